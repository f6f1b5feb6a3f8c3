"""idml.cluster: k-means, NMI (vs scikit-learn) and pairwise F1 (vs a brute-force count)."""

import itertools

import numpy as np
import pytest
import torch

from idml import cluster, ops, reference


def brute_force_f1(labels, clusters):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(labels)), 2):
        same_class, same_cluster = labels[i] == labels[j], clusters[i] == clusters[j]
        tp += same_class and same_cluster
        fp += same_cluster and not same_class
        fn += same_class and not same_cluster
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


PARTITIONS = [
    (torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([5, 5, 7, 7, 9, 9])),  # identical
    (torch.tensor([0, 0, 0, 0]), torch.tensor([3, 3, 3, 3])),  # one class, one cluster
    (torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 0])),  # no information
    (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])),  # all singletons
    (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])),
]


def random_partitions():
    g = torch.Generator().manual_seed(3)
    for n, a, b in [(10, 3, 4), (200, 7, 5), (500, 60, 80), (300, 300, 20)]:
        yield torch.randint(a, (n,), generator=g) * 3 - 5, torch.randint(b, (n,), generator=g) + 100


@pytest.mark.parametrize("labels,clusters", PARTITIONS + list(random_partitions()))
def test_nmi_equals_sklearn(labels, clusters):
    metrics = pytest.importorskip("sklearn.metrics")
    expected = metrics.normalized_mutual_info_score(labels.numpy(), clusters.numpy())
    assert cluster.nmi(labels, clusters) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("labels,clusters", PARTITIONS + list(random_partitions()))
def test_f1_equals_brute_force_pair_count(labels, clusters):
    expected = brute_force_f1(labels.tolist(), clusters.tolist())
    assert cluster.pairwise_f1(labels, clusters) == pytest.approx(expected, abs=1e-12)


def separated_blobs(n_per, k, dim=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    centres = 20 * torch.randn(k, dim, generator=g)
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centres[labels] + torch.randn(k * n_per, dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm].to(device), labels[perm].to(device)


def test_kmeans_recovers_separated_clusters():
    x, labels = separated_blobs(50, 10)
    ids = cluster.kmeans(x, 10, seed=0)
    assert ids.dtype == torch.long and ids.shape == labels.shape
    assert cluster.nmi(labels, ids) > 0.99
    assert cluster.pairwise_f1(labels, ids) > 0.99


def test_kmeans_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g)
    first = cluster.kmeans(x, 40, seed=7)
    assert torch.equal(first, cluster.kmeans(x, 40, seed=7))
    assert not torch.equal(first, cluster.kmeans(x, 40, seed=8))


