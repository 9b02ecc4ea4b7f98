"""experiments/m8_multi_task.py end to end on three tiny pairs: its models are trained once (the
teachers on their tasks, S1 from the pair's student) and reused, every run of the three parts is
reported on both tasks with its verdicts, a restart reads the runs back, and a teacher trained on
another task mix or a bad setting is refused by name."""

import pytest

from conftest import rerun, run_on_tiny_pairs
from nanoopd.checkpoint import read_checkpoint
from nanoopd.tasks import encode_example, sample_problems, weighted_ops

FLAGS = ["--pairs", "3", "--seeds", "1", "--opd_steps", "2", "--opd_batch", "4", "--max_new_tokens", "8",
         "--digits", "2", "--eval_n", "4", "--final_eval_n", "8", "--threads", "1", "--t_steps", "2",
         "--t_layer", "1", "--t_embd", "32", "--t_head", "2", "--batch_size", "4", "--s_steps", "2", "--s_pool", "8",
         "--forget_steps", "2", "--opd_eval_every", "1"]


def fake_traces(teacher, tok, cfg):
    """The cold-start pool as train_math.teacher_traces returns it (a tiny teacher ends no trace)."""
    return [encode_example(tok, p) for p in sample_problems(8, "train", cfg.seed + 1, cfg.digits, weighted_ops(cfg.s_ops))]


@pytest.fixture(scope="module")
def m8_run(tmp_path_factory):
    import train_math
    from experiments import m8_multi_task as m8
    mp = pytest.MonkeyPatch()
    mp.setattr(train_math, "teacher_traces", fake_traces)
    out = run_on_tiny_pairs(tmp_path_factory, "m8", m8.main, FLAGS)
    mp.undo()
    return out


def test_every_run_of_every_part_is_reported_on_both_tasks_with_its_verdicts(m8_run):
    root, out = m8_run
    runs = [r for r in out["runs"] if r["part"] != "stages"]
    assert sorted({r["label"] for r in runs}) == ["recover_opd", "recover_sft", "renorm_generalist", "st_generalist",
                                                  "st_routed"] and len(runs) == 15
    stages = {r["label"] for r in out["runs"] if r["part"] == "stages"}
    assert stages == {"student", "pair_student", "forgot", "generalist", "rev", "pair_teacher"}
    assert all(0 <= r["acc_math"] <= 1 and 0 <= r["acc_rev"] <= 1 for r in out["runs"])
    assert all(r["final_acc"] == (r["acc_math"] + r["acc_rev"]) / 2 for r in out["runs"])
    opd = next(r for r in runs if r["label"] == "recover_opd")
    assert [s for s, _ in opd["evals_by_task"]] == [0, 1, 2] and set(opd["evals_by_task"][0][1]) == {"math", "rev"}
    assert set(out["verdicts"]) == {"renorm_above_sampled", "routed_above_generalist", "routed_same_as_generalist",
                                    "sft_forgets", "opd_recovers", "opd_above_sft", "opd_keeps_reversal"}
    for label, ops in (("generalist", "+-~~"), ("rev", "~")):
        assert read_checkpoint(str(root / "pair2337" / "m8" / label / "teacher.pt"))["extra"]["train"]["ops"] == ops
    assert (root / "m8" / "m8.txt").read_text().count("%") > 20 and (root / "pair3337" / "m8" / "forgot_2.pt").exists()


def test_a_restarted_m8_reads_its_runs_back(m8_run, capsys, monkeypatch):
    from experiments import m8_multi_task as m8
    root, _ = m8_run
    monkeypatch.setattr(m8, "train_student", lambda *a: pytest.fail("a finished student was trained again"))
    assert "15 of 15 runs finished earlier, read back" in rerun(m8, root, FLAGS, capsys, monkeypatch)


def test_a_teacher_of_another_mix_or_a_bad_setting_is_refused(m8_run, capsys):
    from experiments import m8_multi_task as m8
    from nanoopd.script import cli
    root, _ = m8_run
    for flag, value, says in (("--mt_ops", "+-", "--mt_ops must mix '~' with '+' or '-'"),
                              ("--m8_parts", "forget", "--m8_parts must be comma-separated names of"),
                              ("--forget_steps", "0", "--forget_steps must be >= 1")):
        with pytest.raises(SystemExit) as e:
            m8.main(["--out_dir", str(root)] + FLAGS + [flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err, err
    with pytest.raises(SystemExit) as e:  # the generalist was trained on half reversal, not a third
        cli(lambda: m8.main(["--out_dir", str(root)] + FLAGS + ["--mt_ops", "+-~"]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and "was trained with --ops +-~~ (asked: +-~)" in err
