"""
Device and dtype policy, decided here and nowhere else.

- device: cuda -> mps -> cpu, unless the user names one (`--device`).
- matmuls: bf16 autocast on CUDA when the GPU supports bf16, float32 everywhere else (CPU autocast
  is slower than float32 for models this small, and MPS bf16 autocast is not reliable).
- log-softmax and every loss: float32, always (callers do `logits.float()`).
"""

import contextlib
import random

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; any other value is checked and used as given."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device torch knows (try auto, cpu, cuda, mps)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA but no CUDA GPU is visible; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name} asked for MPS but it is not available; use --device cpu or auto")
    return dev


def autocast(device: torch.device):
    """Context manager for the forward pass: bf16 autocast on capable CUDA GPUs, else a no-op."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) for repeatable runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_snapshot(generator: torch.Generator) -> dict:
    """Every random state a training loop draws from: its own sampling generator and torch's
    global CPU (and CUDA) generators, so that a resumed run draws what an uninterrupted one would."""
    snap = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda"] = torch.cuda.get_rng_state()
    return snap


def rng_restore(snap: dict, generator: torch.Generator) -> None:
    """Undo rng_snapshot: put the states back."""
    generator.set_state(snap["generator"])
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state(snap["cuda"])


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()
