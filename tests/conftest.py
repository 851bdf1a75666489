"""Test-session setup: one torch thread per test process, caches under a temporary directory.

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
