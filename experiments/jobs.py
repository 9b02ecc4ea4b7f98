"""
The workers that run the experiments' independent runs (--jobs J), and resume.

The runs of a grid, and the pairs, are independent; J spawned processes take them in turn, each with
an even share of the threads, max(1, T // J) (T: --threads, or torch's default), and the parent uses
the same share. A run's result depends on the thread count alone, never on J or on which worker ran
it, so `--jobs 2` gives the bits of `--jobs 1 --threads T//2` (tests/test_experiment_grid.py). A
finished run leaves <prefix>.row.json; a grid started again with the same flags reads those back
instead of redoing the runs (resume after an interruption).
"""

import concurrent.futures
import json
import multiprocessing
import os
from dataclasses import asdict

import torch


def job_threads(cfg, total: int) -> int:
    """The even share of `total` threads of each of the cfg.jobs workers (and of the parent)."""
    return max(1, total // cfg.jobs)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(cfg, work, calls: list[tuple]) -> list:
    """[work(pcfg, cell) for (pcfg, cell) in calls], in that order: here (jobs = 1) or in cfg.jobs
    spawned processes with this process's thread count. `work` must be a module-level function."""
    if cfg.jobs == 1 or len(calls) <= 1:
        return [work(p, c) for p, c in calls]
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools mid-use
    with concurrent.futures.ProcessPoolExecutor(min(cfg.jobs, len(calls)), mp_context=ctx, initializer=_init_worker,
                                                initargs=(torch.get_num_threads(),)) as pool:
        return list(pool.map(work, *zip(*calls)))


def run_cells(cfg, work, calls: list[tuple], log) -> list[dict]:
    """run_jobs for runs whose cell (a dict) names its files by cell["prefix"]: a run whose
    <prefix>.row.json was written by a run of the same settings is read back, not redone; every
    other run writes its row there when it ends."""
    rows, todo = [None] * len(calls), []
    for i, (pcfg, cell) in enumerate(calls):
        path = cell["prefix"] + ".row.json"
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("key") == run_key(pcfg, cell):
                rows[i] = saved["row"]
                continue
            log(f"resume: {path} was written with other settings: running it again")
        todo.append(i)
    if len(todo) < len(calls):
        log(f"resume: {len(calls) - len(todo)} of {len(calls)} runs finished earlier, read back")
    for i, row in zip(todo, run_jobs(cfg, _finished_row, [(calls[i][0], (work, calls[i][1])) for i in todo])):
        rows[i] = row
    return rows


def run_key(pcfg, cell: dict) -> str:
    """What defines a run's result: the pair's config but for how the grid is run (jobs, pairs,
    seeds, M6's arms; the thread count is kept: it changes the bits), and the cell (functions by name)."""
    settings = {k: v for k, v in asdict(pcfg).items() if k not in ("jobs", "pairs", "seeds", "arms")}
    # a script's own functions live in __main__ in the parent and in __mp_main__ in a spawned worker
    module = lambda v: "__main__" if v.__module__ == "__mp_main__" else v.__module__
    name = lambda v: f"{module(v)}.{v.__qualname__}" if callable(v) else v
    return json.dumps({"config": settings, "threads": torch.get_num_threads(),
                       "cell": {k: name(v) for k, v in cell.items()}}, sort_keys=True, default=str)


def _finished_row(pcfg, work_cell) -> dict:
    work, cell = work_cell
    row = work(pcfg, cell)
    os.makedirs(os.path.dirname(os.path.abspath(cell["prefix"])), exist_ok=True)
    tmp = cell["prefix"] + ".row.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"key": run_key(pcfg, cell), "row": row}, f)
    os.replace(tmp, cell["prefix"] + ".row.json")  # atomic: a killed run leaves no row
    return row
