"""DDP on the CPU (gloo, 2 processes): the same weights as one process on the same global batch,
for SFT and for on-policy distillation."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nanoopd import distributed
from nanoopd.model import GPT, GPTConfig
from nanoopd.opd import OPDConfig, train_opd
from nanoopd.sft import train_sft
from nanoopd.tasks import encode_example
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


# OPD: rollouts with top_k = 1 are the same whoever samples them, so 2 ranks that each sample half
# of every batch see exactly the rollouts of one process; what is tested is the data-parallel
# arithmetic (sharding, the global-token loss scale, gradient averaging, reduced logs). With real
# sampling each rank draws from its own generator and the runs agree in distribution only. The
# learning rate is small because Adam scales every gradient to a step of order lr, also the ones
# that are 0 in exact arithmetic (the attention key bias, which softmax ignores) and so differ
# between the runs only by rounding noise: at lr 1e-2 those reach 2e-5 after 3 steps.
OPD = OPDConfig(loss="sampled_token", opd_steps=3, opd_batch=5, top_k=1, max_new_tokens=10, digits=1, opd_lr=1e-3,
                opd_warmup=0, opd_eval_every=2, seed=5)


def opd_pair():
    torch.manual_seed(1)
    teacher = GPT(GPTConfig(vocab_size=get_tokenizer().n_vocab, n_layer=1, n_head=2, n_embd=48, block_size=32))
    torch.manual_seed(2)
    student = GPT(GPTConfig(vocab_size=get_tokenizer().n_vocab, n_layer=1, n_head=2, n_embd=32, block_size=32))
    return teacher, student


def run_opd(prefix):
    teacher, student = opd_pair()
    summary = train_opd(student, teacher, get_tokenizer(), OPD, prefix, sample_problems(4, "test", 0, digits=1),
                        log=lambda _: None, save_every=1)
    return student, summary


def opd_worker(rank, world, port, prefix):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.setup("cpu")
    try:
        student, _ = run_opd(prefix)
        torch.save(student.state_dict(), f"{prefix}.rank{rank}")
    finally:
        distributed.cleanup()


def resume_worker(rank, world, port, folder):
    """Under 2 ranks with real sampling: OPD and RLVR killed mid-run and resumed end where an
    uninterrupted run ends (each rank's sampler state comes back from the checkpoint)."""
    import nanoopd.opd as opd
    import nanoopd.rlvr as rlvr
    from nanoopd.rlvr import RLVRConfig, train_rlvr
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.setup("cpu")
    tok, problems = get_tokenizer(), sample_problems(4, "test", 0, digits=1)
    cfg = OPDConfig(loss="sampled_token", opd_steps=4, opd_batch=4, max_new_tokens=8, digits=1, opd_lr=3e-3, opd_warmup=1,
                    opd_eval_every=0, seed=3)
    rcfg = RLVRConfig(rlvr_steps=4, rlvr_prompts=2, rlvr_group=4, max_new_tokens=6, digits=1, rlvr_warmup=1, rlvr_lr=3e-3)
    rlvr.math_reward = lambda tok, batch, done: lambda i, resp: float(bool(resp) and resp[0] % 2 == 0)
    real_opd, real_rlvr = opd.opd_step, rlvr.rlvr_step

    def dies_at_step_3(real):
        calls = []

        def step(*args):
            if len(calls) == 3:
                raise KeyboardInterrupt
            calls.append(1)
            return real(*args)
        return step

    def run_opd_(prefix, **kw):
        teacher, student = opd_pair()
        train_opd(student, teacher, tok, cfg, f"{folder}/{prefix}", problems, log=lambda _: None,
                  save_every=2, **kw)
        return student

    def run_rlvr_(name, **kw):
        model = opd_pair()[1]
        train_rlvr(model, tok, rcfg, log=lambda _: None, ckpt_path=f"{folder}/{name}.pt", save_every=2, **kw)
        return model

    try:
        out = {"opd_full": run_opd_("opd_full").state_dict(), "rlvr_full": run_rlvr_("rlvr_full").state_dict()}
        opd.opd_step, rlvr.rlvr_step = dies_at_step_3(real_opd), dies_at_step_3(real_rlvr)
        for name, run in (("opd_part", run_opd_), ("rlvr_part", run_rlvr_)):
            try:
                run(name)
            except KeyboardInterrupt:
                pass
            distributed.barrier()
        opd.opd_step, rlvr.rlvr_step = real_opd, real_rlvr
        out["opd_part"] = run_opd_("opd_part", resume=True).state_dict()
        out["rlvr_part"] = run_rlvr_("rlvr_part", resume=True).state_dict()
        torch.save(out, f"{folder}/rank{rank}.pt")
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
    a = torch.load(tmp_path / "one" / "teacher.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "teacher.pt", weights_only=True)["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=TOL, rtol=0), name


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_process_opd_matches_single_process(tmp_path):
    prefix = str(tmp_path / "ddp")
    mp.spawn(opd_worker, args=(2, free_port(), prefix), nprocs=2, join=True)
    single, summary = run_opd(str(tmp_path / "one"))
    ranks = [torch.load(f"{prefix}.rank{r}") for r in range(2)]
    start = opd_pair()[1].state_dict()
    for name, p in single.state_dict().items():
        assert not torch.equal(p, start[name]) or name.endswith("bias")  # training moved the weights
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP keeps the ranks identical
        assert torch.allclose(ranks[0][name], p, atol=TOL, rtol=0), name
    saved = torch.load(prefix + ".pt", weights_only=True)  # rank 0 wrote it, with both ranks' RNG states
    assert saved["step"] == OPD.opd_steps and len(saved["extra"]["resume"]["rng"]) == 2
    import json
    two = [json.loads(line) for line in open(prefix + ".jsonl")]
    one = [json.loads(line) for line in open(str(tmp_path / "one.jsonl"))]
    assert len(two) == len(one) == OPD.opd_steps
    for a, b in zip(one, two):  # the logged numbers are those of the whole global batch (3 + 2 rows)
        for key in ("loss", "kl", "acc", "n_loss_tokens", "response_length", "grad_norm", "overlap_ratio",
                    "entropy_student", "logratio_max_abs", "logratio_pos_share"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), key
    assert json.load(open(prefix + ".json"))["evals"] == summary["evals"]


def test_torchrun_train_math_opd_stage_matches_single_process(tmp_path):
    """Stage opd of the real entry point under torchrun (2 gloo ranks, top_k 1 rollouts) writes the
    student one process writes; then --resume finds the finished run and trains nothing more."""
    import subprocess
    import sys
    from nanoopd.checkpoint import save_checkpoint
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    teacher, student = opd_pair()
    for folder in ("one", "two"):
        save_checkpoint(str(tmp_path / folder / "teacher.pt"), teacher, 0)
        save_checkpoint(str(tmp_path / folder / "student.pt"), student, 0)
    args = ["train_math.py", "--stages", "opd", "--opd_steps", "3", "--opd_batch", "8", "--top_k", "1",
            "--max_new_tokens", "10", "--digits", "1", "--eval_n", "4", "--opd_lr", "1e-3", "--opd_warmup", "0",
            "--threads", "1", "--device", "cpu"]
    single = subprocess.run([sys.executable, *args, "--out_dir", str(tmp_path / "one")],
                            cwd=root, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port", str(free_port()), *args, "--out_dir", str(tmp_path / "two")],
                         cwd=root, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "batch 8 over 2 processes" in two.stdout
    a = torch.load(tmp_path / "one" / "opd_sampled_token.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "opd_sampled_token.pt", weights_only=True)["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=TOL, rtol=0), name
    again = subprocess.run([sys.executable, *args, "--out_dir", str(tmp_path / "one"), "--resume"],
                           cwd=root, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout and "at step 3/3" in again.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_process_opd_and_rlvr_resume_where_they_stopped(tmp_path):
    mp.spawn(resume_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    start = opd_pair()[1].state_dict()
    for run in ("opd", "rlvr"):
        assert torch.load(tmp_path / f"{run}_part.pt", weights_only=True)["step"] == 4
        full, part = ranks[0][f"{run}_full"], ranks[0][f"{run}_part"]
        assert not torch.equal(full["wte.weight"], start["wte.weight"])  # training moved the weights
        for name in full:
            assert torch.equal(full[name], part[name]), (run, name)  # resumed == uninterrupted, bit for bit
            assert torch.equal(full[name], ranks[1][f"{run}_full"][name]), (run, name)  # ranks identical
