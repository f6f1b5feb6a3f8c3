"""Checkpoints: written atomically, read with torch.load(weights_only=True).

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it
loads safely and without idml's classes. checkpoint_last.pt, the state a run resumes from:
  format, version, args (the run's arguments), model, criterion, optimizer, scheduler,
  epoch (epochs completed), best ({"epoch", "metrics"}), rng, wandb_run_id.
<dataset>_<model>_best.pth, the best epoch's weights: format, version, args, model,
  criterion, epoch, metrics.
"""
import io
import os
import random
import warnings

import numpy as np
import torch

from idml.errors import UsageError, torch_load_failure
from idml.files import atomic_write

FORMAT = "idml-checkpoint"
VERSION = 1


def save_checkpoint(path: str, state: dict) -> None:
    buffer = io.BytesIO()  # serialise fully before touching the disk
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str) -> dict:
    """The checkpoint at `path`; UsageError when it is missing or not an idml checkpoint."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder; expected a checkpoint file (a run folder holds checkpoint_last.pt)")
    try:
        with warnings.catch_warnings():  # torch's note on TorchScript files: said below, in one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except Exception as error:
        raise UsageError(f"{path} is not a checkpoint written by scripts/train.py ({torch_load_failure(error)})") \
            from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"{path} is not an idml checkpoint (expected a file written by scripts/train.py)")
    return state


def model_from_checkpoint(path: str):
    """(IDMLNet in eval mode on the CPU, the run's args dict) of a training checkpoint;
    UsageError when its weights do not fit or are not finite."""
    from argparse import Namespace

    from idml.runtime import build_model

    checkpoint = load_checkpoint(path)
    args = checkpoint["args"]
    model = build_model(Namespace(**args), pretrained="none")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise UsageError(f"{path}: the weights do not fit a {args['model']} with embedding size "
                         f"{args['embedding_size']} ({str(error).splitlines()[0]})") from None
    broken = [name for name, tensor in checkpoint["model"].items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise UsageError(f"{path}: {len(broken)} weight tensors hold NaN or infinite values (e.g. {broken[0]}): "
                         f"the run diverged before this checkpoint; use an earlier one")
    return model.eval(), args


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
