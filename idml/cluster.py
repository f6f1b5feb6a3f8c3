"""k-means, NMI and pairwise F1 for the clustering metrics (docs/method.md, section 5).

Everything runs in torch on the input's device (no scikit-learn at run time) and is
deterministic for a seed: random draws come from a seeded CPU generator, assignments
are blockwise argmins (ties to the lower centroid), and centroid sums avoid atomics.
Empty clusters keep their centroid.
"""

import math

import torch
from tqdm import tqdm

from idml import ops, reference

# Most point-centroid distances held at once: 64 MiB of float32 on a CPU, 256 MiB on a GPU,
# where fewer, larger GEMMs leave less of a partly filled last wave of tiles.
CPU_BLOCK_ELEMENTS = 1 << 24
GPU_BLOCK_ELEMENTS = 1 << 26
# Blocks of whole GEMM tiles (cuBLAS's fp32 tiles are 128 rows) leave no mostly empty tile.
GEMM_TILE_ROWS = 128
# Width of the augmented rows: a multiple of 8 floats keeps every row's GEMM loads aligned.
GEMM_ALIGNMENT = 8
# k-means++ draws per operator call: the progress bar's step (about a second on a CPU at
# SOP size, a few ms on a GPU).
DRAWS_PER_CALL = 256


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _row_blocks(n: int, k: int, budget: int):
    """Row ranges of about equal size with at most budget // k rows each (never n x k),
    whole GEMM tiles where the budget allows."""
    most = max(1, budget // max(k, 1))
    granule = GEMM_TILE_ROWS if most >= GEMM_TILE_ROWS else 1
    most -= most % granule
    count = max(1, _ceil_div(n, most))
    step = max(granule, _ceil_div(_ceil_div(n, count), granule) * granule)
    return ((start, min(n, start + step)) for start in range(0, n, step))


def local_trials(k: int, n_local_trials: int | None = None) -> int:
    """Candidates per k-means++ draw: n_local_trials, or scikit-learn's default 2 + int(ln k)."""
    if n_local_trials is None:
        return 2 + int(math.log(k))
    if n_local_trials < 1:
        raise ValueError(f"kmeans: n_local_trials must be at least 1, got {n_local_trials}")
    return n_local_trials


def kmeans_plus_plus(
    x: torch.Tensor, k: int, seed: int = 0, progress: bool = False, n_local_trials: int | None = None
) -> torch.Tensor:
    """k initial centroids [k, d] by greedy k-means++ (D^2 sampling), seeded and deterministic.

    The first centroid is a uniformly drawn row; each later one is the best of
    `n_local_trials` candidates (default 2 + int(ln k), scikit-learn's): each candidate is
    u * sum(D^2) located in the running cumulative sum of D^2 (float64), and the one that
    leaves the least sum of D^2 is kept. 1 is plain k-means++, one candidate per draw. The
    uniforms come from a seeded CPU generator up front, so the draws never synchronise with
    the device (ops.kmeans_plus_plus_draws, a C++ loop). `progress`: a progress bar once a
    second has passed (the k draws take a minute on a CPU at SOP size).
    """
    n, trials = x.shape[0], local_trials(k, n_local_trials)
    generator = torch.Generator().manual_seed(seed)
    # [k, 1] draws the same numbers as the single draw's [k] did, so its centroids stay the same.
    uniforms = torch.rand(k, trials, generator=generator, dtype=torch.float64).to(x.device)
    first = torch.randint(n, (1,), generator=generator).to(x.device)
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    torch.index_select(x, 0, first, out=centroids[:1])
    sq_norms = (x * x).sum(dim=1)
    closest = reference.squared_distances_to_row(x, sq_norms, first, centroids[0]).double()
    with tqdm(total=k, initial=1, desc="k-means++ seeding", leave=False, delay=1, disable=not progress) as bar:
        for start in range(1, k, DRAWS_PER_CALL):
            stop = min(k, start + DRAWS_PER_CALL)
            ops.kmeans_plus_plus_draws(x, sq_norms, uniforms, closest, centroids, start, stop)
            bar.update(stop - start)
    return centroids


def _augmented_points(x: torch.Tensor) -> torch.Tensor:
    """[-2x, 1, 0...] per row: its product with _augmented_centroids is |c|^2 - 2 x.c, which
    orders the centroids as |x - c|^2 does, from one plain GEMM (addmm would first copy its
    broadcast bias into the whole output block). Scaling by -2 is exact."""
    n, d = x.shape
    width = _ceil_div(d + 1, GEMM_ALIGNMENT) * GEMM_ALIGNMENT
    points = x.new_zeros(n, width)
    torch.mul(x, -2.0, out=points[:, :d])
    points[:, d] = 1.0
    return points


def _augmented_centroids(centroids: torch.Tensor, width: int) -> torch.Tensor:
    """[c, |c|^2, 0...] per centroid, `width` columns (_augmented_points' width)."""
    k, d = centroids.shape
    augmented = centroids.new_zeros(k, width)
    augmented[:, :d] = centroids
    augmented[:, d] = (centroids * centroids).sum(dim=1)
    return augmented


def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of every row of _augmented_points, in blocks of rows
    (ties to the lower index); no host synchronisation."""
    augmented = _augmented_centroids(centroids, points.shape[1])
    ids = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    budget = CPU_BLOCK_ELEMENTS if points.device.type == "cpu" else GPU_BLOCK_ELEMENTS
    for start, end in _row_blocks(points.shape[0], augmented.shape[0], budget):
        torch.argmin(torch.mm(points[start:end], augmented.t()), dim=1, out=ids[start:end])
    return ids


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of every row (ties to the lower index)."""
    return _nearest(_augmented_points(x), centroids)


def update_centroids(x: torch.Tensor, ids: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Means of the clusters (an empty cluster keeps its centroid).

    Sums in float64 over the rows sorted by cluster, one segment per cluster: no atomics
    (index_add_ on CUDA has them), so every run gives the same result. No host
    synchronisation either: the segments come from searchsorted, not bincount (which reads
    the largest id back to size its output), and segment_reduce skips its checks.
    """
    k = centroids.shape[0]
    sorted_ids, order = torch.sort(ids, stable=True)
    offsets = torch.searchsorted(sorted_ids, torch.arange(k + 1, device=ids.device))
    counts = offsets.diff()
    sums = torch.segment_reduce(x.index_select(0, order).double(), "sum", offsets=offsets, unsafe=True)
    means = (sums / counts.clamp_min(1).unsqueeze(1)).to(x.dtype)
    return torch.where((counts > 0).unsqueeze(1), means, centroids)


def lloyd(x: torch.Tensor, centroids: torch.Tensor, iters: int, stop_early: bool = True, progress: bool = False):
    """`iters` Lloyd iterations from `centroids`: (cluster ids, centroids).

    stop_early ends as soon as an iteration changes no assignment (the one host
    synchronisation per iteration; none without it).
    """
    points = _augmented_points(x)
    ids = _nearest(points, centroids)
    for _ in tqdm(range(iters), desc="k-means iterations", leave=False, delay=1, disable=not progress):
        centroids = update_centroids(x, ids, centroids)
        new_ids = _nearest(points, centroids)
        if stop_early and torch.equal(new_ids, ids):
            break
        ids = new_ids
    return ids, centroids


def inertia(x: torch.Tensor, ids: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of squared distances of the rows to their centroids (float64; one host read)."""
    return float((x - centroids.index_select(0, ids)).double().square().sum())


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 100,
    seed: int = 0,
    runs: int = 1,
    progress: bool = False,
    n_local_trials: int | None = None,
) -> torch.Tensor:
    """Cluster ids (LongTensor [n], on x's device) of k-means with greedy k-means++ seeding
    (kmeans_plus_plus; `n_local_trials` candidates per draw, default scikit-learn's).

    Deterministic for a seed; each run stops when the assignment is stable or after
    `iters` Lloyd iterations. With runs > 1, the run (seeded seed, seed + 1, ...) of the
    lowest inertia, the earlier on a tie: what scikit-learn's KMeans(n_init=runs) keeps.
    Computed in float32 at least. `progress`: progress bars for the seeding and the iterations.
    """
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"kmeans: k must be in [1, {x.shape[0]}] (number of rows), got {k}")
    if runs < 1:
        raise ValueError(f"kmeans: runs must be at least 1, got {runs}")
    x = x.to(torch.promote_types(x.dtype, torch.float32)).contiguous()
    best, best_inertia = None, float("inf")
    for run in range(runs):
        ids, centroids = lloyd(
            x, kmeans_plus_plus(x, k, seed + run, progress, n_local_trials), iters, progress=progress
        )
        if runs == 1:
            return ids
        run_inertia = inertia(x, ids, centroids)
        if best is None or run_inertia < best_inertia:
            best, best_inertia = ids, run_inertia
    return best


