"""train_toy.py --preset paper and --sweep: the published settings, and the drift measure on hand-made end points.

Fast checks only: the runs themselves are experiments (docs/toy.md, "At the published settings").
"""

import math

import pytest
import torch

import train_toy
from emulation import no_float64
from toy.continuous import TARGETS, drift, visitation


# ----------------------------------------------------------------------------------------------
# the preset and the sweep flags


def test_preset_paper_sets_the_published_settings():
    cfg = train_toy.parse_args(["--preset", "paper"])
    assert cfg.drift  # the paper's report: drift, orders of magnitude, heatmaps
    assert cfg.parts == ("control",)
    assert cfg.control_horizon == 20                     # horizon about 20
    assert cfg.student_steps == 2000                     # about 2,000 alternating-task iterations
    assert (cfg.control_batch, cfg.micro_batches) == (64, 8)
    assert cfg.control_seeds == (42, 43, 2026)
    assert cfg.control_gammas == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert (cfg.student_optimizer, cfg.student_lr) == ("adam", 3e-3)  # the paper names neither: the replica's
    assert cfg.sweep == ()


def test_explicit_flags_override_the_preset_and_default_is_untouched():
    cfg = train_toy.parse_args(["--preset", "paper", "--student_optimizer", "sgd", "--student_lr", "1e-6",
                                "--control_horizon", "10", "--control_seeds", "7"])
    assert (cfg.student_optimizer, cfg.student_lr, cfg.control_horizon, cfg.control_seeds) == ("sgd", 1e-6, 10, (7,))
    assert cfg.student_steps == 2000  # the rest still comes from the preset

    d = train_toy.parse_args([])  # no preset: the replica as before
    assert (d.drift, d.control_horizon, d.student_steps, d.control_seeds) == (False, 10, 300, (0,))
    assert d.control_gammas == (0.0, 0.5, 1.0) and d.parts == ("exact", "train", "control")


def test_sweep_points_parse_and_fall_back_to_the_control_horizon():
    cfg = train_toy.parse_args(["--preset", "paper", "--sweep", "sgd:1e-6,adam:3e-3:10"])
    assert cfg.sweep == (("sgd", 1e-6, None), ("adam", 3e-3, 10))
    assert train_toy.control_points(cfg) == [("sgd", 1e-6, 20), ("adam", 3e-3, 10)]
    assert train_toy.control_points(train_toy.parse_args(["--preset", "paper"])) == [("adam", 3e-3, 20)]


@pytest.mark.parametrize("flags, message", [(["--sweep", "rmsprop:1e-3"], "optimizer:lr"),
                                            (["--sweep", "sgd:fast"], "lr must be a number"),
                                            (["--sweep", "sgd:0"], "lr must be > 0"),
                                            (["--parts", "exact", "--sweep", "sgd:1e-6"], "add control"),
                                            (["--preset", "nature"], "invalid choice")])
def test_bad_sweep_and_preset_are_refused_with_a_reason(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_toy.parse_args(flags)
    assert message in capsys.readouterr().err


def test_help_explains_every_new_flag(capsys):
    with pytest.raises(SystemExit):
        train_toy.parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--preset", "--sweep", "--student_optimizer", "--control_seeds", "--drift", "--quick"):
        assert flag in out, flag


# ----------------------------------------------------------------------------------------------
# the drift measure


@pytest.mark.parametrize("task", [0, 1])
def test_drift_is_zero_at_the_own_target(task):
    d = drift(torch.full((10,), TARGETS[task]), task)
    assert d == dict(other=0.0, missed=0.0, dist=0.0, dist_sd=0.0, diverged=0.0, n=10)


@pytest.mark.parametrize("task", [0, 1])
def test_drift_is_total_at_the_other_target(task):
    d = drift(torch.full((4,), TARGETS[1 - task]), task)
    assert (d["other"], d["missed"], d["dist"], d["diverged"]) == (1.0, 1.0, 6.0, 0.0)  # targets -3 and +3


def test_drift_half_and_half():
    ends = torch.tensor([-3.0, -3.0, 3.0, 3.0])  # task 0 (target -3): two at home, two at the other target
    d = drift(ends, 0)
    assert (d["other"], d["missed"], d["dist"]) == (0.5, 0.5, 3.0)
    assert d["dist_sd"] == pytest.approx(math.sqrt(12.0))  # |s - z| = 0, 0, 6, 6: unbiased variance 12


def test_drift_counts_an_overshoot_as_missed_but_not_as_the_other_side():
    d = drift(torch.tensor([-10.0, -3.5, 0.0]), 0)  # past the own target; within tolerance; a tie between both
    assert d["other"] == 0.0                          # none is strictly nearer +3
    assert d["missed"] == pytest.approx(2 / 3)         # -10 (7 away) and 0 (3 away); -3.5 is 0.5 away
    assert d["dist"] == pytest.approx((7 + 0.5 + 3) / 3)


def test_drift_of_diverged_end_points():
    d = drift(torch.tensor([float("nan"), float("inf"), 3.0, -3.0]), 0)
    assert d["diverged"] == 0.5 and d["other"] == 0.25 and d["missed"] == 0.75
    assert d["dist"] == math.inf
    with pytest.raises(ValueError, match="at least one"):
        drift(torch.tensor([]), 0)


# ----------------------------------------------------------------------------------------------
# the heatmap's state-visitation frequency


def test_visitation_bins_positions_per_time_step():
    paths = torch.tensor([[2.0, -0.5, -3.0],
                          [2.0, 0.5, 9.0]])  # (n=2, T+1=3); 9 lies beyond the range: the top bin
    freq = visitation(paths, -6.0, 6.0, 12)  # bins of width 1: bin i holds [-6 + i, -5 + i)
    assert freq.shape == (12, 3)
    assert torch.allclose(freq.sum(0), torch.ones(3, dtype=freq.dtype))
    assert freq[8, 0] == 1.0                   # both start in [2, 3)
    assert freq[5, 1] == 0.5 and freq[6, 1] == 0.5
    assert freq[3, 2] == 0.5 and freq[11, 2] == 0.5
    nan_path = visitation(torch.tensor([[0.0, float("nan")]]), -6.0, 6.0, 12)
    assert nan_path[:, 1].sum() == 0.0         # a non-finite position is counted nowhere


# ----------------------------------------------------------------------------------------------
# the report path end to end, tiny, in the MPS precision


def test_preset_and_sweep_report_run_tiny_without_float64(tmp_path, capsys):
    """A few steps of --preset paper with a two-point sweep: the drift table is printed, no float64 is made."""
    tiny = ["--preset", "paper", "--control_seeds", "42,43", "--control_gammas", "0,1", "--student_steps", "3",
            "--teacher_steps", "3", "--eval_episodes", "8", "--dtype", "float32", "--no-plots", "--out", str(tmp_path)]
    with no_float64():
        out = train_toy.main(tiny + ["--sweep", "sgd:1e-6,adam:3e-3:5"])
    text = capsys.readouterr().out
    assert "Sweep of the continuous-control study over 2 points" in text and "missed" in text
    rows = out["control_summary"]
    assert [(r["optimizer"], r["horizon"], r["gamma"]) for r in rows] == [("sgd", 20, 0.0), ("sgd", 20, 1.0),
                                                                           ("adam", 5, 0.0), ("adam", 5, 1.0)]
    assert all(0.0 <= r["other"] <= r["missed"] <= 1.0 or r["diverged"] for r in rows)
    assert rows[0]["orders"] == 0.0 and rows[2]["orders"] == 0.0  # each point against its own gamma = 0
