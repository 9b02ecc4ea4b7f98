"""
What every script of the project does around its work: threads, device and process group, the
output folder, a log on stdout and in <out_dir>/log.txt (rank 0 only), summary.json, and an exit
with a message instead of a traceback on expected failures.
"""

import json
import os
import signal
import sys
from dataclasses import asdict

import torch

from nanoopd import distributed
from nanoopd.checkpoint import CheckpointError
from nanoopd.config import ConfigError
from nanoopd.tokenizer import get_tokenizer


def start(cfg, experiment: str | None = None):
    """Threads, device, process group, out_dir, the log (stdout + <out_dir>/log.txt on rank 0) and
    the summary so far. Returns (dist_info, device, tok, log, summary)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timeout = getattr(cfg, "dist_timeout", distributed.DEFAULT_TIMEOUT_S)  # only train_math.py runs under torchrun
    dist_info, device = distributed.setup(cfg.device, timeout)  # one process, or one rank of torchrun
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


EXPECTED = (CheckpointError, FloatingPointError, ValueError, OSError)  # bad input, a diverged run, a full disk
DISK_HINT = ("check that --out_dir is on a disk with free space that this user may write to; every checkpoint "
             "already written is kept (writes are atomic), so rerun with --resume to go on")


class Terminated(RuntimeError):
    """SIGTERM: torchrun stops the other processes this way when one of them has failed."""


def _terminated(signum, frame):
    raise Terminated("stopped by the launcher (torchrun ends every process when one fails)")


def cli(main) -> None:
    """Run a script's main(); expected failures end with a message and exit code 1, no traceback.
    Under torchrun, a failure on any rank ends every rank, each naming the rank that failed first
    (distributed.stop_all)."""
    if "RANK" in os.environ:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except BaseException as e:  # noqa: BLE001 - sorted below; anything else is re-raised
        if distributed.active() and not isinstance(e, SystemExit):
            distributed.stop_all(e, expected=isinstance(e, EXPECTED))
        if not isinstance(e, EXPECTED):
            raise
        disk = isinstance(e, OSError) and not isinstance(e, FileNotFoundError)
        said = f"--{e.field} {e.message}" if isinstance(e, ConfigError) else str(e)  # a setting: named by its flag
        print(f"error: {said}" + (f"\n{DISK_HINT}" if disk else ""), file=sys.stderr)
        sys.exit(1)
