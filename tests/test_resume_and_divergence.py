"""A run records what it does: resume applies the schedule's flags, a diverging run skips its
bad steps and names a checkpoint that really is good, checkpoints are checked on load, the
run folder is locked, wandb honours WANDB_MODE, --help needs no torch. On a 4-class synthetic
CUB (12 test images), so each run takes seconds."""

import os
import subprocess
import sys
import time

import pytest
import torch
from test_robustness import cub_config, cub_flags

import idml.train
from idml import distributed, tracking
from idml.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from idml.cli import run_guarded, train_main
from idml.data.synthetic import write_cub
from idml.errors import TrainingDiverged, UsageError
from idml.evaluate import embed
from idml.files import FolderLock
from idml.train import Trainer

pytestmark = pytest.mark.slow  # trains tiny runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def data(tmp_path):
    write_cub(str(tmp_path / "data"), 4, 6)
    return tmp_path


@pytest.fixture
def more_data(tmp_path):
    """15 steps of 8 images per epoch."""
    write_cub(str(tmp_path / "data"), 4, 60)
    return tmp_path


def first_run(tmp_path, *extra):
    trainer = Trainer(cub_config(tmp_path, "--max-steps", "2", *extra))
    trainer.run()
    return os.path.join(trainer.recorder.run_dir, "checkpoint_last.pt")


def test_resume_applies_changed_schedule_flags_and_records_them(data, capsys):
    last = first_run(data)
    trainer = Trainer(
        cub_config(
            data,
            "--max-steps",
            "2",
            "--epochs",
            "3",
            "--resume",
            last,
            "--lr",
            "1e-3",
            "--weight-decay",
            "0.5",
            "--lr-decay-step",
            "1",
        )
    )
    out = capsys.readouterr().out
    assert "--lr 0.0001 -> 0.001" in out and "--weight-decay 0.0001 -> 0.5" in out and "--lr-decay-step 10 -> 1" in out
    # one epoch done, StepLR(1, 0.5): 1e-3 * 0.5 now; proxies 100 x
    assert [g["lr"] for g in trainer.parts.optimizer.param_groups] == pytest.approx([5e-4, 5e-4, 5e-2])
    assert all(g["weight_decay"] == 0.5 for g in trainer.parts.optimizer.param_groups)
    assert trainer.parts.optimizer.state  # AdamW's moments kept
    trainer.run()
    saved = load_checkpoint(last)
    assert saved["args"]["lr"] == 1e-3 and saved["args"]["weight_decay"] == 0.5
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == pytest.approx([1.25e-4, 1.25e-4, 1.25e-2])
    assert saved["scheduler"]["step_size"] == 1 and saved["scheduler"]["last_epoch"] == 3


def test_resume_with_another_optimizer_starts_it_afresh(data, capsys):
    last = first_run(data)
    state = Trainer(cub_config(data, "--max-steps", "2", "--epochs", "2", "--resume", last, "--optimizer", "sgd")).run()
    assert state.epoch == 2
    assert "--optimizer adamw -> sgd: the sgd state starts afresh" in capsys.readouterr().out
    assert load_checkpoint(last)["args"]["optimizer"] == "sgd"


def test_one_bad_step_is_skipped_and_ten_in_a_row_stop_with_a_checked_checkpoint(more_data, monkeypatch, capsys):
    """A NaN loss leaves the weights as they were (the run goes on); ten in a row stop the run
    with exit code 3, naming a checkpoint whose test embeddings are finite."""
    calls = []
    real_loss = idml.train.idml_loss

    def loss_turning_nan(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) in bad_calls else loss

    monkeypatch.setattr(idml.train, "idml_loss", loss_turning_nan)
    data = more_data
    bad_calls = {2}
    trainer = Trainer(cub_config(data, "--max-steps", "3", "--checkpoint-every", "1"))
    trainer.run()
    assert "1 step(s) up to epoch 1, step 2 did not update the weights" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in trainer.parts.model.parameters())

    calls.clear()
    bad_calls = set(range(3, 30))
    args = ["--max-steps", "20", "--checkpoint-every", "2", "--remark", "_nan"]
    with pytest.raises(
        TrainingDiverged,
        match=r"NaN or infinite in 10 steps in a row \(up to epoch 1, step 12\); "
        r".*checkpoint_last.pt is good .*resumes at epoch 1, step \d+\)",
    ) as stop:
        Trainer(cub_config(data, *args)).run()
    path = str(stop.value).split("; ")[1].split(" is good")[0]
    model, _ = model_from_checkpoint(path)  # the message is true: finite test embeddings
    trainer = Trainer(cub_config(data, "--resume", path, "--epochs", "2"))
    assert torch.isfinite(embed(model, trainer.parts.test_loader, torch.device("cpu"), progress=False)[0]).all()
    trainer.recorder.release(failed=False)
    calls.clear()
    assert run_guarded(train_main, [*map(str, cub_flags(data, *args, "--remark", "_nan2"))]) == 3
    assert "error: the loss was NaN or infinite in 10 steps in a row" in capsys.readouterr().err


def test_a_huge_lr_never_names_a_checkpoint_with_nan_embeddings(more_data):
    data = more_data
    """--lr 1e6: every weight moves by ~1e6 on the first step. The stop message may name a
    checkpoint only if its test embeddings are finite."""
    with pytest.raises(TrainingDiverged) as stop:
        Trainer(cub_config(data, "--lr", "1e6", "--checkpoint-every", "1", "--max-steps", "20")).run()
    message = str(stop.value)
    if " is good " in message:
        path = message.split("; ")[1].split(" is good")[0]
        model, _ = model_from_checkpoint(path)
        trainer = Trainer(cub_config(data, "--resume", path, "--epochs", "2"))
        assert torch.isfinite(embed(model, trainer.parts.test_loader, torch.device("cpu"), progress=False)[0]).all()
    else:
        assert "start again with a lower --lr" in message


