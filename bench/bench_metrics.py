"""Retrieval metrics and k-means benchmarks (docs/performance.md, section 2: targets).

    pytest bench/bench_metrics.py --benchmark-only [--bench-scale full]

The op (idml.ops.retrieval_metrics) against, measured in the same run: scikit-learn brute
force NearestNeighbors (the published path; k = max K + 1, which also covers the classes'
R here) and blockwise torch matmul + topk. Full scale: CUB (5,924 x 512) and SOP
(60,502 x 512, ks 1/10/100); on CPU the op must take <= 0.6x scikit-learn's time at SOP
size, on CUDA <= 60 ms fp32 / 15 ms tf32 at SOP size and <= 2 ms at CUB size. k-means:
20 Lloyd iterations at SOP size with 11,316 clusters (<= 0.5 s on CUDA).
"""

import numpy as np
import pytest
import timing
import torch
from timing import (
    alternated_best,
    benchmarked_time,
    best_time,
    check_floor,
    check_target,
    full_size_on_cpu,
    record_ratio,
)

from idml import cluster, ops, reference

SIZES = {  # name: (full n, small n, number of classes at full scale, ks)
    "cub": (5924, 1500, 100, (1, 2, 4, 8)),
    "sop": (60502, 4000, 11316, (1, 10, 100)),
}
# Speed-up floors on the CPU at small scale, asserted by the test command too (check_floor).
METRICS_FLOOR = 2.0  # x the plain-PyTorch reference (the fall-back) at SOP-like size
SEEDING_FLOOR = 1.5  # x scikit-learn's kmeans_plusplus


