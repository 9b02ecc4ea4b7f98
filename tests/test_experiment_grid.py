"""experiments/common.py: the pairs and the grid over pairs x OPD seeds give the same bits with one
worker or two (each run's thread count fixed), a restarted grid reads its finished runs back
instead of redoing them, the per-cell interval is the t-interval over the pairs' means, and the
verdict rule reads the pairs' differences."""

import csv
import math
import os

import pytest
import torch

from nanoopd.checkpoint import save_checkpoint
from nanoopd.model import GPT, GPTConfig
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()
PAIR_SEEDS = (1337, 2337)  # --seed 1337 --pairs 2: pair i has pipeline seed 1337 + 1000 i


def tiny(seed: int, n_embd: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=n_embd))


def two_pairs(root, both: bool = True) -> None:
    """Tiny teacher/student pairs where --pairs 2 looks for them: <out_dir> and <out_dir>/pair2337
    (both=False: the first only; the grid trains the second)."""
    for i, folder in enumerate((root, root / "pair2337")[:2 if both else 1]):
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(str(folder / "teacher.pt"), tiny(10 + i, 48), 0)
        save_checkpoint(str(folder / "student.pt"), tiny(20 + i), 0)


def m1_flags(out_dir, jobs: int, threads: int) -> list[str]:
    """M1 on two pairs, one OPD seed; a missing pair is a 3-step 1 x 16 teacher and a random student."""
    return ["--out_dir", str(out_dir), "--pairs", "2", "--seeds", "3", "--jobs", str(jobs), "--threads", str(threads),
            "--opd_steps", "2", "--opd_batch", "4", "--max_new_tokens", "8", "--digits", "1", "--eval_n", "4",
            "--final_eval_n", "8", "--t_layer", "1", "--t_embd", "16", "--t_head", "2", "--t_steps", "3",
            "--s_layer", "1", "--s_embd", "16", "--s_head", "2", "--s_steps", "0", "--batch_size", "4"]


def csv_rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def run_weights(root, pair_dir: str, label: str) -> dict:
    folder = root / pair_dir / "m1" if pair_dir else root / "m1"
    return torch.load(folder / f"{label}_s3.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def one_and_two_jobs(tmp_path_factory):
    """M1 on two tiny pairs (the second trained by the grid), one seed: with 1 job x 1 thread and
    with 2 jobs x (2 // 2) threads."""
    from experiments import m1_objectives
    roots = []
    for jobs, threads in ((1, 1), (2, 2)):
        root = tmp_path_factory.mktemp(f"jobs{jobs}")
        two_pairs(root, both=False)
        m1_objectives.main(m1_flags(root, jobs, threads))
        roots.append(root)
    return roots


def test_two_jobs_give_the_bits_of_one(one_and_two_jobs):
    from experiments.m1_objectives import CSV, RUNS
    one, two = one_and_two_jobs
    rows1, rows2 = csv_rows(one / "m1" / "m1.csv"), csv_rows(two / "m1" / "m1.csv")
    assert len(rows1) == len(rows2) == 2 * len(RUNS)  # 2 pairs x 1 seed x every objective
    assert sorted({r["pair"] for r in rows1}) == [str(s) for s in PAIR_SEEDS]
    for a, b in zip(rows1, rows2):  # the same runs, in the same order, with the same numbers
        assert {k: a[k] for k in CSV if k != "seconds"} == {k: b[k] for k in CSV if k != "seconds"}
    for role in ("teacher", "student"):  # the pair trained by the grid
        w1, w2 = (torch.load(root / "pair2337" / f"{role}.pt", weights_only=False)["model"] for root in (one, two))
        assert all(torch.equal(w1[k], w2[k]) for k in w1)
    for pair_dir in ("", "pair2337"):
        for label in ("sampled_token", "topk_renorm"):
            w1, w2 = run_weights(one, pair_dir, label), run_weights(two, pair_dir, label)
            assert all(torch.equal(w1[k], w2[k]) for k in w1)  # bit-identical weights after OPD
    start = {r["pair"]: r["start_acc"] for r in rows1}
    assert len(start) == 2  # each pair's own student


def test_m1_draws_its_figure_where_matplotlib_is_installed(one_and_two_jobs):
    pytest.importorskip("matplotlib")
    png = one_and_two_jobs[0] / "m1" / "m1.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_restarted_grid_reads_finished_runs_back(one_and_two_jobs, monkeypatch):
    import experiments.common as common
    from experiments import m1_objectives
    root = one_and_two_jobs[0]
    before = csv_rows(root / "m1" / "m1.csv")
    redo = root / "pair2337" / "m1" / "topk_renorm_s3.row.json"
    os.remove(redo)  # as if the grid had been stopped during this run
    calls = []
    real = common.train_opd
    monkeypatch.setattr(common, "train_opd", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    m1_objectives.main(m1_flags(root, 1, 1))
    assert calls == [str(redo)[:-len(".row.json")]]  # only the unfinished run ran again
    assert redo.exists()
    after = csv_rows(root / "m1" / "m1.csv")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in after] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in before]  # and it ends where it would have


