"""Apple MPS emulated on the CPU, for the tests: MPS has no float64, so code that is to run there
must never create a float64 tensor; and older MPS stacks lack or get wrong a few operators, which
that code must not call either.

    with no_float64():
        train_math.main([...])     # raises Float64Error at the first float64 tensor
    with old_mps():
        train_math.main([...])     # also raises MPSOpError at int64 cumsum, cummax/cummin, multinomial

old_mps() forbids, besides float64:
- a cumsum whose result is int64 (a long or bool input without dtype=): MPS refuses it before
  macOS 13.3, and PYTORCH_ENABLE_MPS_FALLBACK does not catch it;
- cummax and cummin: no MPS kernel before torch 2.3;
- multinomial: a known MPS bug can return indices out of range.

no_float64() is a torch.overrides.TorchFunctionMode: every torch function and Tensor method called
inside it goes through __torch_function__, which raises when the call asks for float64 (a
`dtype=torch.float64` argument, or torch.float64 passed positionally, as in x.to(torch.float64))
or returns a float64 tensor (x.double(), torch.tensor / torch.as_tensor of a numpy float64 array,
type promotion with a float64 operand, ...). torch.from_numpy is not a torch function and slips
through; nothing in the project calls it.

It is stricter than MPS in one way: a float64 tensor on the CPU is fine on a Mac but raises here.
That is what we want for the training, evaluation and sampling paths (they must run on the device
in float32), and it is why the code under test keeps its host-side bookkeeping in Python floats.
"""

import torch
from torch.overrides import TorchFunctionMode

FORBIDDEN = (torch.float64, torch.complex128)  # complex128 is float64 pairs: missing on MPS as well


class Float64Error(RuntimeError):
    """A float64 tensor was asked for or produced where MPS would have none."""


def _leaves(x):
    """Every non-container value in nested lists, tuples and dicts (args, kwargs, results)."""
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _leaves(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _leaves(y)
    else:
        yield x


class MPSOpError(RuntimeError):
    """An operator that older MPS stacks lack or get wrong was called."""


class _NoFloat64(TorchFunctionMode):
    old_ops = False  # also forbid the operators of old MPS stacks (old_mps())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        short = name.split(".")[-1].rstrip("_")
        if self.old_ops and short in ("cummax", "cummin", "multinomial"):
            raise MPSOpError(f"{name}: older MPS stacks lack it or return wrong values; use another operator")
        asked = [a for a in _leaves((args, kwargs)) if isinstance(a, torch.dtype) and a in FORBIDDEN]
        if asked:
            raise Float64Error(f"{name} asked for {asked[0]}, which MPS does not have")
        out = func(*args, **kwargs)
        for t in _leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype in FORBIDDEN:
                raise Float64Error(f"{name} returned a {t.dtype} tensor of shape {tuple(t.shape)}, "
                                   f"which MPS does not have")
            if self.old_ops and short == "cumsum" and isinstance(t, torch.Tensor) and t.dtype == torch.int64:
                raise MPSOpError(f"{name} gave an int64 result, which MPS refuses before macOS 13.3; "
                                 f"cumsum in int32 (dtype=torch.int32)")
        return out


def no_float64() -> TorchFunctionMode:
    """Context manager: inside it, any float64 tensor is an error (Float64Error)."""
    return _NoFloat64()


class _OldMPS(_NoFloat64):
    old_ops = True


def old_mps() -> TorchFunctionMode:
    """Context manager: no_float64(), and an MPSOpError at int64 cumsum, cummax/cummin, multinomial."""
    return _OldMPS()
