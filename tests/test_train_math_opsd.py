"""train_math.py: the OPSD / RLVR flags are checked, and the experiments M3, M4, M5 and the stages
rlvr and opd --mode opsd run end to end on tiny checkpoints and write their tables."""

import csv

import pytest
import torch

from nanoopd.checkpoint import save_checkpoint
from nanoopd.model import GPT, GPTConfig
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()
# tiny, fast runs: 1-digit problems, short budgets, one seed
TINY = ["--digits", "1", "--max_new_tokens", "8", "--eval_n", "6", "--opd_steps", "2", "--opd_batch", "4",
        "--log_every", "0"]
RLVR = ["--rlvr_steps", "2", "--rlvr_prompts", "2", "--rlvr_group", "2"]



def test_every_new_flag_is_explained_in_help(capsys):
    from experiments import m4_rlvr_teacher
    from train_math import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--mode", "--pi", "--live_teacher", "--pi_steps", "--teacher", "--rlvr_init", "--rlvr_steps",
                 "--rlvr_lr", "--rlvr_prompts", "--rlvr_group", "--rlvr_cut"):
        assert flag in text
    with pytest.raises(SystemExit):
        m4_rlvr_teacher.main(["--help"])
    assert "--cont_frac" in capsys.readouterr().out


def tiny(seed: int, n_embd: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=n_embd))


@pytest.fixture
def pair(tmp_path):
    save_checkpoint(str(tmp_path / "teacher.pt"), tiny(0, 48), 0)
    save_checkpoint(str(tmp_path / "student.pt"), tiny(1), 0)
    save_checkpoint(str(tmp_path / "pibase.pt"), tiny(2), 0)
    return tmp_path


def rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_m3_runs_every_kind_of_pi_and_writes_its_table(pair, capsys):
    from experiments.m3_opsd import main
    main(["--out_dir", str(pair), "--seeds", "1", *TINY])
    table = (pair / "m3" / "m3.txt").read_text()
    assert "M3" in table and table.strip() in capsys.readouterr().out
    assert sorted(r["pi"] for r in rows(pair / "m3" / "m3.csv")) == ["answer", "rule", "solution"]


def test_m4_compares_the_sft_and_the_rlvr_teachers(pair, capsys):
    from experiments.m4_rlvr_teacher import main
    from nanoopd.checkpoint import read_checkpoint
    main(["--out_dir", str(pair), "--seeds", "1", *TINY, *RLVR, "--prefix_steps", "3", "--long_steps", "4"])
    got = rows(pair / "m4" / "m4.csv")
    assert [r["label"] for r in got] == ["sft", "rlvr", "rlvr_prefix", "rlvr_long"]
    assert all(0 <= float(r["continuation_acc"]) <= 1 and 0 <= float(r["first_overlap_ratio"]) <= 1 for r in got)
    for label, init, steps, cut in (("rlvr", "student", 2, 0.0), ("rlvr_prefix", "teacher", 3, 0.9),
                                    ("rlvr_long", "student", 4, 0.0)):
        ck = read_checkpoint(str(pair / "m4" / f"teacher_{label}_s1.pt"))
        train = ck["extra"]["train"]
        assert (train["rlvr_init"], train["rlvr_steps"], train["rlvr_cut"], ck["step"]) == (init, steps, cut, steps)
        assert (pair / "m4" / f"teacher_{label}_s1.jsonl").exists()
    assert ck["config"]["n_embd"] == 32 and read_checkpoint(str(pair / "m4" / "teacher_rlvr_prefix_s1.pt"))["config"]["n_embd"] == 48
    assert "rlvr_prefix above sft: distils" in capsys.readouterr().out


def test_m4_names_a_bad_rlvr_setting_by_its_own_flag(capsys):
    from experiments.m4_rlvr_teacher import main
    for flags, says in ((["--prefix_cut", "1.5"], "--prefix_cut"), (["--long_steps", "0"], "--long_steps"),
                        (["--m4_teachers", "rlvr"], "--m4_teachers must be names of")):
        with pytest.raises(SystemExit) as e:
            main(flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err, err


def test_m5_distils_the_cold_started_and_the_random_student(pair):
    from experiments.m5_cold_start import main
    main(["--out_dir", str(pair), "--seeds", "1", *TINY])
    got = rows(pair / "m5" / "m5.csv")
    assert len(got) == 2 and got[0]["label"].startswith("cold start") and got[1]["label"].startswith("no cold")


def test_stage_rlvr_then_opd_from_the_rlvr_teacher_and_an_opsd_stage(pair):
    from train_math import main
    summary = main(["--out_dir", str(pair), "--stages", "rlvr,opd", "--teacher", "rlvr", "--run_name", "from_rlvr",
                    "--rlvr_cut", "0.5", *TINY, *RLVR])
    assert (pair / "teacher_rlvr.pt").exists() and summary["opd_from_rlvr"]["final_acc"] is not None
    # every stage says what it spent: RLVR's steps, OPD's (teacher sampling charged and given)
    assert summary["rlvr_flops"] == summary["rlvr_flops_given"] > 0
    assert summary["opd_from_rlvr"]["flops"] == summary["opd_from_rlvr"]["flops_given"] > 0
    summary = main(["--out_dir", str(pair), "--stages", "opd", "--mode", "opsd", "--pi", "answer", "--live_teacher",
                    *TINY, *RLVR])
    assert set(summary["opd_opsd_answer"]) >= {"start_acc", "final_acc", "start_rule", "final_rule"}
