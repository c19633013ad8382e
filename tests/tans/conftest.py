"""Library unit tests run torch on one thread.

With two OpenMP threads on two cores, any other busy process (a Ray job, a parallel test run)
makes every op wait for a descheduled thread: a tiny training step then takes ~10x longer. One
thread is nearly as fast when the machine is idle and stays fast when it is not.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
