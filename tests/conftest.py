import os
import sys

import torch

# tests run from any folder, on the CPU, with few threads (CI machines have 2 cores)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))
