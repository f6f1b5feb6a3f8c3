"""scripts/reproduce.py: a published command line trained with several seeds, and the mean and standard
deviation of each metric over the runs beside the published numbers.

Each seed is one scripts/train.py run with `--seed N --remark <remark>_seed<N>` appended, so its run
folder is the published name plus `_seed<N>`. The runs go one after the other, or at the same time, one
per visible GPU (CUDA_VISIBLE_DEVICES set per run), with --parallel or whenever several GPUs are
visible. Each run contributes its best epoch by R@1, the epoch its <dataset>_<model>_best_results.txt
reports (as the published code does); --from-runs makes the same table from finished run folders.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from idml.config import TrainConfig
from idml.errors import UsageError
from idml.files import atomic_write_text

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
# README.md, "Reproducing the published results": the paper's numbers, in percent.
PUBLISHED = {
    "cub": {"R@1": 70.7, "R@2": 80.2, "R@4": 87.9, "NMI": 73.5, "RP": 39.3, "MAP@R": 28.4},
    "cars": {"R@1": 90.6, "R@2": 94.5, "R@4": 97.1, "NMI": 76.9, "RP": 42.6, "MAP@R": 33.8},
    "SOP": {"R@1": 81.5, "R@10": 92.7, "NMI": 92.3, "RP": 54.8, "MAP@R": 51.3},
}
EPOCH_CHOICE = "best epoch by R@1"


def canonical_dataset(name: str) -> str:
    from idml.cli import DATASET_NAMES

    try:
        return DATASET_NAMES[name.lower()]
    except KeyError:
        raise UsageError(f"--dataset expects one of {', '.join(DATASET_NAMES.values())}, got {name!r}") from None


# --- reading finished runs -------------------------------------------------------------------


def best_epoch(run_dir: str) -> dict:
    """The entry of run_dir/metrics.jsonl with the highest R@1 among the trained epochs (the first
    one on a tie), as training picks its best checkpoint."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"--from-runs expects run folders written by scripts/train.py; {path} does not exist")
    try:
        with open(path) as f:
            entries = [json.loads(line) for line in f if line.strip()]
        trained = [e for e in entries if e["epoch"] > 0 and isinstance(e["R@1"], (int, float))]
    except (ValueError, KeyError, TypeError):
        raise UsageError(
            f"{path} is not a metrics.jsonl of scripts/train.py (one JSON object per line, each with an epoch and R@1)"
        ) from None
    if not trained:
        raise UsageError(f"{path} holds no trained epoch (only the evaluation before training)")
    return max(trained, key=lambda e: (e["R@1"], -e["epoch"]))


def dataset_of(run_dirs: Sequence[str]) -> str:
    """The data set of run folders under <LOG_DIR>/logs_<dataset>/, when they all agree."""
    names = {os.path.basename(os.path.dirname(os.path.abspath(d))) for d in run_dirs}
    if len(names) != 1 or not next(iter(names)).startswith("logs_"):
        raise UsageError(
            "cannot tell the data set from the run folders' parents (expected one <LOG_DIR>/"
            "logs_<dataset>/ for all); pass --dataset"
        )
    return canonical_dataset(next(iter(names))[len("logs_") :])


# --- the table -------------------------------------------------------------------------------


def summary(dataset: str, runs: list[dict], failed: Sequence[dict] = ()) -> dict:
    """runs: [{"dir", "seed" (or None), "epoch", "metrics"}]. Mean and sample standard deviation
    (n - 1; none for one run) of each metric every run has, as fractions, beside the published."""
    published = PUBLISHED.get(dataset, {})
    names = [
        name for name in runs[0]["metrics"] if all(isinstance(run["metrics"].get(name), (int, float)) for run in runs)
    ]
    names += [name for name in published if name not in names]
    table = {}
    for name in names:
        values = [run["metrics"][name] for run in runs if name in run["metrics"]]
        mean = sum(values) / len(values) if values else None
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        table[name] = {"mean": mean, "std": std, "published": published[name] / 100 if name in published else None}
    return {"dataset": dataset, "epoch": EPOCH_CHOICE, "runs": runs, "failed": list(failed), "metrics": table}


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}"


