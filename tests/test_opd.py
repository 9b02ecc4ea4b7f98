"""The OPD step and loop on tiny models: every objective trains the student and never the teacher,
student == teacher gives a zero gradient, seeded runs repeat, NaNs stop the run at the right step,
the per-step JSONL log, and train_math.py's OPD flags and stage."""

import copy
import json
import math

import pytest
import torch

from nanoopd import OBJECTIVES
from nanoopd.checkpoint import save_checkpoint
from nanoopd.model import GPT, GPTConfig
from nanoopd.opd import OPDConfig, freeze, opd_step, plain_scores, train_opd
from nanoopd.report import degradation
from nanoopd.rollout import Rollout, response_logits
from nanoopd.special_tokens import HiddenTokens, TrackedTokens
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()
# every key the opd.py docstring documents for a step record, with the track_* keys of
# special_tokens.TrackedTokens
STEP_KEYS = {"step", "loss", "kl", "acc", "tok_s", "overlap_ratio", "overlap_mass_student",
             "overlap_mass_teacher", "entropy_student", "entropy_teacher", "entropy_gap",
             "logratio_max_abs", "logratio_pos_share", "response_length", "budget_share",
             "grad_norm", "n_loss_tokens", "track_logratio_mean", "track_share", "track_rows", "track_other_kl",
             "flops", "flops_given", "t_rollout", "t_teacher", "t_student"}


def tiny(seed: int, n_embd: int = 32, vocab: int | None = None) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab or TOK.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=n_embd))


def config(**kw) -> OPDConfig:
    base = dict(opd_steps=3, opd_batch=4, max_new_tokens=12, digits=1, opd_eval_every=0, seed=0, opd_lr=1e-4)
    return OPDConfig(**{**base, **kw})


def step_once(student, teacher, cfg, step=0):
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.opd_lr, weight_decay=0.0)
    problems = sample_problems(cfg.opd_batch, "train", 0, cfg.digits)
    return opd_step(student, freeze(teacher), opt, TOK, problems, cfg, torch.Generator().manual_seed(0), step)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_step_changes_the_student_and_never_the_teacher(name):
    teacher, student = tiny(0, 48), tiny(1)
    teacher_before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    rec = step_once(student, teacher, config(loss=name, options={"k": 8} if name.startswith("topk") else {}))
    assert math.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key  # bit-identical
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert "wte.weight" in changed and len(changed) > len(student_before) // 2


def test_student_equal_to_teacher_gives_zero_full_reverse_kl_gradient():
    teacher = tiny(0)
    student = copy.deepcopy(teacher)
    rec = step_once(student, teacher, config(loss="full_reverse_kl"))
    assert rec["n_loss_tokens"] > 0
    assert abs(rec["loss"]) < 1e-7 and rec["kl"] < 1e-7
    assert rec["grad_norm"] < 1e-6
    assert rec["overlap_ratio"] == pytest.approx(1.0)


def test_a_seeded_run_repeats_exactly(tmp_path):
    teacher, init = tiny(0, 48), tiny(1)
    problems = sample_problems(4, "test", 0, 1)

    def run(seed, name):
        student = copy.deepcopy(init)
        train_opd(student, teacher, TOK, config(loss="sampled_token", seed=seed), str(tmp_path / name),
                  problems, log=lambda _: None, start_acc=0.0)
        return student.state_dict()

    a, b, c = run(3, "a"), run(3, "b"), run(4, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a.jsonl").read_text() != (tmp_path / "c.jsonl").read_text()


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_good_checkpoint(tmp_path):
    teacher, student = tiny(0, 48), tiny(1)
    calls = []

    def poison(module, inputs, output):  # the teacher returns NaN logits from its 3rd call on
        calls.append(1)
        return output * float("nan") if len(calls) >= 3 else output

    teacher.register_forward_hook(poison)
    prefix = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="OPD step 2"):
        train_opd(student, teacher, TOK, config(loss="full_reverse_kl", opd_steps=4, opd_eval_every=1), prefix,
                  sample_problems(4, "test", 0, 1), log=lambda _: None, start_acc=0.0)
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert len(lines) == 2  # steps 0 and 1 completed
    summary = json.loads((tmp_path / "run.json").read_text())
    assert "OPD step 2" in summary["error"] and summary["steps_done"] == 2
    assert "non-finite" in summary["degraded"]
    saved = torch.load(prefix + ".pt", weights_only=True)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_jsonl_has_one_line_per_step_with_the_documented_keys(tmp_path):
    teacher, student = tiny(0, 48), tiny(1)
    cfg = config(loss="topk_renorm", options={"k": 8, "mask_tokens": [TOK.fmt_id]}, opd_steps=3, opd_eval_every=2)
    summary = train_opd(student, teacher, TOK, cfg, str(tmp_path / "run"), sample_problems(4, "test", 0, 1),
                        log=lambda _: None, extra_stats=TrackedTokens((TOK.fmt_id,)))
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in r.values())
    assert ["eval_acc" in r for r in records] == [False, True, True]  # after step 2, and at the end
    assert [s for s, *_ in summary["evals"]] == [0, 2, 3]
    flops = [f for *_, f, _ in summary["evals"]]  # the running FLOPs (teacher sampling charged) at each
    assert flops == [0.0, records[0]["flops"] + records[1]["flops"], summary["flops"]] and flops[1] < flops[2]
    assert summary["final_acc"] == records[-1]["eval_acc"]  # the held-out accuracy, not the rollouts'
    assert json.loads((tmp_path / "run.json").read_text())["steps_done"] == 3
    assert (tmp_path / "run.pt").exists()


