"""
Device and dtype policy, decided here and nowhere else.

- device: cuda -> mps -> cpu, unless the user names one (`--device`).
- matmuls: bf16 autocast on CUDA GPUs with native bf16 (compute capability >= 8.0: A100, RTX 30xx
  and newer); float32 everywhere else: T4 and V100 (they only emulate bf16, slower than float32),
  the CPU (autocast is slower than float32 for models this small) and MPS (bf16 autocast there is
  recent and not reliable). amp_dtype() decides, autocast() applies it.
- the LM head and everything after it: float32, always, even under autocast (fp32_region() in
  GPT.forward; bf16 keeps 8 significant bits, so it rounds a logit of 8-16 by up to 1/32 and one
  of 16-32 by up to 1/16, and r_t, a difference of two log-softmaxes, by up to 4x that). Log-softmax
  and every loss: float32 (callers do `logits.float()`).
- no float64 on any training, evaluation or sampling path: MPS has none (tests/emulation.py). Nor
  the operators older MPS stacks lack or get wrong: int64 cumsum (macOS < 13.3), cummax (torch <
  2.3), multinomial (out-of-range indices); tests/emulation.old_mps() forbids them all.
- Apple MPS needs torch >= 2.5 and macOS >= 12.3 (MPS_MIN_TORCH, MPS_MIN_MACOS), checked when MPS
  is picked: before 2.5, Generator.set_state did not restore the offset on MPS, so --resume would
  silently draw other samples than the uninterrupted run.
"""

import contextlib
import platform
import random
import time

import numpy as np
import torch


MPS_MIN_TORCH = (2, 5)    # Generator.set_state restores the offset on MPS from 2.5 on (resume)
MPS_MIN_MACOS = (12, 3)   # torch's own floor for MPS


def _version(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '14.4.1' -> (14, 4, 1); unparsable parts end the tuple."""
    parts = []
    for part in text.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_mps() -> None:
    """Refuse Apple MPS on a torch or macOS older than the floors above, with the way out."""
    found, mac = _version(torch.__version__), _version(platform.mac_ver()[0])  # mac: () off macOS
    if found < MPS_MIN_TORCH:
        raise ValueError(f"Apple MPS needs torch >= {'.'.join(map(str, MPS_MIN_TORCH))}, this is {torch.__version__}: "
                         f"older releases do not restore the sampler's random state on MPS (--resume would "
                         f"silently diverge); upgrade torch (pip install -U torch) or run on the CPU with --device cpu")
    if mac and mac < MPS_MIN_MACOS:
        raise ValueError(f"Apple MPS needs macOS >= {'.'.join(map(str, MPS_MIN_MACOS))}, this is "
                         f"{platform.mac_ver()[0]}; update macOS or run on the CPU with --device cpu")


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; any other value is checked and used as given."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            check_mps()
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
    if dev.type == "mps":
        check_mps()
    return dev


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of forward passes on `device`: torch.bfloat16 on CUDA GPUs of compute
    capability >= 8.0, None (plain float32) everywhere else. torch.cuda.is_bf16_supported() is not
    the test: it also says yes on T4 (7.5) and V100 (7.0), which emulate bf16 slower than float32."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return None


def autocast(device: torch.device):
    """Context manager for the forward pass: autocast to amp_dtype(device), or a no-op."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fp32_region(device: torch.device):
    """Context manager: float32 inside, even within autocast (for the LM head). A no-op on device
    types where autocast is never on (MPS: older torch releases reject torch.autocast('mps'))."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
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


class PhaseClock:
    """Wall time of the phases of a step without stalling the GPU: on CUDA an event is recorded at
    every mark and the elapsed times are read at the end (seconds() waits for the last event
    only); on MPS the device is synchronised at each mark; on the CPU work is synchronous."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []
        self._mark()

    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            synchronize(self.device)  # a no-op on the CPU
            self.marks.append(time.perf_counter())

    def mark(self) -> None:
        """End the current phase, start the next."""
        self._mark()

    def seconds(self) -> list[float]:
        """The duration of every phase, in seconds."""
        if self.device.type == "cuda":
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]
