"""The device policy for laptop and cloud GPUs, checked on the CPU.

- amp_dtype: bf16 autocast only on CUDA GPUs of compute capability >= 8.0; T4 (7.5), V100 (7.0),
  MPS and the CPU run float32.
- the LM head runs in float32 even under autocast. Autocast is forced on the CPU in bf16 through
  the project's own helper (device.amp_dtype patched to say bfloat16, so device.autocast(cpu) is
  torch.autocast("cpu", torch.bfloat16) everywhere the code calls it), and one OPD step's r_t
  are compared with an fp32 run of the same step on the same rollout (tolerance: see below).
- every objective takes a finite OPD step under that bf16 autocast; RLVR trains under it too.
- the broadcast comparison that replaced torch.isin (missing on MPS in older torch) gives the
  same booleans; SFT with fewer examples per batch than processes stops with a clear message.
"""

import contextlib
import copy
import math

import pytest
import torch

import nanoopd.device as device_mod
import nanoopd.model as model_mod
from nanoopd import OBJECTIVES, distributed, opd, sft
from nanoopd.metrics import sampled_logratio
from nanoopd.model import GPT, GPTConfig
from nanoopd.objectives import prepare, resolve_options
from nanoopd.rlvr import RLVRConfig, rlvr_step
from nanoopd.rollout import generate
from nanoopd.tasks import encode_example
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer

TOK = get_tokenizer()
CPU = torch.device("cpu")


@pytest.fixture
def bf16(monkeypatch):
    """device.autocast(cpu) becomes torch.autocast('cpu', torch.bfloat16) for the test."""
    monkeypatch.setattr(device_mod, "amp_dtype", lambda device: torch.bfloat16)


@pytest.fixture
def bf16_head(monkeypatch):
    """The LM head as it was: no float32 region, so under autocast it runs in bf16."""
    monkeypatch.setattr(model_mod, "fp32_region", lambda device: contextlib.nullcontext())