def test_a_token_hidden_from_the_teacher_is_as_if_it_were_not_there():
    teacher = tiny(0)
    prompt, resp, X = [TOK.bos_id, 49, 43, 50, 61, 10], [50, 43, 50, 61, 10, TOK.eos_id], TOK.fmt_id

    def rollout(response):
        tokens = torch.tensor([prompt + response])
        r = torch.tensor([response])
        return Rollout(tokens, torch.ones_like(tokens, dtype=torch.bool), len(prompt), r,
                       torch.ones_like(r, dtype=torch.bool), r * 0.0, r * 0.0)

    with_x = rollout(resp[:2] + [X] + resp[2:])
    plain = response_logits(teacher, rollout(resp))[0]  # (N, V)
    hidden = HiddenTokens((X,))(teacher, with_x)[0]  # (N+1, V)
    assert torch.allclose(hidden[[0, 1, 3, 4, 5, 6]], plain, atol=1e-5)  # every token but X itself
    assert torch.equal(plain_scores(teacher, with_x), response_logits(teacher, with_x))


def test_vocabulary_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vocabularies differ"):
        train_opd(tiny(1), tiny(0, vocab=TOK.n_vocab + 3), TOK, config(), str(tmp_path / "run"),
                  sample_problems(2, "test", 0, 1), log=lambda _: None)


def test_degradation_reasons():
    ok = {"start_acc": 0.5, "final_acc": 0.45, "final_budget_share": 0.1, "first_budget_share": 0.0}
    assert degradation(ok) == ""
    assert degradation({**ok, "final_acc": 0.3}) == "collapse"
    assert degradation({**ok, "final_budget_share": 0.6}) == "length"
    assert degradation({**ok, "final_budget_share": 0.6, "first_budget_share": 0.5}) == ""  # it started there
    assert degradation({**ok, "error": "OPD step 3: ..."}) == "non-finite"


# ----------------------------------------------------------------------------------------------
# train_math.py: OPD flags and the opd stage



def test_good_opd_flags_reach_the_objective_options():
    from train_math import objective_options, parse_args
    cfg = parse_args(["--stages", "opd", "--loss", "topk_renorm", "--k", "8", "--support", "intersection",
                      "--add_sampled", "--mask_tokens", "<|fmt|>,7"])
    assert objective_options(cfg, TOK) == {"k": 8, "support": "intersection", "add_sampled": True,
                                           "mask_tokens": [TOK.fmt_id, 7]}
    assert objective_options(parse_args([]), TOK) == {}  # unset flags keep the objective's defaults
    # every registered option has its flag, generated from the registry (jsd's beta, topk_forward_kl's m)
    assert parse_args(["--loss", "jsd", "--beta", "0.1"]).options == {"beta": 0.1}
    assert parse_args(["--loss", "topk_forward_kl", "--m", "-20"]).options == {"m": -20.0}


def test_opd_stage_loads_the_pair_and_writes_its_outputs(tmp_path):
    from train_math import main
    save_checkpoint(str(tmp_path / "teacher.pt"), tiny(0, 48), 0)
    save_checkpoint(str(tmp_path / "student.pt"), tiny(1), 0)
    summary = main(["--out_dir", str(tmp_path), "--stages", "opd", "--loss", "sequence_kl", "--gamma", "0.5",
                    "--opd_steps", "2", "--opd_batch", "4", "--max_new_tokens", "12", "--digits", "1",
                    "--eval_n", "4", "--run_name", "g05"])
    assert summary["opd_g05"]["final_acc"] is not None
    assert (tmp_path / "opd_g05.pt").exists()
    assert len((tmp_path / "opd_g05.jsonl").read_text().splitlines()) == 2


def eos_teacher() -> GPT:
    """A tiny teacher that answers <|eos|> at once: its greedy traces all finish."""
    teacher = tiny(0, 48)
    with torch.no_grad():
        teacher.ln_f.weight.zero_()
        teacher.ln_f.bias.copy_(10 * teacher.wte.weight[TOK.eos_id] / teacher.wte.weight[TOK.eos_id].norm())
    return teacher


