"""
gpu_check.py: check a GPU in one command (about 5 minutes): the GPU tests, the benchmark, the toy
study and a short math run, with every figure gathered into one JSON.

  python gpu_check.py out/gpu_check                  # CUDA or MPS, picked automatically
  python gpu_check.py out/gpu_check --device cuda:1
  python gpu_check.py /tmp/dry --device cpu          # a dry run of this script on the CPU (slow)

Its steps, each a subprocess with its own time limit (a step that fails or runs out of time is
recorded as such and the next one runs):

  tests   python -m pytest -q tests/test_gpu.py          (graph = eager, cached = recomputed, every
                                                          objective finite, seeded steps repeat)
  bench   python bench.py --repeats 2                    (tokens/s, OPD steps/s, % of the matmul peak)
  toy     python train_toy.py                            (the exact and trained toy study)
  math    python train_math.py --preset gpu, shortened   (held-out accuracies and wall time)

Writes <out>/gpu_check.json: the device (name, compute capability, torch), and per step its
command, exit code, wall seconds, the figures read from its output and the tail of that output.
Exit code 0 when every step passed. It is a script, not a test: the CPU test suite never runs it.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

from nanoopd.device import amp_dtype, pick_device

# -----------------------------------------------------------------------------
# command line

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("out", help="folder for gpu_check.json and the runs' outputs (created if missing)")
p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | mps | cpu (cpu: a dry run) (default auto)")
p.add_argument("--math_steps", type=int, default=30, help="OPD steps of the short math run (default 30)")
args = p.parse_args()
try:
    device = pick_device(args.device)
except ValueError as e:
    p.error(str(e))
if device.type == "cpu" and args.device != "cpu":
    p.exit(1, "gpu_check.py: no CUDA or MPS GPU is visible, so there is nothing to check; "
              "pass --device cpu for a dry run of the script itself\n")
if args.math_steps < 1:
    p.error(f"--math_steps must be >= 1, got {args.math_steps}")
os.makedirs(args.out, exist_ok=True)
env = dict(os.environ)
if device.type == "cuda" and device.index is not None:
    env["CUDA_VISIBLE_DEVICES"] = str(device.index)  # the steps pick "the" GPU: make it this one

# -----------------------------------------------------------------------------
# the steps


def run(name: str, cmd: list[str], limit_s: int, read) -> dict:
    """Run one step; its figures are read(stdout) (a dict), or {} if it failed."""
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s, env=env)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = round(time.time() - t0, 1)
    try:
        figures = read(out) if rc == 0 else {}
    except Exception as e:  # a changed output format loses the figures, not the run
        figures = {"unreadable": str(e)}
    print(f"[{name}] exit {rc}, {wall} s, {figures}", flush=True)
    return {"command": " ".join(cmd), "exit": rc, "wall_s": wall, "figures": figures, "tail": out[-3000:]}


def read_tests(out: str) -> dict:
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out)}


def read_bench(out: str) -> dict:
    figures = {}
    m = re.search(r"matmul peak \((\w+)[^)]*\): ([\d,]+) GFLOP/s", out)
    if m:
        figures["matmul_peak_dtype"], figures["matmul_peak_gflops"] = m.group(1), float(m.group(2).replace(",", ""))
    for name, cached, recompute, train in re.findall(r"^(teacher|student)\s+[\d,]+ \|\s+([\d,]+)\s+([\d,]+)\s+[\d.]+x \|\s+([\d,]+)", out, re.M):
        figures[f"{name}_rollout_cached_tok_s"] = float(cached.replace(",", ""))
        figures[f"{name}_rollout_recompute_tok_s"] = float(recompute.replace(",", ""))
        figures[f"{name}_train_tok_s"] = float(train.replace(",", ""))
    for name, steps, share in re.findall(r"^(\w+)\s+([\d.]+) \|.*\|\s+[\d.]+\s+(\d+)%$", out, re.M):
        figures[f"opd_{name}_steps_s"], figures[f"opd_{name}_pct_of_peak"] = float(steps), int(share)
    return figures


def read_math(out_dir: str):
    def read(out: str) -> dict:
        with open(os.path.join(out_dir, "summary.json")) as f:
            summary = json.load(f)
        return {k: v for k, v in summary.items() if isinstance(v, (int, float, str))} or {"summary": summary}
    return read


py = sys.executable
math_dir = os.path.join(args.out, "math")
steps = {
    "tests": run("tests", [py, "-m", "pytest", "-q", "tests/test_gpu.py"], 120, read_tests),
    "bench": run("bench", [py, "bench.py", "--device", str(device), "--repeats", "2"], 150, read_bench),
    "toy": run("toy", [py, "train_toy.py", "--device", str(device), "--out", os.path.join(args.out, "toy")], 60,
               lambda out: {"last_lines": out.strip().splitlines()[-5:]}),
    "math": run("math", [py, "train_math.py", "--preset", "gpu", "--device", str(device), "--out_dir", math_dir,
                         "--t_steps", "400", "--s_steps", "100", "--opd_steps", str(args.math_steps),
                         "--eval_n", "200"], 150, read_math(math_dir)),
}
name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or device.type
report = {
    "device": {"type": device.type, "name": name, "torch": torch.__version__,
               "compute_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
               "autocast": str(amp_dtype(device))},
    "steps": steps,
}
path = os.path.join(args.out, "gpu_check.json")
with open(path, "w") as f:
    json.dump(report, f, indent=2)
failed = [k for k, v in steps.items() if v["exit"] != 0]
print(f"wrote {path}; " + (f"failed: {', '.join(failed)}" if failed else "every step passed"))
sys.exit(1 if failed else 0)
