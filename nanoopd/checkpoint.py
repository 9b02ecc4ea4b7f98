"""
Checkpoints: weights + model config + step (+ optional optimizer / RNG state and metadata).

A resumable run stores in the same file what it needs to go on exactly where it stopped (the
optimizer, and for OPD and RLVR every rank's RNG states and the run's records): loop.py writes and
reads that state.

Loading needs no flags: the config stored in the file rebuilds the model. Writes are atomic (write
a temporary file in the same folder, flush it to disk, then rename over the target), so a crash in
the middle of a save never leaves a broken file where a good checkpoint was.

A checkpoint is data, never code: checkpoints travel between machines (a course hands teachers and
students around), so files are read with torch.load(weights_only=True), which unpickles only
tensors, numbers, strings and plain containers. A file that asks for anything else (a pickled
function call, say) is refused before any of it runs. Everything the project writes (weights,
configs, optimizer states, RNG states, run records) is of those kinds.
"""

import os
import pickle
import re
from dataclasses import asdict

import torch

from nanoopd import distributed
from nanoopd.model import GPT, GPTConfig
from nanoopd.tokenizer import TOKENIZERS

FORMAT = "nanoopd-gpt-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit what was asked of it."""


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to `path` via a temporary file and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str, model: GPT, step: int, optimizer=None, extra: dict | None = None) -> None:
    """Write weights, config and step (and optimizer state / extra metadata if given) atomically."""
    raw = distributed.bare(model)  # unwrap DDP / torch.compile
    payload = {
        "format": FORMAT,
        "config": asdict(raw.config),
        "model": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
        "step": int(step),
        "extra": extra or {},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    atomic_torch_save(payload, path)


def read_checkpoint(path: str) -> dict:
    """The raw payload of a checkpoint, with a clear error for a missing, corrupt or unsafe file.
    Only tensors and plain Python data are unpickled (weights_only=True): nothing in the file runs."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at '{path}': train one first (see train_math.py --help) "
                              f"or point to the right file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"checkpoint '{path}' is unreadable ({e}); it is corrupt or truncated: delete it "
                                  f"and retrain, or resume from an earlier one") from e
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise CheckpointError(f"refused to load '{path}': besides tensors and plain data it asks to build "
                              f"{found.group(1) if found else 'a Python object'}, which could run code on this "
                              f"machine, and no nanoopd checkpoint holds such things; nothing in it was run. "
                              f"Use a checkpoint written by nanoopd (retrain it, or ask its author for the file "
                              f"train_math.py wrote)") from e
    except Exception as e:  # noqa: BLE001 - any other unpickling failure means the file is unusable
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(e).__name__}: {e}); it is corrupt "
                              f"or truncated: delete it and retrain, or resume from an earlier one") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a nanoopd checkpoint (expected format {FORMAT}); "
                              f"it was written by something else or by an incompatible version")
    return payload


def load_checkpoint(path: str, device="cpu", expect_vocab: int | None = None,
                    expect_tokenizer: str | None = None) -> tuple[GPT, dict]:
    """Rebuild the model stored in `path` on `device`. Returns (model, payload).

    expect_vocab: if given, the checkpoint's vocabulary must have exactly this size.
    expect_tokenizer: if given, the model must read this tokenizer (its config records the one it
    was trained with; checkpoints from before that record read "bytes").
    """
    payload = read_checkpoint(path)
    try:
        config = GPTConfig(**payload["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' holds an invalid model config: {e}") from e
    if config.tokenizer not in TOKENIZERS:
        raise CheckpointError(f"checkpoint '{path}' reads the tokenizer {config.tokenizer!r}, which this version "
                              f"does not know (it knows {', '.join(TOKENIZERS)}): retrain it here")
    if expect_tokenizer is not None and config.tokenizer != expect_tokenizer:
        raise CheckpointError(f"checkpoint '{path}' reads the tokenizer {config.tokenizer!r}, but {expect_tokenizer!r} "
                              f"was asked for: pass the tokenizer it was trained with (train_math.py: "
                              f"--teacher_tokenizer {config.tokenizer}), or retrain it with {expect_tokenizer!r}")
    if expect_vocab is not None and config.vocab_size != expect_vocab:
        raise CheckpointError(f"checkpoint '{path}' has a vocabulary of {config.vocab_size} tokens but "
                              f"{expect_vocab} are needed; it was trained with another tokenizer: retrain it")
    model = GPT(config)
    load_weights(model, payload, path)
    bad = [k for k, v in payload["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint '{path}' holds non-finite weights (NaN or inf) in {few(bad)}: the run "
                              f"that wrote it diverged or the file was damaged; retrain it (with a lower "
                              f"learning rate if it diverged)")
    return model.to(device), payload


def few(names: list[str], n: int = 3) -> str:
    """'3 tensors (a, b, c)' or '50 tensors (a, b, c, ...)': a long list of names, shortened."""
    shown = ", ".join(names[:n]) + (", ..." if len(names) > n else "")
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown})"


def load_weights(model: GPT, payload: dict, path: str) -> None:
    """model.load_state_dict(payload['model']) with an error that names at most a few of the
    missing, unexpected or misshapen weights and says how many there are."""
    given, wanted = payload.get("model"), model.state_dict()
    if not isinstance(given, dict) or not all(isinstance(v, torch.Tensor) for v in given.values()):
        raise CheckpointError(f"checkpoint '{path}' holds no weights (its 'model' entry is not a dict of tensors); "
                              f"the file is damaged or was written by something else: retrain it")
    missing = [k for k in wanted if k not in given]
    unexpected = [k for k in given if k not in wanted]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in wanted.items()
              if k in given and given[k].shape != v.shape]
    problems = [f"{what} {few(names)}" for what, names in (("missing", missing), ("unexpected", unexpected),
                                                           ("with another shape", shapes)) if names]
    if problems:
        raise CheckpointError(f"checkpoint '{path}': its weights do not fit the model its config describes: "
                              f"{'; '.join(problems)}. The file is damaged, was edited, or comes from another "
                              f"architecture: retrain it")
    model.load_state_dict(given)