def test_a_scripts_own_hook_names_the_run_the_same_in_a_worker():
    """Run as a script, an experiment's own functions (the stability map's tail_hook) live in
    __main__ in the parent and in __mp_main__ in a spawned worker, which writes the row: the run's
    key must not differ, or a restarted grid with --jobs 2 would run every run again."""
    from experiments.common import ExperimentConfig
    from experiments.jobs import run_key

    def hook(options):
        return None
    in_worker = lambda options: None
    hook.__module__, in_worker.__module__, in_worker.__qualname__ = "__main__", "__mp_main__", hook.__qualname__
    cfg = ExperimentConfig()
    assert run_key(cfg, {"extra_stats": hook}) == run_key(cfg, {"extra_stats": in_worker})
    other = lambda options: None
    other.__module__, other.__qualname__ = "experiments.stability_map", hook.__qualname__
    assert run_key(cfg, {"extra_stats": hook}) != run_key(cfg, {"extra_stats": other})


def test_interval_is_a_t_interval_over_the_pairs_means():
    from experiments.common import cell_text, interval
    rows = [{"pair": p, "final_acc": v} for p, vs in ((1, (0.4, 0.6)), (2, (0.6, 0.6)), (3, (0.7, 0.7)))
            for v in vs]
    c = interval(rows, "final_acc")
    assert c["per_pair"] == pytest.approx({1: 0.5, 2: 0.6, 3: 0.7})
    assert c["mean"] == pytest.approx(0.6)
    half = 4.303 * 0.1 / math.sqrt(3)  # t_{0.975, 2} x sd of the pair means / sqrt(3)
    assert (c["low"], c["high"]) == pytest.approx((0.6 - half, 0.6 + half))
    assert cell_text(rows) == "60.0% [35.2, 84.8] (50.0 60.0 70.0)"
    one_pair = interval([{"pair": 1, "final_acc": v} for v in (0.5, 0.7)], "final_acc")
    assert one_pair["interval"] == "t over the runs of one pair"
    assert (one_pair["low"], one_pair["high"]) == pytest.approx((0.6 - 12.706 * 0.1, 0.6 + 12.706 * 0.1))
    assert interval([{"pair": 1, "final_acc": 0.5}], "final_acc")["low"] is None  # one run: no interval


def test_bad_pairs_and_jobs_are_refused(capsys):
    from experiments import m1_objectives
    for flag in ("--pairs", "--jobs"):
        with pytest.raises(SystemExit) as e:
            m1_objectives.main([flag, "0"])
        assert e.value.code == 2 and f"{flag} must be >= 1" in capsys.readouterr().err