def test_kmeans_runs_keep_the_lowest_inertia_run():
    """runs=R keeps the run of least inertia among the single runs seeded seed .. seed+R-1
    (scikit-learn's n_init); on overlapping clusters the single runs differ."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 4, generator=g)
    singles = [cluster.kmeans(x, 12, seed=5 + run) for run in range(4)]
    inertias = []
    for ids in singles:
        centroids = torch.stack([x[ids == c].mean(dim=0) for c in range(12)])  # Lloyd's fixed point
        inertias.append(float(((x.double() - centroids.double()[ids]) ** 2).sum()))
    assert len(set(inertias)) > 1
    best = min(range(4), key=lambda run: (inertias[run], run))
    assert torch.equal(cluster.kmeans(x, 12, seed=5, runs=4), singles[best])
    assert torch.equal(cluster.kmeans(x, 12, seed=5, runs=1), singles[0])
    with pytest.raises(ValueError, match="runs must be at least 1"):
        cluster.kmeans(x, 12, runs=0)


def test_kmeans_assignment_is_blockwise_and_exact(monkeypatch):
    # Force many row blocks (never n x k at once); the result must not change.
    x, _ = separated_blobs(30, 25)
    expected = cluster.kmeans(x, 25, seed=1)
    monkeypatch.setattr(cluster, "CPU_BLOCK_ELEMENTS", 25 * 7)
    assert torch.equal(cluster.kmeans(x, 25, seed=1), expected)
    centroids = x[:25]
    brute = torch.cdist(x.double(), centroids.double()).argmin(dim=1)
    assert torch.equal(cluster.assign(x, centroids), brute)


def reference_assignment(x, centroids):
    """Nearest centroid from float64 squared distances (first index on ties), and whether
    each row's two nearest centroids tie."""
    distances = ((x.double()[:, None] - centroids.double()[None]) ** 2).sum(dim=2)
    nearest_two = distances.topk(2, dim=1, largest=False).values
    return distances.argmin(dim=1), nearest_two[:, 0] == nearest_two[:, 1], nearest_two[:, 1] - nearest_two[:, 0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("block_elements", [None, 37 * 7])  # one block; blocks of 7 rows, the last shorter
def test_assignment_equals_float64_reference(monkeypatch, device, block_elements):
    if block_elements is not None:
        monkeypatch.setattr(cluster, "CPU_BLOCK_ELEMENTS", block_elements)
        monkeypatch.setattr(cluster, "GPU_BLOCK_ELEMENTS", block_elements)
    g = torch.Generator().manual_seed(5)
    x, centroids = torch.randn(600, 13, generator=g), torch.randn(37, 13, generator=g)  # 13 + 1 columns pad to 16
    expected, _, gap = reference_assignment(x, centroids)
    clear = gap > 1e-3  # float32 rounding cannot swap these rows' two nearest centroids
    assert clear.float().mean() > 0.95
    got = cluster.assign(x.to(device), centroids.to(device)).cpu()
    assert torch.equal(got[clear], expected[clear])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_assignment_ties_go_to_the_lower_centroid(monkeypatch, device):
    # Small integers: every distance is exact in float32 whatever the summation order, so
    # equal distances stay equal; the centroid list holds duplicates as well.
    monkeypatch.setattr(cluster, "CPU_BLOCK_ELEMENTS", 50 * 9)
    monkeypatch.setattr(cluster, "GPU_BLOCK_ELEMENTS", 50 * 9)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-3, 4, (400, 5), generator=g).float()
    distinct = torch.randint(-3, 4, (30, 5), generator=g).float()
    centroids = torch.cat([distinct, distinct[torch.randperm(30, generator=g)[:20]]])
    expected, tied, _ = reference_assignment(x, centroids)
    assert tied.sum() > 100
    assert torch.equal(cluster.assign(x.to(device), centroids.to(device)).cpu(), expected)


def test_row_blocks_are_even_whole_tiles_within_the_budget():
    n, k, budget = 60502, 11316, cluster.GPU_BLOCK_ELEMENTS
    blocks = list(cluster._row_blocks(n, k, budget))
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(end == next_start for (_, end), (next_start, _) in zip(blocks, blocks[1:]))
    sizes = [end - start for start, end in blocks]
    assert max(sizes) * k <= budget
    assert all(size % cluster.GEMM_TILE_ROWS == 0 for size in sizes[:-1])
    assert min(sizes) > max(sizes) - cluster.GEMM_TILE_ROWS  # no small last block
    assert list(cluster._row_blocks(0, 3, 9)) == []


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_centroid_update_is_the_float64_mean_and_keeps_empty_clusters(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 16, generator=g)
    ids = torch.randint(0, 40, (500,), generator=g) * 2  # only even clusters are used
    centroids = torch.randn(80, 16, generator=g)
    got = cluster.update_centroids(x.to(device), ids.to(device), centroids.to(device)).cpu()
    for c in range(80):
        members = x[ids == c].double()
        expected = members.mean(dim=0).float() if len(members) else centroids[c]
        torch.testing.assert_close(got[c], expected, rtol=1e-6, atol=1e-7)


def seeding_inputs(n, k, dim, dtype, device, seed=0, trials=1):
    """(x, sq_norms, uniforms, closest, centroids) after draw 0 (row 0), as kmeans_plus_plus
    prepares them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype).to(device)
    uniforms = torch.rand(k, trials, generator=g, dtype=torch.float64).to(device)
    sq_norms = (x * x).sum(dim=1)
    centroids = torch.empty(k, dim, dtype=dtype, device=device)
    centroids[:1] = x[:1]
    closest = reference.squared_distances_to_row(
        x, sq_norms, torch.zeros(1, dtype=torch.long, device=device), centroids[0]
    )
    return x, sq_norms, uniforms, closest.double(), centroids


def draw_all(draws, inputs, splits):
    """Runs `draws` over draws 1..k-1 in calls that end at each of `splits`; (centroids, closest)."""
    x, sq_norms, uniforms, closest, centroids = (t.clone() for t in inputs)
    start = 1
    for stop in splits:
        draws(x, sq_norms, uniforms, closest, centroids, start, stop)
        start = stop
    return centroids, closest


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("trials", [1, 5])
def test_seeding_operator_draws_what_the_reference_draws(device, dtype, trials):
    """The C++ loop runs the reference's operations in the same order: the same centroids and
    distances, bit for bit, however the draws are split into calls."""
    assert ops.has_kernel("kmeans_plus_plus_draws", torch.device(device)), ops.EXTENSION_ERROR
    k = 90
    # 13: rows of the centroids at every alignment
    inputs = seeding_inputs(700, k, 13, dtype, device, trials=trials)
    expected = draw_all(reference.kmeans_plus_plus_draws, inputs, [k])
    for splits in ([k], [2, 40, 41, k], [k - 1, k]):
        got = draw_all(torch.ops.idml.kmeans_plus_plus_draws, inputs, splits)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), splits


@pytest.mark.parametrize("draws", [ops.kmeans_plus_plus_draws, reference.kmeans_plus_plus_draws])
def test_seeding_in_more_calls_draws_the_same_centroids(monkeypatch, draws):
    """kmeans_plus_plus's centroids do not depend on how many draws each call makes."""
    monkeypatch.setattr(ops, "kmeans_plus_plus_draws", draws)
    x, _ = separated_blobs(20, 30, dim=7, seed=3)
    expected = cluster.kmeans_plus_plus(x, 50, seed=2)
    monkeypatch.setattr(cluster, "DRAWS_PER_CALL", 7)
    assert torch.equal(cluster.kmeans_plus_plus(x, 50, seed=2), expected)


