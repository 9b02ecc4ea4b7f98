"""The training-loop scaffolding (nanoopd/loop.py): the update reports the total gradient norm,
clips, and refuses a non-finite one; the schedule; the JSONL log."""

import json
import math

import pytest
import torch

from nanoopd.loop import JsonlLog, lr_at, update


def test_update_reports_the_total_l2_norm_of_the_gradients_and_clips():
    layer, unused = torch.nn.Linear(3, 2), torch.nn.Parameter(torch.ones(4))
    model = torch.nn.ParameterList([*layer.parameters(), unused])  # a parameter without a gradient
    loss = layer(torch.ones(5, 3)).pow(2).sum()
    loss.backward(retain_graph=True)
    expected = math.sqrt(layer.weight.grad.pow(2).sum().item() + layer.bias.grad.pow(2).sum().item())
    reference = torch.nn.utils.get_total_norm([layer.weight.grad, layer.bias.grad]).item()
    before = layer.weight.detach().clone()
    norm = update(model, torch.optim.SGD(model.parameters(), lr=1.0), loss, grad_clip=1e-3, what="t")
    assert norm == pytest.approx(expected, rel=1e-6) and norm == pytest.approx(reference, rel=1e-6)
    assert (layer.weight - before).norm().item() <= 1e-3 * (1 + 1e-5)  # the step is the clipped gradient


def test_update_refuses_a_non_finite_gradient_and_leaves_the_weights():
    layer = torch.nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    loss = layer(torch.full((1, 3), float("nan"))).sum()
    with pytest.raises(FloatingPointError, match="step 4: non-finite gradient"):
        update(layer, torch.optim.SGD(layer.parameters(), lr=1.0), loss, 1.0, "step 4")
    assert torch.equal(layer.weight, before) and all(p.grad is None for p in layer.parameters())


def test_lr_warms_up_then_decays_to_ten_percent():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10) == pytest.approx(0.1, abs=1e-3)


def test_jsonl_rewrites_kept_records_then_appends(tmp_path):
    path = str(tmp_path / "run.jsonl")
    with JsonlLog(path, kept=[{"step": 0}]) as log:
        log.write({"step": 1})
    assert [json.loads(line)["step"] for line in open(path)] == [0, 1]
    with JsonlLog(None) as log:  # no path: nothing is written
        log.write({"step": 0})


def test_a_jsonl_log_creates_its_folder(tmp_path):
    """A run can be the first to write in its folder (an RLVR teacher of an experiment's worker)."""
    from nanoopd.loop import JsonlLog
    path = tmp_path / "m4" / "teacher_rlvr_s1.jsonl"
    with JsonlLog(str(path)) as log:
        log.write({"step": 0})
    assert path.read_text() == '{"step": 0}\n'