def test_verdict_rule_reads_the_pairs_differences():
    from experiments.common import verdict, verdict_text
    row = lambda pair, label, acc: {"pair": pair, "label": label, "final_acc": acc}
    # a above b by 3, 4, 5 points on three pairs (two seeds each): every pair, interval above 0
    rows = [row(p, lab, acc + s) for p, gap in ((1, .03), (2, .04), (3, .05)) for s in (0, .01)
            for lab, acc in (("a", .6 + gap), ("b", .6))]
    v = verdict(rows, "a", "b")
    assert v["per_pair"] == pytest.approx({1: .03, 2: .04, 3: .05}) and v["verdict"] == "reproduced"
    assert (v["low"], v["high"]) == pytest.approx((.04 - 4.303 * .01 / math.sqrt(3), .04 + 4.303 * .01 / math.sqrt(3)))
    wide = [dict(r, final_acc=r["final_acc"] + .04) if r["pair"] == 3 and r["label"] == "a" else r for r in rows]
    assert verdict(wide, "a", "b")["verdict"] == "partly"  # 3, 4, 9 points: every pair, but the interval includes 0
    flipped = [dict(r, final_acc=r["final_acc"] - .1) if r["pair"] == 3 and r["label"] == "a" else r for r in rows]
    assert verdict(flipped, "a", "b")["verdict"] == "partly"  # two pairs of three
    assert verdict(rows, "b", "a")["verdict"] == "not reproduced"
    assert verdict([r for r in rows if r["pair"] < 3], "a", "b")["verdict"] == "pending"  # fewer than 3 pairs
    assert verdict_text(v) == "+4.0 [+1.5, +6.5] (+3.0 +4.0 +5.0) reproduced"  # as the stability map prints it
    one = verdict([r for r in rows if r["pair"] == 1], "a", "b")
    assert verdict_text(one) == "+3.0 (+3.0) pending"  # one pair: no interval


def test_stage_eval_reads_the_final_accuracies_on_final_eval_n(tmp_path, capsys):
    from nanoopd.tasks import sample_problems
    from train_math import main
    two_pairs(tmp_path, both=False)
    summary = main(["--out_dir", str(tmp_path), "--stages", "eval", "--digits", "1", "--max_new_tokens", "8",
                    "--eval_n", "3", "--final_eval_n", "12"])
    out = capsys.readouterr().out
    assert "n=12" in out and "n=3" not in out
    assert all(0 <= summary[k] <= 1 for k in ("teacher_acc_greedy", "student_acc_sampled"))
    assert sample_problems(3, "test", 1337, 1) == sample_problems(12, "test", 1337, 1)[:3]  # the small set opens the large


def test_the_stability_map_runs_only_the_rows_asked_for():
    from experiments.stability_map import OBJECTIVES, StabilityConfig, k_runs
    from nanoopd.config import ConfigError
    cfg = StabilityConfig(objectives="sampled_token,topk_stopgrad(teacher)", ks="4,16")
    assert cfg.labels() == ["topk_stopgrad(teacher)", "sampled_token"]  # in the map's order
    assert [r[0] for r in cfg.rows()] == cfg.labels()
    assert [r[0] for r in k_runs(cfg)] == ["topk_stopgrad(teacher) k4"]  # the K sweep of the chosen rows only
    assert StabilityConfig().labels() == [o[0] for o in OBJECTIVES]
    with pytest.raises(ConfigError, match="unknown row"):
        StabilityConfig(objectives="topk_stopgrad")


def test_a_pair_trained_with_other_flags_is_not_reused(tmp_path, capsys):
    """A pair's checkpoints record the flags train_math.py trained them with; an experiment that
    asks for another student stops with a message instead of taking the old one for the new."""
    from experiments import m1_objectives
    from nanoopd.script import cli
    flags = m1_flags(tmp_path, 1, 1)
    flags[flags.index("--pairs") + 1] = "1"
    m1_objectives.main(flags)  # trains the pair (its student: --s_embd 16), runs the grid
    flags[flags.index("--s_embd") + 1] = "32"
    with pytest.raises(SystemExit) as done:
        cli(lambda: m1_objectives.main(flags))
    err = capsys.readouterr().err
    assert done.value.code == 1 and "Traceback" not in err
    assert "student.pt was trained with --s_embd 16 (asked: 32)" in err and "another --out_dir" in err


