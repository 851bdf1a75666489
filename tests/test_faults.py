"""Fault injection (``pytest -m faults``): processes killed with SIGKILL at random moments and in
the middle of saves (``deepgrpo.records.failpoint``), then resumed; corrupt inputs of every kind.

What must hold: a resumed run ends exactly where the uninterrupted one does (metrics and
weights); no user-visible file is ever half-written (temporary files are hidden, dot-prefixed);
every bad input ends in exit code 2 and one line naming what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.faults

DATA = Path(__file__).resolve().parents[1] / "llm" / "data" / "arith_sample.jsonl"
VOLATILE = ("time_explore_s", "time_update_s", "wall_time_s")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEEPGRPO_FAILPOINT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _deepgrpo(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepgrpo.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=_env(**env), timeout=600)


def _killed_after(args: list[str], cwd: Path, delay_s: float) -> int:
    """Start ``deepgrpo ARGS``, SIGKILL it after ``delay_s`` (if still running); its exit code."""
    p = subprocess.Popen([sys.executable, "-m", "deepgrpo.cli", *args], cwd=cwd, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(delay_s)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
    return p.returncode


def _visible_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)]


def _assert_complete(d: Path) -> None:
    """Every visible file a user may load parses completely."""
    for f in _visible_files(d):
        assert f.stat().st_size > 0, f
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".jsonl":
            for line in f.read_text().splitlines():
                json.loads(line)
        elif f.suffix == ".csv":
            import pandas as pd
            pd.read_csv(f)
        elif f.suffix == ".safetensors":
            from safetensors.torch import load_file
            load_file(str(f))


def _stable_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def _weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file
    return {k: v.numpy() for k, v in load_file(str(run / "checkpoint" / "model.safetensors")).items()}


# -- the LLM trainer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    """A micro model, with an evaluation file disjoint from DATA beside it (``heldout.jsonl``)."""
    from llm.models import save_pretrained_dir
    from llm.testing import micro_model, write_arith_heldout
    model, tok = micro_model(seed=0)
    base = tmp_path_factory.mktemp("micro")
    write_arith_heldout(base / "heldout.jsonl")
    return save_pretrained_dir(model, tok, base / "model")


def _train_args(model_dir: Path, out: Path) -> list[str]:
    heldout = Path(model_dir).parent / "heldout.jsonl"
    return ["llm", "train", "--model", str(model_dir), "--data", str(DATA), "--eval-data", str(heldout),
            "--method", "deep-grpo", "--G", "4", "--K", "4", "--prompts-per-step", "4", "--steps", "6", "--lr", "3e-3",
            "--checkpoint-every", "1", "--eval-problems", "4", "--eval-samples", "2", "--max-response-tokens", "40",
            "--threads", "1", "--no-tensorboard", "--seed", "5",
            "--out", str(out)]


def _finish(model_dir: Path, out: Path, cwd: Path) -> None:
    """Resume ``out`` to the end (a run that never checkpointed starts again from step 0), or
    start it again if it never wrote its config."""
    if (out / "config.json").is_file():
        p = _deepgrpo(["llm", "train", "--resume", "--out", str(out)], cwd)
    else:
        shutil.rmtree(out, ignore_errors=True)
        p = _deepgrpo(_train_args(model_dir, out), cwd)
    assert p.returncode == 0, p.stderr[-2000:]


def test_llm_training_killed_at_random_moments_and_during_saves_resumes_to_the_same_run(micro_dir, tmp_path):
    ref = tmp_path / "ref"
    p = _deepgrpo(_train_args(micro_dir, ref), tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    rng = np.random.default_rng(0)
    # SIGKILL at random moments: several kills of one run, each followed by --resume
    run = tmp_path / "random"
    for delay in sorted(rng.uniform(2.0, 12.0, size=3)):
        args = (["llm", "train", "--resume", "--out", str(run)] if (run / "config.json").is_file()
                else _train_args(micro_dir, run))
        if not (run / "config.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
        _killed_after(args, tmp_path, delay)
        _assert_complete(run) if run.exists() else None
    _finish(micro_dir, run, tmp_path)
    # SIGKILL inside a save: half-way through the checkpoint and between its two renames
    for point in ("checkpoint-half-written:3", "checkpoint-between-renames:1", "checkpoint-between-renames:4",
                  "atomic-write:5"):
        out = tmp_path / point.replace(":", "-")
        p = _deepgrpo(_train_args(micro_dir, out), tmp_path, DEEPGRPO_FAILPOINT=point)
        assert p.returncode == -signal.SIGKILL, (point, p.returncode, p.stderr[-500:])
        _assert_complete(out)
        _finish(micro_dir, out, tmp_path)
    for out in [run, *(tmp_path / x for x in ("checkpoint-half-written-3", "checkpoint-between-renames-1",
                                              "checkpoint-between-renames-4", "atomic-write-5"))]:
        assert _stable_rows(out) == _stable_rows(ref), out.name
        w, w_ref = _weights(out), _weights(ref)
        assert w.keys() == w_ref.keys() and all(np.array_equal(w[k], w_ref[k]) for k in w), out.name
        _assert_complete(out)


def test_sft_killed_while_saving_leaves_no_model_directory(tmp_path):
    out = tmp_path / "sft"
    args = ["llm", "sft", "--steps", "3", "--batch-size", "8", "--eval-problems", "8", "--eval-samples", "0",
            "--threads", "1", "--out", str(out)]
    p = _deepgrpo(args, tmp_path, DEEPGRPO_FAILPOINT="atomic-directory")
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()  # only a hidden temporary directory, never a half-written model
    assert _visible_files(tmp_path) == []
    p = _deepgrpo(args, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    from llm.models import check_model_dir
    check_model_dir(out)
    _assert_complete(out)


# -- the simulator --------------------------------------------------------------------------------


def test_sim_run_killed_anywhere_leaves_complete_files_and_reruns_identically(tmp_path):
    args = ["sim", "run", "--method", "deep-grpo", "--steps", "40", "--n-problems", "16", "--no-progress"]
    ref = tmp_path / "ref"
    assert _deepgrpo([*args, "--out", str(ref)], tmp_path).returncode == 0
    reference = (ref / "history.csv").read_bytes()
    rng = np.random.default_rng(1)
    for i, delay in enumerate(rng.uniform(0.5, 4.0, size=3)):
        out = tmp_path / f"k{i}"
        _killed_after([*args, "--out", str(out)], tmp_path, delay)
        if out.exists():
            _assert_complete(out)
        # rerunning the same command: a killed run (no run.json, written last) is run again in the
        # same directory; a finished one is kept, and the rerun refused in one line
        finished = {f.name: f.read_bytes() for f in _visible_files(out)} if (out / "run.json").is_file() else None
        p = _deepgrpo([*args, "--out", str(out)], tmp_path)
        if finished is None:
            assert p.returncode == 0, p.stderr[-2000:]
        else:
            assert p.returncode == 2 and "holds a finished run (run.json)" in p.stderr, p.stderr[-2000:]
            assert {f.name: f.read_bytes() for f in _visible_files(out)} == finished
        assert (out / "history.csv").read_bytes() == reference
    out = tmp_path / "fp"
    p = _deepgrpo([*args, "--out", str(out)], tmp_path, DEEPGRPO_FAILPOINT="atomic-write:2")  # run.json half-way
    assert p.returncode == -signal.SIGKILL
    _assert_complete(out)
    assert [f.name for f in _visible_files(out)] == ["history.csv"]
    assert _deepgrpo([*args, "--out", str(out)], tmp_path).returncode == 0
    assert (out / "history.csv").read_bytes() == reference
    p = _deepgrpo([*args, "--out", str(out)], tmp_path)  # now finished: a rerun would replace it
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--force" in p.stderr, p.stderr[-2000:]


# -- corrupt inputs ---------------------------------------------------------------------------------


def _one_line_exit_2(p: subprocess.CompletedProcess, *fragments: str) -> None:
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-1500:])
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-1500:]
    for f in fragments:
        assert f in err[0], (f, err[0])


def test_every_kind_of_corrupt_input_is_one_line_and_exit_2(micro_dir, tmp_path):
    d = tmp_path
    train = ["llm", "train", "--method", "grpo", "--steps", "1", "--threads", "1", "--no-tensorboard"]

    def broken_model(name: str, edit) -> Path:
        m = d / name
        shutil.copytree(micro_dir, m)
        edit(m)
        return m

    models = {
        "empty config": broken_model("m1", lambda m: (m / "config.json").write_text("")),
        "corrupt config": broken_model("m2", lambda m: (m / "config.json").write_text("{not json")),
        "unknown type": broken_model("m3", lambda m: (m / "config.json").write_text(
            json.dumps({**json.loads((micro_dir / "config.json").read_text()), "model_type": "no-such-arch"}))),
        "no tokenizer": broken_model("m4", lambda m: [(m / f).unlink() for f in os.listdir(m) if "token" in f]),
        "truncated weights": broken_model("m5", lambda m: (m / "model.safetensors").write_bytes(
            (m / "model.safetensors").read_bytes()[:200])),
    }
    for name, m in models.items():
        out = d / f"out-{m.name}"
        p = _deepgrpo([*train, "--model", str(m), "--data", str(DATA), "--out", str(out)], d)
        _one_line_exit_2(p, "--model", str(m))
        assert not out.exists(), name
        p = _deepgrpo(["llm", "eval", "--model", str(m), "--eval-problems", "2", "--eval-samples", "0"], d)
        _one_line_exit_2(p, "--model")
    files = {"empty.jsonl": "", "bad.jsonl": '{"question": "1+1=", "answer": "2"}\n{"question": \n',
             "list.jsonl": "[1, 2]\n", "bad.parquet": "PAR1 not really", "notes.txt": "hello"}
    for name, text in files.items():
        f = d / name
        f.write_text(text)
        p = _deepgrpo([*train, "--model", str(micro_dir), "--data", str(f), "--out", str(d / "o")], d)
        _one_line_exit_2(p, "--data", name)
        assert not (d / "o").exists()
    p = _deepgrpo([*train, "--model", str(micro_dir), "--data", str(d / "bad.jsonl"), "--out", str(d / "o")], d)
    _one_line_exit_2(p, "line 2")
    # config files
    (d / "bad.yaml").write_text("steps: [1,\n")
    (d / "list.json").write_text("[1, 2]")
    for cfg in ("bad.yaml", "list.json"):
        _one_line_exit_2(_deepgrpo(["sim", "run", "--method", "grpo", "--config", str(d / cfg), "--out",
                                    str(d / "s")], d), "--config", cfg)
        _one_line_exit_2(_deepgrpo([*train, "--config", str(d / cfg), "--out", str(d / "o")], d), "--config")
    # a run to resume, then its checkpoint state and its config corrupted
    run = d / "run"
    p = _deepgrpo([*train, "--model", str(micro_dir), "--data", str(DATA), "--G", "2", "--prompts-per-step", "2",
                   "--eval-problems", "2", "--eval-samples", "0", "--max-response-tokens", "30",
                   "--out", str(run)], d)
    assert p.returncode == 0, p.stderr[-1500:]
    metrics = (run / "metrics.jsonl").read_bytes()
    state = run / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    _one_line_exit_2(_deepgrpo(["llm", "train", "--resume", "--steps", "2", "--out", str(run)], d),
                     "--resume", "trainer_state.pt")
    state.unlink()
    _one_line_exit_2(_deepgrpo(["llm", "train", "--resume", "--steps", "2", "--out", str(run)], d),
                     "--resume", "trainer_state.pt", "missing")
    assert (run / "metrics.jsonl").read_bytes() == metrics  # never overwritten
    (run / "config.json").write_text("{")
    _one_line_exit_2(_deepgrpo(["llm", "train", "--resume", "--out", str(run)], d), "--resume", "config.json")
    # an output that is a file
    (d / "afile").write_text("x")
    _one_line_exit_2(_deepgrpo(["sim", "run", "--method", "grpo", "--out", str(d / "afile")], d), "--out")
    _one_line_exit_2(_deepgrpo([*train, "--model", str(micro_dir), "--out", str(d / "afile" / "sub")], d), "--out")
    _one_line_exit_2(_deepgrpo(["sim", "compare", "--out", str(d / "afile")], d), "--out")


def test_ctrl_c_stops_training_promptly_with_one_line_saying_what_was_saved(micro_dir, tmp_path):
    out = tmp_path / "run"
    args = _train_args(micro_dir, out)
    args[args.index("--steps") + 1] = "500"
    p = subprocess.Popen([sys.executable, "-m", "deepgrpo.cli", *args], cwd=tmp_path, env=_env(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint").is_dir() and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    t0 = time.time()
    _, err = p.communicate(timeout=60)
    assert time.time() - t0 < 20
    lines = [line for line in err.strip().splitlines() if "interrupted" in line]
    assert p.returncode == 130 and len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in err
    # the step it names is the checkpoint's, and everything on disk is complete
    import re

    import torch
    named = int(re.search(r"checkpoint \(step (\d+)\)", lines[0]).group(1))
    assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == named >= 1
    _assert_complete(out)
