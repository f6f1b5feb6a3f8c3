"""Evaluation on the unseen test classes (docs/method.md, section 5): embed every test image
with the semantic head and compute the retrieval and clustering metrics on the device."""

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from idml.config import EvaluateConfig
from idml.data.datasets import BadImageBudget
from idml.metrics import compute_metrics
from idml.precision import autocast, configure_cudnn, place_model, resolve_amp

DEFAULT_MAX_BAD_IMAGES = 10
RECALL_KS = {"SOP": (1, 10, 100)}  # every other dataset: 1, 2, 4, 8
# k-means runs for NMI and F1 (--kmeans-runs) where not 10: at SOP's 11,316 clusters one run
# takes seconds even on a GPU, and the runs scatter least (the more clusters, the less).
KMEANS_RUNS = {"SOP": 1}


def recall_ks(dataset: str) -> tuple[int, ...]:
    return RECALL_KS.get(dataset, (1, 2, 4, 8))


def kmeans_runs(dataset: str, given: int | None = None) -> int:
    """--kmeans-runs as given, else the dataset's default."""
    return given if given is not None else KMEANS_RUNS.get(dataset, 10)


@torch.no_grad()
def embed(
    model,
    loader: DataLoader,
    device: torch.device,
    amp: str = "off",
    progress: bool = True,
    bad_images: BadImageBudget = None,
):
    """(embeddings, labels, uncertainties |sigma|^2) of every readable image of `loader`,
    float32 on `device`; `amp` is a resolved --amp (idml.precision)."""
    bad_images = bad_images or BadImageBudget(DEFAULT_MAX_BAD_IMAGES)
    was_training = model.training
    model.eval()
    embeddings, labels, uncertainties = [], [], []
    for images, targets, dropped in tqdm(loader, desc="embedding", leave=False, delay=1, disable=not progress):
        bad_images.add(dropped)
        if images is None:
            continue
        with autocast(device, amp):
            mu, sigma = model(images.to(device, non_blocking=True))
        embeddings.append(mu.float())
        uncertainties.append(sigma.float().pow(2).sum(dim=1))
        labels.append(targets.to(device, non_blocking=True))
    model.train(was_training)
    if not embeddings:  # every image unreadable (or, under torchrun, every one of this share)
        return (
            torch.empty(0, model.embedding_size, device=device),
            torch.empty(0, dtype=torch.long, device=device),
            torch.empty(0, device=device),
        )
    return torch.cat(embeddings), torch.cat(labels), torch.cat(uncertainties)


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value * 100:.2f}" for name, value in metrics.items())


def evaluate_checkpoint(config: EvaluateConfig) -> tuple[dict[str, float], list[str]]:
    """scripts/evaluate.py: the test-split metrics of a checkpoint written by training, and
    the plot files written (--plots DIR: recall_at_k.png and query_grid.png)."""
    from idml.checkpoint import model_from_checkpoint
    from idml.data import build_dataset, default_image_size
    from idml.runtime import eval_loader, resolve_device

    model, trained = model_from_checkpoint(config.resume)
    saved = trained.data
    dataset = config.dataset or saved.dataset
    image_size = config.image_size or saved.image_size or default_image_size(dataset)
    device = resolve_device(config.device, config.gpu)
    amp = resolve_amp(config.amp, device)
    configure_cudnn(device, amp)
    model = place_model(model, device, amp)
    test_set = build_dataset(dataset, config.data_root or saved.data_root, train=False, image_size=image_size)
    # The training's evaluation batch by default: a convolution's rounding can depend on the
    # batch, so that is what reproduces metrics.jsonl to the last digit.
    batch_size = config.batch_size or saved.batch_size
    loader = eval_loader(test_set, batch_size, config.workers, device, config.loader, image_size)
    embeddings, labels, _ = embed(model, loader, device, amp, progress=config.progress)
    # Metrics first: a test set they are undefined on is refused before any plot of it is written.
    metrics = compute_metrics(
        embeddings,
        labels,
        ks=recall_ks(dataset),
        progress=config.progress,
        kmeans_runs=kmeans_runs(dataset, config.kmeans_runs),
    )
    if config.published_protocol:
        from idml.published_protocol import beside

        metrics = beside(metrics, embeddings, labels, recall_ks(dataset))
    plots = []
    if config.plots:
        from idml.plots import evaluation_plots

        plots = evaluation_plots(config.plots, test_set, embeddings, labels, f"{dataset}: {config.resume}")
    return metrics, plots
