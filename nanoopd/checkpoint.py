"""
Checkpoints: weights + model config + step (+ optional optimizer / RNG state and metadata).

A resumable run (OPD, RLVR) stores in extra["resume"] what it needs to go on exactly where it
stopped: every rank's RNG states and the run's own records; extra[<kind>] holds the run's settings,
which a resume must match (save_run_state / resume_run_state).

Loading needs no flags: the config stored in the file rebuilds the model. Writes are atomic (write
a temporary file in the same folder, flush it to disk, then rename over the target), so a crash in
the middle of a save never leaves a broken file where a good checkpoint was.
"""

import os
from dataclasses import asdict

import torch

from nanoopd import distributed
from nanoopd.device import rng_restore, rng_snapshot
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


def restore_training_state(path: str, model, optimizer) -> dict:
    """Load weights and optimizer state from a checkpoint into model/optimizer (in place) and
    return its payload (step, extra). The checkpoint's model config must equal the model's, and it
    must hold an optimizer state (else a CheckpointError says so)."""
    payload = read_checkpoint(path)
    raw = distributed.bare(model)
    if payload["config"] != asdict(raw.config):
        raise CheckpointError(f"cannot resume from '{path}': it holds a model with config {payload['config']}, "
                              f"this run builds {asdict(raw.config)}; use the same flags or another --out_dir")
    if "optimizer" not in payload:
        raise CheckpointError(f"cannot resume from '{path}': it holds no optimizer state (a final export?)")
    raw.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return payload


def can_resume(resume: bool, path: str | None) -> bool:
    """True when --resume is asked and a checkpoint exists at `path`. Decided on rank 0, which
    writes the checkpoints, and handed to every rank, so that all ranks take the same branch."""
    return bool(resume and path) and distributed.from_main(lambda: os.path.exists(path))


def save_run_state(path: str, model, step: int, optimizer, generator: torch.Generator, extra: dict,
                   state: dict) -> None:
    """Checkpoint a resumable run: weights, optimizer, step, `extra` (the run's settings), and in
    extra["resume"] the dict `state` plus every rank's RNG states. Under torchrun every rank must
    call it (the RNG states are gathered); rank 0 writes."""
    rngs = distributed.gather_objects(rng_snapshot(generator))
    if distributed.is_main():
        save_checkpoint(path, model, step, optimizer=optimizer, extra={**extra, "resume": {**state, "rng": rngs}})


def resume_run_state(path: str, model, optimizer, generator: torch.Generator, kind: str,
                     settings: dict) -> tuple[int, dict]:
    """Undo save_run_state: weights and optimizer state into model/optimizer, this rank's RNG states
    into `generator` and torch; returns (step, the saved state). The checkpoint must hold a `kind`
    run ('opd', 'rlvr') with these settings, written by as many processes as this run has."""
    payload = restore_training_state(path, model, optimizer)
    extra = payload.get("extra", {})
    state = extra.get("resume")
    if state is None or kind not in extra:
        raise CheckpointError(f"cannot resume from '{path}': it holds no {kind} run state (another kind of "
                              f"checkpoint, or one from an older version); start again without --resume")
    if extra[kind] != settings:
        diff = ", ".join(f"{k}: {extra[kind].get(k)!r} -> {v!r}" for k, v in settings.items() if extra[kind].get(k) != v)
        raise CheckpointError(f"cannot resume from '{path}': it was written by a run with other {kind} settings "
                              f"({diff}); use the same flags, or another output name for a new run")
    rank, world = distributed.rank_and_world()
    if len(state["rng"]) != world:
        raise CheckpointError(f"cannot resume from '{path}': it was written by {len(state['rng'])} process(es), "
                              f"this run has {world}; resume with the same number of processes")
    try:
        rng_restore(state["rng"][rank], generator)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot resume from '{path}': its random-generator states do not fit this run's "
                              f"device ({e}); resume on the kind of device (cpu, cuda, mps) it was written on") from e
    return int(payload["step"]), state
