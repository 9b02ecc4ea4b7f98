"""nanoopd: a minimal, from-scratch reference for on-policy distillation of language models."""


def __getattr__(name):
    # `from nanoopd import OBJECTIVES` without importing every objective at package import time
    if name == "OBJECTIVES":
        from nanoopd.objectives import OBJECTIVES
        return OBJECTIVES
    raise AttributeError(f"module 'nanoopd' has no attribute {name!r}")
