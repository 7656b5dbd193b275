"""Training tests run torch on one thread: the machine's cores are shared, and two threads
under contention are many times slower than one for these tiny models."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
