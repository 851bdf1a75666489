"""Output directories of ``deepgrpo sim run|compare``: one writer at a time (a second process
given the same ``--out`` is refused in one line), and a finished run is never silently replaced
(``sim run`` refuses a directory holding one unless ``--force``; a directory a killed run left
without its ``run.json`` is reused)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from deepgrpo.cli import main as deepgrpo_main

RUN = ["sim", "run", "--method", "grpo", "--steps", "2", "--n-problems", "4", "--n-heldout", "0", "--depth", "4",
       "--no-progress"]
HOLDER = textwrap.dedent("""
    import sys
    from deepgrpo.records import lock_output
    for path in sys.argv[1:]:
        lock_output(path)
    print("locked", flush=True)
    sys.stdin.read()  # hold the locks until the test closes stdin
""")


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    n = torch.get_num_threads()  # sims.cli.main sets one thread (tiny tensors)
    yield
    torch.set_num_threads(n)


def hold_locks(*paths) -> subprocess.Popen:
    """A second process holding the output-directory locks of ``paths`` (as a running command
    would) until its stdin is closed."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, paths)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def release(p: subprocess.Popen) -> None:
    p.stdin.close()
    p.wait(timeout=30)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_second_process_on_the_same_out_is_refused_in_one_line(tmp_path, capsys):
    run, cmp_ = tmp_path / "run", tmp_path / "compare"
    holder = hold_locks(run, cmp_)
    try:
        assert deepgrpo_main([*RUN, "--out", str(run)]) == 2
        err = _one_line(capsys)
        assert err.startswith("deepgrpo sim: error: --out") and f"in use by process {holder.pid}" in err
        assert deepgrpo_main(["sim", "compare", "--steps", "1", "--n-problems", "4", "--out", str(cmp_)]) == 2
        assert f"in use by process {holder.pid}" in _one_line(capsys)
        assert not run.exists() and not cmp_.exists()  # nothing was written
    finally:
        release(holder)
    assert deepgrpo_main([*RUN, "--out", str(run)]) == 0  # free once the other process ended
    assert (run / "run.json").is_file()


def test_a_finished_run_is_refused_unless_forced_and_an_unfinished_directory_is_reused(tmp_path, capsys):
    out = tmp_path / "run"
    assert deepgrpo_main([*RUN, "--out", str(out)]) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(files) == {"history.csv", "run.json"}
    capsys.readouterr()
    assert deepgrpo_main([*RUN, "--seed", "3", "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert "--out" in err and "holds a finished run (run.json)" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # untouched
    assert deepgrpo_main([*RUN, "--seed", "3", "--force", "--out", str(out)]) == 0
    assert (out / "history.csv").read_bytes() != files["history.csv"]
    # a run killed before its run.json (written last) leaves no finished run: the directory is reused
    (out / "run.json").unlink()
    assert deepgrpo_main([*RUN, "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()}["history.csv"] == files["history.csv"]
