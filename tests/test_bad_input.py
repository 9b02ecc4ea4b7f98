"""The bad-input battery: files and disks that go wrong. Each is answered with a message that says
what is wrong and what to do, exit code 1 and no traceback, and nothing already written is lost.
(Bad flags: test_cli.py; a truncated JSONL log on --resume: test_opd.py, the resumed run rewrites it.)"""

import errno
import os
import subprocess
import sys

import pytest
import torch

import train_math
from nanoopd import checkpoint
from nanoopd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanoopd.model import GPT, GPTConfig
from nanoopd.script import DISK_HINT, cli
from nanoopd.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = get_tokenizer()
TINY = ["--t_layer", "1", "--t_embd", "16", "--t_head", "2", "--s_layer", "1", "--s_embd", "16", "--s_head", "2",
        "--batch_size", "4", "--digits", "1", "--log_every", "0", "--eval_n", "2", "--max_new_tokens", "8",
        "--opd_steps", "1", "--opd_batch", "2", "--device", "cpu"]


def tiny_model(n_layer=1) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, n_layer=n_layer, n_head=2, n_embd=16))


def run_cli(argv, capsys) -> str:
    """train_math.py's main as `python train_math.py` runs it; must exit 1. Returns stderr."""
    with pytest.raises(SystemExit) as done:
        cli(lambda: train_math.main(argv))
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------------------
# a checkpoint that would run code


