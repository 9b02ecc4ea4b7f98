"""
bench.py: throughput of the pieces that dominate on-policy distillation, so changes can be compared.

  rollout   new tokens/s at batch 64, 64 new tokens, with the KV cache and with full recomputation
  training  SFT tokens/s (forward + backward + AdamW step) at batch 64
  OPD step  steps/s of one on-policy distillation step (nanoopd/opd.py) for every objective, and
            its split: student rollout | teacher scoring | student forward + backward + AdamW |
            the rest (diagnostics, verifier)

for the default teacher and student architectures of train_math.py (random weights: speed does not
depend on them; EOS is disabled so every row generates the full budget; an OPD rollout of a random
student almost never samples EOS either, so it too runs to the budget: the slowest case).

  python bench.py                    # CPU or the GPU picked automatically
  python bench.py --device cpu --threads 2
Quote ratios from one run; absolute numbers only together with the machine they came from.
"""

import argparse
import copy
import platform
import time

import torch

from nanoopd.device import pick_device, synchronize
from nanoopd.model import GPT, GPTConfig
from nanoopd.objectives import OBJECTIVES
from nanoopd.opd import OPDConfig, freeze, opd_step
from nanoopd.rollout import generate
from nanoopd.sft import sft_loss
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer
from train_math import TrainConfig

# -----------------------------------------------------------------------------
# command line

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch default")
p.add_argument("--batch", type=int, default=64, help="sequences per rollout / training batch (default 64)")
p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per row (default 64)")
p.add_argument("--prompt_len", type=int, default=12, help="prompt tokens per row (default 12, a math prompt)")
p.add_argument("--train_len", type=int, default=64, help="tokens per training sequence (default 64)")
p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported (default 3)")
args = p.parse_args()
for name in ("batch", "new_tokens", "prompt_len", "train_len", "repeats"):
    if getattr(args, name) < 1:
        p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
if args.threads < 0:
    p.error(f"--threads must be >= 0 (0 = torch default), got {args.threads}")
block_size = GPTConfig().block_size
if args.prompt_len + args.new_tokens > block_size or args.train_len > block_size:
    p.error(f"--prompt_len + --new_tokens ({args.prompt_len + args.new_tokens}) and --train_len ({args.train_len}) "
            f"must fit the models' block size of {block_size} tokens")
try:
    device = pick_device(args.device)
except ValueError as e:
    p.error(str(e))
if args.threads:
    torch.set_num_threads(args.threads)
tok = get_tokenizer()
cfg = TrainConfig()
ARCH = {
    "teacher": GPTConfig(vocab_size=tok.n_vocab, n_layer=cfg.t_layer, n_embd=cfg.t_embd, n_head=cfg.t_head),
    "student": GPTConfig(vocab_size=tok.n_vocab, n_layer=cfg.s_layer, n_embd=cfg.s_embd, n_head=cfg.s_head),
}


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


# -----------------------------------------------------------------------------
# measurements

print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
      f"{platform.processor() or platform.machine()} | batch {args.batch}")
g = torch.Generator(device=device).manual_seed(0)
prompts = [[tok.bos_id] + torch.randint(0, 256, (args.prompt_len - 1,), generator=torch.Generator().manual_seed(i)).tolist()
           for i in range(args.batch)]
print(f"{'model':8s} {'params':>9s} | {'rollout cached tok/s':>20s} {'recompute tok/s':>16s} {'speed-up':>8s} | {'train tok/s':>11s}")
for name, arch in ARCH.items():
    torch.manual_seed(0)
    model = GPT(arch).to(device)
    new = args.batch * args.new_tokens

    def rollout(use_cache):
        generate(model, prompts, args.new_tokens, eos_id=-1, pad_id=tok.pad_id, temperature=1.0,
                 generator=g, use_cache=use_cache)

    cached = new / best_time(lambda: rollout(True), args.repeats)
    recompute = new / best_time(lambda: rollout(False), max(1, args.repeats - 2))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (args.batch, args.train_len), device=device)
    y = torch.randint(0, 256, (args.batch, args.train_len), device=device)

    def train_step():
        loss = sft_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = args.batch * args.train_len / best_time(train_step, args.repeats)
    print(f"{name:8s} {model.num_params():9,d} | {cached:20,.0f} {recompute:16,.0f} {cached / recompute:7.1f}x | {train:11,.0f}")

# one OPD step per objective: the student samples, the teacher scores, the student learns
torch.manual_seed(0)
teacher, student0 = freeze(GPT(ARCH["teacher"]).to(device)), GPT(ARCH["student"]).to(device)
problems = sample_problems(args.batch * (args.repeats + 1), "train", 0, cfg.digits, cfg.ops)
print(f"\nOPD step, batch {args.batch}, up to {args.new_tokens} new tokens (seconds of the fastest of "
      f"{args.repeats} steps after a warm-up)")
print(f"{'objective':18s} {'steps/s':>7s} | {'rollout':>13s} {'teacher':>13s} {'student':>13s} {'rest':>13s} | "
      f"{'resp. tok/s':>11s}")
for name in sorted(OBJECTIVES):
    student = copy.deepcopy(student0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ocfg = OPDConfig(loss=name, batch_size=args.batch, max_new_tokens=args.new_tokens, digits=cfg.digits, ops=cfg.ops)
    gen = torch.Generator(device=device).manual_seed(0)
    timed = []
    for i in range(args.repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        rec = opd_step(student, teacher, opt, tok, problems[i * args.batch:(i + 1) * args.batch], ocfg, gen, i)
        synchronize(device)
        timed.append((time.perf_counter() - t0, rec))
    dt, rec = min(timed[1:], key=lambda x: x[0])  # the first step is the warm-up
    parts = [rec["t_rollout"], rec["t_teacher"], rec["t_student"]]
    parts.append(dt - sum(parts))
    split = " ".join(f"{t:6.3f} ({t / dt:3.0%})" for t in parts)
    print(f"{name:18s} {1 / dt:7.2f} | {split} | {rec['response_length'] * args.batch / dt:11,.0f}")