def test_opd_stage_with_half_the_rows_from_the_cold_start_pool(tmp_path):
    from train_math import main
    save_checkpoint(str(tmp_path / "teacher.pt"), eos_teacher(), 0)
    save_checkpoint(str(tmp_path / "student.pt"), tiny(1), 0)
    summary = main(["--out_dir", str(tmp_path), "--stages", "opd", "--loss", "forward_kl", "--lmbda", "0.5",
                    "--teacher_rows", "pool", "--s_pool", "6", "--opd_steps", "2", "--opd_batch", "4",
                    "--max_new_tokens", "8", "--digits", "1", "--eval_n", "4"])["opd_forward_kl"]
    records = [json.loads(line) for line in (tmp_path / "opd_forward_kl.jsonl").read_text().splitlines()]
    assert all("acc" in r and "acc_teacher_rows" in r for r in records)
    assert all(r["response_length_teacher_rows"] == 1.0 for r in records)  # the pool's traces: <|eos|> alone
    # 2 steps x 2 teacher rows from a pool of 6: every trace is new, so its sampling is charged
    assert summary["flops"] > summary["flops_given"] > 0


def test_m1_and_m2_write_their_tables(tmp_path):
    from experiments import m1_objectives, m2_special_tokens
    save_checkpoint(str(tmp_path / "teacher.pt"), eos_teacher(), 0)  # so that M2 has traces to fine-tune on
    save_checkpoint(str(tmp_path / "student.pt"), tiny(1), 0)
    tiny_flags = ["--out_dir", str(tmp_path), "--seeds", "3", "--opd_steps", "1", "--opd_batch", "2",
                  "--max_new_tokens", "8", "--digits", "1", "--eval_n", "2", "--s_pool", "4", "--batch_size", "2",
                  "--threads", "1"]
    m1_objectives.main(tiny_flags)
    m2_special_tokens.main([*tiny_flags, "--fmt_steps", "1"])
    for name, runs in (("m1", m1_objectives.RUNS), ("m2", m2_special_tokens.RUNS)):
        table = (tmp_path / name / f"{name}.txt").read_text()
        assert all(label in table for label, _, _ in runs)
        rows = (tmp_path / name / f"{name}.csv").read_text().splitlines()
        assert len(rows) == 1 + len(runs)  # header + one run per objective (one seed)
    assert (tmp_path / "student_fmt.pt").exists()


# ----------------------------------------------------------------------------------------------
# resume: an interrupted run continues from its checkpoint to the weights of an uninterrupted one


def test_interrupted_then_resumed_opd_equals_uninterrupted(tmp_path, monkeypatch):
    import nanoopd.opd as opd
    teacher, init = tiny(0, 48), tiny(1)
    problems = sample_problems(4, "test", 0, 1)
    cfg = config(loss="sampled_token", opd_steps=6, opd_eval_every=3, opd_lr=3e-3, opd_warmup=2)
    run = lambda student, prefix, **kw: train_opd(student, teacher, TOK, cfg, str(tmp_path / prefix), problems,
                                                 log=lambda _: None, save_every=2, **kw)
    full = copy.deepcopy(init)
    run(full, "full")

    real_step = opd.opd_step

    def killed_at_step_5(*args):  # the process dies during step 5; the last checkpoint is after step 3
        if args[7] == 5:
            raise KeyboardInterrupt
        return real_step(*args)
    monkeypatch.setattr(opd, "opd_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(init), "part")
    assert torch.load(tmp_path / "part.pt", weights_only=True)["step"] == 4
    log = tmp_path / "part.jsonl"
    log.write_text(log.read_text()[:-9])  # the crash also cut the log mid-line: resume rewrites it whole
    monkeypatch.setattr(opd, "opd_step", real_step)
    torch.manual_seed(1234)  # a fresh process: other global RNG state, the checkpoint restores it
    resumed = tiny(7)  # other weights too: they come from the checkpoint
    summary = run(resumed, "part", resume=True)

    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bit-identical on the CPU
    timing = ("tok_s", "t_rollout", "t_teacher", "t_student")
    lines = lambda p: [{k: v for k, v in json.loads(line).items() if k not in timing}
                       for line in (tmp_path / p).read_text().splitlines()]
    assert lines("part.jsonl") == lines("full.jsonl")  # steps 0-3 kept, 4-5 rerun identically
    full_summary = json.loads((tmp_path / "full.json").read_text())
    assert summary["evals"] == full_summary["evals"] and summary["final_kl"] == full_summary["final_kl"]


def test_resume_refuses_a_checkpoint_of_other_opd_settings(tmp_path):
    from nanoopd.checkpoint import CheckpointError
    teacher, student = tiny(0, 48), tiny(1)
    problems = sample_problems(2, "test", 0, 1)
    prefix = str(tmp_path / "run")
    train_opd(student, teacher, TOK, config(opd_steps=2), prefix, problems, log=lambda _: None, start_acc=0.0)
    with pytest.raises(CheckpointError, match=r"other opd settings \(loss: 'sampled_token' -> 'full_reverse_kl'"):
        train_opd(tiny(1), teacher, TOK, config(opd_steps=2, loss="full_reverse_kl"), prefix, problems,
                  log=lambda _: None, resume=True)
    save_checkpoint(prefix + ".pt", tiny(1), 1)  # weights only, e.g. an SFT export
    with pytest.raises(CheckpointError, match="optimizer"):
        train_opd(tiny(1), teacher, TOK, config(opd_steps=2), prefix, problems, log=lambda _: None, resume=True)
