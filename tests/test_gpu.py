"""On a real GPU (CUDA or Apple MPS), under the device policy it really gets (bf16 autocast on
CUDA of compute capability >= 8.0, float32 on T4/V100 and MPS). Skipped where there is none, which
includes the CPU-only test runs; tests/test_mps_emulation.py and tests/test_device_policy.py cover
the same paths on the CPU by emulation.
"""

import math

import pytest
import torch

from nanoopd import OBJECTIVES
import nanoopd.device as device_mod
from nanoopd.model import GPT, GPTConfig
from nanoopd.opd import OPDConfig, freeze, opd_step
from nanoopd.rollout import generate, response_logits
from nanoopd.tasks import encode_example
from nanoopd.tasks import sample_problems
from nanoopd.tokenizer import get_tokenizer


def _gpu():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return None


GPU = _gpu()
pytestmark = pytest.mark.skipif(GPU is None, reason="needs a CUDA or MPS GPU")
TOK = get_tokenizer()


def tiny(seed: int, n_embd: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.n_vocab, block_size=64, n_layer=2, n_head=2, n_embd=n_embd)).to(GPU)


def test_cached_decoding_matches_recomputation():
    """log pi(y_t|c_t) recorded while decoding with the KV cache vs one full forward pass over the
    sampled tokens (how OPD scores them). float32: the two differ only by summation order and
    kernel choice (5e-7 on the CPU; 1e-3 leaves room for GPU kernels). bf16 autocast: the cached
    keys/values and every matmul output are rounded to 8 significant bits along different paths,
    ~2^-8 relative on activations of order 1, which this random model's small logits (|z| < 1)
    turn into differences of ~1e-4 (2e-4 measured under CPU bf16 autocast); 0.05 nats leaves room
    for GPU kernels and is still far below the log-probs' own scale (~5 nats)."""
    model = tiny(0)
    prompts = [encode_example(TOK, p)[0] for p in sample_problems(8, "train", 0, 2)]
    ro = generate(model, prompts, 24, TOK.eos_id, TOK.pad_id, temperature=1.0,
                  generator=torch.Generator(device=GPU).manual_seed(0))
    with torch.no_grad(), device_mod.autocast(GPU):
        logits = response_logits(model, ro)
    assert logits.dtype == torch.float32  # the head runs in float32 under autocast too
    logp = torch.log_softmax(logits, -1).gather(-1, ro.response.unsqueeze(-1)).squeeze(-1)  # (B, N)
    tol = 0.05 if device_mod.amp_dtype(GPU) is not None else 1e-3
    assert (logp - ro.logprobs)[ro.response_mask].abs().max().item() < tol


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_one_opd_step_per_objective_is_finite(name):
    student, teacher = tiny(1), freeze(tiny(0, 48))
    cfg = OPDConfig(loss=name, opd_batch=8, max_new_tokens=16, digits=2, opd_lr=1e-4,
                    options={"k": 8} if name.startswith("topk") else {})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    rec = opd_step(student, teacher, opt, TOK, sample_problems(8, "train", 0, 2), cfg,
                   torch.Generator(device=GPU).manual_seed(0), 0)
    assert math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in student.parameters())


@pytest.mark.skipif(GPU is None or GPU.type != "cuda", reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replay_equals_eager_decoding():
    """The decoding step replayed as a CUDA graph against the same step run eagerly, under the
    device policy (bf16 autocast from compute capability 8.0). Greedy: the same tokens (the same
    kernels run in the same order, graph or not). Sampled from the same uniforms: the same tokens
    and log-probs within 1e-4 (float32) or 0.05 nats (bf16), the tolerance of the cached-decoding
    test above, in case a kernel is chosen differently under capture."""
    model = tiny(0)
    prompts = [encode_example(TOK, p)[0] for p in sample_problems(16, "train", 0, 2)]
    for temperature in (0.0, 1.0):
        ro = [generate(model, prompts, 24, TOK.eos_id, TOK.pad_id, temperature=temperature,
                       generator=torch.Generator(device=GPU).manual_seed(0), cuda_graph_replay=graph)
              for graph in (True, False)]
        m = ro[1].response_mask
        if temperature == 0.0:
            assert torch.equal(ro[0].response, ro[1].response)
        tol = 0.05 if device_mod.amp_dtype(GPU) is not None else 1e-4
        assert torch.equal(ro[0].response_mask, m)
        assert (ro[0].logprobs - ro[1].logprobs)[m].abs().max().item() < tol


@pytest.mark.skipif(GPU is None or GPU.type != "cuda", reason="needs a CUDA GPU")
def test_seeded_opd_steps_repeat_on_cuda():
    """Masked scoring takes the math attention kernel when a backward follows (model.attention),
    so two seeded OPD steps give the same weights bit for bit."""
    weights = []
    for _ in range(2):
        student, teacher = tiny(1), freeze(tiny(0, 48))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        cfg = OPDConfig(loss="sampled_token", opd_batch=8, max_new_tokens=16, digits=2, opd_lr=1e-4)
        for step in range(2):
            opd_step(student, teacher, opt, TOK, sample_problems(8, "train", step, 2), cfg,
                     torch.Generator(device=GPU).manual_seed(0), step)
        weights.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(weights[0], weights[1])
