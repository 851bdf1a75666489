"""Run records and the command line's promises: one writer per output directory, leftovers of
interrupted writes removed, strict JSON, one line for an operating-system failure, exact
integers and bounded settings files."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deepgrpo.cli import main as deepgrpo_main
from deepgrpo.config import ConfigError
from deepgrpo.flags import MAX_CONFIG_VALUES, load_config_file
from deepgrpo.overrides import coerce
from deepgrpo.records import (
    atomic_write,
    check_writable_dir,
    describe_os_error,
    json_line,
    json_safe,
    lock_output,
    lock_path,
    release_output_locks,
    remove_stale_temps,
    write_json_atomic,
)

HOLD = textwrap.dedent("""
    import sys, time
    from deepgrpo.records import lock_output
    lock_output(sys.argv[1])
    print("locked", flush=True)
    time.sleep(60)
""")


@pytest.fixture(autouse=True)
def _release():
    yield
    release_output_locks()


def _holder(out: Path) -> subprocess.Popen:
    """A second process holding ``out``'s lock (it says so on stdout once it does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_one_writer_per_directory_and_a_killed_writer_frees_it(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(ConfigError, match=rf"--out = .*is in use by process {proc.pid} "):
            lock_output(out)
        assert not out.exists()  # refused before anything was written
    finally:
        proc.kill()
        proc.wait()
    assert lock_output(out) == out.resolve()  # kill -9 released it
    assert lock_output(out) == out.resolve()  # taking it again in the same process is a no-op
    assert lock_path(out) == tmp_path / ".run.lock"


def test_the_command_line_refuses_a_busy_directory_in_one_line(tmp_path, capsys):
    out = tmp_path / "cmp"
    proc = _holder(out)
    try:
        code = deepgrpo_main(["sim", "run", "--method", "grpo", "--steps", "1", "--out", str(out), "--no-progress"])
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is in use by process" in err
    assert not out.exists()


def test_a_command_releases_its_lock_when_it_ends(tmp_path):
    out = tmp_path / "run"
    assert deepgrpo_main(["sim", "run", "--method", "grpo", "--steps", "1", "--out", str(out), "--no-progress"]) == 0
    code = subprocess.run([sys.executable, "-c", "import sys; from deepgrpo.records import lock_output; "
                           "lock_output(sys.argv[1])", str(out)], capture_output=True, text=True)
    assert code.returncode == 0, code.stderr


def test_taking_the_lock_removes_what_interrupted_atomic_writes_left(tmp_path):
    out = tmp_path / "study"
    (out / "cells").mkdir(parents=True)
    left = [out / ".history.csv.abc123.tmp", out / "cells" / ".c1.csv.x.tmp", tmp_path / ".study.q1.tmp"]
    for p in left:
        p.write_text("partial")
    (out / ".model.z.tmp").mkdir()
    (out / ".model.z.tmp" / "weights").write_text("partial")
    kept = [out / "history.csv", out / "cells" / "c1.csv", out / ".hidden"]
    for p in kept:
        p.write_text("done")
    lock_output(out)
    assert not any(p.exists() for p in left) and not (out / ".model.z.tmp").exists()
    assert all(p.read_text() == "done" for p in kept)
    assert remove_stale_temps(out) == 0


def test_a_failed_write_names_its_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "table.csv"

    def fill_the_disk(p: Path) -> None:
        p.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises, with no file name

    with pytest.raises(OSError) as info:
        atomic_write(target, fill_the_disk)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []
    line = describe_os_error(info.value)
    assert line.startswith(f"no space left on device: {target}") and "rerun the same command" in line
    assert "\n" not in line


def test_strict_json_never_writes_nan_or_infinity(tmp_path):
    import numpy as np
    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": np.array([np.nan, 2.0]), "d": np.float64(np.inf),
           "e": Path("x"), "f": 3}
    assert json_safe(obj) == {"a": None, "b": [None, None, 1.5], "c": [None, 2.0], "d": None, "e": "x", "f": 3}
    line = json_line(obj)
    assert "NaN" not in line and "Infinity" not in line and "\n" not in line
    write_json_atomic(tmp_path / "r.json", obj)
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c))["b"][0] is None


def test_an_empty_or_unwritable_out_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--out is empty"):
        check_writable_dir("")
    with pytest.raises(ConfigError, match="--out is empty"):
        check_writable_dir("  ")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        check_writable_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_writable_dir(tmp_path / "file" / "sub")
    assert check_writable_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"


def test_the_command_line_refuses_an_empty_out_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert deepgrpo_main(["sim", "run", "--method", "grpo", "--steps", "1", "--out", "", "--no-progress"]) == 2
    assert "--out is empty" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_integers_are_exact_at_any_size():
    big = 2**64 + 1  # not a float: float(2**64 + 1) == 2**64
    assert coerce("run", "seed", int, str(big)) == big
    assert coerce("run", "seed", int, f" +{big} ") == big
    assert coerce("run", "seed", int, "8.0") == 8 and coerce("run", "seed", int, "1e3") == 1000
    for bad in ("8.5", "inf", "nan", "1e400000000", "abc", str(big) + ".5"):
        with pytest.raises(ConfigError, match="expected an integer"):
            coerce("run", "seed", int, bad)


def test_a_seed_above_2_to_the_53_reaches_the_run_record_exactly(tmp_path):
    seed = 2**60 + 1
    out = tmp_path / "run"
    assert deepgrpo_main(["sim", "run", "--method", "grpo", "--steps", "1", "--seed", str(seed), "--spec-seed",
                          str(seed + 2), "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["seed"] == seed and record["problem_set_seed"] == seed + 2


def test_yaml_aliases_are_bounded(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b 0.5\nlam: *b\n")
    assert load_config_file(ok) == {"base": 0.5, "lam": 0.5}
    bomb = tmp_path / "bomb.yaml"  # 9 levels of 9 aliases: 72 aliases that expand to 9**9 values
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nlam: *a8\n")
    with pytest.raises(ConfigError, match=f"aliases expand to more than {MAX_CONFIG_VALUES:,} values"):
        load_config_file(bomb)
    many = tmp_path / "many.yaml"
    many.write_text("a: &a 1\nb: [" + ",".join(["*a"] * 101) + "]\n")
    with pytest.raises(ConfigError, match="more than 100 aliases"):
        load_config_file(many)
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"lam": 1.0, "pad": "x" * (2 << 20)}))
    with pytest.raises(ConfigError, match="more than a settings file holds"):
        load_config_file(huge)


def test_an_error_message_about_a_huge_value_stays_short():
    with pytest.raises(ConfigError) as info:
        coerce("LossConfig", "lam", float, ["x"] * 10**6)
    assert len(str(info.value)) < 300


@pytest.mark.faults
def test_sigterm_stops_a_command_like_ctrl_c_with_exit_143(tmp_path):
    """A scheduler's SIGTERM: one line, exit 143 (128 + 15), and the lock released."""
    import signal
    import time
    out = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, "-m", "deepgrpo.cli", "sim", "run", "--method", "deep-grpo",
                             "--steps", "100000", "--out", str(out), "--no-progress"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not lock_path(out).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().count("\n") == 0 and "terminated (SIGTERM)" in err
    lock_output(out)  # free again
