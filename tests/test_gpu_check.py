"""gpu_check.py on a machine without a GPU: a clear refusal, no traceback, nothing written."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_GPU = torch.cuda.is_available() or (getattr(torch.backends, "mps", None) is not None
                                        and torch.backends.mps.is_available())


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible: gpu_check.py would run for minutes")
def test_gpu_check_without_a_gpu_says_so_and_exits_non_zero(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, "gpu_check.py", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "no CUDA or MPS GPU is visible" in done.stderr and "--device cpu" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
