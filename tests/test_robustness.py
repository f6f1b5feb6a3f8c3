"""Runs survive interruption and bad input: exact resume after SIGKILL and SIGTERM,
atomic checkpoints under a failing write, a diverging loss, unreadable images."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import idml.train
from idml.checkpoint import load_checkpoint, save_checkpoint
from idml.cli import train_config
from idml.data.synthetic import write_cub
from idml.errors import TrainingDiverged, UsageError
from idml.train import Trainer

pytestmark = pytest.mark.slow  # trains in subprocesses and kills them

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Deterministic CPU mode: one thread, no loader processes; 2 epochs of 8 steps.
RUN = (
    "--dataset digits --model resnet18 --pretrained none --embedding-size 16 --image-size 24 --batch-size 24 "
    "--max-steps 8 --epochs 2 --warm 1 --bn-freeze 0 --workers 0 --wandb disabled --eval-clustering 0 --seed 7"
).split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(log_dir, *extra):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), *RUN, "--LOG_DIR", str(log_dir), *extra],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process):
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def last_checkpoint(log_dir):
    found = glob.glob(os.path.join(str(log_dir), "logs_digits", "*", "checkpoint_last.pt"))
    return found[0] if found else None


def wait_for_checkpoint(log_dir, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        path = last_checkpoint(log_dir)
        if path:
            return path
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def assert_same_parameters(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    for part in ("model", "criterion"):
        for name, tensor in a[part].items():
            # Same thread count and order of operations: equal up to float32 rounding at most.
            torch.testing.assert_close(tensor, b[part][name], rtol=1e-6, atol=1e-7, msg=f"{part}.{name}")
    assert a["history"] == b["history"]


@pytest.fixture(scope="module")
def uninterrupted(module_tmp_path):
    log_dir = module_tmp_path
    code, out, err = finish(start(log_dir))
    assert code == 0, err[-2000:]
    return last_checkpoint(log_dir)


def test_sigkill_after_the_first_checkpoint_then_resume_matches(tmp_path, uninterrupted):
    process = start(tmp_path, "--checkpoint-every", "3")
    path = wait_for_checkpoint(tmp_path, process)
    process.send_signal(signal.SIGKILL)
    finish(process)
    resumed = load_checkpoint(path)
    assert (resumed["epoch"], resumed["step"]) != (2, 0)  # killed before the end
    code, out, err = finish(start(tmp_path, "--resume", path))
    assert code == 0, err[-2000:]
    assert "resumed from" in out
    assert_same_parameters(path, uninterrupted)


def test_sigterm_mid_epoch_saves_the_step_and_resume_matches(tmp_path, uninterrupted):
    process = start(tmp_path, "--checkpoint-every", "2")
    path = wait_for_checkpoint(tmp_path, process)  # training has started
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM after epoch" in err and f"--resume {path}" in err
    stopped = load_checkpoint(path)
    assert stopped["epoch"] < 2 and 0 < stopped["step"] < 8  # mid-epoch
    code, out, err = finish(start(tmp_path, "--resume", path))
    assert code == 0, err[-2000:]
    assert_same_parameters(path, uninterrupted)


def test_a_checkpoint_write_failing_halfway_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_last.pt")
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(10000)}})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new data is written, then the flush fails
    with pytest.raises(UsageError, match="No space left on device"):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(10000)}})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(10000))
    assert os.listdir(tmp_path) == ["checkpoint_last.pt"]


def test_a_nan_loss_skips_its_update_and_the_run_goes_on(tmp_path, monkeypatch):
    """One NaN loss used to stop the run; now that step leaves the weights unchanged (decided
    on the device) and the checkpoints stay finite (tests/test_resume_and_divergence.py: ten
    in a row stop it)."""
    args = train_config(RUN + ["--LOG_DIR", str(tmp_path), "--checkpoint-every", "2", "--epochs", "1"])
    trainer = Trainer(args)
    calls = []
    real_loss = idml.train.idml_loss

    def loss_turning_nan(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(idml.train, "idml_loss", loss_turning_nan)
    assert trainer.run().epoch == 1
    good = load_checkpoint(os.path.join(trainer.recorder.run_dir, "checkpoint_last.pt"))
    assert good["step_guard"]["skipped"] == 1
    assert all(torch.isfinite(t).all() for t in good["model"].values() if t.is_floating_point())


def test_embeddings_turning_nan_stop_the_run_before_their_metrics_are_recorded(tmp_path, monkeypatch):
    """NaN similarities compare false with everything, so unchecked they would score R@1 = 100."""
    trainer = Trainer(train_config(RUN + ["--LOG_DIR", str(tmp_path), "--max-steps", "2"]))
    calls = []
    real_embed = idml.train.embed

    def embed_turning_nan(*a, **k):  # before training, after epoch 1, after epoch 2
        calls.append(1)
        embeddings, labels, uncertainties = real_embed(*a, **k)
        if len(calls) == 3:
            embeddings[5:8, 0] = float("nan")
        return embeddings, labels, uncertainties

    monkeypatch.setattr(idml.train, "embed", embed_turning_nan)
    with pytest.raises(
        TrainingDiverged,
        match=r"the embeddings of 3 of \d+ test images became NaN or infinite "
        r"\(epoch 2/2\); .*checkpoint_last.pt is good \(its test embeddings are "
        r"finite; it resumes at epoch 2, step 0\)",
    ):
        trainer.run()
    assert load_checkpoint(os.path.join(trainer.recorder.run_dir, "checkpoint_last.pt"))["epoch"] == 1
    lines = open(os.path.join(trainer.recorder.run_dir, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 2  # before training and epoch 1: nothing of epoch 2


def corrupt_some_images(root, count):
    folder = sorted(glob.glob(os.path.join(root, "CUB_200_2011", "images", "*")))[0]
    files = sorted(glob.glob(os.path.join(folder, "*.jpg")))[:count]
    for path in files:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])  # truncated JPEG
    return files


def cub_flags(tmp_path, *extra):
    """The flags of a tiny run on the synthetic CUB under tmp_path/data, logs in tmp_path/logs."""
    return [
        "--dataset",
        "cub",
        "--data-root",
        str(tmp_path / "data"),
        "--model",
        "resnet18",
        "--pretrained",
        "none",
        "--embedding-size",
        "8",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--max-steps",
        "4",
        "--workers",
        "0",
        "--wandb",
        "disabled",
        "--eval-clustering",
        "0",
        "--LOG_DIR",
        str(tmp_path / "logs"),
        *extra,
    ]


def cub_config(tmp_path, *extra):
    return train_config(cub_flags(tmp_path, *extra))


def test_corrupt_images_are_skipped_with_a_warning_and_counted(tmp_path):
    write_cub(str(tmp_path / "data"), 4, 6)
    bad = corrupt_some_images(str(tmp_path / "data"), 2)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        state = Trainer(cub_config(tmp_path)).run()
    assert state.epoch == 1
    with pytest.raises(UsageError, match=r"could not be decoded, more than --max-bad-images 1"):
        Trainer(cub_config(tmp_path, "--max-bad-images", "1")).run()
    assert all(os.path.isfile(path) for path in bad)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA"])
def test_grey_cmyk_and_rgba_images_train(tmp_path, mode):
    write_cub(str(tmp_path / "data"), 4, 6)
    for path in glob.glob(str(tmp_path / "data" / "CUB_200_2011" / "images" / "*" / "*.jpg"))[::2]:
        image = Image.open(path).convert(mode)
        if mode == "RGBA":
            os.remove(path)
            path = path[:-4] + ".png"
        image.save(path)
    assert Trainer(cub_config(tmp_path)).run().epoch == 1
