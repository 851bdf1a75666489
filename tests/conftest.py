import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/toy_backend.py
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_torch_thread():
    """The simulator's tensors are tiny: intra-op threads only add overhead (several-fold)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
