"""Apple MPS emulated on the CPU: every stage runs with float64 and the operators of old MPS stacks
forbidden (tests/emulation.py).

MPS has no float64, so a float64 tensor anywhere on a training, evaluation or sampling path stops
a run on a Mac; older stacks also refuse int64 cumsum (macOS < 13.3), lack cummax (torch < 2.3) and
get multinomial wrong. Under old_mps() every stage of train_math.py runs on tiny models (teacher,
student, eval, opd with every objective, opd --mode opsd, pibase, rlvr), bench.py at tiny sizes,
and train_toy.py --quick --dtype float32 (the toy's MPS path).
"""

import json
import os
import runpy
import sys

import pytest
import torch

from emulation import Float64Error, MPSOpError, no_float64, old_mps
from nanoopd import rlvr
from nanoopd.checkpoint import load_checkpoint, save_checkpoint
from nanoopd.objectives import OBJECTIVES
from nanoopd.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = get_tokenizer()


# ----------------------------------------------------------------------------------------------
# the helper itself


@pytest.mark.parametrize("make", [lambda: torch.ones(2, dtype=torch.float64),
                                  lambda: torch.ones(2).double(),
                                  lambda: torch.ones(2).to(torch.float64),
                                  lambda: torch.tensor([0.5], dtype=torch.float64),
                                  lambda: torch.ones(2) + torch.zeros(2, dtype=torch.float64)],
                         ids=["factory", "double", "to", "tensor", "promotion"])
def test_no_float64_raises_on_any_float64_tensor(make):
    make()  # fine outside the mode
    with pytest.raises(Float64Error, match="float64"):
        with no_float64():
            make()


@pytest.mark.parametrize("call", [lambda: torch.tensor([True, False]).cumsum(0),
                                  lambda: torch.cumsum(torch.arange(3), 0),
                                  lambda: torch.arange(3).cummax(0),
                                  lambda: torch.multinomial(torch.ones(3), 1)],
                         ids=["bool-cumsum", "int64-cumsum", "cummax", "multinomial"])
def test_old_mps_forbids_the_operators_old_stacks_lack(call):
    call()  # fine outside the mode
    with pytest.raises(MPSOpError):
        with old_mps():
            call()
    with old_mps():  # what stands in for them is allowed
        assert torch.tensor([True, False]).cumsum(0, dtype=torch.int32).tolist() == [1, 1]
        assert torch.ones(2).cumsum(0).tolist() == [1.0, 2.0]
    with pytest.raises(Float64Error):
        with old_mps():
            torch.ones(1).double()


def test_no_float64_lets_float32_work_through():
    with no_float64():
        x = torch.ones(3, requires_grad=True)
        y = (x * 2).sum()
        y.backward()
        assert y.item() == 6.0 and x.grad.dtype == torch.float32
    assert torch.ones(1).double().dtype == torch.float64  # the mode is gone afterwards


# ----------------------------------------------------------------------------------------------
# train_math.py, every stage


def flags(out_dir) -> list[str]:
    """Tiny models, tiny budgets: every stage in well under a second."""
    return ["--out_dir", str(out_dir), "--device", "cpu", "--digits", "1", "--max_new_tokens", "8", "--eval_n", "4",
            "--batch_size", "4", "--log_every", "1", "--save_every", "1",
            "--t_layer", "1", "--t_embd", "16", "--t_head", "2", "--t_steps", "2",
            "--s_layer", "1", "--s_embd", "16", "--s_head", "2", "--s_steps", "2", "--s_pool", "8",
            "--opd_steps", "2", "--opd_batch", "2", "--opd_eval_every", "1", "--pi_steps", "2",
            "--rlvr_steps", "2", "--rlvr_prompts", "2", "--rlvr_group", "2"]


def run(out_dir, *stage_flags) -> dict:
    from train_math import main
    with old_mps():
        return main(flags(out_dir) + list(stage_flags))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """out_dir after the stages teacher, student and eval, each run with float64 forbidden.

    Between them the 2-step teacher is made to answer <|eos|> at once (its final LayerNorm emits
    one fixed vector, which the <|eos|> embedding matches): an untrained teacher never ends an
    answer, and the student's cold start keeps only the teacher's answers that end."""
    out = tmp_path_factory.mktemp("mps")
    summary = run(out, "--stages", "teacher")
    assert (out / "teacher.pt").exists() and summary["teacher_seconds"] >= 0
    teacher, _ = load_checkpoint(str(out / "teacher.pt"), "cpu")
    with torch.no_grad():
        teacher.ln_f.weight.zero_()
        teacher.ln_f.bias.zero_()
        teacher.ln_f.bias[0] = 1.0
        teacher.wte.weight[TOK.eos_id, 0] = 20.0
    save_checkpoint(str(out / "teacher.pt"), teacher, 2)
    summary = run(out, "--stages", "student,eval")
    assert (out / "student.pt").exists()
    assert all(0 <= summary[f"{r}_acc_{k}"] <= 1 for r in ("teacher", "student") for k in ("greedy", "sampled"))
    # the cold start's FLOPs: its SFT steps, and (charged only) the teacher's sampling of its pool
    assert summary["student_flops"] > summary["student_flops_given"] > 0
    return out


