"""
bench.py: throughput of the pieces that dominate on-policy distillation, so changes can be compared.

  rollout   new tokens/s at batch 64, 64 new tokens, with the KV cache and with full recomputation
  training  SFT tokens/s (forward + backward + AdamW step) at batch 64
  OPD step  steps/s of one on-policy distillation step (nanoopd/opd.py) for every objective, its
            split: student rollout | teacher scoring | student forward + backward + AdamW | the
            rest (diagnostics, verifier), its matmul FLOPs against a matmul peak measured here in the
            dtype of the step's matmuls (bf16 under CUDA autocast, else float32); then with a teacher
            reading 'digits': the share of the step that re-reading and aligning, and projecting take
  --vs trl  the same OPD step in nanoopd and in Hugging Face TRL's GKDTrainer, side by side: fully
            on-policy (lmbda 1) with the reverse KL (beta 1, nanoopd's full_reverse_kl), GPT-2 models
            of the same shapes and vocabulary, float32, KV cache on, EOS suppressed on both sides
            so that both generate the same number of tokens; at two sizes (4x128 student / 6x256
            teacher, batch 16, 32 new tokens; 2x64 / 4x128, batch 64, 64 new tokens)
  --profile where the time of one OPD step goes at those two sizes: its split, and the operators
            that take the most time (torch.profiler, self time: CPU time, or GPU time on CUDA)

for the default teacher and student architectures of train_math.py (random weights: speed does not
depend on them; EOS is disabled so every row generates the full budget).

  python bench.py                    # CPU or the GPU picked automatically
  python bench.py --device cpu --threads 2
  python bench.py --vs trl           # needs: pip install trl transformers datasets
  python bench.py --profile          # the top operators of one OPD step
Quote ratios from one run; absolute numbers only together with the machine they came from.
"""

import argparse
import copy
import platform
import time

import torch

from nanoopd.cross_teacher import CrossTokenizerTeacher
from nanoopd.device import amp_dtype, pick_device, synchronize
from nanoopd.flops import opd_step_flops
from nanoopd.model import GPT, GPTConfig
from nanoopd.objectives import OBJECTIVES
from nanoopd.opd import OPDConfig, freeze, opd_step
from nanoopd.mixed_batch import pool_rollout
from nanoopd.rollout import generate
from nanoopd.sft import sft_loss
from nanoopd.tasks import encode_example, sample_problems
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
p.add_argument("--vs", choices=("trl",), default=None,
               help="time the OPD step side by side with another implementation (trl: TRL's GKDTrainer); "
                    "only that comparison runs")
p.add_argument("--profile", action="store_true",
               help="profile one OPD step (full_reverse_kl) at the two --vs sizes and print the operators that "
                    "take the most time; only the profile runs")
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
if args.vs == "trl":
    try:
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        p.exit(1, "bench.py --vs trl needs TRL and transformers, which nanoopd itself does not: "
                  "pip install trl transformers datasets\n")
if args.threads:
    torch.set_num_threads(args.threads)
tok = get_tokenizer()
no_eos = copy.copy(tok)  # EOS never matches: every row generates the full budget
no_eos.eos_id = -1
cfg = TrainConfig()
ARCH = {"teacher": GPTConfig(vocab_size=tok.n_vocab, n_layer=cfg.t_layer, n_embd=cfg.t_embd, n_head=cfg.t_head),
        "student": GPTConfig(vocab_size=tok.n_vocab, n_layer=cfg.s_layer, n_embd=cfg.s_embd, n_head=cfg.s_head)}


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


def step_flops(student: GPTConfig, teacher: GPTConfig, B: int, P: int, N: int) -> float:
    """Matmul FLOPs of one OPD step, B rows of P prompt and N response tokens (nanoopd/flops.py)."""
    return sum(opd_step_flops(student, teacher, ([P] * B, [N] * B)))


def peak_dtype() -> tuple[torch.dtype, str]:
    """The dtype the step's matmuls run in here, and its name: bf16 where the device policy turns
    autocast on (CUDA of compute capability >= 8.0), else float32 (TF32 on CUDA when torch allows
    it for matmuls, which nanoopd leaves at torch's default, off)."""
    amp = amp_dtype(device)
    if amp is not None:
        return amp, str(amp).removeprefix("torch.")
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return torch.float32, "tf32" if tf32 else "float32"


