"""experiments/m6_on_policy.py end to end on three tiny pairs: every arm runs to the common budget
(and not past one step beyond it), the figures it reports are computed from the runs, the verdicts
are read over three pairs, a restart reads the runs back; and the report's interpolations by hand."""

import json
import math

import pytest

from conftest import run_on_tiny_pairs

FLAGS = ["--pairs", "3", "--seeds", "1", "--opd_steps", "2", "--opd_batch", "4", "--max_new_tokens", "8",
         "--digits", "2", "--eval_n", "4", "--final_eval_n", "8", "--probe_n", "12", "--m6_evals", "2",
         "--rlvr_prompts", "2", "--rlvr_group", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def m6_run(tmp_path_factory):
    from experiments import m6_on_policy
    return run_on_tiny_pairs(tmp_path_factory, "m6", m6_on_policy.main, FLAGS)


def test_every_arm_runs_once_per_pair_to_the_common_budget(m6_run):
    from experiments.m6_on_policy import ARMS
    _, out = m6_run
    runs = out["runs"]
    assert sorted({r["label"] for r in runs}) == sorted(a[0] for a in ARMS) and len(runs) == 3 * len(ARMS)
    budget = {p["pair"]: p["budget"] for p in out["pairs"]}
    for r in runs:
        assert r["flops"] > 0 and r["flops_given"] <= r["flops"]
        per_step = r["flops"] / r["steps_done"]
        # stopped at the budget (within one step past it), or at the end of its schedule below it
        assert r["flops"] < budget[r["pair"]] + per_step + 1 and (r["flops"] >= budget[r["pair"]] or r["steps_done"] == r["steps"])
        assert [e[0] for e in r["evals"]][0] == 0 and r["evals"][-1][2] == pytest.approx(r["flops"])
        for bucket in ("short", "long"):
            assert set(r["probe"][bucket]) == {"teacher", "own"}
    seqkd = [r for r in runs if r["label"] == "seqkd"]
    assert all(r["flops"] > r["flops_given"] for r in seqkd)  # the teacher's sampling is charged, not given
    rlvr = [r for r in runs if r["label"] == "rlvr"]
    assert all(r["flops"] == r["flops_given"] for r in rlvr)  # no teacher at all


def test_the_report_has_its_verdicts_table_and_files(m6_run):
    root, out = m6_run
    assert set(out["verdicts"]) >= {"gkd_rkl", "gkd_fkl", "tm_charged", "tm_given", "dense_vs_sparse",
                                    "exposure_seqkd", "exposure_kd_rkl", "exposure_length", "advantage_falls"}
    assert all(v["pairs"] == 3 and v["verdict"] != "pending" for v in out["verdicts"].values())
    text = (root / "m6" / "m6.txt").read_text()
    assert "exposure gap" in text and "half gap" in text and "on-policy's accuracy" in text and "opd_rkl" in text
    assert (root / "m6" / "m6.csv").exists()


def test_a_restarted_m6_reads_its_runs_back(m6_run, capsys):
    from experiments import m6_on_policy
    root, _ = m6_run
    m6_on_policy.main(["--out_dir", str(root)] + FLAGS)
    assert "runs finished earlier, read back" in capsys.readouterr().out


def test_a_subset_of_arms_reuses_the_runs_and_reports_only_its_verdicts(m6_run, capsys):
    from experiments import m6_on_policy
    root, _ = m6_run
    m6_on_policy.main(["--out_dir", str(root), "--arms", "seqkd,opd_rkl"] + FLAGS)
    out = capsys.readouterr().out
    assert "3 of 3 runs finished earlier" in out and "6 of 6 runs finished earlier" in out  # the pairs, then 2 arms x 3
    out = json.loads((root / "m6" / "m6.json").read_text())
    assert {r["label"] for r in out["runs"]} == {"seqkd", "opd_rkl"}
    assert "gkd_rkl" not in out["verdicts"] and "tm_charged" in out["verdicts"]


def test_reach_interpolates_in_log_flops():
    from experiments.m6_report import reach
    evals = [[0, 0.5, 0.0, 0.0], [10, 0.6, 1e9, 5e8], [20, 0.8, 1e11, 5e10]]
    assert reach(evals, 0.55) == 1e9  # crossed before the first evaluation after the start: its FLOPs
    assert reach(evals, 0.7) == pytest.approx(math.sqrt(1e9 * 1e11))  # half way in log FLOPs
    assert reach(evals, 0.7, 3) == pytest.approx(math.sqrt(5e8 * 5e10))
    assert reach(evals, 0.9) is None
    assert reach(evals, 0.5) == 0.0


def test_bad_m6_flags_are_refused(capsys):
    from experiments import m6_on_policy
    for argv, flag in ((["--m6_flops", "-1"], "--m6_flops"), (["--probe_n", "0"], "--probe_n"),
                       (["--lmbda", "0.5"], "unrecognized arguments: --lmbda"), (["--arms", "seqkd"], "--arms"),
                       (["--arms", "opd_rkl,bogus"], "--arms")):
        with pytest.raises(SystemExit) as e:
            m6_on_policy.main(argv)
        assert e.value.code == 2 and flag in capsys.readouterr().err
