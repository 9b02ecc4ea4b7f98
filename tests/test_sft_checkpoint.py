"""A tiny SFT run lowers the loss; checkpoints round-trip; broken ones fail clearly."""

import os

import pytest
import torch

from nanoopd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nanoopd.model import GPT, GPTConfig
from nanoopd.sft import make_batch, sft_loss, train_sft
from nanoopd.tasks import encode_example
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer


def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=get_tokenizer().n_vocab, n_layer=1, n_head=2, n_embd=32, block_size=96))


def test_batch_targets_cover_exactly_the_response():
    tok = get_tokenizer()
    p = sample_problems(1, "train", 0)[0]
    prompt, resp = encode_example(tok, p)
    x, y = make_batch([(prompt, resp), (prompt[:2], resp[:3])], tok.pad_id, "cpu")
    assert (y[0] != -1).sum() == len(resp) and (y[1] != -1).sum() == 3
    assert y[0, len(prompt) - 1:len(prompt) - 1 + len(resp)].tolist() == resp
    assert x[0, :len(prompt)].tolist() == prompt


def test_tiny_sft_lowers_the_loss():
    tok = get_tokenizer()
    model = small_model()
    problems = sample_problems(16 * 40, "train", 0, digits=2)
    batches = lambda s: [encode_example(tok, p) for p in problems[s * 16:(s + 1) * 16]]
    x, y = make_batch(batches(0), tok.pad_id, "cpu")
    before = sft_loss(model, x, y).item()
    losses = train_sft(model, batches, 40, 3e-3, tok.pad_id, warmup=5, log_every=0)
    assert sft_loss(model, x, y).item() < 0.6 * before
    assert losses[-1] < losses[0]


def test_checkpoint_round_trip(tmp_path):
    model = small_model()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, step=7, extra={"role": "teacher"})
    loaded, payload = load_checkpoint(path, expect_vocab=model.config.vocab_size)
    assert payload["step"] == 7 and payload["extra"]["role"] == "teacher"
    assert loaded.config == model.config
    x = torch.randint(0, 50, (2, 9))
    assert torch.equal(loaded(x), model(x))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temporary left behind


def test_corrupt_missing_and_incompatible_checkpoints_fail_clearly(tmp_path):
    model = small_model()
    good = str(tmp_path / "good.pt")
    save_checkpoint(good, model, step=1)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(good, "rb").read()[:200])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="not a nanoopd checkpoint"):
        load_checkpoint(str(other))
    with pytest.raises(CheckpointError, match="vocabulary"):
        load_checkpoint(good, expect_vocab=1000)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = small_model()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, step=1)

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, model, step=2)
    monkeypatch.undo()
    _, payload = load_checkpoint(path)
    assert payload["step"] == 1
    assert os.listdir(tmp_path) == ["m.pt"]


def test_interrupted_then_resumed_sft_equals_uninterrupted(tmp_path):
    tok = get_tokenizer()
    problems = sample_problems(16 * 12, "train", 3, digits=2)
    batches = lambda s: [encode_example(tok, p) for p in problems[s * 16:(s + 1) * 16]]
    full = small_model()
    train_sft(full, batches, 12, 3e-3, tok.pad_id, warmup=3, log_every=0)

    path = str(tmp_path / "run.pt")
    part = small_model()
    with pytest.raises(KeyboardInterrupt):  # a run killed after step 5, checkpoints every 5 steps
        def interrupted(s):
            if s == 7:
                raise KeyboardInterrupt
            return batches(s)
        train_sft(part, interrupted, 12, 3e-3, tok.pad_id, warmup=3, log_every=0, ckpt_path=path, save_every=5)
    assert load_checkpoint(path)[1]["step"] == 5
    resumed = small_model()  # a fresh process: new model, state comes from the checkpoint
    train_sft(resumed, batches, 12, 3e-3, tok.pad_id, warmup=3, log_every=0, ckpt_path=path, save_every=5, resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_checkpoint(path)[1]["step"] == 12


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    tok = get_tokenizer()
    path = str(tmp_path / "run.pt")
    save_checkpoint(path, small_model(), step=3)
    other = GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32, block_size=96))
    with pytest.raises(CheckpointError, match="config"):
        train_sft(other, lambda s: [], 5, 1e-3, tok.pad_id, ckpt_path=path, resume=True)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import nanoopd.sft as sft
    tok = get_tokenizer()
    problems = sample_problems(16 * 8, "train", 4, digits=2)
    batches = lambda s: [encode_example(tok, p) for p in problems[s * 16:(s + 1) * 16]]
    real_loss, calls = sft.sft_loss, []

    def loss_that_breaks(*a, **k):
        calls.append(1)
        out = real_loss(*a, **k)
        return out * float("nan") if len(calls) == 6 else out  # step 5 goes bad
    monkeypatch.setattr(sft, "sft_loss", loss_that_breaks)
    path = str(tmp_path / "run.pt")
    model = small_model()
    with pytest.raises(FloatingPointError, match="step 5"):
        train_sft(model, batches, 8, 3e-3, tok.pad_id, warmup=2, log_every=0, ckpt_path=path, save_every=2)
    good, payload = load_checkpoint(path)
    assert payload["step"] == 4
    assert all(torch.isfinite(p).all() for p in good.parameters())
