"""The estimator audit (toy/audit.py): its exact findings on a small toy, its files, its errors.

The audit runs on V=4, T=3 (64 sequences) here, a fraction of a second per objective; the numbers
it prints are exact (float64 enumeration), so the findings are asserted, not sampled.
"""

import csv
import re
from dataclasses import replace

import pytest
import torch

from toy.audit import FIRST, AuditConfig, audit, main, problem, targets, variants
from toy.audit_report import COLUMNS

SMALL = AuditConfig(vocab=4, horizon=3, k=2, out="unused", plots=False)


@pytest.fixture(scope="module")
def table():
    rows, info = audit(SMALL)
    return {(r["objective"], r["options"]): r for r in rows}, info


def test_every_registered_objective_that_reads_the_teacher_is_audited_with_its_defaults():
    from nanoopd import OBJECTIVES
    from nanoopd.objectives import SPECS
    rows = variants(2)
    assert {name for name, options, _ in rows if not options} == {n for n in OBJECTIVES if SPECS[n].uses_teacher}
    assert "sft" in OBJECTIVES and "sft" not in {name for name, _, _ in rows}  # no teacher, no divergence to it


def test_the_row_numbers_docs_audit_md_cites_stay_put():
    """Rows 1-13 are FIRST with their defaults, then the 14 variants; an objective registered since
    (forward_kl, row 28) comes after them, so that the page's "row 19" is still topk_unnormalized at K = 2."""
    rows = [(name, options) for name, options, _ in variants(2)]
    assert rows[:13] == [(name, {}) for name in FIRST] and rows[18] == ("topk_unnormalized", {"k": 2})
    assert rows[26] == ("topk_bregman", {"k": 2}) and rows[27] == ("forward_kl", {})


def test_each_row_claims_what_its_objective_registered(monkeypatch):
    """A newly registered objective is held to the claim it registered, not to a table of the audit's
    own: k3 registered as a forward-KL estimator is not flagged, and follows what it claims."""
    from nanoopd.objectives import OBJECTIVES, SPECS, register
    monkeypatch.setitem(OBJECTIVES, "k3_as_forward", None)  # restored (removed) after the test
    monkeypatch.setitem(SPECS, "k3_as_forward", None)
    register("k3_as_forward", claim="F")(OBJECTIVES["kl_k3"])
    rows = variants(2)
    assert ("k3_as_forward", {}, "F") in rows and ("sequence_kl", {"gamma": 0.5}, None) in rows
    assert all(claim == SPECS[name].claim for name, options, claim in rows if "gamma" not in options)
    row = {(r["objective"], r["options"]): r for r in audit(SMALL)[0]}[("k3_as_forward", "-")]
    assert row["claims"] == "F" and row["follows"] == "F exactly" and row["flags"] == "-"


def test_the_known_estimators_follow_what_the_maths_says(table):
    rows, info = table
    assert rows[("sequence_kl", "-")]["follows"] == "J exactly"
    for name in ("sampled_token", "kl_k2", "full_reverse_kl"):
        assert rows[(name, "-")]["follows"] == "K exactly"
    forward = rows[("forward_kl", "-")]  # claims F, follows it exactly, 0 at pi = q, unflagged
    assert (forward["claims"], forward["follows"], forward["flags"]) == ("F", "F exactly", "-")
    assert forward["g_norm_at_q"] < 1e-12 and forward["err_F"] < 1e-12
    for options in ("baseline=True", "baseline=topk k=2"):  # vOPD: any b(c) keeps the expectation
        assert rows[("sampled_token", options)]["follows"] == "K exactly"
    # coupling on: the token-level gradient is a different thing from grad J
    assert info["cos_K_J"] < 0.999 and rows[("sampled_token", "-")]["err_J"] > 0.05


def test_the_audit_flags_the_field_s_surprises(table):
    rows, _ = table
    assert rows[("kl_k1", "-")]["flags"] == "zero expected gradient"
    assert rows[("kl_k1", "-")]["trace_cov"] > 0  # each sample still moves the weights
    k3 = rows[("kl_k3", "-")]
    assert k3["follows"] == "F exactly" and "wrong divergence (claims K, follows F)" in k3["flags"]
    assert "drains S" in rows[("topk_unnormalized", "k=2")]["flags"]
    assert "fills S" in rows[("topk_forward_kl", "k=2")]["flags"]
    assert rows[("topk_renorm", "k=1")]["flags"] == "constant in theta"
    for proper in ("topk_stopgrad", "topk_renorm", "topk_tail", "topk_bregman"):
        row = rows[(proper, "k=2")]
        assert "S" not in row["flags"] and row["g_norm_at_q"] < 1e-12 and row["dJ_step"] < 0
    # Bregman's correction gives exactly the stop-gradient estimator
    for column in ("err_J", "err_K", "err_F", "trace_cov"):
        assert rows[("topk_bregman", "k=2")][column] == pytest.approx(
            rows[("topk_stopgrad", "k=2")][column], rel=1e-9)


