"""Faults of the LLM trainer's environment (``pytest -m faults``): a disk that fills up during
``llm train`` and ``llm sft`` (a small tmpfs in a private mount namespace), SIGTERM from a
scheduler, a second process on the same ``--out``, a read-only output path.

What must hold: every failure ends in one line naming what happened and where, with exit code
2 (143 after SIGTERM); nothing visible is half-written; the run resumes once the cause is gone
and ends exactly where an undisturbed run ends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from private_mounts import needs_root, run_in_private_mounts  # noqa: E402

pytestmark = pytest.mark.faults

DATA = Path(__file__).resolve().parents[1] / "llm" / "data" / "arith_sample.jsonl"
VOLATILE = ("time_explore_s", "time_update_s", "wall_time_s")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEEPGRPO_FAILPOINT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _deepgrpo(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepgrpo.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(), timeout=600)


def _default_signals() -> None:
    """In the child: SIGINT and SIGTERM at their defaults, as in a terminal or under a scheduler
    (a CI job started in the background inherits them ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "deepgrpo.cli", *args], cwd=cwd, env=_env(),
                            preexec_fn=_default_signals, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _error_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _stable_rows(run: Path) -> list[dict]:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    rows = [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file
    return {k: v.numpy() for k, v in load_file(str(run / "checkpoint" / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> tuple[Path, Path]:
    """(micro model directory, an evaluation file disjoint from DATA)."""
    from llm.testing import save_micro_model, write_arith_heldout
    base = tmp_path_factory.mktemp("micro")
    return save_micro_model(base / "model"), write_arith_heldout(base / "heldout.jsonl")


def _train_args(micro: tuple[Path, Path], out: Path, steps: int = 12) -> list[str]:
    model, heldout = micro
    return ["llm", "train", "--model", str(model), "--data", str(DATA), "--eval-data", str(heldout),
            "--method", "deep-grpo", "--G", "4", "--K", "4", "--prompts-per-step", "4", "--steps", str(steps),
            "--lr", "3e-3", "--checkpoint-every", "1", "--eval-problems", "4", "--eval-samples", "2",
            "--max-response-tokens", "40", "--threads", "1", "--seed", "5", "--out", str(out)]


def _in_private_mounts(script: str, mount_setup: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run Python ``script`` in a private mount namespace after the shell commands
    ``mount_setup`` (mounts there vanish with the namespace and never touch the machine's)."""
    path = cwd / "scenario.py"
    path.write_text(textwrap.dedent(script))
    p = run_in_private_mounts(f"{mount_setup} && exec {sys.executable} {path}", _env(), cwd=cwd, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@needs_root
def test_disk_full_during_training_and_sft_is_one_line_and_resumes_to_the_same_run(micro, tmp_path):
    ref = tmp_path / "ref"
    p = _deepgrpo([*_train_args(micro, ref), "--no-tensorboard"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
        import json, os, shutil, subprocess, sys, time
        mnt, run, sft = {str(mnt)!r}, {str(mnt / "run")!r}, {str(mnt / "sft")!r}
        env = {{**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}}
        cli = [sys.executable, "-m", "deepgrpo.cli"]

        def fill(leave=0):
            # fill the tmpfs up to `leave` free bytes
            st = os.statvfs(mnt)
            todo = st.f_bavail * st.f_frsize - leave
            with open(os.path.join(mnt, "filler"), "ab", buffering=0) as f:
                for chunk in (65536, 512):
                    try:
                        while todo >= chunk or (not leave and todo > 0):
                            f.write(b"x" * chunk)
                            todo -= chunk
                    except OSError:
                        pass

        def visible():
            found = [os.path.relpath(os.path.join(d, f), mnt) for d, ds, fs in os.walk(mnt) for f in fs]
            return sorted(r for r in found if r != "filler" and not any(p.startswith(".") for p in r.split("/")))

        out = {{}}
        # the disk fills up while the run trains (after its first checkpoint), tensorboard on
        train = subprocess.Popen(cli + {_train_args(micro, mnt / "run")!r}, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not os.path.isdir(os.path.join(run, "checkpoint")) and time.time() < deadline:
            time.sleep(0.05)
        fill()
        _, err = train.communicate(timeout=600)
        out["train_full"] = {{"code": train.returncode, "err": err}}
        out["metrics_full"] = open(os.path.join(run, "metrics.jsonl")).read()
        # still full: the resume fails the same way, and keeps the run resumable
        p = subprocess.run(cli + ["llm", "train", "--resume", "--out", run], env=env, capture_output=True, text=True)
        out["resume_full"] = {{"code": p.returncode, "err": p.stderr}}
        os.remove(os.path.join(mnt, "filler"))
        p = subprocess.run(cli + ["llm", "train", "--resume", "--out", run], env=env, capture_output=True, text=True)
        out["resume_freed"] = {{"code": p.returncode, "err": p.stderr[-3000:]}}
        shutil.copytree(run, {str(tmp_path / "resumed")!r}, ignore=shutil.ignore_patterns("tb"))
        # sft on a disk with room for its lock file but not its model: one line, no model directory; the
        # same command works once space is freed
        shutil.rmtree(run)
        fill(leave=32768)
        sft_args = cli + ["llm", "sft", "--steps", "3", "--batch-size", "8", "--eval-problems", "8",
                          "--eval-samples", "0", "--threads", "1", "--out", sft]
        p = subprocess.run(sft_args, env=env, capture_output=True, text=True)
        out["sft_full"] = {{"code": p.returncode, "err": p.stderr, "visible": visible()}}
        os.remove(os.path.join(mnt, "filler"))
        p = subprocess.run(sft_args, env=env, capture_output=True, text=True)
        out["sft_freed"] = {{"code": p.returncode, "err": p.stderr[-3000:], "visible": visible()}}
        print(json.dumps(out))
    """
    p = _in_private_mounts(script, f"mount -t tmpfs -o size=8m tmpfs {mnt}", tmp_path)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    full = res["train_full"]
    assert full["code"] == 2, full["err"][-2000:]
    line = _error_line(full["err"], "no space left on device", str(mnt / "run"), "--resume")
    assert re.search(r"free some space: the last checkpoint \(step \d+\) is in", line), line
    assert int(re.search(r"step (\d+)", line).group(1)) < 12  # it stopped before the end
    assert res["resume_full"]["code"] == 2
    _error_line(res["resume_full"]["err"], "no space left on device")
    for text in res["metrics_full"].splitlines():  # complete, strict JSON lines only
        json.loads(text, parse_constant=lambda name: 1 / 0)
    assert res["resume_freed"]["code"] == 0, res["resume_freed"]["err"]
    resumed = tmp_path / "resumed"
    assert _stable_rows(resumed) == _stable_rows(ref)
    w, w_ref = _weights(resumed), _weights(ref)
    assert w.keys() == w_ref.keys() and all(np.array_equal(w[k], w_ref[k]) for k in w)
    sft = res["sft_full"]
    assert sft["code"] == 2 and sft["visible"] == [], sft
    _error_line(sft["err"], "no space left on device", str(mnt / "sft"))
    assert res["sft_freed"]["code"] == 0, res["sft_freed"]["err"]
    assert "sft/model.safetensors" in res["sft_freed"]["visible"]


def test_sigterm_stops_training_like_ctrl_c_with_one_line_and_exit_143(micro, tmp_path):
    out = tmp_path / "run"
    p = _popen([*_train_args(micro, out, steps=500), "--no-tensorboard"], tmp_path)
    deadline = time.time() + 120
    while not (out / "checkpoint").is_dir() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    t0 = time.time()
    _, err = p.communicate(timeout=60)
    assert time.time() - t0 < 20
    lines = [line for line in err.strip().splitlines() if "terminated" in line]
    assert p.returncode == 143 and len(lines) == 1 and "Traceback" not in err, (p.returncode, err[-2000:])
    assert "--resume" in lines[0]
    import torch
    named = int(re.search(r"checkpoint \(step (\d+)\)", lines[0]).group(1))
    assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == named >= 1
    q = _deepgrpo(["llm", "train", "--resume", "--steps", str(named + 1), "--out", str(out)], tmp_path)
    assert q.returncode == 0, q.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == named + 1


def test_a_second_process_on_the_same_out_is_refused_while_the_first_runs(micro, tmp_path):
    out = tmp_path / "run"
    first = _popen([*_train_args(micro, out, steps=500), "--no-tensorboard"], tmp_path)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").is_file() and time.time() < deadline:
            time.sleep(0.2)
        config = (out / "config.json").read_text()
        for args in ([*_train_args(micro, out), "--method", "grpo"],
                     ["llm", "train", "--resume", "--out", str(out)],
                     ["llm", "sft", "--steps", "1", "--batch-size", "2", "--force", "--out", str(out)]):
            p = _deepgrpo(args, tmp_path)
            assert p.returncode == 2, (args, p.stderr[-2000:])
            _error_line(p.stderr, "--out", "in use", f"process {first.pid}")
        assert first.poll() is None and (out / "config.json").read_text() == config
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 130
    assert json.loads((out / "config.json").read_text())["train"]["method"] == "deep-grpo"


@needs_root
def test_eval_to_a_read_only_place_is_refused_before_evaluating(micro, tmp_path):
    model, _ = micro
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
        import json, subprocess, sys, time
        cli = [sys.executable, "-m", "deepgrpo.cli", "llm", "eval", "--eval-problems", "256", "--eval-samples", "8",
               "--threads", "1"]
        out = {{}}
        for name, args in (("out", ["--model", {str(model)!r}, "--out", {str(mnt / "ro" / "ev.json")!r}]),
                           ("default", ["--model", {str(mnt / "ro" / "model")!r}])):
            t0 = time.time()
            p = subprocess.run(cli + args, capture_output=True, text=True)
            out[name] = {{"code": p.returncode, "err": p.stderr, "out": p.stdout, "seconds": time.time() - t0}}
        print(json.dumps(out))
    """
    setup = (f"mount -t tmpfs -o size=4m tmpfs {mnt} && mkdir {mnt}/ro && cp -r {model} {mnt}/ro/model && "
             f"mount --bind {mnt}/ro {mnt}/ro && mount -o remount,ro,bind {mnt}/ro")
    res = json.loads(_in_private_mounts(script, setup, tmp_path).stdout.strip().splitlines()[-1])
    for name, where in (("out", mnt / "ro" / "ev.json"), ("default", mnt / "ro" / "model" / "eval" / "arith.json")):
        r = res[name]
        assert r["code"] == 2 and r["out"] == "", r
        _error_line(r["err"], "--out", str(where), "cannot be written")
