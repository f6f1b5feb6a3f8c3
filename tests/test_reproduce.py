"""scripts/reproduce.py: seeds trained one after the other or side by side, failures reported, and the
mean +- std table of finished runs beside the published numbers."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from tiny_runs import TINY_DIGITS_RUN

from idml import reproduce
from idml.cli import run_guarded
from idml.reproduce import reproduce_main

pytestmark = pytest.mark.slow  # trains tiny runs in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("R@1", "R@2", "R@4", "R@8", "RP", "MAP@R")


def write_run(folder, epochs):
    """A run folder whose metrics.jsonl holds `epochs`: [(R@1, RP)] for epochs 0, 1, ..."""
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for epoch, (r1, rp) in enumerate(epochs):
            values = {"R@1": r1, "R@2": 0.9, "R@4": 0.95, "R@8": 0.99, "RP": rp, "MAP@R": rp / 2}
            f.write(json.dumps({"epoch": epoch, "loss": None if epoch == 0 else 1.0, **values}) + "\n")
    return str(folder)


def test_from_runs_takes_each_runs_best_epoch_and_their_mean_and_sample_std(tmp_path, capsys):
    logs = tmp_path / "logs" / "logs_cub"
    runs = [
        write_run(logs / "a", [(0.9, 0.9), (0.60, 0.30), (0.55, 0.40)]),  # epoch 0 never counts
        write_run(logs / "b", [(0.1, 0.1), (0.62, 0.32), (0.64, 0.31)]),
        write_run(logs / "c", [(0.1, 0.1), (0.66, 0.35), (0.66, 0.20)]),
    ]  # a tie: the first
    prefix = str(tmp_path / "out" / "table")
    assert run_guarded(reproduce_main, ["--from-runs", *runs, "--out", prefix]) == 0
    result = json.load(open(prefix + ".json"))
    assert result["dataset"] == "cub" and result["epoch"] == "best epoch by R@1"
    assert [run["epoch"] for run in result["runs"]] == [1, 2, 1]
    table = result["metrics"]
    # by hand: R@1 0.60, 0.64, 0.66: mean 0.19 / 0.3, squared deviations sum 0.0018667, / 2
    assert table["R@1"]["mean"] == pytest.approx(0.633333, abs=1e-6)
    assert table["R@1"]["std"] == pytest.approx(math.sqrt(0.00186667 / 2), abs=1e-6)
    assert table["RP"]["mean"] == pytest.approx(0.32) and table["RP"]["std"] == pytest.approx(math.sqrt(0.0007))
    assert table["MAP@R"]["mean"] == pytest.approx(0.16) and table["R@8"]["std"] == pytest.approx(0.0)
    assert table["R@1"]["published"] == pytest.approx(0.707) and table["R@8"]["published"] is None
    assert table["NMI"] == {"mean": None, "std": None, "published": pytest.approx(0.735)}  # not in these runs
    markdown = open(prefix + ".md").read()
    assert "| R@1 | 63.33 +- 3.06 | 70.7 |" in markdown and "| RP | 32.00 +- 2.65 | 39.3 |" in markdown
    assert markdown in capsys.readouterr().out


def test_from_runs_refuses_bad_input_in_one_sentence(tmp_path, capsys):
    empty = tmp_path / "logs_cars" / "empty"
    empty.mkdir(parents=True)
    good = write_run(tmp_path / "logs_cars" / "good", [(0.1, 0.1), (0.5, 0.2)])
    untrained = write_run(tmp_path / "logs_cars" / "untrained", [(0.1, 0.1)])
    cases = [
        (["--from-runs", str(empty)], "metrics.jsonl does not exist"),
        (["--from-runs", good, "--dataset", "imagenet"], "--dataset expects one of"),
        (["--from-runs", untrained], "holds no trained epoch"),
        (["--from-runs", good, str(tmp_path)], "cannot tell the data set"),
        (["--seeds", "1", "1", "--", *TINY_DIGITS_RUN], "--seeds expects distinct numbers"),
        (["--seeds", "1", "--", "--seed", "3", *TINY_DIGITS_RUN], "leave --seed out"),
        (["--seeds", "1", "--", "--dataset", "imagenet"], "not valid for scripts/train.py"),
    ]
    for argv, message in cases:
        assert run_guarded(reproduce_main, argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert run_guarded(reproduce_main, ["--from-runs", good]) == 0  # cars, from the parent folder's name
    assert "| R@1 | 50.00 | 90.6 |" in capsys.readouterr().out  # one run: no spread


FAKE_TRAIN = """
import argparse, json, os, sys

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int)
parser.add_argument("--remark")
parser.add_argument("--LOG_DIR")
args, _ = parser.parse_known_args()
if args.seed == 2:
    sys.exit(3)