def matmul_peak() -> float:
    """FLOP/s of a large matrix product in the dtype the step's matmuls run in (peak_dtype): the
    ceiling the step is compared with. On CUDA timed with CUDA events around 20 products."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=peak_dtype()[0])
    if device.type != "cuda":
        return 2 * n ** 3 / best_time(lambda: a @ a, 10)
    for _ in range(3):
        a @ a  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ a
    end.record()
    end.synchronize()
    return 20 * 2 * n ** 3 / (start.elapsed_time(end) / 1e3)


def problems_for(B: int, steps: int):
    return sample_problems(B * steps, "train", 0, cfg.digits, cfg.ops)


def time_opd(student: GPT, teacher: GPT, loss: str, B: int, N: int, problems, score=None) -> tuple[float, dict]:
    """Seconds of the fastest of --repeats OPD steps after a warm-up, and that step's record."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ocfg = OPDConfig(loss=loss, opd_batch=B, max_new_tokens=N, digits=cfg.digits, ops=cfg.ops)
    gen = torch.Generator(device=device).manual_seed(0)
    timed = []
    for i in range(args.repeats + 1):
        synchronize(device)
        t0 = time.perf_counter()
        rec = opd_step(student, teacher, opt, no_eos, problems[i * B:(i + 1) * B], ocfg, gen, i, teacher_score=score)
        synchronize(device)
        timed.append((time.perf_counter() - t0, rec))
    return min(timed[1:], key=lambda x: x[0])  # the first step is the warm-up


print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
      f"{platform.processor() or platform.machine()} | batch {args.batch}")
peak = matmul_peak()
print(f"matmul peak ({peak_dtype()[1]}, the dtype of the step's matmuls): {peak / 1e9:,.0f} GFLOP/s")

# -----------------------------------------------------------------------------
# --vs trl: the same OPD step in nanoopd and in TRL's GKDTrainer


def trl_step_time(s: GPTConfig, t: GPTConfig, B: int, N: int, problems) -> float:
    """Seconds of the fastest of --repeats GKDTrainer steps (generate on-policy, student and teacher
    forward, generalised JSD at beta 1 = reverse KL, backward, AdamW step) after a warm-up."""
    import logging
    import os
    import tempfile
    import warnings
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    hf_logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)

    def gpt2(c: GPTConfig):  # the same shapes: layers, width, heads, vocabulary, positions, tied head
        m = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                       n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=tok.bos_id, eos_token_id=None,
                                       pad_token_id=tok.pad_id))
        m.generation_config.eos_token_id = None  # EOS suppressed: every row generates N tokens
        return m

    vocab = {str(i): i for i in range(tok.n_vocab)}  # a stand-in tokenizer: only its pad id is used
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="0")),
                                     pad_token=str(tok.pad_id))
    with tempfile.TemporaryDirectory() as out:
        gkd = GKDConfig(output_dir=out, lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=N,
                        per_device_train_batch_size=B, learning_rate=1e-4, use_cpu=device.type == "cpu",
                        bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
                        report_to=[], logging_strategy="no", save_strategy="no")
        data = Dataset.from_dict({"messages": [[{"role": "user", "content": "1+1="}]]})
        trainer = GKDTrainer(model=gpt2(s), teacher_model=gpt2(t), args=gkd, train_dataset=data,
                             processing_class=hf_tok)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which is not run here
        model = trainer.model.train()

        def batch(i):  # the same prompts as nanoopd's, left-padded
            prompts = [encode_example(tok, q)[0] for q in problems[i * B:(i + 1) * B]]
            P = max(len(q) for q in prompts)
            ids = torch.tensor([[tok.pad_id] * (P - len(q)) + q for q in prompts], device=trainer.args.device)
            mask = torch.tensor([[0] * (P - len(q)) + [1] * len(q) for q in prompts], device=trainer.args.device)
            return {"prompts": ids, "prompt_attention_mask": mask, "input_ids": ids, "attention_mask": mask,
                    "labels": ids}

        times = []
        for i in range(args.repeats + 1):
            inputs = batch(i)
            synchronize(device)
            t0 = time.perf_counter()
            trainer.training_step(model, inputs)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            synchronize(device)
            times.append(time.perf_counter() - t0)
            new = inputs["input_ids"].shape[1] - inputs["prompts"].shape[1]
            assert new == N, f"TRL generated {new} tokens instead of {N}: EOS was not suppressed"
    return min(times[1:])