def embeddings(n, num_classes, device, dim=512, seed=0, noise=2.5):
    """Normalised clustered embeddings with roughly the published R@1 (about 0.6-0.8 at the
    default noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=g)
    x = torch.randn(num_classes, dim, generator=g)[labels] + noise * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1).to(device), labels.to(device)


def size_of(name, bench_scale):
    full_n, small_n, num_classes, ks = SIZES[name]
    n = full_n if bench_scale == "full" else small_n
    return n, max(2, num_classes * n // full_n), ks


@pytest.fixture
def compiled_op(device):
    for op in ("retrieval_ranks", "kmeans_plus_plus_draws"):
        assert ops.has_kernel(op, device), (
            f"idml._C has no {op} kernel for {device}: build the extension ({ops.EXTENSION_ERROR})"
        )


def torch_topk(x, labels, k, block=2048):
    """Baseline: blockwise matmul + topk of the k nearest other rows (R@K only)."""
    hits = torch.zeros((), device=x.device)
    for start in range(0, x.shape[0], block):
        sim = x[start : start + block] @ x.t()
        rows = torch.arange(sim.shape[0], device=x.device)
        sim[rows, rows + start] = float("-inf")
        nearest = sim.topk(k, dim=1).indices
        hits += (labels[nearest] == labels[start : start + block, None]).any(dim=1).sum()
    return hits.item()


def sklearn_brute(x, k):
    neighbors = pytest.importorskip("sklearn.neighbors")
    data = x.cpu().numpy()
    return neighbors.NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="cosine").fit(data).kneighbors(data)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("name", ["cub", "sop"])
def test_retrieval_metrics(benchmark, compiled_op, device, bench_scale, name, precision):
    if device.type == "cpu" and precision != "fp32":
        pytest.skip("tf32 is exact fp32 on CPU")
    n, num_classes, ks = size_of(name, bench_scale)
    x, labels = embeddings(n, num_classes, device)
    repeat, warmup = (1, 0) if full_size_on_cpu(device, bench_scale) else (5, 1)

    def run():  # keeps the metrics for the report (one full-size CPU run takes seconds)
        benchmark.extra_info.update(ops.retrieval_metrics(x, labels, ks=ks, precision=precision))

    op_s = benchmarked_time(benchmark, run, device, repeat, warmup)
    topk_s = best_time(lambda: torch_topk(x, labels, max(ks)), device, repeat, warmup)
    record_ratio(benchmark, "torch_matmul_topk", topk_s, op_s)
    if device.type == "cpu":
        sklearn_s = best_time(lambda: sklearn_brute(x, max(ks)), device, repeat, warmup)
        record_ratio(benchmark, "sklearn_brute", sklearn_s, op_s)
        if bench_scale == "full" and name == "sop":
            check_target(op_s <= 0.6 * sklearn_s, f"op {op_s:.1f} s vs scikit-learn {sklearn_s:.1f} s")
        if bench_scale == "small" and name == "sop":
            # Against the reference, not scikit-learn: under load the op's OpenMP regions and
            # the reference's slow down alike, scikit-learn's BLAS less (down to 0.9x of it).
            def fall_back():
                return ops.metrics_from_ranks(
                    *reference.retrieval_ranks(x, labels, 1023, "fp32", None, None, max(ks)), ks
                )

            op_s, reference_s = alternated_best([run, fall_back], device)
            check_floor(
                reference_s / op_s, METRICS_FLOOR, "the retrieval metrics op against its plain-PyTorch reference"
            )
    elif bench_scale == "full":
        target = {("sop", "fp32"): 0.060, ("sop", "tf32"): 0.015}.get((name, precision), 0.002)
        check_target(op_s <= target, f"{name} {precision}: {op_s * 1e3:.1f} ms > {target * 1e3:.0f} ms")


def kmeans_rounds(device, bench_scale) -> dict:
    if full_size_on_cpu(device, bench_scale):
        return dict(rounds=1, warmup_rounds=0)
    return dict(rounds=3, warmup_rounds=1)


def test_kmeans_plus_plus_seeding(benchmark, compiled_op, device, bench_scale):
    """Greedy k-means++ seeding at SOP size: k sequential draws of 2 + int(ln k) candidates
    each, against scikit-learn's kmeans_plusplus with its default (the same) number of
    candidates on the CPU at small scale (4,000 x 512, k = 748), which it must beat."""
    n, k, _ = size_of("sop", bench_scale)
    x, _ = embeddings(n, k, device)

    seeding_s = benchmarked_time(
        benchmark, lambda: cluster.kmeans_plus_plus(x, k, seed=0), device, **kmeans_rounds(device, bench_scale)
    )
    if device.type == "cpu" and not full_size_on_cpu(device, bench_scale):
        sklearn_cluster = pytest.importorskip("sklearn.cluster")
        data = x.numpy()
        sklearn_s = best_time(lambda: sklearn_cluster.kmeans_plusplus(data, k, random_state=0), device, 1, 0)
        ratio = record_ratio(benchmark, "sklearn_kmeans_plusplus", sklearn_s, seeding_s)
        check_floor(ratio, SEEDING_FLOOR, "greedy k-means++ seeding against scikit-learn's")  # one run each: 10x apart
        check_target(seeding_s < sklearn_s, f"seeding {seeding_s:.2f} s vs scikit-learn {sklearn_s:.2f} s")


def test_kmeans_nmi_f1_as_scikit_learns(benchmark, compiled_op, device):
    """k-means (greedy k-means++ seeding, one run) with 2,000 clusters of 14,076 points (32
    dimensions) against scikit-learn's KMeans(n_init=1) over the same 3 seeds: its time, and
    NMI and F1, whose mean must reach scikit-learn's mean minus two standard deviations
    (one-candidate seeding fell 2.5 points of NMI and 11 of F1 short). Seconds to a minute on a
    CPU: not in the quick mode."""
    if timing.QUICK:
        pytest.skip("k-means with 2,000 clusters, 3 runs each: benchmark mode only")
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x, labels = embeddings(14076, 2000, device, dim=32, noise=0.7)
    data, seeds = x.cpu().numpy(), range(3)
    ours, theirs = [], []

    def scores(ids):
        return cluster.nmi(labels.cpu(), ids.cpu()), cluster.pairwise_f1(labels.cpu(), ids.cpu())

    def kmeans_runs():
        ours[:] = [scores(cluster.kmeans(x, 2000, seed=seed)) for seed in seeds]

    def sklearn_runs():
        fits = (sklearn_cluster.KMeans(2000, n_init=1, random_state=seed).fit(data) for seed in seeds)
        theirs[:] = [scores(torch.from_numpy(fit.labels_)) for fit in fits]

    kmeans_s = benchmarked_time(benchmark, kmeans_runs, device, rounds=1, warmup_rounds=0)
    record_ratio(benchmark, "sklearn_kmeans", best_time(sklearn_runs, device, 1, 0), kmeans_s)
    ours, theirs = np.array(ours), np.array(theirs)
    floor = theirs.mean(axis=0) - 2 * theirs.std(axis=0)
    benchmark.extra_info.update(nmi_f1=ours.mean(axis=0).tolist(), sklearn_nmi_f1=theirs.mean(axis=0).tolist())
    check_target((ours.mean(axis=0) >= floor).all(), f"NMI, F1 {ours.mean(axis=0)} < scikit-learn's floor {floor}")


def twenty_lloyd_iterations(bench_scale, device):
    """(embeddings, start centroids: k random rows, the 20 iterations to time) at SOP size,
    k = its number of classes."""
    n, k, _ = size_of("sop", bench_scale)
    x, _ = embeddings(n, k, device)
    start = x[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].to(device)]
    return x, start, lambda: cluster.lloyd(x, start, iters=20, stop_early=False)


def test_kmeans_20_iterations(benchmark, compiled_op, device, bench_scale):
    x, start, run = twenty_lloyd_iterations(bench_scale, device)
    k = start.shape[0]
    lloyd_s = benchmarked_time(benchmark, run, device, **kmeans_rounds(device, bench_scale))
    if device.type == "cpu" and not full_size_on_cpu(device, bench_scale):
        sklearn_cluster = pytest.importorskip("sklearn.cluster")
        data, init = x.numpy(), start.numpy()

        iterations = []

        def sklearn_lloyd():
            fitted = sklearn_cluster.KMeans(k, init=init, n_init=1, max_iter=20, tol=0.0, algorithm="lloyd").fit(data)
            iterations.append(fitted.n_iter_)

        sklearn_s = best_time(sklearn_lloyd, device, 1, 0)
        # scikit-learn stops once no assignment changes (often after a few iterations on
        # clustered data): compare the time per iteration.
        record_ratio(benchmark, "sklearn_kmeans_lloyd_per_iteration", sklearn_s / iterations[-1], lloyd_s / 20)
    if device.type == "cuda" and bench_scale == "full":
        check_target(lloyd_s <= 0.5, f"20 k-means iterations took {lloyd_s:.2f} s")
