"""Evaluation on the unseen test classes (IDML_METHOD.md section 5): embed every test image
with the semantic head and compute the retrieval and clustering metrics on the device."""
import contextlib
import sys
from typing import Dict, Tuple

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from idml.errors import UsageError
from idml.metrics import compute_metrics

RECALL_KS = {"SOP": (1, 10, 100)}  # every other dataset: 1, 2, 4, 8


def recall_ks(dataset: str) -> Tuple[int, ...]:
    return RECALL_KS.get(dataset, (1, 2, 4, 8))


def autocast(device: torch.device, amp: str):
    """Mixed precision of the forward pass: 'off', 'bf16' or 'fp16'."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def embed(model, loader: DataLoader, device: torch.device, amp: str = "off", progress: bool = True):
    """(embeddings float32, labels) of every image of `loader`, on `device`."""
    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    for images, targets in tqdm(loader, desc="embedding", leave=False, disable=not progress):
        with autocast(device, amp):
            mu, _ = model(images.to(device, non_blocking=True))
        embeddings.append(mu.float())
        labels.append(targets.to(device, non_blocking=True))
    model.train(was_training)
    return torch.cat(embeddings), torch.cat(labels)


def evaluate(model, loader: DataLoader, device: torch.device, dataset: str, amp: str = "off",
             clustering: bool = True, progress: bool = True) -> Dict[str, float]:
    embeddings, labels = embed(model, loader, device, amp, progress)
    return compute_metrics(embeddings, labels, ks=recall_ks(dataset), clustering=clustering)


def format_metrics(metrics: Dict[str, float]) -> str:
    return "  ".join(f"{name} {value * 100:.2f}" for name, value in metrics.items())


def evaluate_checkpoint(args) -> Dict[str, float]:
    """scripts/evaluate.py: the test-split metrics of a checkpoint written by training."""
    from argparse import Namespace

    from idml.checkpoint import load_checkpoint
    from idml.data import build_dataset, default_image_size
    from idml.runtime import build_model, eval_loader, resolve_device

    checkpoint = load_checkpoint(args.resume)
    saved = Namespace(**checkpoint["args"])
    dataset = args.dataset or saved.dataset
    image_size = args.image_size or saved.image_size or default_image_size(dataset)
    device = resolve_device(args.device, args.gpu)
    model = build_model(saved, pretrained="none")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise UsageError(f"{args.resume}: the weights do not fit a {saved.model} with embedding size "
                         f"{saved.embedding_size} ({str(error).splitlines()[0]})") from None
    model.to(device)
    test_set = build_dataset(dataset, args.data_root or saved.data_root, train=False, image_size=image_size)
    loader = eval_loader(test_set, args.batch_size, args.workers, device)
    embeddings, labels = embed(model, loader, device, args.amp, progress=not args.json)
    if getattr(args, "plots", None):  # --plots DIR: recall_at_k.png and query_grid.png
        from idml.plots import evaluation_plots

        for path in evaluation_plots(args.plots, test_set, embeddings, labels, f"{dataset}: {args.resume}"):
            print(f"wrote {path}", file=sys.stderr)
    return compute_metrics(embeddings, labels, ks=recall_ks(dataset))
