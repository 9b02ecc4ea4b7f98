"""
Checkpoints: weights + model config + step (+ optional optimizer / RNG state and metadata).

A resumable run stores in the same file what it needs to go on exactly where it stopped (the
optimizer, and for OPD and RLVR every rank's RNG states and the run's records): loop.py writes and
reads that state.

Loading needs no flags: the config stored in the file rebuilds the model. Writes are atomic (write
a temporary file in the same folder, flush it to disk, then rename over the target), so a crash in
the middle of a save never leaves a broken file where a good checkpoint was.
"""

import os
from dataclasses import asdict

import torch

from nanoopd import distributed
from nanoopd.model import GPT, GPTConfig

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
    """The raw payload of a checkpoint, with a clear error for a missing or corrupt file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at '{path}': train one first (see train_math.py --help) "
                              f"or point to the right file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(e).__name__}: {e}); it is corrupt "
                              f"or truncated: delete it and retrain, or resume from an earlier one") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a nanoopd checkpoint (expected format {FORMAT}); "
                              f"it was written by something else or by an incompatible version")
    return payload


def load_checkpoint(path: str, device="cpu", expect_vocab: int | None = None) -> tuple[GPT, dict]:
    """Rebuild the model stored in `path` on `device`. Returns (model, payload).

    expect_vocab: if given, the checkpoint's vocabulary must have exactly this size.
    """
    payload = read_checkpoint(path)
    try:
        config = GPTConfig(**payload["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' holds an invalid model config: {e}") from e
    if expect_vocab is not None and config.vocab_size != expect_vocab:
        raise CheckpointError(f"checkpoint '{path}' has a vocabulary of {config.vocab_size} tokens but "
                              f"{expect_vocab} are needed; it was trained with another tokenizer: retrain it")
    model = GPT(config)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint '{path}': weights do not match its config ({e}); the file is "
                              f"damaged or was edited: retrain it") from e
    return model.to(device), payload