def greedy_seeding_rows(points, first, uniforms):
    """Rows of scikit-learn's greedy k-means++ in numpy float64, fed its random numbers: the
    first row, then per draw the candidates u * potential located in the running sum of the
    squared distances to the nearest centroid (clipped to the last row), of which the one
    leaving the least potential (the first on ties) is kept. Returns (rows, final distances)."""
    nearest = ((points - points[first]) ** 2).sum(axis=1)
    rows = [first]
    for u in uniforms[1:]:
        candidates = np.minimum(np.searchsorted(np.cumsum(nearest), u * nearest.sum()), len(points) - 1)
        reduced = np.minimum(nearest, ((points[None] - points[candidates][:, None]) ** 2).sum(axis=2))
        best = int(np.argmin(reduced.sum(axis=1)))
        rows.append(int(candidates[best]))
        nearest = reduced[best]
    return rows, nearest


@pytest.mark.parametrize("draws", [ops.kmeans_plus_plus_draws, reference.kmeans_plus_plus_draws])
@pytest.mark.parametrize("trials", [1, 2, 7])
def test_seeding_draws_are_scikit_learns_greedy_choices(draws, trials):
    """Each draw is the best of `trials` rows located by u * sum(D^2) in the running sum of
    D^2 (D = distance to the nearest centroid so far), by the sum of D^2 it leaves: checked
    against numpy in float64, draw by draw (one trial: plain D^2 sampling)."""
    k = 60
    x, sq_norms, uniforms, closest, centroids = seeding_inputs(400, k, 5, torch.float64, "cpu", seed=4, trials=trials)
    draws(x, sq_norms, uniforms, closest, centroids, 1, k)
    rows, nearest = greedy_seeding_rows(x.numpy(), 0, uniforms.numpy())
    np.testing.assert_array_equal(centroids.numpy(), x.numpy()[rows])
    np.testing.assert_allclose(closest.numpy(), nearest, rtol=1e-9, atol=1e-9)


class ReplayedRandomState(np.random.RandomState):
    """A RandomState that hands scikit-learn's k-means++ the given first row and uniforms."""

    def __init__(self, first, uniforms):
        super().__init__(0)
        self.first, self.uniforms = first, iter(uniforms)

    def choice(self, *args, **kwargs):
        return self.first

    def uniform(self, *args, size=None, **kwargs):
        values = next(self.uniforms)
        assert values.shape == (size,)
        return values


@pytest.mark.parametrize("k,trials", [(40, None), (150, None), (40, 3)])
def test_seeding_equals_scikit_learns_kmeans_plusplus(k, trials):
    """kmeans_plus_plus draws scikit-learn's kmeans_plusplus centroids when both get the same
    random numbers (replayed from the seeded generator, which kmeans_plus_plus draws up front)."""
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x, _ = separated_blobs(8, 60, dim=6, seed=2)
    x = x.double() + 8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seed = 11
    generator = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(k, cluster.local_trials(k, trials), generator=generator, dtype=torch.float64)
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    kwargs = {} if trials is None else {"n_local_trials": trials}
    replayed = ReplayedRandomState(first, uniforms[1:].numpy())
    expected, _ = sklearn_cluster.kmeans_plusplus(x.numpy(), k, random_state=replayed, **kwargs)
    np.testing.assert_array_equal(cluster.kmeans_plus_plus(x, k, seed=seed, n_local_trials=trials).numpy(), expected)


