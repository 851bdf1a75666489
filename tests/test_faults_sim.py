"""Fault injection for ``deepgrpo sim run`` (``pytest -m faults``): a full disk, a read-only
output directory (each in a private mount namespace: ``unshare -m``, as root), a second process
on the same ``--out``, and SIGTERM.

What must hold: one line and exit code 2 naming what is wrong (exit 143 after SIGTERM); the
output directory stays resumable, and rerunning the same command once the cause is gone gives
the files an undisturbed run gives.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from private_mounts import needs_root, run_in_private_mounts  # noqa: E402

pytestmark = pytest.mark.faults

ARGS = ["sim", "run", "--method", "deep-grpo", "--steps", "40", "--n-problems", "16", "--no-progress"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEEPGRPO_FAILPOINT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _command(out: Path, args: list[str] = ARGS) -> list[str]:
    return [sys.executable, "-m", "deepgrpo.cli", *args, "--out", str(out)]


def in_private_mounts(script: str) -> subprocess.CompletedProcess:
    return run_in_private_mounts(script, _env())


def _one_line_exit_2(rc: str, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert rc.strip() == "2", (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("reference") / "run"
    p = subprocess.run(_command(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return (out / "history.csv").read_bytes()


@needs_root
@pytest.mark.parametrize("size_k,fill_k", [(12, 0), (64, 100)], ids=["fills-up-while-writing", "full-from-the-start"])
def test_disk_full_is_one_line_and_the_run_resumes_once_space_is_freed(reference, tmp_path, size_k, fill_k):
    mnt, out = tmp_path / "mnt", tmp_path / "mnt" / "run"
    mnt.mkdir()
    cmd = shlex.join(_command(out))
    m, t = shlex.quote(str(mnt)), shlex.quote(str(tmp_path))
    p = in_private_mounts(f"""
        mount -t tmpfs -o size={size_k}k tmpfs {m} || exit 97
        dd if=/dev/zero of={m}/filler bs=1k count={fill_k} 2>/dev/null
        {cmd} >/dev/null 2>{t}/err1; echo $? >{t}/rc1
        ls -A {shlex.quote(str(out))} >{t}/left1 2>/dev/null
        rm {m}/filler; mount -o remount,size=4m {m}
        {cmd} >/dev/null 2>{t}/err2; echo $? >{t}/rc2
        cp {shlex.quote(str(out))}/history.csv {t}/history.csv
    """)
    assert p.returncode != 97, p.stderr
    _one_line_exit_2((tmp_path / "rc1").read_text(), (tmp_path / "err1").read_text(),
                     f"deepgrpo sim: error: no space left on device: {mnt}/",
                     "free some space and rerun the same command to resume")
    assert (tmp_path / "left1").read_text().split() == []  # no half-written file, no temporary file
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert (tmp_path / "history.csv").read_bytes() == reference


@needs_root
def test_a_read_only_out_is_one_line_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    (ro / "run").mkdir(parents=True)
    q = shlex.quote(str(ro))
    t = shlex.quote(str(tmp_path))
    script = f"mount --bind {q} {q} && mount -o remount,bind,ro {q} || exit 97\n"
    for i, out in enumerate((ro / "run", ro / "new" / "run")):
        script += f"{shlex.join(_command(out))} >/dev/null 2>{t}/err{i}; echo $? >{t}/rc{i}\n"
    p = in_private_mounts(script)
    assert p.returncode != 97, p.stderr
    for i, out in enumerate((ro / "run", ro / "new" / "run")):
        _one_line_exit_2((tmp_path / f"rc{i}").read_text(), (tmp_path / f"err{i}").read_text(),
                         f"--out = {str(out)!r} is invalid:", "read-only file system")


def _holds_lock(p: subprocess.Popen, out: Path, timeout_s: float = 60.0) -> None:
    """Wait until process ``p`` holds the lock of output directory ``out``."""
    lock = out.parent / f".{out.name}.lock"
    deadline = time.monotonic() + timeout_s
    while not (lock.is_file() and f"process {p.pid} " in lock.read_text()):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_second_process_is_refused_and_sigterm_leaves_the_directory_resumable(reference, tmp_path):
    out = tmp_path / "run"
    long = [*ARGS[:ARGS.index("--steps")], "--steps", "100000", *ARGS[ARGS.index("--steps") + 2:]]
    first = subprocess.Popen(_command(out, long), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        _holds_lock(first, out)
        second = subprocess.run(_command(out), env=_env(), capture_output=True, text=True, timeout=600)
        _one_line_exit_2(str(second.returncode), second.stderr, "deepgrpo sim: error: --out",
                         f"is in use by process {first.pid}")
        first.send_signal(signal.SIGTERM)  # what a scheduler sends: stops like Ctrl-C
        _, err = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 143, err
    assert err.strip().splitlines() == ["deepgrpo sim: terminated (SIGTERM); results are written only when "
                                        "complete, so nothing was left half-written"]
    assert not (out / "run.json").exists()  # no finished run: the same directory is reused
    p = subprocess.run(_command(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "history.csv").read_bytes() == reference
