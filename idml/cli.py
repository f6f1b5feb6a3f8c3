"""Command lines of scripts/train.py, evaluate.py, export.py, search.py and synthetic.py:
their flags and what they print (the library modules return what they compute).

Every flag of the published commands is accepted verbatim (`--gpu -1` included). Bad
arguments or data end with one sentence on stderr and exit code 2, never a traceback; a
diverged training run ends with one sentence and exit code 3.

This module and its imports stay free of torch until a command runs, so that --help answers
at once (the choices come from idml.choices, which the library uses too).
"""

import argparse
import json
import math
import os
import signal
import sys

from idml.choices import AMP_CHOICES, ARCHITECTURES, DATASETS, LOSSES, SYNTHETIC_LAYOUTS, UNCERTAINTY_MODES
from idml.config import EvaluateConfig, TrainConfig
from idml.errors import Interrupted, TrainingDiverged, UsageError

DIVERGED = 3  # exit code of a run whose loss or weights stopped being finite

DATASET_NAMES = {name.lower(): name for name in DATASETS}  # --dataset is read case-insensitively


def _dataset(value: str) -> str:
    try:
        return DATASET_NAMES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DATASETS)}, got {value!r}") from None


def _checked(kind, accept, expected: str):
    """An argparse type: `kind(value)`, finite and accepted by `accept`."""

    def parse(value):
        number = kind(value)
        if not math.isfinite(number) or not accept(number):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return number

    return parse


def _positive(kind):
    return _checked(kind, lambda number: number > 0, "a positive number")


def _non_negative(kind):
    return _checked(kind, lambda number: number >= 0, "a number >= 0")


_finite = _checked(float, lambda number: True, "a finite number")
_percentile = _checked(float, lambda number: 0 < number < 100, "a number between 0 and 100")


def _folder_name(value: str) -> str:
    if os.sep in value or (os.altsep and os.altsep in value):
        raise argparse.ArgumentTypeError(f"expected a name without '{os.sep}', got {value!r}")
    return value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        type=_dataset,
        default="digits",
        metavar="{" + ",".join(DATASETS) + "}",
        help="data set (default: digits, embedded; cub, cars, SOP and custom read --data-root)",
    )
    parser.add_argument(
        "--data-root",
        default="./data",
        help="folder holding CUB_200_2011/, cars196/ or Stanford_Online_Products/ (default ./data)",
    )
    parser.add_argument("--model", default="resnet50", choices=ARCHITECTURES, help="backbone (default resnet50)")
    parser.add_argument("--embedding-size", type=_positive(int), default=512, help="embedding width D (default 512)")
    parser.add_argument("--l2-norm", type=int, choices=(0, 1), default=1, help="L2-normalise mu and sigma (default 1)")
    parser.add_argument(
        "--uncertainty",
        choices=UNCERTAINTY_MODES,
        default="normalized",
        help="sigma: 'normalized' as published (|sigma|=1, the head gets no gradient), "
        "'relu' or 'softplus' (learned uncertainty)",
    )
    parser.add_argument(
        "--image-size", type=_positive(int), default=None, help="input size in pixels (default 224; digits 32)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive(int),
        default=150,
        help="global batch size (default 150; the published commands pass 120)",
    )
    parser.add_argument("--workers", type=_non_negative(int), default=4, help="data loading processes (default 4)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU when there is one (default)"
    )
    parser.add_argument(
        "--gpu",
        "--gpu-id",
        dest="gpu",
        type=int,
        default=0,
        help="GPU index; -1 = all visible GPUs, as in the published commands (default 0)",
    )
    parser.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision of the forward pass; auto (default): bf16 autocast and channels_last "
        "on a GPU with bf16 support, float32 elsewhere; off: float32 as published",
    )
    parser.add_argument("--seed", type=_non_negative(int), default=1, help="random seed (default 1)")


def _add_kmeans_runs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kmeans-runs",
        type=_positive(int),
        default=None,
        metavar="N",
        help="k-means runs for NMI and F1, the lowest-inertia one kept (default 10, as "
        "scikit-learn's KMeans did until version 1.4; SOP 1: seconds per run)",
    )