def test_the_tail_levels_are_read_from_the_trailing_mean():
    """lead() reads the tail through its 5-step trailing mean: the relative rise, each absolute level
    and the peak; level_table counts the drops each level precedes and the quiet runs it fires in."""
    from experiments.tail_warning import TAIL_LEVELS, lead, level_table
    assert TAIL_LEVELS == (0.003, 0.01, 0.03)
    tails = [1e-4] * 10 + [0.02] * 5 + [0.5] * 5  # steps 1..20: quiet, a small rise, then the leak
    row = {"evals": [(0, 0.90), (10, 0.89), (20, 0.40)], "start_acc_train": 0.90}
    got = lead(row, [{"tail_mass": t} for t in tails])
    assert got["first_tail_mass"] == pytest.approx(1e-4) and got["acc_drop_step"] == 20
    # the trailing mean at step 11 is (4 x 1e-4 + 0.02) / 5 = 0.00408: past 2x the start and past 0.003
    assert got["tail_step"] == 11 and got["tail_0.003_step"] == 11
    assert got["tail_0.01_step"] == 13 and got["tail_0.03_step"] == 16  # 0.0121 at 13; 0.112 at 16
    assert got["peak_tail_mass"] == pytest.approx(0.5)
    quiet = lead({"evals": [(0, 0.9), (10, 0.9)], "start_acc_train": 0.9}, [{"tail_mass": 1e-4}] * 10)
    assert quiet["tail_step"] is None and quiet["acc_drop_step"] is None and quiet["tail_0.003_step"] is None
    rows = [{**got, "degraded": "collapse", "final_tail_mass": 0.5},
            {**quiet, "degraded": "", "final_tail_mass": 1e-4},
            {**quiet, "degraded": "", "final_tail_mass": 0.005, "tail_0.003_step": 7, "peak_tail_mass": 0.005}]
    lines = level_table(rows)
    assert "the 1 degraded runs whose accuracy dropped" in lines[0]
    assert lines[2].split(" | ") == ["0.003 ", "1 of 1           ", "9-9       ", "1 of 2"]
    assert lines[3].split(" | ")[1:] == ["1 of 1           ", "7-7       ", "0 of 2"]
    assert lines[4].split(" | ")[1:] == ["1 of 1           ", "4-4       ", "0 of 2"]
    assert lines[5] == "highest trailing mean of a run that did not degrade: 0.0050; final tail of the degraded runs: 0.5000-0.5000"


def test_the_stability_table_prints_each_rates_verdicts_against_sampled_token():
    """tables() prints, under the accuracy grid, the verdict rule for every objective against
    sampled-token at every rate, and sampled-token's end against its start: here renorm is 2, 3, 4
    points above on the three pairs at 1e-3 (reproduced) and level with it at 1e-4 (not reproduced)."""
    from experiments.stability_map import StabilityConfig, tables
    cfg = StabilityConfig(lrs="1e-4,1e-3", ks="16", k_lr=1e-3, objectives="topk_renorm,sampled_token")
    quiet = {"first_tail_mass": 1e-3, "final_tail_mass": 1e-3, "degraded": "", "tail_step": None, "acc_drop_step": None,
             "peak_tail_mass": 1e-3, **{f"tail_{x:g}_step": None for x in (0.003, 0.01, 0.03)}}
    rows = [{**quiet, "label": label, "lr": lr, "pair": pair, "seed": seed, "start_acc": 0.5,
             "final_acc": 0.55 + (0.01 * (pair + 1) if label == "topk_renorm" and lr == 1e-3 else 0)}
            for label in ("topk_renorm", "sampled_token") for lr in (1e-4, 1e-3) for pair in (1, 2, 3) for seed in (1, 2)]
    text = tables(cfg, rows, 0.97, 0.5, 60.0)
    block = text.split("the verdict rule")[1].splitlines()
    renorm, gain = (next(line for line in block if line.startswith(x)) for x in ("topk_renorm", "end > start"))
    at_1e4, at_1e3 = renorm.split(" | ")[1:]
    assert at_1e3.strip() == "+3.0 [+0.5, +5.5] (+2.0 +3.0 +4.0) reproduced"
    assert at_1e4.strip() == "+0.0 [+0.0, +0.0] (+0.0 +0.0 +0.0) not reproduced"
    assert gain.split(" | ")[1].strip() == "+5.0 [+5.0, +5.0] (+5.0 +5.0 +5.0) reproduced"