def _contingency(labels: torch.Tensor, clusters: torch.Tensor):
    """Non-empty cells of the label x cluster table: (cell counts, label size and cluster
    size of each cell, label sizes, cluster sizes), all float64. Never dense: at most n
    cells, however many classes and clusters."""
    label_ids = torch.unique(labels, return_inverse=True)[1]
    cluster_ids = torch.unique(clusters, return_inverse=True)[1]
    num_clusters = int(cluster_ids.max()) + 1
    keys, cells = torch.unique(label_ids * num_clusters + cluster_ids, return_counts=True)
    label_sizes = torch.bincount(label_ids).double()
    cluster_sizes = torch.bincount(cluster_ids).double()
    return (
        cells.double(),
        label_sizes[keys // num_clusters],
        cluster_sizes[keys % num_clusters],
        label_sizes,
        cluster_sizes,
    )


def _entropy(sizes: torch.Tensor, n: int) -> float:
    p = sizes / n
    return float(-(p * p.log()).sum())


def nmi(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    """Normalised mutual information, arithmetic normalisation (scikit-learn's default,
    including its limit cases: one class and one cluster give 1, zero information 0)."""
    n = labels.numel()
    if n == 0:
        return 1.0
    cells, cell_label_sizes, cell_cluster_sizes, label_sizes, cluster_sizes = _contingency(labels, clusters)
    if label_sizes.numel() == cluster_sizes.numel() == 1:
        return 1.0
    # MI = sum_ij p_ij log(p_ij / (p_i p_j)) with p = counts / n (natural log).
    outer = cell_label_sizes * cell_cluster_sizes
    mutual = max(float((cells / n * (torch.log(cells * n) - torch.log(outer))).sum()), 0.0)
    if mutual == 0.0:
        return 0.0
    normaliser = 0.5 * (_entropy(label_sizes, n) + _entropy(cluster_sizes, n))
    return mutual / max(normaliser, torch.finfo(torch.float64).eps)


def pairwise_f1(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    """F1 of same-cluster pairs against same-class pairs, from the contingency table.

    true positives = sum over cells C(n_ij, 2); precision divides them by the same-cluster
    pairs sum_j C(b_j, 2), recall by the same-class pairs sum_i C(a_i, 2); 0 when no pair
    is a true positive.
    """
    if labels.numel() == 0:
        return 0.0
    cells, _, _, label_sizes, cluster_sizes = _contingency(labels, clusters)

    def pairs(sizes):
        return float((sizes * (sizes - 1) / 2).sum())

    true_positive = pairs(cells)
    if true_positive == 0:
        return 0.0
    precision, recall = true_positive / pairs(cluster_sizes), true_positive / pairs(label_sizes)
    return 2 * precision * recall / (precision + recall)
