"""Run artifacts on disk: every file a run writes goes through here, atomically, and checkpoints are read back
safely and checked against their schema.

Atomic: the bytes go to a unique temporary file in the same folder, are flushed to disk (fsync), and the file
is renamed over the target (`os.replace`), so a crash or a kill never leaves a half-written checkpoint, report
or cache, and two processes writing the same file never mix their bytes. Checkpoints are loaded with
`torch.load(..., weights_only=True)`: tensors and plain containers only, never arbitrary pickled objects.

A checkpoint is a dict with `model` (the state dict) and `metadata` (architecture, classes, transform:
enough to rebuild the network without the training code); one that training resumes from also has the
optimizer, scheduler, scaler, counters, history and RNG state (`RESUME_KEYS`). A hand-aware model also has
`hand_net` (the landmark network's state dict) and `metadata["hands"]` (its settings and calibration). What
serving needs of it (`for_serving`: no optimizer, no RNG state) is what a logged MLflow model carries.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from errors import UsageError

MODEL_KEYS = ("model", "metadata")
METADATA_KEYS = ("arch", "num_classes", "classes", "transform")
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "best_val_loss", "bad_epochs", "history", "rng")
SERVING_KEYS = (*MODEL_KEYS, "hand_net", "history")  # history: the figures the app shows beside the model


class CheckpointError(UsageError):
    """A checkpoint that lacks what it must hold; the message names what is missing."""


def _fsync_dir(folder: Path) -> None:
    # the rename itself lives in the folder's entry: without this a power cut may undo it
    with contextlib.suppress(OSError):  # some filesystems (and Windows) cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; on success it is synced and renamed onto `path`, on
    failure removed. For writers that want a file name (ONNX export, numpy); `save_bytes` for the rest."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write a file atomically (see the module docstring)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_json(obj, path: str | os.PathLike) -> None:
    """Write JSON atomically."""
    save_bytes(json.dumps(obj, indent=2).encode(), path)


def load_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """`torch.save` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects (`weights_only=True`)."""
    return torch.load(path, map_location=device, weights_only=True)


def check_checkpoint(ckpt, *, resume: bool = False) -> dict:
    """`ckpt` itself if it holds what serving a model needs (the model and its metadata) or, with `resume`,
    what continuing its training needs; else a CheckpointError naming what is missing or inconsistent
    (the caller adds which file)."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"it holds a {type(ckpt).__name__}, not a dict of model and metadata")
    missing = [k for k in (*MODEL_KEYS, *(RESUME_KEYS if resume else ())) if k not in ckpt]
    if missing:
        raise CheckpointError(f"it has no {', '.join(missing)}")
    if resume:  # the engine trains any network: its metadata is the caller's business
        return ckpt
    meta = ckpt["metadata"]
    missing = [k for k in METADATA_KEYS if k not in meta] if isinstance(meta, dict) else list(METADATA_KEYS)
    if missing:
        raise CheckpointError(f"its metadata has no {', '.join(missing)}")
    if "hand_net" in ckpt and not isinstance(meta.get("hands"), dict):
        raise CheckpointError("it has a hand network but no metadata['hands'] to rebuild it from")
    if len(meta["classes"]) != meta["num_classes"]:
        raise CheckpointError(f"its metadata lists {len(meta['classes'])} classes but says num_classes "
                              f"{meta['num_classes']}")
    return ckpt


def for_serving(ckpt: dict) -> dict:
    """The part of a checkpoint that serving reads (`SERVING_KEYS`), without what only resuming needs."""
    return {key: ckpt[key] for key in SERVING_KEYS if key in ckpt}