class Payload:
    """Unpickling this creates a file: what a checkpoint built to run code would do, harmlessly."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted(path, marker):
    good = tiny_model()
    torch.save({"format": checkpoint.FORMAT, "config": vars(good.config), "model": good.state_dict(), "step": 0,
                "extra": {"note": Payload(str(marker))}}, path)


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    crafted(tmp_path / "teacher.pt", marker)
    with pytest.raises(CheckpointError, match="refused to load") as e:
        load_checkpoint(str(tmp_path / "teacher.pt"))
    assert "nothing in it was run" in str(e.value)
    assert not marker.exists()
    assert torch.load(tmp_path / "teacher.pt", weights_only=False) and marker.exists()  # the payload is real


def test_the_crafted_checkpoint_stops_the_script_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    crafted(tmp_path / "teacher.pt", marker)
    save_checkpoint(str(tmp_path / "student.pt"), tiny_model(), 0)
    r = subprocess.run([sys.executable, "train_math.py", "--stages", "eval", "--out_dir", str(tmp_path), *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "refused to load" in r.stderr and "teacher.pt" in r.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# a checkpoint of another architecture, a teacher with NaN weights


def test_a_checkpoint_of_another_architecture_names_a_few_keys_and_counts_them(tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    one_layer = tiny_model(n_layer=1)
    payload = {"format": checkpoint.FORMAT, "config": vars(tiny_model(n_layer=3).config),
               "model": one_layer.state_dict(), "step": 0, "extra": {}}
    torch.save(payload, path)  # a 3-layer config over 1-layer weights
    err = run_cli(["--stages", "eval", "--out_dir", str(tmp_path), *TINY], capsys)
    n_missing = sum(k.startswith(("blocks.1.", "blocks.2.")) for k in tiny_model(n_layer=3).state_dict())
    assert f"missing {n_missing} tensors (blocks.1." in err and ", ...)" in err and "retrain it" in err
    assert len(err) < 600  # a few names, not all of them

    foreign = {f"transformer.{k}": v for k, v in one_layer.state_dict().items()}  # another naming scheme
    torch.save({**payload, "config": vars(one_layer.config), "model": foreign}, path)
    with pytest.raises(CheckpointError, match=r"missing \d+ tensors .*; unexpected \d+ tensors \(transformer\."):
        load_checkpoint(str(path))


def test_a_teacher_with_nan_weights_is_refused(tmp_path, capsys):
    teacher = tiny_model()
    with torch.no_grad():
        teacher.blocks[0].mlp.c_fc.weight[3, 2] = float("nan")
    save_checkpoint(str(tmp_path / "teacher.pt"), teacher, 5)
    save_checkpoint(str(tmp_path / "student.pt"), tiny_model(), 0)
    err = run_cli(["--stages", "opd", "--out_dir", str(tmp_path), *TINY], capsys)
    assert "non-finite weights" in err and "blocks.0.mlp.c_fc.weight" in err and "retrain" in err


# ----------------------------------------------------------------------------------------------
# a full or read-only disk under --out_dir


def test_a_full_disk_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    argv = ["--stages", "teacher", "--out_dir", str(tmp_path), "--t_steps", "6", "--save_every", "3", *TINY]
    real_save, saves = torch.save, []

    def disk_fills_up(obj, f, *a, **k):
        saves.append(1)
        if len(saves) == 2:  # the second checkpoint finds the disk full halfway through
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", disk_fills_up)
    err = run_cli(argv, capsys)
    assert "No space left on device" in err and DISK_HINT in err
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(str(tmp_path / "teacher.pt"))[1]["step"] == 3  # the first one is intact
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # and no partial file is left
    train_math.main(argv + ["--resume"])  # space freed: --resume goes on from step 3
    assert load_checkpoint(str(tmp_path / "teacher.pt"))[1]["step"] == 6


def test_a_read_only_out_dir_stops_with_a_message(tmp_path, monkeypatch, capsys):
    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(os, "makedirs", read_only)
    err = run_cli(["--stages", "teacher", "--out_dir", str(tmp_path / "out"), "--t_steps", "1", *TINY], capsys)
    assert "Read-only file system" in err and DISK_HINT in err


def test_a_flop_budget_below_one_step_exits_1_naming_the_flag_and_writes_nothing(tmp_path, capsys):
    for role in ("teacher", "student"):
        save_checkpoint(str(tmp_path / f"{role}.pt"), tiny_model(), 0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    err = run_cli(["--out_dir", str(tmp_path), "--stages", "opd", "--opd_flops", "1000", *TINY], capsys)
    assert "--opd_flops" in err and "below one step" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    assert not list(tmp_path.glob("opd_*"))  # no run files were started


def test_a_teacher_of_another_tokenizer_is_refused_unless_asked_for_and_never_with_a_one_vocabulary_objective(tmp_path, capsys):
    """A teacher.pt that reads 'digits' loaded as the default 'bytes' one: exit 1 naming the flag;
    asked for with a shared-vocabulary objective or an unknown tokenizer: exit 2 naming the choices.
    Nothing is written over the checkpoints."""
    digits = get_tokenizer("digits")
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "teacher.pt"), GPT(GPTConfig(vocab_size=digits.n_vocab, tokenizer="digits",
                                                                n_layer=1, n_head=2, n_embd=16)), 0)
    save_checkpoint(str(tmp_path / "student.pt"), tiny_model(), 0)
    before = {p: os.path.getmtime(tmp_path / p) for p in ("teacher.pt", "student.pt")}
    err = run_cli(["--out_dir", str(tmp_path), "--stages", "opd"] + TINY, capsys)
    assert "reads the tokenizer 'digits', but 'bytes' was asked for" in err and "--teacher_tokenizer digits" in err
    for flags, says in ((["--teacher_tokenizer", "digits"], "--loss sampled_token compares the two models over one "
                                                            "vocabulary"),
                        (["--teacher_tokenizer", "words"], "invalid choice: 'words' (choose from 'bytes', 'digits')")):
        with pytest.raises(SystemExit) as done:
            cli(lambda: train_math.main(["--out_dir", str(tmp_path), "--stages", "opd"] + TINY + flags))
        err = capsys.readouterr().err
        assert done.value.code == 2 and says in err and "Traceback" not in err, err
    assert before == {p: os.path.getmtime(tmp_path / p) for p in ("teacher.pt", "student.pt")}