def _add_loader_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loader",
        choices=("pil", "dali"),
        default="pil",
        help="image decoding: pil (DataLoader processes, default) or dali (NVIDIA DALI, GPU "
        "decoding when on CUDA; pip install nvidia-dali-cuda130); --workers sets its threads",
    )


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/train.py",
        description="Train Introspective Deep Metric Learning (ProxyAnchor + IDML) and evaluate on unseen classes.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--LOG_DIR", default="./logs", help="folder for run folders (default ./logs)")
    parser.add_argument("--remark", type=_folder_name, default="", help="suffix of the run folder's name")
    parser.add_argument(
        "--loss",
        default="Proxy_Anchor",
        choices=LOSSES,
        help="Proxy_Anchor (IDML, default) or a published baseline via pytorch-metric-learning",
    )
    parser.add_argument("--epochs", type=_positive(int), default=60, help="epochs (default 60)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd", "adam", "rmsprop"), default="adamw")
    parser.add_argument("--lr", type=_positive(float), default=1e-4, help="learning rate (proxies: 100x)")
    parser.add_argument("--weight-decay", type=_non_negative(float), default=1e-4)
    parser.add_argument("--lr-decay-step", type=_positive(int), default=10, help="StepLR step in epochs")
    parser.add_argument("--lr-decay-gamma", type=_positive(float), default=0.5, help="StepLR factor")
    parser.add_argument("--alpha", type=_positive(float), default=32.0, help="Proxy Anchor scale alpha")
    parser.add_argument("--mrg", type=_finite, default=0.1, help="Proxy Anchor margin delta")
    parser.add_argument(
        "--ism", type=int, choices=(0, 1), default=1, help="1: introspective similarity (IDML); 0: plain Proxy Anchor"
    )
    parser.add_argument("--ism-offset", type=_finite, default=4.0, help="a in exp(-(u + a) / (b d)) (default 4)")
    parser.add_argument(
        "--ism-scale", type=_positive(float), default=5.0, help="b in exp(-(u + a) / (b d)) (default 5)"
    )
    parser.add_argument(
        "--IPC", type=_non_negative(int), default=0, help="images per class in balanced batches (0: shuffled)"
    )
    parser.add_argument(
        "--warm", type=_non_negative(int), default=1, help="warm-up epochs: only the semantic head and proxies train"
    )
    parser.add_argument("--bn-freeze", type=int, choices=(0, 1), default=1, help="freeze the backbone's BatchNorm")
    parser.add_argument(
        "--pretrained",
        default="imagenet",
        help="backbone weights: imagenet (default), none, or a torchvision state-dict file",
    )
    _add_loader_argument(parser)
    parser.add_argument(
        "--resume",
        default=None,
        help="continue from this checkpoint_last.pt; --lr, --weight-decay, --lr-decay-step, "
        "--lr-decay-gamma and --optimizer apply from there on when they differ",
    )
    parser.add_argument(
        "--wandb",
        choices=("auto", "online", "offline", "disabled"),
        default="auto",
        help="auto: online with credentials and a reachable server, else offline (default); "
        "WANDB_MODE, when stricter, wins",
    )
    parser.add_argument("--max-steps", type=_positive(int), default=None, help="cap steps per epoch (smoke runs)")
    parser.add_argument(
        "--max-bad-images",
        type=_non_negative(int),
        default=10,
        help="unreadable images to skip (with a warning) before stopping (default 10)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_positive(int),
        default=None,
        help="also write checkpoint_last.pt every N steps (default: at the end of every epoch)",
    )
    parser.add_argument(
        "--max-loss-jump",
        type=_positive(float),
        default=None,
        metavar="F",
        help="skip the update of a step whose loss exceeds F times the running mean of recent "
        "finite losses (default: off); steps with a non-finite loss or gradient are always "
        "skipped, and 10 in a row stop the run",
    )
    parser.add_argument(
        "--compile",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: torch.compile the model and the loss (slow first steps, faster after)",
    )
    parser.add_argument(
        "--eval-clustering",
        type=int,
        choices=(0, 1),
        default=1,
        help="compute NMI and F1 (k-means) at every evaluation (default 1)",
    )
    _add_kmeans_runs_argument(parser)
    return parser


def evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/evaluate.py", description="Evaluate a trained checkpoint on the unseen test classes."
    )
    parser.add_argument("--dataset", type=_dataset, default=None, help="default: the checkpoint's")
    parser.add_argument("--data-root", default=None, help="default: the checkpoint's")
    parser.add_argument("--resume", required=True, help="checkpoint (checkpoint_last.pt or *_best.pth)")
    parser.add_argument("--image-size", type=_positive(int), default=None, help="default: the checkpoint's")
    parser.add_argument("--batch-size", type=_positive(int), default=None, help="default: the checkpoint's")
    parser.add_argument("--workers", type=_non_negative(int), default=4)
    _add_loader_argument(parser)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--gpu", "--gpu-id", dest="gpu", type=int, default=0)
    parser.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="as in training (default auto)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument(
        "--plots",
        metavar="DIR",
        default=None,
        help="also write recall_at_k.png and query_grid.png (queries and their neighbours) to DIR",
    )
    parser.add_argument(
        "--published-protocol",
        action="store_true",
        help="also R@K, RP and MAP@R as the published code computes them: neighbour lists as long "
        "as the largest class, so its R@K for larger K is R@(that length)",
    )
    _add_kmeans_runs_argument(parser)
    return parser


PEER_STOPPED = ("Connection closed by peer", "Connection reset by peer")  # gloo, when a process exits


def run_guarded(main, argv=None) -> int:
    """Run main(argv); a UsageError becomes one line on stderr and exit code 2, a diverged
    run one line and exit code 3. Under torchrun each process says its own error (naming
    itself unless it is rank 0), and a process whose collective failed because another one
    stopped says only that."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    prefix = "error" if rank == "0" else f"error (process {rank} of {world})"
    try:
        main(argv)
    except UsageError as error:
        _say(f"{prefix}: {error}")
        return 2
    except TrainingDiverged as error:
        if rank == "0":  # every rank stops at the same step, on the same loss
            _say(f"error: {error}")
        return DIVERGED
    except Interrupted as stop:
        if rank == "0":  # every rank stops at the same step
            _say(str(stop))
        return 128 + stop.signal_number
    except KeyboardInterrupt:  # Ctrl-C outside training's steps (loading, evaluating, indexing)
        _say("interrupted")
        return 128 + signal.SIGINT
    except RuntimeError as error:
        if world == "1" or not any(sign in str(error) for sign in PEER_STOPPED):
            raise
        _say(f"{prefix}: another process stopped, so this one stops too (that process says why)")
        return 1
    return 0


def _say(line: str) -> None:
    """One write per line: the processes of a torchrun share one terminal."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def train_config(argv=None) -> TrainConfig:
    """The configuration of scripts/train.py's command line `argv` (default: sys.argv's)."""
    return TrainConfig.from_args(train_parser().parse_args(argv))


def train_main(argv=None) -> None:
    config = train_config(argv)  # before torch is imported: --help and bad flags answer at once
    from idml.distributed import relaunch_command
    from idml.train import train

    # --gpu -1 with several GPUs: start the DDP run itself, one process per GPU, as
    # `torchrun --standalone --nproc_per_node=<GPUs> scripts/train.py ...` would.
    argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    command = relaunch_command(argv, config.run.gpu, config.run.device)
    if command is not None:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import main as torchrun

        print(f"--gpu -1: starting one process per GPU: torchrun {' '.join(command)}")
        try:
            torchrun(command)
        except ChildFailedError as failure:  # the processes have said what went wrong: their exit code
            raise SystemExit(failure.get_first_failure()[1].exitcode) from None
        return
    train(config)


def evaluate_main(argv=None) -> None:
    args = evaluate_parser().parse_args(argv)
    from idml.evaluate import evaluate_checkpoint

    metrics, plots = evaluate_checkpoint(EvaluateConfig.from_args(args))
    for path in plots:
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(metrics))
        return
    sections = [(None, metrics)]
    if args.published_protocol:
        from idml.published_protocol import heading

        sections = [
            ("project's metrics", metrics["project"]),
            (heading(metrics["published_list_length"]), metrics["published_protocol"]),
        ]
    for title, values in sections:
        if title:
            print(f"{title}:")
        for name, value in values.items():
            print(f"{name:6s} {value * 100:6.2f}")


