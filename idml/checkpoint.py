"""Checkpoints: written atomically, read with torch.load(weights_only=True).

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it
loads safely and without idml's classes. checkpoint_last.pt, the state a run resumes from:
  format, version, args (the run's flags: TrainConfig.flat()), model, criterion, optimizer, scheduler,
  epoch (epochs completed), best ({"epoch", "metrics"}), rng, wandb_run_id.
<dataset>_<model>_best.pth, the best epoch's weights: format, version, args, model,
  criterion, epoch, metrics.
Both carry "sha256", a digest of everything else (checked on load: a damaged file is refused,
where torch.load would read flipped bits silently; files without one still load), and are
written only from finite weights.
"""

import hashlib
import io
import os
import random
import warnings
from dataclasses import replace

import numpy as np
import torch

from idml.config import TrainConfig
from idml.errors import TrainingDiverged, UsageError, torch_load_failure
from idml.files import atomic_write

FORMAT = "idml-checkpoint"
VERSION = 1
WEIGHTS = ("model", "criterion")  # the parts that must be finite to be written


def digest(state) -> str:
    """sha256 of a checkpoint's contents in a fixed order: each tensor's dtype, shape and
    bytes, each plain value's repr, dict entries sorted by key."""
    sha = hashlib.sha256()

    def feed(value):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            sha.update(f"T{value.dtype}{tuple(value.shape)}".encode())
            sha.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            sha.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                sha.update(repr(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            sha.update(f"{type(value).__name__[0]}{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            sha.update(repr(value).encode())

    feed(state)
    return sha.hexdigest()


def non_finite_weights(state: dict) -> list:
    """Names of the floating-point weight tensors of `state` holding NaN or infinite values
    (the model's as named in its state_dict, the others prefixed with their part)."""
    return [
        name if part == "model" else f"{part}.{name}"
        for part in WEIGHTS
        for name, tensor in state.get(part, {}).items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]


def save_checkpoint(path: str, state: dict) -> None:
    """Writes `state` atomically; TrainingDiverged when its weights are not finite (such a
    file could only be resumed into NaNs), UsageError when the disk refuses it (the previous
    file stays intact)."""
    broken = non_finite_weights(state)
    if broken:
        raise TrainingDiverged(
            f"{len(broken)} weight tensors hold NaN or infinite values (e.g. {broken[0]}), so {path} was not written"
        )
    state = {"format": FORMAT, "version": VERSION, **state}
    buffer = io.BytesIO()  # serialise fully before touching the disk
    torch.save({**state, "sha256": digest(state)}, buffer)
    try:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as error:
        raise UsageError(
            f"cannot write {path} ({error.strerror or error}); the previous file there is intact: "
            f"free some space and resume from it"
        ) from None


def load_checkpoint(path: str, required=()) -> dict:
    """The checkpoint at `path`; UsageError when it is missing, damaged, not an idml
    checkpoint, or lacks one of the keys `required`."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder; expected a checkpoint file (a run folder holds checkpoint_last.pt)")
    try:
        with warnings.catch_warnings():  # torch's note on TorchScript files: said below, in one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except Exception as error:
        raise UsageError(
            f"{path} is not a checkpoint written by scripts/train.py ({torch_load_failure(error)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not an idml checkpoint (expected a file written by scripts/train.py)")
    saved = state.pop("sha256", None)
    if saved is not None and saved != digest(state):
        raise UsageError(
            f"{path} is damaged: its checksum does not match its contents (a disk or copy error); "
            f"use another checkpoint"
        )
    require(state, path, required)
    return state


def require(state: dict, path: str, keys) -> None:
    """UsageError, in one sentence, when the checkpoint `state` read from `path` lacks one of `keys`."""
    missing = [key for key in keys if key not in state]
    if missing:
        raise UsageError(
            f"{path} lacks {', '.join(repr(key) for key in missing)}, which every checkpoint written by "
            f"scripts/train.py holds: it is incomplete or was written by another program"
        )


def model_from_checkpoint(path: str):
    """(IDMLNet in eval mode on the CPU, the run's TrainConfig) of a training checkpoint;
    UsageError when its weights do not fit or are not finite."""
    from idml.runtime import build_model

    checkpoint = load_checkpoint(path, required=("args", "model"))
    config = TrainConfig.from_dict(checkpoint["args"])
    model = build_model(replace(config.model, pretrained="none"))  # the checkpoint's weights replace them
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise UsageError(
            f"{path}: the weights do not fit a {config.model.model} with embedding size "
            f"{config.model.embedding_size} ({str(error).splitlines()[0]})"
        ) from None
    broken = non_finite_weights({"model": checkpoint["model"]})
    if broken:
        raise UsageError(
            f"{path}: {len(broken)} weight tensors hold NaN or infinite values (e.g. {broken[0]}): "
            f"the run diverged before this checkpoint; use an earlier one"
        )
    return model.eval(), config


def rng_state(mixup_generator: torch.Generator) -> dict:
    """Every random state a run draws from, as tensors and plain values."""
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_extra": (int(numpy_pos), int(numpy_has_gauss), float(numpy_gauss)),
        "torch": torch.get_rng_state(),
        "mixup": mixup_generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, mixup_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), *state["numpy_extra"]))
    torch.set_rng_state(state["torch"])
    mixup_generator.set_state(state["mixup"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
