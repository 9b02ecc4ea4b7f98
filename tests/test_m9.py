"""experiments/m9_which_teacher.py end to end on three tiny pairs: the extra teachers are trained once
(the thin one on the student's pool) and reused, every run of both halves is reported with its
verdicts, the overlap mass is read back from the runs' logs, a restart reads the runs back; the
equivalence rule by hand; and bad settings answered by name."""

import json

import pytest

from conftest import rerun, tiny_pairs
from nanoopd.checkpoint import read_checkpoint
from nanoopd.tasks import encode_example, sample_problems
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()
FLAGS = ["--pairs", "3", "--seeds", "1", "--opd_steps", "2", "--opd_batch", "4", "--max_new_tokens", "8",
         "--digits", "2", "--eval_n", "4", "--final_eval_n", "8", "--threads", "1", "--t_steps", "2",
         "--t_layer", "1", "--t_embd", "32", "--t_head", "2", "--big", "1,48,2", "--small", "1,16,2",
         "--select_pool", "16", "--batch_size", "4"]
POOL = []  # the traces the thin teachers were given


def fake_traces(teacher, tok, cfg):
    """The student's pool, as train_math.teacher_traces returns it (a tiny teacher ends no trace)."""
    pool = [encode_example(tok, p) for p in sample_problems(8, "train", cfg.seed + 1, cfg.digits, cfg.ops)]
    POOL.append(cfg.seed)
    return pool


@pytest.fixture(scope="module")
def m9_run(tmp_path_factory):
    from experiments import m9_which_teacher as m9
    root = tmp_path_factory.mktemp("m9")
    tiny_pairs(root)
    mp = pytest.MonkeyPatch()
    mp.setattr(m9, "teacher_traces", fake_traces)
    m9.main(["--out_dir", str(root)] + FLAGS)
    mp.undo()
    return root, json.loads((root / "m9" / "m9.json").read_text())


def test_every_teacher_and_prompt_run_is_reported_with_its_verdicts(m9_run):
    from experiments.m9_which_teacher import TEACHERS
    root, out = m9_run
    runs = out["runs"]
    labels = sorted({r["label"] for r in runs})
    assert labels == sorted(list(TEACHERS) + [f"{w}_{r}" for w in ("cold", "scratch") for r in ("random", "aligned")])
    assert len(runs) == 3 * 8 and {r["pair"] for r in runs} == {1337, 2337, 3337}
    assert POOL == [1337, 2337, 3337]  # one thin teacher per pair, on that pair's pool
    for label, shape in (("thin", (1, 32, 2)), ("big", (1, 48, 2)), ("small", (1, 16, 2))):
        ck = read_checkpoint(str(root / "pair2337" / "m9" / label / "teacher.pt"))
        c = ck["config"]
        assert (c["n_layer"], c["n_embd"], c["n_head"]) == shape and ck["extra"]["train"]["seed"] == 2337
    params = {r["label"]: r["params"] for r in runs if r["part"] == "teachers"}
    assert params["big"] > params["thin"] > params["small"]
    prompts = [r for r in runs if r["part"] == "prompts"]
    assert all(r["kept"] == 4 for r in prompts)  # 0.25 of 16 candidates
    aligned = [r for r in prompts if r["label"].endswith("aligned")]
    assert all(r["kept_alignment"] >= r["pool_alignment"] - 1e-9 for r in aligned)  # the rule keeps the best
    assert set(out["verdicts"]) >= {"new_capability", "thin_teaches_nothing", "thin_above_student", "big_same",
                                    "small_same", "aligned_scratch", "aligned_cold", "mass_q_rises", "mass_q_level"}
    text = (root / "m9" / "m9.txt").read_text()
    assert "new capability" in text and "overlap mass of every on-policy OPD run" in text


def test_the_overlap_mass_is_read_back_from_every_runs_log(m9_run):
    root, out = m9_run
    masses = out["masses"]
    assert len(masses) == 3 * 8 and {m["experiment"] for m in masses} == {"m9"}
    first = json.loads((root / "pair2337" / "m9" / "big_s1.json").read_text())["first_step"]
    m = next(m for m in masses if m["pair"] == 2337 and m["run"] == "big_s1")
    assert m["start_mass_q"] == first["overlap_mass_teacher"] and m["start_mass_pi"] == first["overlap_mass_student"]
    lines = (root / "pair2337" / "m9" / "big_s1.jsonl").read_text().splitlines()
    assert m["end_mass_q"] == json.loads(lines[-1])["overlap_mass_teacher"]  # 2 steps: the tail is the last one


def test_a_restarted_m9_reuses_its_teachers_and_reads_its_runs_back(m9_run, capsys, monkeypatch):
    from experiments import m9_which_teacher as m9
    root, _ = m9_run
    assert "24 of 24 runs finished earlier, read back" in rerun(m9, root, FLAGS, capsys, monkeypatch)


def test_a_teacher_from_another_task_or_a_bad_setting_is_refused(m9_run, capsys):
    from experiments import m9_which_teacher as m9
    from nanoopd.script import cli
    root, _ = m9_run
    for flag, value, says in (("--big", "2,10,3", "--big must be layers,width,heads"),
                              ("--small", "2,96", "--small must be layers,width,heads"),
                              ("--select_keep", "0.01", "leaves no prompt to train on"),
                              ("--m9_parts", "teacher", "--m9_parts must be comma-separated names of teachers, prompts")):
        with pytest.raises(SystemExit) as e:
            m9.main(["--out_dir", str(root)] + FLAGS + [flag, value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err, err
    flags = list(FLAGS)
    flags[flags.index("--digits") + 1] = "3"  # the extra teachers were trained on 2-digit problems
    with pytest.raises(SystemExit) as e:
        cli(lambda: m9.main(["--out_dir", str(root)] + flags))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and "was trained with --digits 2 (asked: 3)" in err


def test_the_equivalence_rule_reads_the_interval_against_the_margin():
    from experiments.stats import equivalence
    row = lambda pair, label, acc: {"pair": pair, "label": label, "final_acc": acc}
    rows = lambda gaps: [row(p, lab, .6 + (g if lab == "a" else 0)) for p, g in zip((1, 2, 3), gaps) for lab in "ab"]
    assert equivalence(rows((.001, -.002, .004)), "a", "b", .02)["verdict"] == "reproduced"  # inside +-2 points
    assert equivalence(rows((.03, -.02, .01)), "a", "b", .02)["verdict"] == "partly"  # includes 0, reaches past 2
    assert equivalence(rows((.05, .06, .07)), "a", "b", .02)["verdict"] == "not reproduced"  # excludes 0
    assert equivalence(rows((.05, .06, .07))[:4], "a", "b", .02)["verdict"] == "pending"  # two pairs
