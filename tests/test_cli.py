"""Bad input to the scripts: a clear message on stderr and a non-zero exit code, nothing else."""

import os
import subprocess
import sys

import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv, message", [
    (["--t_embd", "30"], "not divisible"),
    (["--stages", "teacher,nonsense"], "unknown stage"),
    (["--ops", "/"], "--ops"),
    (["--digits", "0"], "--digits"),
    (["--s_steps", "-1"], "--s_steps"),
    (["--s_digits", "4"], "--s_digits"),
    (["--s_ops", "*"], "--s_ops"),
    (["--s_ops", "+0-"], "count >= 1"),
    (["--s_ops", "3+"], "--s_ops"),
    (["--t_lr", "0"], "--t_lr"),
    (["--preset", "tpu"], "invalid choice"),
    (["--t_steps", "ten"], "invalid int"),
    # OPD flags
    (["--loss", "kl_of_everything"], "--loss"),
    (["--loss", "sampled_token", "--gamma", "0.5"], "gamma"),
    (["--loss", "sequence_kl", "--gamma", "1.5"], "gamma"),
    (["--loss", "topk_renorm", "--k", "0"], "k (the support size)"),
    (["--loss", "topk_stopgrad", "--support", "both"], "support"),
    (["--clamp", "-1"], "clamp"),
    (["--mask_tokens", "<|nope|>"], "--mask_tokens"),
    (["--mask_tokens", "99999"], "--mask_tokens"),
    (["--hide_from_teacher", "<|nope|>"], "--hide_from_teacher"),
    (["--temperature", "0"], "--temperature"),
    (["--top_p", "0"], "--top_p"),
    (["--top_k", "-1"], "--top_k"),
    (["--opd_steps", "0"], "--opd_steps"),
    (["--opd_lr", "-1e-3"], "--opd_lr"),
    (["--opd_eval_every", "-1"], "--opd_eval_every"),
    (["--opd_batch", "0"], "--opd_batch"),
    (["--opd_warmup", "-1"], "--opd_warmup"),
    (["--run_name", "../x"], "--run_name"),
    # the distillation spectrum (docs/m6.md)
    (["--lmbda", "1.5"], "--lmbda"),
    (["--lmbda", "-0.1"], "--lmbda"),
    (["--lmbda", "0.5", "--mode", "opsd"], "no teacher to sample from"),
    (["--lmbda", "0.5", "--hide_from_teacher", "<|fmt|>"], "no teacher to sample from"),
    (["--teacher_rows", "cache"], "--teacher_rows"),
    (["--loss", "forward_kl", "--k", "4"], "unknown option"),
    (["--opd_flops", "-1"], "--opd_flops"),
    (["--rlvr_flops", "-1"], "--rlvr_flops"),
    # OPSD and RLVR flags
    (["--pi", "answer"], "--mode opsd"),
    (["--live_teacher"], "--mode opsd"),
    (["--mode", "opsd", "--teacher", "rlvr"], "--teacher"),
    (["--mode", "kd"], "--mode"),
    (["--pi", "hint", "--mode", "opsd"], "--pi"),
    (["--teacher", "bigger"], "--teacher"),
    (["--rlvr_init", "random"], "--rlvr_init"),
    (["--rlvr_group", "1"], "--rlvr_group"),
    (["--rlvr_steps", "0"], "--rlvr_steps"),
    (["--rlvr_lr", "0"], "--rlvr_lr"),
    (["--rlvr_cut", "1"], "--rlvr_cut"),
    (["--pi_steps", "0"], "--pi_steps"),
    (["--dist_timeout", "0"], "--dist_timeout"),
])
def test_train_math_rejects_bad_flags(argv, message, capsys):
    import train_math
    with pytest.raises(SystemExit) as e:
        train_math.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    ("m2_special_tokens", ["--fmt_steps", "0"], "--fmt_steps"),
    ("m1_objectives", ["--seeds", "one"], "--seeds"),
    ("m1_objectives", ["--loss", "topk_renorm"], "unrecognized arguments: --loss"),  # M1 runs its own objectives
    ("m4_rlvr_teacher", ["--stages", "opd"], "unrecognized arguments: --stages"),  # an experiment's stages are its own
    ("m3_opsd", ["--pi", "rule"], "unrecognized arguments: --pi"),  # M3 runs every kind of PI
    ("m4_rlvr_teacher", ["--cont_frac", "-0.1"], "--cont_frac"),
    ("m4_rlvr_teacher", ["--rlvr_group", "1"], "--rlvr_group"),
    ("m5_cold_start", ["--opd_steps", "0"], "--opd_steps"),
])
def test_experiments_reject_bad_flags(script, argv, message, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"experiments.{script}").main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_train_math_missing_checkpoint_exits_1_with_a_message(tmp_path):
    r = run("train_math.py", "--stages", "eval", "--out_dir", str(tmp_path))
    assert r.returncode == 1
    assert "no checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_train_math_corrupt_checkpoint_exits_1_with_a_message(tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"not a checkpoint at all")
    r = run("train_math.py", "--stages", "eval", "--out_dir", str(tmp_path))
    assert r.returncode == 1
    assert "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_train_toy_rejects_bad_flags():
    r = run("train_toy.py", "--gammas", "0,1.5", "--quick")
    assert r.returncode == 2 and "gamma" in r.stderr