def markdown(result: dict) -> str:
    runs = result["runs"]
    lines = [
        f"{result['dataset']}: {len(runs)} run(s), each at its {result['epoch']}, in percent "
        f"(mean +- sample standard deviation)",
        "",
        f"| metric | mean +- std ({len(runs)} runs) | published |",
        "|---|---|---|",
    ]
    for name, row in result["metrics"].items():
        spread = "" if row["std"] is None else f" +- {_percent(row['std'])}"
        lines.append(f"| {name} | {_percent(row['mean'])}{spread} | {_percent(row['published'], 1)} |")
    lines += ["", "runs:"] + [f"- {run['dir']} (seed {run['seed']}, epoch {run['epoch']})" for run in runs]
    lines += [f"- seed {run['seed']}: failed ({run['reason']})" for run in result["failed"]]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, prefix: str | None) -> str:
    """The table as Markdown, also written to PREFIX.json and PREFIX.md with a prefix."""
    table = markdown(result)
    if prefix:
        atomic_write_text(prefix + ".json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(prefix + ".md", table)
    return table


def print_outputs(result: dict, prefix: str | None) -> None:
    print(write_outputs(result, prefix), end="")
    if prefix:
        print(f"wrote {prefix}.json and {prefix}.md")


# --- running the seeds -----------------------------------------------------------------------


def training_config(command: Sequence[str]) -> TrainConfig:
    """The configuration of the published command line after --, parsed as scripts/train.py will;
    bad ones are refused here, before any run starts."""
    from idml.cli import train_parser

    if any(token == "--seed" or token.startswith("--seed=") for token in command):
        raise UsageError("the seeds come from --seeds; leave --seed out of the training command after --")

    def refuse(message):
        raise UsageError(f"the training command after -- is not valid for scripts/train.py: {message}")

    parser = train_parser()
    parser.error = refuse
    return TrainConfig.from_args(parser.parse_args(list(command)))


def visible_gpus() -> list[str]:
    """The GPUs a child process can be given, as CUDA_VISIBLE_DEVICES entries."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given:
        return [entry.strip() for entry in given.split(",")][:count]
    return [str(index) for index in range(count)]


def _relay(stream, seed: int) -> None:
    for line in stream:
        sys.stdout.write(f"[seed {seed}] {line}")
        sys.stdout.flush()


def _start(seed: int, command: Sequence[str], remark: str, gpu: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    argv = [
        sys.executable,
        os.path.join(SCRIPTS, "train.py"),
        *command,
        "--seed",
        str(seed),
        "--remark",
        f"{remark}_seed{seed}",
    ]
    where = f" on GPU {gpu}" if gpu is not None else ""
    print(f"seed {seed}{where}: {' '.join(argv[1:])}", flush=True)
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process.relay = threading.Thread(target=_relay, args=(process.stdout, seed), daemon=True)
    process.relay.start()
    return process


def run_seeds(seeds: Sequence[int], command: Sequence[str], remark: str, slots: Sequence[str | None]) -> dict[int, int]:
    """Trains every seed, at most len(slots) at a time, each slot a GPU (or None: the environment as it
    is); returns each seed's exit code."""
    pending, running, codes = list(seeds), {}, {}
    free = list(slots)
    while pending or running:
        while pending and free:
            seed = pending.pop(0)
            running[seed] = (_start(seed, command, remark, free[0]), free.pop(0))
        seed, (process, slot) = _wait_any(running)
        process.relay.join()
        codes[seed] = process.returncode
        if process.returncode:
            print(f"seed {seed}: scripts/train.py exited with code {process.returncode}", flush=True)
        free.append(slot)
        del running[seed]
    return codes


def _wait_any(running: dict):
    """The first finished of the running processes (polled: a child's exit cannot be waited on
    together with the others' without a thread each)."""
    while True:
        for seed, (process, slot) in running.items():
            if process.poll() is not None:
                return seed, (process, slot)
        time.sleep(0.2)


def run_folder(log_root: str, remark: str, before: set) -> str | None:
    """The folder a run with `remark` created under log_root (not in `before`): <name><remark>, or
    <name><remark>_<n> when that name was taken."""
    if not os.path.isdir(log_root):
        return None
    found = []
    for name in sorted(set(os.listdir(log_root)) - before):
        stem, _, number = name.rpartition("_")
        if name.endswith(remark) or (number.isdigit() and stem.endswith(remark)):
            found.append(os.path.join(log_root, name))
    return found[-1] if found else None


# --- the command -----------------------------------------------------------------------------


def reproduce_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/reproduce.py",
        description="Train a published command line with several seeds (the arguments after --, passed to "
        "scripts/train.py) and print the mean +- standard deviation of every metric beside the "
        "published numbers; or make that table from finished run folders (--from-runs).",
        epilog="example: scripts/reproduce.py --seeds 1 2 3 --out cub_seeds -- --gpu -1 --loss Proxy_Anchor "
        "--model resnet50 --embedding-size 512 --batch-size 120 --lr 6e-4 --dataset cub --warm 5 "
        "--bn-freeze 1 --lr-decay-step 5",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds to train (default 1 2 3)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--parallel",
        action="store_true",
        help="run the seeds at the same time, one per visible GPU (all at once without GPUs); "
        "the default whenever several GPUs are visible",
    )
    order.add_argument(
        "--sequential",
        action="store_true",
        help="one run after the other, each with every visible GPU (e.g. for --gpu -1 DDP runs)",
    )
    parser.add_argument(
        "--from-runs",
        nargs="+",
        metavar="DIR",
        default=None,
        help="no training: the table of these finished run folders (their metrics.jsonl)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="with --from-runs: whose published numbers to show (default: from the folders' logs_<dataset> parent)",
    )
    parser.add_argument("--out", metavar="PREFIX", default=None, help="also write PREFIX.json and PREFIX.md")
    return parser


def from_runs(run_dirs: Sequence[str], dataset: str | None) -> dict:
    dataset = canonical_dataset(dataset) if dataset else dataset_of(run_dirs)
    runs = [
        {
            "dir": d,
            "seed": None,
            "epoch": entry["epoch"],
            "metrics": {k: v for k, v in entry.items() if k not in ("epoch", "loss")},
        }
        for d, entry in ((d, best_epoch(d)) for d in run_dirs)
    ]
    return summary(dataset, runs)


def reproduce_main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, command = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = reproduce_parser().parse_args(own)
    if args.from_runs:
        if command:
            raise UsageError("--from-runs makes the table of finished runs; it takes no training command after --")
        return print_outputs(from_runs(args.from_runs, args.dataset), args.out)
    if not command:
        raise UsageError("expected the training command after -- (or --from-runs DIR...)")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise UsageError(f"--seeds expects distinct numbers >= 0, got {' '.join(map(str, args.seeds))}")
    training = training_config(command)
    dataset = training.data.dataset
    if args.dataset and canonical_dataset(args.dataset) != dataset:
        raise UsageError(f"--dataset {args.dataset} differs from the training command's {dataset}")
    gpus = [] if args.sequential else visible_gpus()
    parallel = args.parallel or len(gpus) > 1
    slots = (gpus or [None] * len(args.seeds)) if parallel else [None]
    log_root = os.path.join(training.run.LOG_DIR, f"logs_{dataset}")
    before = set(os.listdir(log_root)) if os.path.isdir(log_root) else set()
    codes = run_seeds(args.seeds, command, training.run.remark, slots)
    runs, failed = [], []
    for seed in args.seeds:
        folder = run_folder(log_root, f"{training.run.remark}_seed{seed}", before) if codes[seed] == 0 else None
        if folder is None:
            reason = f"exit code {codes[seed]}" if codes[seed] else f"no run folder under {log_root}"
            failed.append({"seed": seed, "exit_code": codes[seed], "reason": reason})
            continue
        entry = best_epoch(folder)
        runs.append(
            {
                "dir": folder,
                "seed": seed,
                "epoch": entry["epoch"],
                "metrics": {k: v for k, v in entry.items() if k not in ("epoch", "loss")},
            }
        )
    if runs:
        print_outputs(summary(dataset, runs, failed), args.out)
    if failed:
        print(
            f"{len(failed)} of {len(args.seeds)} seed runs failed: "
            + ", ".join(f"seed {f['seed']} ({f['reason']})" for f in failed),
            file=sys.stderr,
        )
        raise SystemExit(1)
