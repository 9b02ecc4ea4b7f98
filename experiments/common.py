"""
What the experiment scripts share: their config (the pipeline's, plus the seeds), the grid of OPD
runs from one pair, and the start and end of a script. Every experiment writes <out_dir>/<mN>/:
<mN>.txt (the printed table), <mN>.csv (one row per run), <mN>.json, and each run's own files.
"""

import copy
import json
import os
import time
from dataclasses import dataclass

from nanoopd.config import ConfigError, parse_config
from nanoopd.evaluate import evaluate
from nanoopd.opd import train_opd
from nanoopd.script import finish, start
from nanoopd.special_tokens import HiddenTokens, TrackedTokens, token_ids
from train_math import (OBJECTIVE_FLAGS, PRESETS, TrainConfig, load_role, opd_config, test_problems, train_student,
                        train_teacher)

# the flags that configure the single run of stage opd: M1 and M2 run their own list of objectives
OPD_RUN_FIELDS = ("loss",) + OBJECTIVE_FLAGS + ("mask_tokens", "hide_from_teacher", "run_name")
# what no experiment takes: its stages are its own, and it does not resume
PIPELINE_FIELDS = ("stages", "resume")
OPSD_FIELDS = ("mode", "pi", "live_teacher", "pi_steps")
STUDENT_FIELDS = ("s_layer", "s_embd", "s_head", "s_steps", "s_lr", "s_pool")
RLVR_FIELDS = ("teacher", "rlvr_init", "rlvr_steps", "rlvr_lr", "rlvr_prompts", "rlvr_group", "rlvr_cut")


@dataclass
class ExperimentConfig(TrainConfig):
    # --- experiment
    seeds: str = "1,2"               # comma-separated OPD seeds (prompt order and sampling): one run per seed

    def __post_init__(self):
        super().__post_init__()
        self.seed_list()

    def seed_list(self) -> list[int]:
        try:
            out = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            out = []
        if not out:
            raise ConfigError("seeds", f"must be comma-separated integers, e.g. 1,2; got {self.seeds!r}")
        return out


def parse(cls, argv, doc: str, exclude=(), **fixed):
    """The experiment's config from its command line: no flags for `exclude` (their defaults hold)
    nor for `fixed` (the values given here)."""
    return parse_config(cls, argv, description=doc, presets=PRESETS, exclude=PIPELINE_FIELDS + tuple(exclude),
                        **fixed)


def run_experiment(name: str, cfg: ExperimentConfig, body) -> dict:
    """body(cfg, tok, device, log) -> the table's numbers; wall time and the summary around it."""
    t0 = time.time()
    _, device, tok, log, summary = start(cfg, experiment=name)
    summary.update(body(cfg, tok, device, log) or {}, **{f"{name}_seconds": round(time.time() - t0, 1)})
    return finish(cfg, summary, device, log)


def pair(cfg: TrainConfig, tok, device, log):
    """The teacher and cold-start student of out_dir; the missing ones are trained first."""
    teacher = load_role(cfg, "teacher", tok, device, log, lambda: train_teacher(cfg, tok, device, log))
    return teacher, load_role(cfg, "student", tok, device, log, lambda: train_student(cfg, tok, device, teacher, log))


def merged_stats(*hooks):
    """One OPD extra_stats hook that returns the figures of every given hook (None: no hook)."""
    hooks = [h for h in hooks if h]
    if not hooks:
        return None
    return lambda student_logits, teacher_logits, rollout: {
        k: v for h in hooks for k, v in h(student_logits, teacher_logits, rollout).items()}


def run_grid(cfg: ExperimentConfig, tok, teacher, student, runs, folder: str, log, track=(), after=None,
             extra_stats=None, start_acc: float | None = None) -> list[dict]:
    """One OPD run per (seed, run), each from a fresh copy of `student`; runs = (label, objective,
    options), where the options mask_tokens and hide_from_teacher (the teacher's contexts) hold token
    names. A run that hits a non-finite loss is kept (as degraded), not fatal. `track`: token ids
    whose log-ratios are logged (special_tokens.TrackedTokens); after(label, model) adds numbers;
    extra_stats(options) -> an extra_stats hook for that run, logged besides `track`'s (e.g.
    lambda o: metrics.TailMass(o.get("k", 16))); start_acc: the student's held-out accuracy when
    the caller has measured it already."""
    test = test_problems(cfg)
    if start_acc is None:
        start_acc = evaluate(student, tok, test, 0.0, cfg.max_new_tokens)
    rows = []
    for seed in cfg.seed_list():
        for label, loss, options in runs:
            options = dict(options)
            if "mask_tokens" in options:
                options["mask_tokens"] = token_ids(options["mask_tokens"], tok)
            hide = token_ids(options.pop("hide_from_teacher", ""), tok)
            prefix = os.path.join(folder, "".join(c if c.isalnum() else "_" for c in label) + f"_s{seed}")
            model = copy.deepcopy(student)
            try:
                s = train_opd(model, teacher, tok, opd_config(cfg, loss, options, seed), prefix, test, log,
                              f"{label} s{seed}", start_acc=start_acc, print_every=10,
                              teacher_score=HiddenTokens(hide) if hide else None,
                              extra_stats=merged_stats(TrackedTokens(track) if track else None,
                                                       extra_stats(options) if extra_stats else None),
                              compile=cfg.compile)
            except FloatingPointError:
                with open(prefix + ".json") as f:
                    s = json.load(f)
            rows.append({"label": label, "seed": seed, **s, **(after(label, model) if after else {})})
    return rows
