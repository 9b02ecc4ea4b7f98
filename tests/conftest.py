import os
import sys

import pytest
import torch

# tests run from any folder, on the CPU, with few threads (CI machines have 2 cores)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module that asks for it: the toys and the course demos are many
    tiny operators (as they run from the command line), and thread hand-offs cost more than they
    gain on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
