"""Fault injection for ``deepgrpo study`` (``pytest -m faults``): SIGKILL of the study process at
random moments and in the middle of a save, and Ctrl-C.

What must hold: no pool worker outlives its study process; a rerun of the same command finishes
the study with tables byte-identical to an uninterrupted run's; Ctrl-C ends the command promptly
with exit code 130 and one line saying what was kept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from private_mounts import needs_root, run_in_private_mounts  # noqa: E402

pytestmark = pytest.mark.faults

STUDY = "lambda-k"
TABLES = ("runs.csv", "summary.csv", "tuned_lr.csv", "tuning/runs.csv")
"""The study's tables (the figure and study.json carry wall times and are not compared)."""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEEPGRPO_FAILPOINT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _args(out: Path, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "deepgrpo.cli", "study", STUDY, "--smoke", "--seeds", "2", "--workers", str(workers),
            "--no-progress", "--out", str(out)]


def _start(out: Path, workers: int = 2, **env: str) -> subprocess.Popen:
    """The study in its own session (so that its workers can be found, and a Ctrl-C can be sent
    to its whole process group as a terminal would)."""
    return subprocess.Popen(_args(out, workers), env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """In the child before exec: SIGINT at its default, as in a terminal (a shell that starts a
    job in the background without job control, e.g. ``cmd &`` in a script, hands it SIGINT
    ignored, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _session_alive(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    alive = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            alive.append(int(d.name))
    return alive


def _assert_session_ends(sid: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while _session_alive(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _session_alive(sid) == [], f"processes of the killed study survive: {_session_alive(sid)}"


def _tables(out: Path) -> dict[str, bytes]:
    return {t: (out / STUDY / t).read_bytes() for t in TABLES}


def _half_written(out: Path) -> list[Path]:
    """Visible files that a user may load but are empty (temporary files are dot-prefixed)."""
    return [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0
            and not any(part.startswith(".") for part in p.relative_to(out).parts)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference")
    p = subprocess.run(_args(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return _tables(out)


def _wait_for_cells(p: subprocess.Popen, out: Path, timeout_s: float = 60.0) -> None:
    """Wait until the study is running its cells (its pool exists)."""
    deadline = time.monotonic() + timeout_s
    while not (out / STUDY / "tuning" / "cells").is_dir():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_study_killed_at_random_moments_leaves_no_worker_and_reruns_identically(reference, tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "killed"
    kills = 0
    for delay in rng.uniform(0.0, 2.5, size=4):
        p = _start(out)
        _wait_for_cells(p, out)
        time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)  # the study process only, as `kill -9 PID` does
            kills += 1
        p.communicate()
        _assert_session_ends(p.pid)
        assert _half_written(out) == []
    assert kills >= 2
    p = subprocess.run(_args(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _tables(out) == reference


def test_study_killed_while_saving_reruns_identically(reference, tmp_path):
    out = tmp_path / "failpoint"
    # one worker: the study process itself writes every cell; die in the middle of its 5th save
    p = _start(out, workers=1, DEEPGRPO_FAILPOINT="atomic-write:5")
    p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL
    assert _half_written(out) == [] and list(out.rglob(".*.tmp"))  # the half-written file stayed hidden
    p = subprocess.run(_args(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _tables(out) == reference


def test_ctrl_c_stops_the_study_promptly_in_one_line_and_a_rerun_resumes(reference, tmp_path):
    out = tmp_path / "ctrl-c"
    p = _start(out)
    _wait_for_cells(p, out)
    # as soon as a pool worker runs (the whole smoke study takes about 2 s, so a fixed wait could
    # let it finish first): the Ctrl-C must find the study mid-sweep
    deadline = time.monotonic() + 5.0
    while len(_session_alive(p.pid)) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "the study ended before the Ctrl-C could be sent"
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    stdout, stderr = p.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert p.returncode == 130, stderr
    assert elapsed < 5.0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"deepgrpo study: interrupted; study {STUDY}")
    assert "finished and kept in" in lines[0] and "rerun the same command to resume" in lines[0]
    _assert_session_ends(p.pid)
    cells = sorted((out / STUDY).rglob("cells/*.csv"))
    time.sleep(0.5)
    assert sorted((out / STUDY).rglob("cells/*.csv")) == cells  # nothing queued started after Ctrl-C
    p = subprocess.run(_args(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _tables(out) == reference


@pytest.mark.parametrize("group", [True, False], ids=["process-group", "study-process"])
def test_sigterm_stops_the_study_like_ctrl_c_and_a_rerun_resumes(reference, tmp_path, group):
    out = tmp_path / "sigterm"
    p = _start(out)
    _wait_for_cells(p, out)
    deadline = time.monotonic() + 5.0
    while len(_session_alive(p.pid)) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert p.poll() is None, "the study ended before SIGTERM could be sent"
    # a scheduler signals the whole job (the study and its workers), `kill PID` the study alone
    (os.killpg if group else os.kill)(p.pid, signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"deepgrpo study: terminated (SIGTERM); study {STUDY}")
    assert "finished and kept in" in lines[0] and "rerun the same command to resume" in lines[0]
    _assert_session_ends(p.pid)
    assert _half_written(out) == []
    p = subprocess.run(_args(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _tables(out) == reference


def test_a_second_study_process_on_the_same_out_is_refused_and_the_first_finishes(tmp_path):
    out = tmp_path / "two"
    first = subprocess.Popen(_args(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    _wait_for_cells(first, out)
    # the first study (and its pool) is paused while the second one tries the directory, so that
    # the first is surely still running, however fast it is and however loaded the machine
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(_args(out), env=_env(), capture_output=True, text=True, timeout=600)
        assert first.poll() is None, "the first study ended before the second one started"
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepgrpo study: error: --out") and \
        f"is in use by process {first.pid}" in lines[0], second.stderr
    assert _half_written(out) == [] and all((out / STUDY / t).is_file() for t in TABLES)


def _in_private_mounts(script: str) -> subprocess.CompletedProcess:
    return run_in_private_mounts(script, _env())


@needs_root
@pytest.mark.parametrize("size_k,fill_k", [(24, 0), (64, 0), (64, 100)])
def test_disk_full_is_one_line_and_the_study_resumes_once_space_is_freed(reference, tmp_path, size_k, fill_k):
    import shlex
    mnt, out = tmp_path / "mnt", tmp_path / "mnt" / "results"
    mnt.mkdir()
    m, t, cmd = shlex.quote(str(mnt)), shlex.quote(str(tmp_path)), shlex.join(_args(out))
    p = _in_private_mounts(f"""
        mount -t tmpfs -o size={size_k}k tmpfs {m} || exit 97
        dd if=/dev/zero of={m}/filler bs=1k count={fill_k} 2>/dev/null
        {cmd} >/dev/null 2>{t}/err1; echo $? >{t}/rc1
        rm {m}/filler
        cp -r {m} {t}/after1
        mount -o remount,size=20m {m}
        {cmd} >/dev/null 2>{t}/err2; echo $? >{t}/rc2
        cp -r {shlex.quote(str(out))} {t}/copy
    """)
    assert p.returncode != 97, p.stderr
    err = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "2", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"deepgrpo study: error: no space left on device: {mnt}/")
    assert lines[0].endswith("free some space and rerun the same command to resume")
    assert _half_written(tmp_path / "after1") == []
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert _tables(tmp_path / "copy") == reference


@needs_root
def test_a_read_only_out_is_one_line_before_any_work(tmp_path):
    import shlex
    ro = tmp_path / "ro"
    (ro / "results").mkdir(parents=True)
    q, t = shlex.quote(str(ro)), shlex.quote(str(tmp_path))
    outs = (ro / "results", ro / "new")
    script = f"mount --bind {q} {q} && mount -o remount,bind,ro {q} || exit 97\n"
    for i, out in enumerate(outs):
        script += f"{shlex.join(_args(out))} >/dev/null 2>{t}/err{i}; echo $? >{t}/rc{i}\n"
    p = _in_private_mounts(script)
    assert p.returncode != 97, p.stderr
    for i, out in enumerate(outs):
        err = (tmp_path / f"err{i}").read_text()
        assert (tmp_path / f"rc{i}").read_text().strip() == "2", err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"deepgrpo study: error: --out = {str(out)!r} is invalid:")
        assert "read-only file system" in lines[0]
