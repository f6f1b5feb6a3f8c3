"""Atomic writes and checkpoints: a failed write never damages the previous file."""

import os

import pytest
import torch

from idml.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from idml.errors import UsageError
from idml.files import atomic_write, atomic_write_text


def test_a_write_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "results.txt")
    atomic_write_text(path, "old\n")

    def broken(f):
        f.write(b"half of the new cont")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert open(path).read() == "old\n"
    assert os.listdir(tmp_path) == ["results.txt"]


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"model": {"w": torch.arange(3.0)}, "epoch": 4, "best": None})
    state = load_checkpoint(path)
    assert state["epoch"] == 4 and torch.equal(state["model"]["w"], torch.arange(3.0))


def test_a_truncated_checkpoint_is_reported(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"model": {"w": torch.randn(1000)}})
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(UsageError, match=r"is not a checkpoint written by scripts/train.py \(the file is truncated"):
        load_checkpoint(path)


def test_rng_state_round_trip_restores_every_stream():
    import random

    import numpy as np

    generator = torch.Generator().manual_seed(5)
    saved = rng_state(generator)
    draws = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    restore_rng_state(saved, generator)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item()) == draws


def test_written_files_get_the_usual_permissions(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    atomic_write_text(path, "{}\n")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


def test_writing_over_a_folder_or_below_a_file_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match="is a folder; expected the name of a file to write"):
        atomic_write_text(str(tmp_path), "text")
    with pytest.raises(UsageError, match="part of its folder path is a file, not a folder"):
        atomic_write_text(str(tmp_path / "a_file" / "out.txt"), "text")
    assert os.listdir(tmp_path) == ["a_file"]