def test_a_gradient_at_rounding_level_has_no_direction(table):
    """k1's expected gradient is 0 up to rounding (||g|| ~ 1e-16): its cosines are noise that changes
    with the summation order, so they, its errors and its verdict are undefined (None, printed n/a)."""
    rows, _ = table
    for key in (("kl_k1", "-"), ("topk_renorm", "k=1")):
        row = rows[key]
        assert row["follows"] is None and all(row[f"{c}_{t}"] is None for c in ("cos", "err") for t in "JKF")
    assert rows[("kl_k1", "-")]["g_norm"] < 1e-12 and rows[("kl_k1", "-")]["trace_cov"] > 0


def test_a_loss_without_a_graph_is_constant_in_theta_not_a_crash(monkeypatch):
    """An objective whose loss never reads the student (no graph at all: autograd.grad raises on it,
    allow_unused or not) is reported as constant in theta."""
    from nanoopd.objectives import OBJECTIVES, SPECS, register
    monkeypatch.setitem(OBJECTIVES, "no_graph", None)  # restored (removed) after the test
    monkeypatch.setitem(SPECS, "no_graph", None)
    register("no_graph")(lambda student_logits, teacher_logits, tokens, mask, **options:
                         ((student_logits.detach() - teacher_logits).pow(2).mean(), {}))
    row = {(r["objective"], r["options"]): r for r in audit(SMALL)[0]}[("no_graph", "-")]
    assert row["flags"] == "constant in theta" and row["follows"] is None and row["trace_cov"] == 0


def test_without_coupling_j_and_k_tie_and_a_tie_is_no_wrong_divergence():
    """At coupling 0 grad J = grad K_tok: the verdict names both ("J = K exactly"), rounding does not
    pick one, and neither sequence_kl (claims J) nor a K estimator is flagged for following the other."""
    rows = {(r["objective"], r["options"]): r for r in audit(replace(SMALL, coupling=0.0))[0]}
    for key in (("sequence_kl", "-"), ("sampled_token", "-"), ("sampled_token", "baseline=topk k=2"),
                ("sequence_kl", "gamma=0.5"), ("full_reverse_kl", "-")):
        assert rows[key]["follows"] == "J = K exactly" and "wrong divergence" not in rows[key]["flags"], key
    k3 = rows[("kl_k3", "-")]  # F is still another target
    assert k3["follows"] == "F exactly" and "wrong divergence (claims K, follows F)" in k3["flags"]


def test_without_coupling_the_token_level_and_sequence_gradients_agree():
    goals = targets(problem(AuditConfig(vocab=4, horizon=3, k=2, coupling=0.0, plots=False)))
    torch.testing.assert_close(goals["K"], goals["J"], rtol=1e-10, atol=1e-12)
    assert (goals["F"] - goals["J"]).norm() > 0.01  # the forward KL is still another target


def test_main_prints_the_table_and_writes_csv_and_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = main(["--vocab", "4", "--horizon", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "kl_k3" in out and "wrong divergence" in out and "wrote" in out
    assert "not audited: sft (reads no teacher" in out
    with open(tmp_path / "audit.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and list(written[0]) == COLUMNS
    k1 = next(r for r in written if r["objective"] == "kl_k1")  # undefined cells are written n/a
    assert k1["follows"] == k1["cos_J"] == k1["err_F"] == "n/a" and "n/a" in out
    assert (tmp_path / "audit.png").stat().st_size > 10_000


@pytest.mark.parametrize("flags,message", [
    (["--k", "4", "--vocab", "4"], "--k must lie in \\[1, V-1\\]"),
    (["--vocab", "9", "--horizon", "6"], "--horizon gives V\\^T = 531441"),
])
def test_bad_flags_exit_with_a_message_not_a_traceback(flags, message, capsys):
    with pytest.raises(SystemExit) as done:
        main(flags)
    assert done.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_the_cross_tokenizer_audit_finds_the_path_kl_exactly_and_the_text_kl_only_for_a_canonical_teacher(tmp_path):
    """toy/cross_audit.py: chunk costs placed after their chunk, at gamma = 1, follow the path KL
    exactly; the text KL too only when the teacher gives non-canonical paths no mass; the naive ids
    and the field's approximations follow neither."""
    from toy.cross_audit import main as cross_main
    rows = {(r["teacher"], r["objective"], r["options"]): r for r in cross_main(["--out", str(tmp_path)])}
    assert rows[("free", "xt_chunk", "gamma=1")]["follows"] == "P exactly"
    assert rows[("canonical", "xt_chunk", "gamma=1")]["follows"] == "P = X exactly"
    assert rows[("free", "xt_chunk", "gamma=1")]["err_X"] > 0.05  # other paths carry mass: the text KL differs
    for teacher in ("free", "canonical"):
        for name in ("xt_uld", "xt_gold", "naive ids"):
            assert rows[(teacher, name, "-")]["follows"] in ("none",) or "~" in rows[(teacher, name, "-")]["follows"]
    assert (tmp_path / "audit_cross.csv").read_text().startswith("teacher,objective,options")