def test_stages_teacher_student_and_eval(pair):
    assert "student step" in (pair / "log.txt").read_text()  # the cold start trained, on the teacher's traces


@pytest.mark.parametrize("loss", sorted(OBJECTIVES))
def test_stage_opd_with_every_objective(pair, loss):
    summary = run(pair, "--stages", "opd", "--loss", loss, *(["--k", "8"] if loss.startswith("topk") else []))
    assert summary[f"opd_{loss}"]["final_acc"] is not None
    records = [json.loads(line) for line in (pair / f"opd_{loss}.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["grad_norm"] > 0 for r in records)


def test_stage_opd_with_masking_hiding_and_truncated_sampling(pair):
    """The paths of --mask_tokens, --hide_from_teacher (tracked tokens too), --baseline, --clamp,
    and temperature, top-k and top-p sampling."""
    summary = run(pair, "--stages", "opd", "--loss", "sampled_token", "--baseline", "--clamp", "5",
                  "--mask_tokens", "<|fmt|>,<|pad|>", "--hide_from_teacher", "<|fmt|>", "--temperature", "0.7",
                  "--top_p", "0.9", "--top_k", "20", "--run_name", "masked")
    assert summary["opd_masked"]["final_acc"] is not None


def test_stages_pibase_and_opd_as_opsd(pair):
    summary = run(pair, "--stages", "pibase,opd", "--mode", "opsd", "--pi", "answer")
    assert (pair / "pibase.pt").exists() and summary["opd_opsd_answer"]["final_rule"] is not None


def test_stage_rlvr(pair, monkeypatch):
    # a reward most groups disagree on, so that the steps really train (the tiny student never
    # solves a problem: with the verifier every group would carry zero advantage)
    monkeypatch.setattr(rlvr, "math_reward",
                        lambda tok, batch, done: lambda i, response: float(bool(response) and response[0] % 2 == 0))
    run(pair, "--stages", "rlvr", "--rlvr_cut", "0.5")
    records = [json.loads(line) for line in (pair / "teacher_rlvr.jsonl").read_text().splitlines()]
    assert len(records) == 2 and any(r["zero_var_groups"] < 1 and r["grad_norm"] > 0 for r in records)


# ----------------------------------------------------------------------------------------------
# bench.py and train_toy.py


def test_bench_at_tiny_sizes(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--batch", "2", "--new_tokens", "4",
                                      "--prompt_len", "4", "--train_len", "8", "--repeats", "1"])
    with old_mps():
        runpy.run_path(os.path.join(ROOT, "bench.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert all(name in text for name in OBJECTIVES)


def test_bench_profile_names_where_the_step_goes(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--profile"])
    with old_mps(), pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(ROOT, "bench.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert text.count("under the profiler: rollout") == 2 and "aten::addmm" in text  # both sizes, real operators


def test_train_toy_quick_in_float32(tmp_path, capsys):
    import train_toy
    with old_mps():
        out = train_toy.main(["--quick", "--dtype", "float32", "--no-plots", "--out", str(tmp_path)])
    assert "device cpu, float32" in capsys.readouterr().out
    gamma_1 = [r for r in out["table"] if r["gamma"] == 1.0]
    assert all(r["rel_bias"] < 1e-4 for r in gamma_1)  # g_1 = grad J up to float32 rounding
    assert all(r["rel_bias"] > 0.01 for r in out["table"] if r["coupling"] > 0 and r["gamma"] == 0.0)
    assert (tmp_path / "control_summary.csv").exists()


def test_train_toy_refuses_float64_on_mps(tmp_path, monkeypatch, capsys):
    import train_toy
    monkeypatch.setattr(train_toy, "pick_device", lambda name: torch.device("mps"))
    with pytest.raises(SystemExit, match="MPS has no float64"):
        train_toy.main(["--quick", "--dtype", "float64", "--no-plots", "--out", str(tmp_path)])