def tiny(seed: int, n_embd: int = 32, logit_scale: float = 1.0) -> GPT:
    """A 1-layer GPT. logit_scale multiplies the (tied) embeddings: at 10 the largest logits are
    ~10-13, the magnitude of a trained model's (a random init's are below 1)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=n_embd))
    with torch.no_grad():
        model.wte.weight.mul_(logit_scale)
    return model


# ----------------------------------------------------------------------------------------------
# the policy


@pytest.mark.parametrize("capability, expected", [((7, 0), None), ((7, 5), None), ((8, 0), torch.bfloat16),
                                                  ((8, 6), torch.bfloat16), ((9, 0), torch.bfloat16)],
                         ids=["V100", "T4", "A100", "RTX30xx", "H100"])
def test_bf16_autocast_only_from_compute_capability_8(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what T4/V100 answer too
    assert device_mod.amp_dtype(torch.device("cuda")) == expected


@pytest.mark.parametrize("name", ["cpu", "mps"])
def test_cpu_and_mps_run_float32(name):
    dev = torch.device(name)  # a device object needs no MPS hardware
    assert device_mod.amp_dtype(dev) is None
    assert isinstance(device_mod.autocast(dev), contextlib.nullcontext)
    assert isinstance(device_mod.fp32_region(torch.device("mps")), contextlib.nullcontext)  # no autocast('mps')


def test_the_lm_head_is_float32_under_bf16_autocast_and_was_not_before(bf16, monkeypatch):
    model = tiny(0)
    idx = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        plain = model(idx)
        with device_mod.autocast(CPU):
            head = model(idx)
            assert model.blocks[0].mlp.c_fc(torch.zeros(1, 32)).dtype == torch.bfloat16  # the body is bf16
        monkeypatch.setattr(model_mod, "fp32_region", lambda device: contextlib.nullcontext())
        with device_mod.autocast(CPU):
            old = model(idx)
    assert plain.dtype == head.dtype == torch.float32
    assert old.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# r_t of one OPD step under bf16 autocast vs float32, on the same rollout


def opd_step_logratios(student, teacher, rollout, problems, monkeypatch, loss="sampled_token"):
    """Run one opd.opd_step on a fixed rollout and return r_t on its response tokens (n,) and the
    largest |logit| the objective saw. The rollout is fixed by replacing opd.generate, the logits
    the objective receives are recorded by wrapping it; everything else is the step as it is."""
    seen = {}
    objective = OBJECTIVES[loss]

    def recording(s, t, tokens, mask, **options):
        seen.update(student=s.detach().clone(), teacher=t.detach().clone())
        return objective(s, t, tokens, mask, **options)

    monkeypatch.setattr(opd, "generate", lambda *args, **kwargs: rollout)
    monkeypatch.setattr(opd, "get_objective", lambda name: recording)
    cfg = opd.OPDConfig(loss=loss, opd_batch=len(problems), max_new_tokens=rollout.response.shape[1], digits=1, opd_lr=1e-4)
    student = copy.deepcopy(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    rec = opd.opd_step(student, opd.freeze(copy.deepcopy(teacher)), optimizer, TOK, problems, cfg,
                       torch.Generator().manual_seed(0), 0)
    assert math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])
    mask = rollout.response_mask
    r = sampled_logratio(torch.log_softmax(seen["student"], -1), torch.log_softmax(seen["teacher"], -1),
                         rollout.response.masked_fill(~mask, 0))  # (B, N)
    zmax = max(seen["student"].abs().max().item(), seen["teacher"].abs().max().item())
    return r[mask], zmax


@pytest.mark.parametrize("seed", [0, 1])
def test_opd_step_logratios_under_bf16_autocast_agree_with_fp32(seed, monkeypatch):
    """Tolerance: max |r_t(bf16) - r_t(fp32)| <= 0.1 * 4 * 2^-9 * max|logit| (about 0.01 nats here).

    Why: bf16 keeps 8 significant bits, so rounding a logit z to bf16 moves it by up to 2^-9 |z|.
    log pi(v) = z_v - logsumexp(z) moves by at most 2 max_v |dz_v|, and r_t = log pi - log q is a
    difference of two such terms, so a bf16 head can move r_t by 4 * 2^-9 * max|z| from its output
    rounding alone: ~0.09 nats at |z| ~ 12, the size of many r_t. With the head in float32 only the
    body's bf16 roundings are left; they reach the logits through the float32 residual stream and
    the exact head, and we require them to cost at most a tenth of that bound, an order of
    magnitude below the r_t that matter (measured: ~0.0015 nats). The old bf16 head is shown to
    break the same tolerance (measured: 0.03-0.05 nats), so the test tells the two apart.
    """
    teacher, student = tiny(seed, 48, logit_scale=10.0), tiny(seed + 100, 32, logit_scale=10.0)
    problems = sample_problems(8, "train", seed, 1)
    rollout = generate(student, [encode_example(TOK, p)[0] for p in problems], 16, TOK.eos_id, TOK.pad_id,
                       generator=torch.Generator().manual_seed(seed))  # float32, sampled once
    r32, zmax = opd_step_logratios(student, teacher, rollout, problems, monkeypatch)
    assert 8 < zmax < 20 and r32.abs().max() > 1  # trained-model magnitudes, large r_t
    tol = 0.1 * 4 * 2 ** -9 * zmax
    monkeypatch.setattr(device_mod, "amp_dtype", lambda device: torch.bfloat16)
    r16, _ = opd_step_logratios(student, teacher, rollout, problems, monkeypatch)
    assert (r16 - r32).abs().max().item() < tol
    monkeypatch.setattr(model_mod, "fp32_region", lambda device: contextlib.nullcontext())
    r16_old_head, _ = opd_step_logratios(student, teacher, rollout, problems, monkeypatch)
    assert (r16_old_head - r32).abs().max().item() > tol


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_takes_a_finite_opd_step_under_bf16_autocast(name, bf16):
    student, teacher = tiny(1), opd.freeze(tiny(0, 48))
    cfg = opd.OPDConfig(loss=name, opd_batch=4, max_new_tokens=8, digits=1, opd_lr=1e-4,
                        options={"k": 8} if name.startswith("topk") else {})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    rec = opd.opd_step(student, teacher, opt, TOK, sample_problems(4, "train", 0, 1), cfg,
                       torch.Generator().manual_seed(0), 0)
    assert math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in student.parameters())


def test_rlvr_trains_under_the_same_autocast_as_opd(bf16):
    model = tiny(0)
    dtypes = []
    hook = model.blocks[0].mlp.c_fc.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype) if torch.is_grad_enabled() else None)
    contexts = [encode_example(TOK, p)[0] for p in sample_problems(2, "train", 0, 1)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reward = lambda i, response: float(bool(response) and response[0] % 2 == 0)  # some signal in most groups
    rec = rlvr_step(model, opt, contexts, reward, RLVRConfig(rlvr_group=4, max_new_tokens=6), TOK.eos_id, TOK.pad_id,
                    torch.Generator().manual_seed(0))
    hook.remove()
    assert dtypes == [torch.bfloat16]  # the one training forward pass (sampling runs without grad)
    assert math.isfinite(rec["loss"])


# ----------------------------------------------------------------------------------------------
# torch.isin and SFT under torchrun


def test_the_isin_replacement_gives_the_same_booleans():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 12, (5, 7), generator=g)
    for ids in ([], [3], [0, 11, 5], list(range(12))):
        ids_t = torch.tensor(ids, dtype=tokens.dtype)
        assert torch.equal((tokens.unsqueeze(-1) == ids_t).any(-1), torch.isin(tokens, ids_t))
        logits = torch.zeros(5, 7, 12)
        mask = torch.rand(5, 7, generator=g) > 0.3
        batch = prepare(logits, logits, tokens, mask, resolve_options("full_reverse_kl", {"mask_tokens": ids}))  # objectives' mask_tokens
        assert torch.equal(batch.mask, mask & ~torch.isin(tokens, ids_t))


def test_sft_with_fewer_examples_than_processes_stops_with_a_clear_message(monkeypatch):
    sft.check_shardable(2, 2)  # one example per rank is enough
    with pytest.raises(ValueError, match="a batch of 1 examples cannot be shared by 2 processes"):
        sft.check_shardable(1, 2)
    # train_sft itself, as rank 0 of 2 would run it (no process group needed: the check comes first)
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    model = tiny(0)
    before = copy.deepcopy(model.state_dict())
    example = encode_example(TOK, sample_problems(1, "train", 0, 1)[0])
    with pytest.raises(ValueError, match="raise --batch_size to at least 2 or lower --nproc_per_node"):
        sft.train_sft(model, lambda step: [example], 3, 1e-3, TOK.pad_id, log_every=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------
# Apple MPS floors, checked when MPS is picked (a Mac emulated by patching what torch reports)


@pytest.mark.parametrize("torch_version, mac, message", [
    ("2.4.1", "14.5", "needs torch >= 2.5"),
    ("2.5.0", "12.1", "needs macOS >= 12.3"),
    ("2.13.0", "", None),
    ("2.5.0", "13.3.1", None),
])
def test_mps_is_refused_below_its_floors_with_the_way_out(torch_version, mac, message, monkeypatch):
    import platform
    from nanoopd import device as policy
    monkeypatch.setattr(torch, "__version__", torch_version)
    monkeypatch.setattr(platform, "mac_ver", lambda: (mac, ("", "", ""), "arm64"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for name in ("auto", "mps"):
        if message is None:
            assert policy.pick_device(name).type == "mps"
        else:
            with pytest.raises(ValueError, match=message) as e:
                policy.pick_device(name)
            assert "--device cpu" in str(e.value)
