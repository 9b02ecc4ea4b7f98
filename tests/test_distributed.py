"""DDP on the CPU (gloo, 2 processes): the same weights as one process on the same global batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nanoopd import distributed
from nanoopd.model import GPT, GPTConfig
from nanoopd.sft import encode_example, train_sft
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer

STEPS, BATCH = 4, 8
TOL = 1e-5  # float summation order differs between 1 and 2 processes; nothing else does


def make_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=get_tokenizer().n_vocab, n_layer=1, n_head=2, n_embd=32, block_size=96))


def batches(step):
    tok = get_tokenizer()
    problems = sample_problems(STEPS * BATCH, "train", 0, digits=2)
    return [encode_example(tok, p) for p in problems[step * BATCH:(step + 1) * BATCH]]


def worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info, device = distributed.setup("cpu")
    try:
        model = make_model()
        train_sft(model, batches, STEPS, 3e-3, get_tokenizer().pad_id, warmup=2, log_every=0)
        if info.is_main:
            torch.save(model.state_dict(), out)
    finally:
        distributed.cleanup()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_covers_the_batch_once():
    items = list(range(10))
    parts = [distributed.shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert distributed.shard(items) == items  # not distributed: everything


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_process_ddp_matches_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    single = make_model()
    train_sft(single, batches, STEPS, 3e-3, get_tokenizer().pad_id, warmup=2, log_every=0)
    ddp_state = torch.load(out)
    start = make_model().state_dict()
    for name, p in single.state_dict().items():
        assert not torch.equal(p, start[name]) or name.endswith("bias")  # training moved the weights
        assert torch.allclose(ddp_state[name], p, atol=TOL, rtol=0), name


def test_torchrun_train_math_teacher_matches_single_process(tmp_path):
    """The real entry point under torchrun (2 gloo ranks) writes the weights one process writes."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = ["--stages", "teacher", "--t_layer", "1", "--t_embd", "16", "--t_head", "2", "--t_steps", "4",
            "--batch_size", "8", "--digits", "1", "--log_every", "0", "--threads", "1", "--device", "cpu"]
    single = subprocess.run([sys.executable, "train_math.py", *tiny, "--out_dir", str(tmp_path / "one")],
                            cwd=root, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port", str(free_port()), "train_math.py", *tiny, "--out_dir", str(tmp_path / "two")],
                         cwd=root, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "teacher.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "teacher.pt", weights_only=False)["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=TOL, rtol=0), name
