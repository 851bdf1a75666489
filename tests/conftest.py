"""Test-session setup: one torch thread per test process, caches under a temporary directory,
and (with pytest-xdist installed) one test process per core.

Torch's OpenMP threads spin while waiting; with several test processes (or another CPU-heavy
job) on two cores they fight over the cores and the suite slows down many-fold. Every test
here uses small tensors, so one intra-op thread is also the fastest setting.
"""

import atexit
import os
import shutil
import sys
import tempfile

# before torch (and its OpenMP runtime) is imported, and inherited by every subprocess
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# HF datasets / hub caches go to a temporary directory, never into the user's home
_CACHE = tempfile.mkdtemp(prefix="deepgrpo-tests-hf-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
for var in ("HF_HOME", "HF_DATASETS_CACHE"):
    os.environ[var] = os.path.join(_CACHE, var.lower())
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests/toy_backend.py
torch.set_num_threads(1)


MAX_WORKERS = 4  # more processes than this cost more in start-up and memory than they save here


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """With pytest-xdist installed and no ``-n`` given, run the tests in one process per core
    (at most :data:`MAX_WORKERS`), each test file whole in one process so that its module
    fixtures are built once. One file named on the command line runs in this process (starting
    workers would cost more than it saves), as does everything with ``-n 0``; without pytest-xdist
    (a machine that has only pytest) nothing changes."""
    opt = config.option
    targets = {arg.split("::")[0] for arg in config.args}
    one_file = len(targets) == 1 and os.path.isfile(next(iter(targets)))
    if (getattr(opt, "numprocesses", "absent") is None and not one_file
            and "PYTEST_XDIST_WORKER" not in os.environ):
        opt.numprocesses = "auto"
        if opt.dist == "no":
            opt.dist = "loadfile"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _one_torch_thread_per_test():
    """Every test starts and ends with one torch thread, whatever the code under test set
    (the trainer sets its configured thread count; the simulator's CLI sets one)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for module-scoped fixtures that train (the per-test reset covers tests)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
