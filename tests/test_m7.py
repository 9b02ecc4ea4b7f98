"""experiments/m7_cross_tokenizer.py end to end on three tiny pairs: the other tokenizer's teachers
are trained once (reading 'digits', recorded in their checkpoints) and reused, every run is reported
with its verdicts, a restart reads the runs back, and a teacher trained otherwise is refused by name."""

import pytest

from conftest import rerun, run_on_tiny_pairs
from nanoopd.checkpoint import read_checkpoint

FLAGS = ["--pairs", "3", "--seeds", "1", "--opd_steps", "2", "--opd_batch", "4", "--max_new_tokens", "8",
         "--digits", "2", "--eval_n", "4", "--final_eval_n", "8", "--threads", "1", "--t_steps", "2",
         "--t_layer", "1", "--t_embd", "32", "--t_head", "2", "--batch_size", "4"]


@pytest.fixture(scope="module")
def m7_run(tmp_path_factory):
    from experiments import m7_cross_tokenizer as m7
    return run_on_tiny_pairs(tmp_path_factory, "m7", m7.main, FLAGS)


def test_every_run_is_reported_with_its_verdicts(m7_run):
    from experiments.m7_cross_tokenizer import runs
    root, out = m7_run
    labels = [label for label, _, _ in runs("m7/digits")]
    assert sorted({r["label"] for r in out["runs"]}) == sorted(labels) and len(out["runs"]) == 3 * len(labels)
    ck = read_checkpoint(str(root / "pair3337" / "m7" / "digits" / "teacher.pt"))
    assert ck["config"]["tokenizer"] == "digits" and ck["extra"]["train"]["seed"] == 3337
    assert set(out["verdicts"]) == {"mismatch_distorts", "chunks_recover", "path_kl_recovers", "full_recovers",
                                    "uld_fails", "uld_teaches", "gold_below_chunks", "naive_teaches"}
    assert all(v["verdict"] != "pending" for v in out["verdicts"].values())  # three pairs: every rule applies
    full = [r for r in out["runs"] if r["label"] == "xt_full"]
    assert all(0 < r["first_step"]["one_token_share"] <= 1 for r in full)
    assert "aligned chunks recover" in (root / "m7" / "m7.txt").read_text()


def test_a_restarted_m7_reuses_its_teachers_and_reads_its_runs_back(m7_run, capsys, monkeypatch):
    from experiments import m7_cross_tokenizer as m7
    root, _ = m7_run
    assert "21 of 21 runs finished earlier, read back" in rerun(m7, root, FLAGS, capsys, monkeypatch)


def test_a_teacher_trained_otherwise_is_refused_by_name(m7_run, capsys):
    from experiments import m7_cross_tokenizer as m7
    from nanoopd.script import cli
    root, _ = m7_run
    flags = list(FLAGS)
    flags[flags.index("--t_steps") + 1] = "3"
    with pytest.raises(SystemExit) as e:
        cli(lambda: m7.main(["--out_dir", str(root)] + flags))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and "was trained with --t_steps 2 (asked: 3)" in err
    with pytest.raises(SystemExit) as e:
        m7.main(["--out_dir", str(root)] + FLAGS + ["--xt_tokenizer", "bytes"])
    assert e.value.code == 2 and "--xt_tokenizer" in capsys.readouterr().err
