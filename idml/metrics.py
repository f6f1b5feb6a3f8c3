"""Evaluation metrics of one epoch (docs/method.md, section 5), on the embeddings' device."""

import warnings

import torch
from tqdm import tqdm

from idml import cluster, ops
from idml.errors import UsageError
from idml.reference import l2_normalize


def non_finite_rows(embeddings: torch.Tensor) -> int:
    """How many embeddings hold a NaN or an infinity (one host synchronisation)."""
    return int((~torch.isfinite(embeddings)).any(dim=1).sum())


def compute_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks=(1, 2, 4, 8),
    max_r: int = 1023,
    clustering: bool = True,
    seed: int = 0,
    precision: str = "fp32",
    progress: bool = False,
    kmeans_runs: int = 10,
) -> "dict[str, float]":
    """R@k for k in ks, RP, MAP@R and (if clustering) NMI and F1, as python floats.

    The embeddings are L2-normalised (x / sqrt(|x|^2 + 1e-12)) and compared by cosine,
    each one a query against all the others (ties to the lower index); the clustering is
    k-means (k = number of distinct labels, k-means++ seeded by `seed`) on the normalised
    embeddings, the lowest-inertia of `kmeans_runs` runs (10: scikit-learn's KMeans default
    until version 1.4, which the published code called with its defaults; one run's NMI
    scatters and is lower on average). CUB/Cars use ks = (1, 2, 4, 8), SOP (1, 10, 100).
    `progress`: a progress bar for each stage that lasts over a second (at SOP size on a CPU
    they take seconds to minutes; at the digits' size none shows, and a log stays readable).
    """
    if embeddings.shape[0] < 2:
        raise UsageError(
            f"retrieval metrics need at least 2 embeddings, got {embeddings.shape[0]} "
            f"(were the images readable? see the warnings above)"
        )
    if embeddings.dim() != 2 or embeddings.shape[1] == 0:
        raise UsageError(f"retrieval metrics need N x D embeddings with D >= 1, got shape {tuple(embeddings.shape)}")
    check_classes(labels)
    bad = non_finite_rows(embeddings)
    if bad:  # NaN similarities compare false with everything: every query would look perfectly ranked
        raise UsageError(
            f"{bad} of {embeddings.shape[0]} embeddings hold NaN or infinite values, so no "
            f"retrieval metric of them means anything (a diverged model, or float16 overflow)"
        )
    x = l2_normalize(embeddings.float())
    labels = labels.to(x.device)
    # One op, so no steps to show: the bar says what runs once a second has passed.
    with tqdm(total=1, desc="retrieval metrics", leave=False, delay=1, disable=not progress) as bar:
        result = ops.retrieval_metrics(x, labels, ks=ks, max_r=max_r, precision=precision)
        bar.update()
    if clustering:
        clusters = cluster.kmeans(x, int(torch.unique(labels).numel()), seed=seed, runs=kmeans_runs, progress=progress)
        result["NMI"] = cluster.nmi(labels, clusters)
        result["F1"] = cluster.pairwise_f1(labels, clusters)
    return result


def check_classes(labels: torch.Tensor) -> None:
    """UsageError when no metric is defined for these test labels (one class; no query with
    another item of its class); a warning counting the queries that cannot have a match."""
    classes, counts = torch.unique(labels, return_counts=True)
    if classes.numel() < 2:  # every neighbour a hit, one cluster: R@K, RP, MAP@R, NMI and F1 all read 1
        raise UsageError(
            f"the test set holds {classes.numel()} class, so retrieval and clustering metrics are "
            f"undefined: evaluation needs at least 2 classes"
        )
    lone = int(counts[counts == 1].numel())
    if lone == labels.numel():
        raise UsageError(
            f"every one of the {lone} test images is the only one of its class, so no query can have "
            f"a match and every metric is undefined: evaluation needs classes of 2 or more images"
        )
    if lone:  # the published protocol: misses in R@K, left out of RP and MAP@R
        warnings.warn(
            f"{lone} of {labels.numel()} test images are the only one of their class: as queries they "
            f"count as misses in R@K and are left out of RP and MAP@R",
            stacklevel=3,
        )
