"""The command lines refuse bad input with one clear sentence and exit code 2."""

import os
import subprocess
import sys

import pytest

from idml.checkpoint import save_checkpoint
from idml.cli import run_guarded, train_parser
from idml.errors import UsageError

pytestmark = pytest.mark.slow  # runs the scripts in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def assert_refused(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_missing_dataset_root(tmp_path):
    result = run("train.py", "--dataset", "cub", "--data-root", str(tmp_path / "nowhere"), "--pretrained", "none")
    assert_refused(result, "CUB-200-2011 folder not found", "CUB_200_2011/images/<NNN.Name>/<file>.jpg")


def test_unknown_dataset_and_bad_number():
    assert_refused(run("train.py", "--dataset", "imagenet"), "expected one of digits, cub, cars, SOP, custom")
    assert_refused(run("train.py", "--batch-size", "0"), "expected a positive number")


def test_offline_imagenet_default_says_what_to_do(tmp_path):
    # A proxy on a closed loopback port makes the download fail at once, network or not.
    env = {"TORCH_HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = run("train.py", "--model", "resnet18", "--wandb", "disabled", env=env)
    assert_refused(
        result, "could not download the ImageNet weights of resnet18", "resnet18-f37072fd.pth", "--pretrained none"
    )


def test_device_cuda_without_a_gpu():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_refused(run("train.py", "--device", "cuda", "--pretrained", "none"), "no CUDA GPU is visible")


def test_evaluate_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    assert_refused(
        run("evaluate.py", "--resume", str(path)),
        f"{path} is not a checkpoint written by scripts/train.py (it is not a file that torch.save wrote)",
    )
    assert_refused(run("evaluate.py", "--resume", str(tmp_path)), "is a folder; expected a checkpoint file")
    assert_refused(run("evaluate.py", "--resume", str(tmp_path / "missing.pt")), "checkpoint not found")


def test_evaluate_refuses_a_foreign_torch_file(tmp_path):
    import torch

    path = str(tmp_path / "weights.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    assert_refused(run("evaluate.py", "--resume", path), "is not an idml checkpoint")


@pytest.mark.parametrize(
    "saved, message",
    [
        ({"embedding_size": 64}, "was trained with --embedding-size 64, this run asks for 32"),
        ({"model": "resnet34"}, "was trained with --model resnet34, this run asks for resnet18"),
    ],
)
def test_resume_with_another_model_is_refused(tmp_path, saved, message):
    import torch

    path = str(tmp_path / "checkpoint_last.pt")
    saved_args = {
        "model": "resnet18",
        "embedding_size": 32,
        "dataset": "digits",
        "uncertainty": "normalized",
        "l2_norm": 1,
        "loss": "Proxy_Anchor",
        **saved,
    }
    save_checkpoint(path, {"args": saved_args, "model": {}})
    result = run(
        "train.py",
        "--model",
        "resnet18",
        "--pretrained",
        "none",
        "--embedding-size",
        "32",
        "--resume",
        path,
        "--wandb",
        "disabled",
        "--workers",
        "0",
    )
    assert_refused(result, message)
    assert torch.load(path, weights_only=True)["args"] == saved_args  # untouched


def test_batch_larger_than_the_training_set(tmp_path):
    result = run(
        "train.py",
        "--batch-size",
        "9000",
        "--pretrained",
        "none",
        "--model",
        "resnet18",
        "--wandb",
        "disabled",
        "--LOG_DIR",
        str(tmp_path),
    )
    assert_refused(result, "--batch-size 9000 is larger than the training set (7208 images)")


def test_wrong_layout_and_empty_class_are_refused_without_writing(tmp_path):
    from idml.data.synthetic import write_cub, write_sop

    write_sop(str(tmp_path), 4, 2)
    listing = tmp_path / "Stanford_Online_Products" / "Ebay_test.txt"
    header, *lines = listing.read_text().splitlines()
    listing.write_text("\n".join([header] + [line.rsplit(" ", 1)[0] for line in lines]))  # no path field
    logs = tmp_path / "logs"
    result = run(
        "train.py", "--dataset", "SOP", "--data-root", str(tmp_path), "--pretrained", "none", "--LOG_DIR", str(logs)
    )
    assert_refused(result, "Ebay_test.txt should read 'image_id class_id super_class_id path'")
    write_cub(str(tmp_path), 4, 2)
    (tmp_path / "CUB_200_2011" / "images" / "000.Empty").mkdir()
    result = run(
        "train.py", "--dataset", "cub", "--data-root", str(tmp_path), "--pretrained", "none", "--LOG_DIR", str(logs)
    )
    assert_refused(result, "000.Empty holds no images")
    assert not logs.exists()  # nothing half-written


def test_synthetic_data_command_writes_a_layout_the_loader_reads(tmp_path):
    from idml.data import build_dataset

    result = run("synthetic.py", "--layout", "sop", "--out", str(tmp_path), "--classes", "4", "--per-class", "3")
    assert result.returncode == 0 and "wrote a synthetic sop dataset" in result.stdout, result.stderr
    assert len(build_dataset("SOP", str(tmp_path), train=True, image_size=32)) == 6  # 2 classes x 3
    assert_refused(run("synthetic.py", "--layout", "imagenet", "--out", str(tmp_path)), "invalid choice")


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--lr", "nan", "expected a positive number, got nan"),
        ("--lr", "inf", "expected a positive number, got inf"),
        ("--workers", "-1", "expected a number >= 0, got -1"),
        ("--IPC", "-1", "expected a number >= 0, got -1"),
        ("--mrg", "nan", "expected a finite number, got nan"),
        ("--remark", "a/b", "expected a name without '/', got 'a/b'"),
        ("--kmeans-runs", "0", "expected a positive number, got 0"),
    ],
)
def test_bad_numbers_and_names_are_refused_by_the_parser(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        train_parser().parse_args([flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: {expected}" in capsys.readouterr().err


def test_wandb_online_without_credentials_says_what_to_do(tmp_path):
    pytest.importorskip("wandb")
    result = run(
        "train.py",
        "--pretrained",
        "none",
        "--model",
        "resnet18",
        "--workers",
        "0",
        "--wandb",
        "online",
        "--LOG_DIR",
        str(tmp_path / "logs"),
        env={"HOME": str(tmp_path), "WANDB_API_KEY": ""},
    )
    assert_refused(result, "--wandb online: wandb could not start the run", "--wandb offline logs into the run folder")


def test_errors_become_one_line_naming_the_torchrun_process_and_ctrl_c_no_traceback(monkeypatch, capsys):
    def fails_with(error):
        def main(argv):
            raise error

        return main

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_guarded(fails_with(UsageError("bad image budget"))) == 2
    assert capsys.readouterr().err == "error (process 1 of 2): bad image budget\n"
    peer = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:29500")
    assert run_guarded(fails_with(peer)) == 1
    assert capsys.readouterr().err == (
        "error (process 1 of 2): another process stopped, so this one stops too (that process says why)\n"
    )
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        run_guarded(fails_with(RuntimeError("a bug")))
    assert run_guarded(fails_with(KeyboardInterrupt())) == 130  # Ctrl-C while loading: no traceback
    assert capsys.readouterr().err == "interrupted\n"