@pytest.mark.parametrize("script, argv, message", [
    ("bench.py", ["--device", "banana"], "not a device torch knows"),
    ("bench.py", ["--batch", "0"], "--batch must be >= 1"),
    ("bench.py", ["--new_tokens", "500"], "block size"),
    ("bench.py", ["--threads", "-2"], "--threads"),
    ("train_toy.py", ["--device", "tpu", "--quick"], "not a device torch knows"),
    ("train_math.py", ["--device", "banana", "--stages", "eval"], "not a device torch knows"),
])
def test_scripts_reject_a_bad_device_or_value_with_a_message(script, argv, message):
    r = run(script, *argv)
    assert r.returncode in (1, 2) and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible here")
def test_asking_for_a_missing_gpu_says_so():
    for script in ("bench.py", "train_math.py"):
        r = run(script, "--device", "cuda", *(["--stages", "eval"] if script == "train_math.py" else []))
        assert r.returncode in (1, 2) and "no CUDA GPU is visible" in r.stderr and "Traceback" not in r.stderr


def test_train_math_resume_continues_an_sft_stage_from_its_checkpoint(tmp_path):
    tiny = ["--stages", "teacher", "--out_dir", str(tmp_path), "--t_layer", "1", "--t_embd", "16", "--t_head", "2",
            "--batch_size", "4", "--digits", "1", "--log_every", "0", "--threads", "1"]
    first = run("train_math.py", *tiny, "--t_steps", "6", "--save_every", "3")
    assert first.returncode == 0, first.stderr
    second = run("train_math.py", *tiny, "--t_steps", "9", "--save_every", "3", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "at step 6/9" in second.stdout
    import torch
    assert torch.load(tmp_path / "teacher.pt", weights_only=True)["step"] == 9


def tiny_checkpoint(path, vocab_extra=0, n_embd=16):
    import torch
    from nanoopd.checkpoint import save_checkpoint
    from nanoopd.model import GPT, GPTConfig
    from nanoopd.tokenizer import get_tokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=get_tokenizer().n_vocab + vocab_extra, n_layer=1, n_head=2, n_embd=n_embd))
    save_checkpoint(str(path), model, 0)


