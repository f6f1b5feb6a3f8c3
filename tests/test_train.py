"""Training end to end: the step's three-term mixup loss, the run's outputs, resume,
evaluation of a checkpoint, and every seed command line on its generated layout."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_runs import TINY_MODEL

from idml import reference
from idml.checkpoint import load_checkpoint
from idml.cli import train_config
from idml.config import OptimConfig
from idml.data.synthetic import WRITERS
from idml.errors import UsageError
from idml.losses import ProxyAnchorISM
from idml.models import IDMLNet
from idml.recorder import best_results_text, claim_run_folder
from idml.train import build_optimizer, idml_loss, mixup_draw, train

pytestmark = pytest.mark.slow  # trains tiny runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, *extra):
    return train_config(TINY_MODEL + ["--LOG_DIR", str(tmp_path / "logs"), *extra])


def run_script(script, *args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "rmsprop"])
def test_optimizer_steps_as_the_plain_for_loop_update(optimizer):
    """Training's optimiser (fused where that is safe) takes the update of torch's for-loop
    implementation with the same groups, to float32 rounding, also after a step that an
    fp16 overflow made GradScaler skip (fused SGD fills its momentum there: torch 2.14)."""
    model, criterion = IDMLNet("resnet18", 8, "none"), ProxyAnchorISM(10, 8)
    fast = build_optimizer(OptimConfig(optimizer=optimizer), model, criterion)
    groups = [
        {
            **{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
            "params": [p.detach().clone().requires_grad_() for p in g["params"]],
        }
        for g in fast.param_groups
    ]
    plain = type(fast)(groups, foreach=False)
    pairs = list(zip(*([p for g in o.param_groups for p in g["params"]] for o in (fast, plain))))
    scalers = [torch.amp.GradScaler("cpu") for _ in range(2)]
    for step in range(4):
        for a, b in pairs:
            a.grad = torch.full_like(a, float("inf")) if step == 0 else torch.randn_like(a)  # 0: skipped
            b.grad = a.grad.clone()
        for o, scaler in zip((fast, plain), scalers):
            scaler.scale(torch.ones(()))  # (creates the scale on the first call)
            scaler.unscale_(o)
            scaler.step(o)
            scaler.update()
    for a, b in pairs:
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bn_freeze", [True, False])
def test_step_loss_is_the_three_term_mixup_formula(bn_freeze):
    torch.manual_seed(0)
    model = IDMLNet("resnet18", 8, "none", bn_freeze=bn_freeze).train()
    criterion = ProxyAnchorISM(4, 8)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    lam, permutation = mixup_draw(6, torch.Generator().manual_seed(3))
    assert 0.0 <= lam <= 1.0 and sorted(permutation.tolist()) == list(range(6))
    got = idml_loss(model, criterion, images, labels, lam, permutation, amp="off")

    mixed = lam * images + (1 - lam) * images[permutation]
    (mu, sigma), (mu_mixed, sigma_mixed) = model(images), model(mixed)
    proxies = criterion.proxies
    expected = (
        reference.pa_ism_loss(mu, sigma, labels, proxies)
        + lam * reference.pa_ism_loss(mu_mixed, sigma_mixed, labels, proxies)
        + (1 - lam) * reference.pa_ism_loss(mu_mixed, sigma_mixed, labels[permutation], proxies)
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_digits_run_writes_every_output(tmp_path):
    args = tiny_config(
        tmp_path, "--dataset", "digits", "--epochs", "2", "--batch-size", "32", "--max-steps", "3", "--lr", "1e-4"
    )
    state = train(args)
    run_dir = glob.glob(str(tmp_path / "logs" / "logs_digits" / "*"))[0]
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert lines[0]["loss"] is None and all(line["loss"] > 0 for line in lines[1:])
    for line in lines:
        assert set(line) == {"epoch", "loss", "R@1", "R@2", "R@4", "R@8", "RP", "MAP@R", "NMI", "F1"}
        assert all(0.0 <= line[k] <= 1.0 for k in line if k not in ("epoch", "loss"))
    last = load_checkpoint(os.path.join(run_dir, "checkpoint_last.pt"))
    assert last["epoch"] == 2 and state.epoch == 2
    best_epoch = state.best["epoch"]
    best = load_checkpoint(os.path.join(run_dir, "digits_resnet18_best.pth"))
    assert best["epoch"] == best_epoch and best["metrics"] == state.best["metrics"]
    assert "optimizer" not in best  # weights only: the optimiser state would double the file
    text = open(os.path.join(run_dir, "digits_resnet18_best_results.txt")).read()
    assert text == best_results_text(best_epoch, state.best["metrics"])
    assert text.startswith(f"Best Epoch: {best_epoch}\nBest Recall@1: ")


def test_resume_continues_after_the_last_epoch(tmp_path):
    common = ["--dataset", "digits", "--batch-size", "32", "--max-steps", "2", "--eval-clustering", "0"]
    train(tiny_config(tmp_path, *common, "--epochs", "1"))
    last = glob.glob(str(tmp_path / "logs" / "logs_digits" / "*" / "checkpoint_last.pt"))[0]
    best = os.path.join(os.path.dirname(last), "digits_resnet18_best.pth")
    with pytest.raises(UsageError, match="only the best epoch's weights; resume from checkpoint_last.pt"):
        train(tiny_config(tmp_path, *common, "--epochs", "2", "--resume", best))
    with pytest.raises(UsageError, match="that run has trained all 1 of its epochs; pass a larger --epochs"):
        train(tiny_config(tmp_path, *common, "--epochs", "1", "--resume", last))
    with pytest.raises(UsageError, match="was trained with --batch-size 32, this run asks for 16"):
        train(tiny_config(tmp_path, *common, "--epochs", "2", "--batch-size", "16", "--resume", last))
    state = train(tiny_config(tmp_path, *common, "--epochs", "2", "--resume", last))
    assert state.epoch == 2
    assert [entry["epoch"] for entry in state.history] == [0, 1, 2]
    assert load_checkpoint(last)["epoch"] == 2


def test_a_new_run_never_writes_into_an_earlier_runs_folder(tmp_path):
    common = [
        "--dataset",
        "digits",
        "--batch-size",
        "32",
        "--max-steps",
        "1",
        "--epochs",
        "1",
        "--eval-clustering",
        "0",
    ]
    train(tiny_config(tmp_path, *common))
    (first,) = glob.glob(str(tmp_path / "logs" / "logs_digits" / "*"))
    before = {name: open(os.path.join(first, name), "rb").read() for name in os.listdir(first)}
    train(tiny_config(tmp_path, *common))
    assert sorted(glob.glob(str(tmp_path / "logs" / "logs_digits" / "*"))) == [first, first + "_2"]
    assert {name: open(os.path.join(first, name), "rb").read() for name in os.listdir(first)} == before
    assert os.path.isfile(os.path.join(first + "_2", "checkpoint_last.pt"))


def test_evaluate_script_reproduces_the_final_metrics(tmp_path):
    state = train(
        tiny_config(tmp_path, "--dataset", "digits", "--epochs", "1", "--batch-size", "32", "--max-steps", "2")
    )
    run_dir = glob.glob(str(tmp_path / "logs" / "logs_digits" / "*"))[0]
    expected = {k: v for k, v in state.history[-1].items() if k not in ("epoch", "loss")}
    for checkpoint in ("checkpoint_last.pt", "digits_resnet18_best.pth"):  # one epoch: the best is the last
        result = run_script("evaluate.py", "--resume", os.path.join(run_dir, checkpoint), "--workers", "0", "--json")
        assert result.returncode == 0, result.stderr
        metrics = json.loads(result.stdout.strip().splitlines()[-1])
        assert metrics.keys() == expected.keys()
        for name in ("R@1", "R@2", "R@4", "R@8", "RP", "MAP@R"):
            assert metrics[name] == pytest.approx(expected[name], abs=1e-6)


def test_wandb_offline_writes_its_run_folder(tmp_path):
    pytest.importorskip("wandb")
    args = tiny_config(
        tmp_path,
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--max-steps",
        "1",
        "--eval-clustering",
        "0",
    )
    args.run.wandb = "offline"
    train(args)
    assert glob.glob(str(tmp_path / "logs" / "logs_digits" / "*" / "wandb" / "offline-run-*"))


SEED_COMMANDS = {
    "cub": "--gpu -1 --loss Proxy_Anchor --model resnet50 --embedding-size 512 --batch-size 120 --lr 6e-4 "
    "--dataset cub --warm 5 --bn-freeze 1 --lr-decay-step 5",
    "cars": "--gpu -1 --loss Proxy_Anchor --model resnet50 --embedding-size 512 --batch-size 120 --lr 2.5e-4 "
    "--dataset cars --warm 5 --bn-freeze 1 --lr-decay-step 10",
    "sop": "--gpu -1 --loss Proxy_Anchor --model resnet50 --embedding-size 512 --batch-size 120 --lr 6e-4 "
    "--dataset SOP --warm 5 --bn-freeze 1 --lr-decay-step 10 --lr-decay-gamma 0.25",
}


@pytest.mark.parametrize("layout", ["cub", "cars", "sop"])
def test_seed_command_runs_one_short_epoch_on_its_layout(tmp_path, layout):
    data = str(tmp_path / "data")
    WRITERS[layout](data, 20, 13)  # 10 train classes x 13 images >= the seed's batch of 120
    logs = str(tmp_path / "logs")
    result = run_script(
        "train.py",
        *SEED_COMMANDS[layout].split(),
        "--data-root",
        data,
        "--pretrained",
        "none",
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--max-steps",
        "2",
        "--wandb",
        "disabled",
        "--workers",
        "2",
        "--LOG_DIR",
        logs,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "no GPU is visible: running on the CPU" in result.stderr
    assert "unseen-class metrics before training -> after training" in result.stdout
    dataset = {"sop": "SOP"}.get(layout, layout)
    run_dir = glob.glob(os.path.join(logs, f"logs_{dataset}", "resnet50_Proxy_Anchor_embedding512_*"))[0]
    for name in (
        "checkpoint_last.pt",
        f"{dataset}_resnet50_best.pth",
        f"{dataset}_resnet50_best_results.txt",
        "metrics.jsonl",
    ):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    expected_ks = ["R@1", "R@10", "R@100"] if layout == "sop" else ["R@1", "R@2", "R@4", "R@8"]
    assert [k for k in lines[-1] if k.startswith("R@")] == expected_ks


def test_two_runs_started_together_claim_different_folders(tmp_path):
    args = tiny_config(tmp_path, "--dataset", "digits")
    first, second = claim_run_folder(args), claim_run_folder(args)
    assert second == first + "_2" and os.path.isdir(first) and os.path.isdir(second)