# the two sizes of the comparison: label, student and teacher (layers, width, heads), batch, new tokens
SIZES = (("4x128 / 6x256", (4, 128, 4), (6, 256, 8), 16, 32),
         ("2x64 / 4x128", (cfg.s_layer, cfg.s_embd, cfg.s_head), (cfg.t_layer, cfg.t_embd, cfg.t_head), 64, 64))


def size_models(student: tuple, teacher: tuple) -> tuple[GPTConfig, GPTConfig, GPT, GPT]:
    """Configs and random-weight models (seed 0) of one size: the frozen teacher and the student."""
    s_cfg, t_cfg = (GPTConfig(vocab_size=tok.n_vocab, n_layer=l, n_embd=c, n_head=h) for l, c, h in (student, teacher))
    torch.manual_seed(0)
    return s_cfg, t_cfg, freeze(GPT(t_cfg).to(device)), GPT(s_cfg).to(device)


if args.profile:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for label, s_arch, t_arch, B, N in SIZES:
        _, _, teacher, student = size_models(s_arch, t_arch)
        problems = problems_for(B, 2)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        ocfg = OPDConfig(loss="full_reverse_kl", opd_batch=B, max_new_tokens=N, digits=cfg.digits, ops=cfg.ops)
        gen = torch.Generator(device=device).manual_seed(0)
        opd_step(student, teacher, opt, no_eos, problems[:B], ocfg, gen, 0)  # warm-up
        with profile(activities=activities) as prof:
            rec = opd_step(student, teacher, opt, no_eos, problems[B:], ocfg, gen, 1)
        self_time = lambda e: e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total  # us
        ops = sorted(prof.key_averages(), key=self_time, reverse=True)
        total = sum(self_time(e) for e in ops)
        print(f"\nOPD step (full_reverse_kl), {label}, batch {B}, {N} new tokens, under the profiler: rollout "
              f"{rec['t_rollout']:.3f}s, teacher {rec['t_teacher']:.3f}s, student {rec['t_student']:.3f}s")
        print(f"{'operator':52s} {'self time':>9s} {'share':>6s} {'calls':>6s} {'per call':>9s}")
        for e in ops[:12]:
            print(f"{e.key[:52]:52s} {self_time(e) / 1e3:7.1f}ms {self_time(e) / total:6.1%} "
                  f"{e.count:6d} {self_time(e) / e.count:7.1f}us")
        rest = ops[12:]
        print(f"{f'the other {len(rest)} operators':52s} {sum(self_time(e) for e in rest) / 1e3:7.1f}ms "
              f"{sum(self_time(e) for e in rest) / total:6.1%} {sum(e.count for e in rest):6d}")
    raise SystemExit(0)