def test_a_checkpoint_of_another_vocabulary_is_refused(tmp_path):
    tiny_checkpoint(tmp_path / "teacher.pt")
    tiny_checkpoint(tmp_path / "student.pt", vocab_extra=5)  # trained with another tokenizer
    r = run("train_math.py", "--stages", "opd", "--out_dir", str(tmp_path), "--opd_steps", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "student.pt' has a vocabulary of" in r.stderr and "another tokenizer" in r.stderr


def test_resuming_from_a_checkpoint_of_another_config_is_refused(tmp_path):
    tiny_checkpoint(tmp_path / "teacher.pt", n_embd=16)
    r = run("train_math.py", "--stages", "teacher", "--out_dir", str(tmp_path), "--t_layer", "1", "--t_embd", "32",
            "--t_head", "2", "--t_steps", "2", "--resume")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot resume" in r.stderr and "use the same flags" in r.stderr


def test_a_teacher_that_finishes_no_trace_stops_the_cold_start_with_a_message(tmp_path):
    tiny_checkpoint(tmp_path / "teacher.pt")  # random weights: its greedy answers never reach <|eos|>
    r = run("train_math.py", "--stages", "student", "--out_dir", str(tmp_path), "--s_pool", "8",
            "--max_new_tokens", "8", "--s_steps", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "finished none of its 8 cold-start traces" in r.stderr


def test_the_cold_start_pool_draws_its_problems_with_s_digits_and_s_ops(monkeypatch):
    """--s_digits and --s_ops narrow the problems whose teacher traces the student learns from; the
    teacher's sampling is replaced by a stand-in that records the prompts it is asked."""
    import train_math
    from nanoopd.tokenizer import get_tokenizer

    class Asked(Exception):
        pass

    def asked(teacher, prompts, *args, **kwargs):
        raise Asked(prompts)

    monkeypatch.setattr(train_math, "generate", asked)
    tok = get_tokenizer()
    stand_in = types.SimpleNamespace(config=types.SimpleNamespace(tokenizer="bytes"))  # a teacher reading 'bytes'
    for flags, ops, digits in (({"s_ops": ""}, "+-", 3), ({"s_ops": "+", "s_digits": 2}, "+", 2), ({"s_ops": "-"}, "-", 3)):
        with pytest.raises(Asked) as e:
            train_math.teacher_traces(stand_in, tok, train_math.TrainConfig(s_pool=200, **flags))
        texts = [tok.decode(p[1:]).rstrip("=\n") for p in e.value.args[0]]  # '<|bos|>347+285=\n' -> '347+285'
        assert len(texts) == 200
        assert {o for t in texts for o in t if not o.isdigit()} == set(ops)
        assert max(len(n) for t in texts for n in t.replace("-", "+").split("+")) == digits
    with pytest.raises(Asked) as e:  # a repeated operator is drawn that much more often
        train_math.teacher_traces(stand_in, tok, train_math.TrainConfig(s_pool=400, s_ops="+++-"))
    minus = sum("-" in tok.decode(p) for p in e.value.args[0])
    assert 60 <= minus <= 140  # a quarter of 400 (binomial s.d. 8.7)
    with pytest.raises(Asked) as counted:  # a count after an operator is the same weight, the same pool
        train_math.teacher_traces(stand_in, tok, train_math.TrainConfig(s_pool=400, s_ops="+3-"))
    assert counted.value.args[0] == e.value.args[0]


def test_compile_flag_routes_every_training_forward_through_torch_compile(tmp_path, monkeypatch):
    """--compile wraps the modules that train (SFT and OPD) in torch.compile; sampling and the
    checkpoints use the bare model. torch.compile is replaced by a stand-in that records its calls
    (real compiling takes tens of seconds on a CPU)."""
    import torch
    import train_math

    class Compiled(torch.nn.Module):  # what torch.compile returns: the original under _orig_mod
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, *args, **kwargs):
            calls.append(type(self._orig_mod).__name__)
            return self._orig_mod(*args, **kwargs)

    calls = []
    monkeypatch.setattr(torch, "compile", Compiled)
    tiny = ["--out_dir", str(tmp_path), "--t_layer", "1", "--t_embd", "16", "--t_head", "2", "--t_steps", "2",
            "--s_layer", "1", "--s_embd", "16", "--s_head", "2", "--batch_size", "4", "--digits", "1", "--log_every", "0",
            "--eval_n", "2", "--opd_steps", "2", "--opd_batch", "2", "--max_new_tokens", "8", "--device", "cpu"]
    tiny_checkpoint(tmp_path / "student.pt")
    train_math.main([*tiny, "--stages", "teacher,opd", "--compile"])
    assert calls.count("GPT") == 2 + 2  # 2 SFT steps of the teacher, 2 OPD steps of the student
    from nanoopd.distributed import bare
    from nanoopd.model import GPT
    model = GPT(train_math.GPTConfig(vocab_size=8, n_layer=1, n_head=2, n_embd=16))
    assert bare(Compiled(model)) is model and bare(model) is model
    calls.clear()
    train_math.main([*tiny, "--stages", "teacher"])  # without the flag nothing is compiled
    assert calls == []
