"""A failing or hung process under torchrun (gloo, 2 CPU processes) brings every process down,
with a message on each that names the rank that failed and its error (distributed.stop_all via
script.cli), within the process group's timeout (--dist_timeout)."""

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The driver runs train_math.py's main through script.cli, as `python train_math.py` does, with the
# SFT loss of one rank replaced: at its third call it raises, or hangs first when HANG is set.
DRIVER = """
import os, sys, time
sys.path.insert(0, {root!r})
import nanoopd.sft as sft
import train_math
from nanoopd.script import cli
real, calls = sft.sft_loss, []

def failing_loss(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        if os.environ.get("HANG"):
            time.sleep(600)  # a rank that hangs without a word
        raise FloatingPointError("injected failure at step 2")
    return real(*args, **kwargs)

sft.sft_loss = failing_loss
cli(lambda: train_math.main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, hang: bool):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"HANG": "1"} if hang else {})}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(driver), "--stages", "teacher", "--out_dir",
                        str(tmp_path / "out"), "--t_layer", "1", "--t_embd", "16", "--t_head", "2", "--t_steps", "6",
                        "--batch_size", "4", "--digits", "1", "--log_every", "1", "--device", "cpu",
                        "--dist_timeout", "5"], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    return r, time.time() - t0


def test_a_rank_that_raises_ends_every_rank_naming_it(tmp_path):
    r, seconds = torchrun(tmp_path, hang=False)
    assert r.returncode != 0
    err = r.stderr
    assert "error: rank 1: FloatingPointError: injected failure at step 2" in err  # rank 1 says it
    assert "(rank 0 stopped with it)" in err  # and rank 0 names it
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err  # an expected error: no traceback
    assert seconds < 120  # not the 5-s timeout either: rank 0's collective breaks when rank 1 exits


def test_a_rank_that_hangs_is_caught_by_the_timeout(tmp_path):
    r, seconds = torchrun(tmp_path, hang=True)
    assert r.returncode != 0
    err = r.stderr
    assert "error: rank 0: the other processes did not answer within --dist_timeout 5 s" in err
    assert "(rank 1 stopped with it)" in err  # torchrun terminated the hung rank, which names rank 0's error
    assert seconds < 120  # a 600-s hang ended by the 5-s timeout (plus start-up)