folder = os.path.join(args.LOG_DIR, "logs_digits", "run" + args.remark)
os.makedirs(folder)
entry = {"epoch": 1, "loss": 1.0, "R@1": args.seed / 10, "RP": 0.5}
open(os.path.join(folder, "metrics.jsonl"), "w").write(json.dumps(entry) + "\\n")
open(os.path.join(folder, "gpu.txt"), "w").write(os.environ.get("CUDA_VISIBLE_DEVICES", "none"))
print("trained seed", args.seed)
"""


@pytest.mark.parametrize("gpus, flags", [([], []), ([], ["--parallel"]), (["4", "6"], [])])
def test_a_failing_seed_is_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys, gpus, flags):
    """A stand-in for scripts/train.py (seed 2 fails with code 3): one after the other, all at once
    on the CPU, and one per GPU when several are visible (each run its own CUDA_VISIBLE_DEVICES)."""
    (tmp_path / "train.py").write_text(textwrap.dedent(FAKE_TRAIN))
    monkeypatch.setattr(reproduce, "SCRIPTS", str(tmp_path))
    monkeypatch.setattr(reproduce, "visible_gpus", lambda: gpus)
    started = []
    real_start = reproduce._start
    monkeypatch.setattr(reproduce, "_start", lambda *a: started.append(a[-1]) or real_start(*a))
    argv = [
        "--seeds",
        "1",
        "2",
        "3",
        *flags,
        "--out",
        str(tmp_path / "t"),
        "--",
        *TINY_DIGITS_RUN,
        "--LOG_DIR",
        str(tmp_path / "logs"),
        "--remark",
        "_r",
    ]
    with pytest.raises(SystemExit) as stop:
        run_guarded(reproduce_main, argv)
    assert stop.value.code == 1
    out, err = capsys.readouterr()
    assert "seed 2: scripts/train.py exited with code 3" in out and "[seed 3] trained seed 3" in out
    assert "1 of 3 seed runs failed: seed 2 (exit code 3)" in err
    result = json.load(open(tmp_path / "t.json"))
    assert [(run["seed"], os.path.basename(run["dir"])) for run in result["runs"]] == [
        (1, "run_r_seed1"),
        (3, "run_r_seed3"),
    ]
    assert result["failed"] == [{"seed": 2, "exit_code": 3, "reason": "exit code 3"}]
    assert result["metrics"]["R@1"]["mean"] == pytest.approx(0.2)
    seen = [open(os.path.join(run["dir"], "gpu.txt")).read() for run in result["runs"]]
    if gpus:  # seed 3 waits for the first GPU set free
        assert started[:2] == gpus and started[2] in gpus and seen == [gpus[0], started[2]]
    else:
        assert started == [None] * 3 and seen == [os.environ.get("CUDA_VISIBLE_DEVICES", "none")] * 2


def test_two_digits_seeds_train_and_make_the_table(tmp_path):
    prefix = str(tmp_path / "table")
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "reproduce.py"),
            "--seeds",
            "1",
            "2",
            "--out",
            prefix,
            "--",
            *TINY_DIGITS_RUN,
            "--LOG_DIR",
            str(tmp_path / "logs"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.load(open(prefix + ".json"))
    folders = sorted(os.listdir(tmp_path / "logs" / "logs_digits"))
    assert [f[-6:] for f in folders] == ["_seed1", "_seed2"]
    assert [os.path.basename(run["dir"]) for run in table["runs"]] == folders
    lines = [
        [json.loads(line) for line in open(tmp_path / "logs" / "logs_digits" / f / "metrics.jsonl")] for f in folders
    ]
    assert lines[0][1]["loss"] != lines[1][1]["loss"]  # the seeds were used
    for name in KEYS:
        values = [run[1][name] for run in lines]  # one epoch: the best is epoch 1
        assert table["metrics"][name]["mean"] == pytest.approx(sum(values) / 2)
        assert table["metrics"][name]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert "| R@1 |" in result.stdout and open(prefix + ".md").read() in result.stdout