if args.vs == "trl":
    print(f"\nOPD step, nanoopd vs TRL GKDTrainer (lmbda 1, beta 1 = full_reverse_kl), float32, KV cache, EOS "
          f"suppressed; seconds of the fastest of {args.repeats} steps after a warm-up")
    print(f"{'student / teacher':17s} {'batch':>5s} {'new':>4s} | {'nanoopd':>8s} {'TRL':>8s} {'ratio':>6s} | "
          f"{'GFLOP':>6s} | {'nanoopd GFLOP/s':>15s} {'TRL GFLOP/s':>15s}   (steps/s; % of the matmul peak)")
    for label, s_arch, t_arch, B, N in SIZES:
        s_cfg, t_cfg, teacher, student = size_models(s_arch, t_arch)
        problems = problems_for(B, args.repeats + 1)
        ours, rec = time_opd(student, teacher, "full_reverse_kl", B, N, problems)
        theirs = trl_step_time(s_cfg, t_cfg, B, N, problems)
        P = sum(len(encode_example(tok, q)[0]) for q in problems[B:2 * B]) / B
        flops = step_flops(s_cfg, t_cfg, B, round(P), N)
        print(f"{label:17s} {B:5d} {N:4d} | {1 / ours:8.2f} {1 / theirs:8.2f} {theirs / ours:5.1f}x | "
              f"{flops / 1e9:6.2f} | {flops / ours / 1e9:7.1f} ({flops / ours / peak:4.0%}) "
              f"{flops / theirs / 1e9:7.1f} ({flops / theirs / peak:4.0%})")
        print(f"{'':17s} nanoopd split: rollout {rec['t_rollout']:.3f}s, teacher {rec['t_teacher']:.3f}s, "
              f"student {rec['t_student']:.3f}s, rest {ours - rec['t_rollout'] - rec['t_teacher'] - rec['t_student']:.3f}s")
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# rollout (cached vs recomputed) and SFT training throughput

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

# -----------------------------------------------------------------------------
# one OPD step per objective: the student samples, the teacher scores, the student learns

_, _, teacher, student0 = size_models(*SIZES[1][1:3])  # train_math's sizes (ARCH's), seed 0
problems = problems_for(args.batch, args.repeats + 1)
P = round(sum(len(encode_example(tok, q)[0]) for q in problems[:args.batch]) / args.batch)
flops = step_flops(ARCH["student"], ARCH["teacher"], args.batch, P, args.new_tokens)
print(f"\nOPD step, batch {args.batch}, {args.new_tokens} new tokens (seconds of the fastest of {args.repeats} steps "
      f"after a warm-up); {flops / 1e9:.2f} GFLOP of matmuls per step")
print(f"{'objective':18s} {'steps/s':>7s} | {'rollout':>13s} {'teacher':>13s} {'student':>13s} {'rest':>13s} | "
      f"{'resp. tok/s':>11s} | {'GFLOP/s':>7s} {'of peak':>7s}")
for name in sorted(OBJECTIVES):
    dt, rec = time_opd(copy.deepcopy(student0), teacher, name, args.batch, args.new_tokens, problems)
    parts = [rec["t_rollout"], rec["t_teacher"], rec["t_student"]]
    parts.append(dt - sum(parts))
    split = " ".join(f"{t:6.3f} ({t / dt:3.0%})" for t in parts)
    print(f"{name:18s} {1 / dt:7.2f} | {split} | {rec['response_length'] * args.batch / dt:11,.0f} | "
          f"{flops / dt / 1e9:7.1f} {flops / dt / peak:7.0%}")
# a teacher reading 'digits' (nanoopd/cross_teacher.py): what re-reading the rows, aligning and projecting cost in the step
xt = CrossTokenizerTeacher(tok, get_tokenizer("digits"))
t_digits = freeze(GPT(GPTConfig(vocab_size=xt.t.n_vocab, tokenizer="digits", n_layer=cfg.t_layer, n_embd=cfg.t_embd,
                                n_head=cfg.t_head)).to(device))
gold = pool_rollout([encode_example(tok, q) for q in problems[:args.batch]], tok.pad_id, device)  # rows that write numbers
for name in ("xt_chunk", "xt_gold"):
    dt, rec = time_opd(copy.deepcopy(student0), t_digits, name, args.batch, args.new_tokens, problems, xt)
    (read, proj), _, _ = xt.seconds, xt(t_digits, gold), xt(t_digits, gold)  # gold: the second call (maps cached)
    print(f"{name + ' (digits)':18s} {1 / dt:7.2f} | teacher {rec['t_teacher']:.3f} s ({rec['t_teacher'] / dt:.0%}): re-reading + aligning "
          f"{read:.3f} s ({read / dt:.0%}), projecting {proj:.3f} s ({proj / dt:.0%}); on gold traces {xt.seconds[0] / dt:.0%}, {xt.seconds[1] / dt:.0%}")
