"""Model tests run on one intra-op thread: the tensors are tiny, so on a busy 2-core machine
thread hand-offs cost more than they save (measured: 10-20x slower with 2 threads)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """torch.set_num_threads(1) for each module's tests, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