def small_classes(num_classes, dim=16, spread=1.5, seed=0):
    """Classes of 2 to 12 points around Gaussian centres that overlap: a few points per
    cluster, where which rows seed k-means shows in NMI and F1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(torch.randint(2, 13, (num_classes,), generator=g))
    x = spread * torch.randn(num_classes, dim, generator=g)[labels] + torch.randn(len(labels), dim, generator=g)
    return x, labels


def test_kmeans_clusters_as_well_as_scikit_learns_kmeans():
    """300 classes of 2-12 points: NMI and F1 of idml's k-means (mean of 5 seeds) are within
    scikit-learn KMeans' spread over 5 seeds (one run each) or above; plain k-means++ seeding
    (one trial per draw) falls below it."""
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x, labels = small_classes(300)

    def scores(ids):
        return cluster.nmi(labels, ids), cluster.pairwise_f1(labels, ids)

    ours = np.array([scores(cluster.kmeans(x, 300, seed=seed)) for seed in range(5)])
    theirs = np.array(
        [
            scores(torch.from_numpy(sklearn_cluster.KMeans(300, n_init=1, random_state=seed).fit(x.numpy()).labels_))
            for seed in range(5)
        ]
    )
    floor = theirs.mean(axis=0) - 2 * theirs.std(axis=0)
    assert (ours.mean(axis=0) >= floor).all(), f"NMI, F1: idml {ours.mean(axis=0)}, scikit-learn floor {floor}"


def test_seeding_trials_default_to_scikit_learns():
    assert [cluster.local_trials(k) for k in (1, 2, 7, 8, 748, 11316)] == [2, 2, 3, 4, 8, 11]
    assert cluster.local_trials(748, 1) == 1
    with pytest.raises(ValueError, match="n_local_trials must be at least 1"):
        cluster.kmeans(torch.randn(20, 2), 3, n_local_trials=0)


def test_seeding_operator_rejects_draws_out_of_range():
    inputs = seeding_inputs(50, 10, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"draws \[0, 5\) must lie within \[1, 10\]"):
        torch.ops.idml.kmeans_plus_plus_draws(*inputs, 0, 5)
    x, sq_norms, uniforms, closest, centroids = inputs
    with pytest.raises(RuntimeError, match="closest must be a contiguous float64 vector"):
        torch.ops.idml.kmeans_plus_plus_draws(x, sq_norms, uniforms, closest.float(), centroids, 1, 5)
    for bad in (uniforms[:, 0], uniforms[:, :0], uniforms.float(), torch.rand(2, 10, dtype=torch.float64).t()):
        with pytest.raises(RuntimeError, match=r"uniforms must be a contiguous float64 \[k, trials\] matrix"):
            torch.ops.idml.kmeans_plus_plus_draws(x, sq_norms, bad, closest, centroids, 1, 5)
    with pytest.raises(RuntimeError, match="sq_norms must be a contiguous vector"):
        strided = torch.stack([sq_norms] * 2, 1)[:, 0]
        torch.ops.idml.kmeans_plus_plus_draws(x, strided, uniforms, closest, centroids, 1, 5)


class RecordingBar:
    """A stand-in for tqdm that keeps its count."""

    last = None

    def __init__(self, total, initial=0, **kwargs):
        self.total, self.n = total, initial
        RecordingBar.last = self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, steps):
        self.n += steps


def test_seeding_shows_progress_in_steps_of_the_operator_calls(monkeypatch, capsys):
    """k = 600: three operator calls (256 draws each, the last 87); the bar counts all 600."""
    calls = []
    monkeypatch.setattr(ops, "kmeans_plus_plus_draws", lambda *args: calls.append(args[-2:]))
    monkeypatch.setattr(cluster, "tqdm", RecordingBar)
    cluster.kmeans_plus_plus(torch.randn(700, 4), 600, progress=True)
    assert calls == [(1, 257), (257, 513), (513, 600)]
    assert RecordingBar.last.n == 600 and RecordingBar.last.total == 600


def test_kmeans_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        cluster.kmeans(torch.randn(5, 2), 6)


@pytest.mark.cuda
def test_cuda_kmeans_on_device_and_deterministic():
    x, labels = separated_blobs(40, 50, device="cuda")
    ids = cluster.kmeans(x, 50, seed=0)
    assert ids.device.type == "cuda"
    assert torch.equal(ids, cluster.kmeans(x, 50, seed=0))
    assert cluster.nmi(labels, ids) > 0.99