def synthetic_main(argv=None) -> None:
    """scripts/synthetic.py: a small data set in a real on-disk layout."""
    parser = argparse.ArgumentParser(
        prog="scripts/synthetic.py",
        description="Writes a small dataset in one of the real on-disk layouts, for tests and smoke runs.",
    )
    parser.add_argument("--layout", choices=SYNTHETIC_LAYOUTS, required=True)
    parser.add_argument("--out", required=True, help="the data root to write into: a new or empty folder")
    parser.add_argument(
        "--classes",
        type=_checked(int, lambda number: number >= 4, "at least 4"),
        default=8,
        help="number of classes, half train, half test (each half needs two)",
    )
    parser.add_argument("--per-class", type=_positive(int), default=6, help="images per class")
    parser.add_argument("--seed", type=_non_negative(int), default=0)
    parser.add_argument(
        "--force",
        action="store_true",
        help="rewrite a synthetic data set this command wrote in --out before (never other files)",
    )
    args = parser.parse_args(argv)
    from idml.data import synthetic

    synthetic.write_dataset(args.layout, args.out, args.classes, args.per_class, args.seed, force=args.force)
    print(
        f"wrote a synthetic {args.layout} dataset ({args.classes} classes x {args.per_class} images) under {args.out}"
    )


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/export.py",
        description="Export a trained checkpoint as a TorchScript module: uint8 images (N, 3, H, W) -> "
        "(L2-normalised embedding N x D, uncertainty |sigma|^2 N), preprocessing inside.",
    )
    parser.add_argument("--resume", required=True, help="checkpoint written by scripts/train.py")
    parser.add_argument("--out", required=True, help="where to write the TorchScript module (e.g. model.pt)")
    return parser


def export_main(argv=None) -> None:
    args = export_parser().parse_args(argv)
    from idml.export import export_checkpoint

    summary = export_checkpoint(args.resume, args.out)
    print(
        f"wrote {summary['out']}: uint8 (N, 3, H, W) -> embedding N x {summary['embedding_size']} "
        f"+ uncertainty N (input {summary['input_size']} px, uncertainty {summary['uncertainty']})"
    )
    print(
        f"TorchScript vs eager on a random batch: max |diff| embedding {summary['max_embedding_diff']:.2e}, "
        f"uncertainty {summary['max_uncertainty_diff']:.2e}"
    )


def search_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/search.py",
        description="Find the images of a folder nearest to a query image, with an exported model "
        "(scripts/export.py). The folder's index is cached in DIR/.idml_index.pt.",
    )
    parser.add_argument("--model", required=True, help="TorchScript file written by scripts/export.py")
    parser.add_argument("--gallery", required=True, metavar="DIR", help="folder of images to search (recursive)")
    parser.add_argument("--query", required=True, nargs="+", metavar="IMG", help="query image file(s)")
    parser.add_argument("-k", type=_positive(int), default=10, help="how many neighbours to print (default 10)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU when there is one (default)"
    )
    parser.add_argument("--batch-size", type=_positive(int), default=32, help="images per forward pass (default 32)")
    parser.add_argument(
        "--percentile",
        type=_percentile,
        default=95.0,
        help="flag queries whose |sigma|^2 is above this percentile of the gallery's (default 95)",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the index even if it is up to date")
    parser.add_argument("--json", action="store_true", help="print one JSON object per query instead of text")
    return parser


def search_main(argv=None) -> None:
    args = search_parser().parse_args(argv)
    from idml.runtime import resolve_device
    from idml.search import search

    device = resolve_device(args.device, gpu=0)
    info, results = search(
        args.model,
        args.gallery,
        args.query,
        args.k,
        device,
        args.batch_size,
        args.percentile,
        args.rebuild,
        progress=not args.json,
    )
    print(info, file=sys.stderr if args.json else sys.stdout)
    for result in results:
        if args.json:
            neighbours = [{"similarity": s, "path": path} for s, path in result["neighbours"]]
            print(
                json.dumps(
                    {
                        "query": result["query"],
                        "uncertainty": result["uncertainty"],
                        "high_uncertainty": result["high_uncertainty"],
                        "uncertainty_mode": result["uncertainty_mode"],
                        "neighbours": neighbours,
                    }
                )
            )
            continue
        print(f"\nquery {result['query']}")
        print(f"  {result['report']}")
        for rank, (similarity, path) in enumerate(result["neighbours"], start=1):
            print(f"  {rank:3d}  {similarity:+.4f}  {path}")


def _console_script(main):
    """An entry point of pyproject.toml's [project.scripts]: `main` as the scripts run it."""

    def command() -> None:
        sys.exit(run_guarded(main))

    return command


train_command = _console_script(train_main)
evaluate_command = _console_script(evaluate_main)
export_command = _console_script(export_main)
search_command = _console_script(search_main)
