"""Kernel launches and host syncs counted on the CPU, for the hot-path budgets.

    with Launches() as n:
        generate(...)
    n.ops, n.syncs        # collections.Counter: operator name -> calls

Launches is a TorchDispatchMode: it sees every aten operator that reaches a backend kernel, after
autograd and autocast, i.e. what a GPU would launch. Counted as an operator: every one but views
(they only make new metadata), allocations without a fill (empty, empty_strided) and host-side
bookkeeping (detach, lift_fresh, alias, _unsafe_view, scalar_tensor, promote_types). Counted as a
host sync: reading a value back (_local_scalar_dense: .item(), bool(), float(), int()), an output
whose shape depends on the data (nonzero, masked_select, indexing with a boolean mask), and
.tolist() (one transfer; it does not go through the dispatcher, so a TorchFunctionMode counts it).

`phase` names the part of the work being counted ("rollout", ...): every count is keyed
(phase, name). Each call of a function wrapped by `during(phase, fn)` is counted under that phase.
"""

import collections
import functools

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

NOT_A_LAUNCH = {"empty.memory_format", "empty_strided.default", "detach.default", "lift_fresh.default",
                "alias.default", "_unsafe_view.default", "scalar_tensor.default", "promote_types.default"}
SYNCS = {"_local_scalar_dense.default", "nonzero.default", "masked_select.default", "is_nonzero.default"}


class _ToList(TorchFunctionMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "tolist":
            self.owner.syncs[(self.owner.phase, "tolist")] += 1
        return func(*args, **(kwargs or {}))


class Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.phase = collections.Counter(), collections.Counter(), "rest"
        self.shapes = []  # (phase, name, output shape) of every operator

    def __enter__(self):
        self._tolist = _ToList(self).__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._tolist.__exit__(*exc)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func._schema.name.split('::')[1]}.{func._overloadname}"
        out = func(*args, **(kwargs or {}))
        boolean_index = name == "index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in SYNCS or boolean_index:
            self.syncs[(self.phase, name)] += 1
        elif not func.is_view and name not in NOT_A_LAUNCH:
            self.ops[(self.phase, name)] += 1
            if isinstance(out, torch.Tensor):
                self.shapes.append((self.phase, name, tuple(out.shape)))
        return out

    def during(self, phase: str, fn):
        """fn, counting each of its calls under `phase`."""
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            before, self.phase = self.phase, phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = before
        return counted

    def total(self, counter: collections.Counter, phase: str | None = None) -> int:
        return sum(v for (p, _), v in counter.items() if phase is None or p == phase)
