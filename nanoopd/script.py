"""
What every script of the project does around its work: threads, device and process group, the
output folder, a log on stdout and in <out_dir>/log.txt (rank 0 only), summary.json, and an exit
with a message instead of a traceback on expected failures.
"""

import json
import os
import sys
from dataclasses import asdict

import torch

from nanoopd import distributed
from nanoopd.checkpoint import CheckpointError
from nanoopd.tokenizer import get_tokenizer


def start(cfg, experiment: str | None = None):
    """Threads, device, process group, out_dir, the log (stdout + <out_dir>/log.txt on rank 0) and
    the summary so far. Returns (dist_info, device, tok, log, summary)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist_info, device = distributed.setup(cfg.device)  # one process, or one rank of torchrun
    if dist_info.enabled and experiment:
        raise ValueError(f"under torchrun every stage runs data-parallel, but {experiment} is a grid of small "
                         f"runs: start it as a single process (python experiments/...)")
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else {}
    log_file = open(os.path.join(cfg.out_dir, "log.txt"), "a") if dist_info.is_main else None

    def log(msg: str):
        if log_file is not None:  # ranks > 0 stay quiet
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()

    log(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | config {json.dumps(asdict(cfg))}")
    return dist_info, device, get_tokenizer(), log, summary


def finish(cfg, summary: dict, device, log) -> dict:
    summary.update(device=str(device), config=asdict(cfg), world_size=distributed.rank_and_world()[1])
    path = os.path.join(cfg.out_dir, "summary.json")
    if distributed.is_main():
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
    log(f"summary written to {path}")
    distributed.cleanup()
    return summary


def cli(main) -> None:
    """Run a script's main(); expected failures end with a message and exit code 1, no traceback."""
    try:
        main()
    except (CheckpointError, FloatingPointError, ValueError, OSError) as e:  # OSError: e.g. an unwritable --out_dir
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
