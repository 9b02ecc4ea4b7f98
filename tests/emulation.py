"""Apple MPS emulated on the CPU, for the tests: MPS has no float64, so code that is to run there
must never create a float64 tensor.

    with no_float64():
        train_math.main([...])     # raises Float64Error at the first float64 tensor

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


class _NoFloat64(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        asked = [a for a in _leaves((args, kwargs)) if isinstance(a, torch.dtype) and a in FORBIDDEN]
        if asked:
            raise Float64Error(f"{name} asked for {asked[0]}, which MPS does not have")
        out = func(*args, **kwargs)
        for t in _leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype in FORBIDDEN:
                raise Float64Error(f"{name} returned a {t.dtype} tensor of shape {tuple(t.shape)}, "
                                   f"which MPS does not have")
        return out


def no_float64() -> TorchFunctionMode:
    """Context manager: inside it, any float64 tensor is an error (Float64Error)."""
    return _NoFloat64()