def test_a_damaged_or_incomplete_checkpoint_is_refused_in_one_sentence(tmp_path):
    path = str(tmp_path / "checkpoint_last.pt")
    save_checkpoint(path, {"args": {"model": "resnet18"}, "model": {"w": torch.full((4096,), 1.5)}})
    data = bytearray(open(path, "rb").read())
    where = bytes(data).index(torch.full((8,), 1.5).numpy().tobytes())
    data[where + 100] ^= 0x10  # one flipped bit inside the tensor
    open(path, "wb").write(bytes(data))
    with pytest.raises(UsageError, match="is damaged: its checksum does not match"):
        load_checkpoint(path)
    save_checkpoint(path, {"model": {}})
    with pytest.raises(UsageError, match=r"lacks 'args', which every checkpoint written by scripts/train.py holds"):
        model_from_checkpoint(path)


def test_a_full_disk_while_saving_is_one_sentence_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_last.pt")
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(100)}})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(
        UsageError,
        match=r"cannot write .*checkpoint_last.pt \(No space left on device\); the "
        r"previous file there is intact",
    ):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(100)}})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and os.listdir(tmp_path) == ["checkpoint_last.pt"]


def test_non_finite_weights_are_never_written(tmp_path):
    with pytest.raises(
        TrainingDiverged,
        match=r"1 weight tensors hold NaN or infinite values \(e.g. "
        r"criterion.proxies\)",
    ):
        save_checkpoint(str(tmp_path / "c.pt"), {"model": {}, "criterion": {"proxies": torch.tensor([float("nan")])}})
    assert not os.listdir(tmp_path)


def test_a_locked_run_folder_refuses_a_second_run_and_stale_temporaries_go(data):
    last = first_run(data)
    folder = os.path.dirname(last)
    stale = os.path.join(folder, ".checkpoint_last.pt.k2x9_ab1.tmp")
    open(stale, "wb").write(b"half a checkpoint")
    lock = FolderLock(folder)  # as a run writing there holds it
    with pytest.raises(UsageError, match=f"{folder} is in use by another run"):
        Trainer(cub_config(data, "--max-steps", "2", "--epochs", "2", "--resume", last))
    lock.release()
    assert os.path.isfile(stale)
    Trainer(cub_config(data, "--max-steps", "2", "--epochs", "2", "--resume", last)).run()
    assert not os.path.exists(stale)


def test_a_failed_start_removes_the_run_folder_it_created(data, monkeypatch):
    def unreadable(*a, **k):
        raise UsageError("12 test images could not be decoded")

    monkeypatch.setattr(idml.train, "embed", unreadable)
    with pytest.raises(UsageError, match="could not be decoded"):
        Trainer(cub_config(data)).run()
    assert not os.listdir(data / "logs" / "logs_cub")


@pytest.mark.parametrize(
    "flag, env, expected",
    [
        ("auto", {"WANDB_MODE": "disabled"}, "disabled"),
        ("online", {"WANDB_MODE": "offline"}, "offline"),
        ("disabled", {"WANDB_MODE": "online"}, "disabled"),
        ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
        ("offline", {"WANDB_DISABLED": "true"}, "disabled"),
        ("auto", {}, "auto"),
    ],
)
def test_the_stricter_of_flag_and_wandb_mode_wins(flag, env, expected):
    assert tracking.resolve_mode(flag, env) == expected


def test_wandb_mode_disabled_in_the_environment_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.open_run("auto", "p", str(tmp_path), {}) is None
    assert not os.listdir(tmp_path)


def test_wandb_auto_with_credentials_and_no_server_falls_back_to_offline_fast(tmp_path):
    pytest.importorskip("wandb")
    code = (
        "from idml import tracking; run = tracking.open_run('auto', 'p', '.', {}); "
        "print(run.settings.mode); run.finish()"
    )
    env = {name: value for name, value in os.environ.items() if name not in ("WANDB_MODE", "WANDB_DIR")}
    env.update(WANDB_API_KEY="x" * 40, WANDB_BASE_URL="http://127.0.0.1:9", PYTHONPATH=ROOT)
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.time() - start < 30 and "offline" in result.stdout.splitlines()[-1]
    assert "logging to wandb offline, as its server cannot be reached" in result.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_amp_on_a_cpu_warns_that_it_is_slow(data, capsys):
    Trainer(cub_config(data, "--amp", "bf16", "--device", "cpu")).recorder.release(failed=True)
    assert "warning: --amp bf16 on a CPU is much slower than float32" in capsys.readouterr().err


def test_the_command_lines_parse_and_answer_help_without_torch():
    code = (
        "import sys; from idml.cli import train_parser, evaluate_parser, export_parser; "
        "[p().parse_args([]) if p is train_parser else p() for p in (train_parser, evaluate_parser, "
        "export_parser)]; print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.stdout.strip() == "False", result.stderr[-2000:]
    for script in ("train.py", "evaluate.py", "export.py"):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "scripts", script), "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        assert result.returncode == 0 and "usage:" in result.stdout


def test_every_dataset_the_command_line_offers_has_a_reader():
    from idml.choices import DATASETS
    from idml.data.datasets import SPLITS

    assert set(DATASETS) == {"digits", *SPLITS}


def test_ddp_is_built_without_torchs_broadcast_buffers_warning(tmp_path, recwarn):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        distributed.wrap(torch.nn.Linear(2, 2), torch.device("cpu"), find_unused_parameters=False, buffers_differ=False)
    finally:
        dist.destroy_process_group()
    assert not [w for w in recwarn if "broadcast_buffers" in str(w.message)]
