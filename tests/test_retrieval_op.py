"""idml.ops.retrieval_metrics / retrieval_ranks (compiled op and plain-PyTorch reference)
against a brute-force float64 numpy evaluation written here (docs/method.md, section 5).

The exact comparisons use embeddings on a grid of multiples of 1/8 with few dimensions:
every dot product is then exact in float32 and float64 alike, so the op's float32 ranks
must equal the float64 oracle's, and the grid makes many exact ties.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from idml import ops, reference
from idml.errors import UsageError

KS = (1, 2, 4, 8, 16)


def brute_force(x, labels, ks, max_r, ref=None, ref_labels=None):
    """Every query's full ranking by (similarity descending, index ascending), float64."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    symmetric = ref is None
    ref = x if symmetric else np.asarray(ref, dtype=np.float64)
    ref_labels = labels if symmetric else np.asarray(ref_labels)
    sim = x @ ref.T
    hits = {k: 0 for k in ks}
    rps, maps = [], []
    for q in range(len(x)):
        candidates = np.arange(len(ref))
        if symmetric:
            candidates = candidates[candidates != q]
        s = sim[q, candidates]
        order = candidates[np.lexsort((candidates, -s))]  # last key is the primary one
        relevant = ref_labels[order] == labels[q]
        for k in ks:
            hits[k] += bool(relevant[:k].any())
        r = min(int(relevant.sum()), max_r)
        if r == 0:
            continue
        top = relevant[:r]
        rps.append(top.sum() / r)
        maps.append((np.cumsum(top) / np.arange(1, r + 1) * top).sum() / r)
    result = {f"R@{k}": hits[k] / len(x) for k in ks}
    result["RP"] = float(np.mean(rps)) if rps else 0.0
    result["MAP@R"] = float(np.mean(maps)) if maps else 0.0
    return result


def clustered(n, num_classes, dim=6, noise=1.0, grid=8, generator=None, duplicates=0, singletons=0):
    """Rows near their class centre, rounded to multiples of 1/grid; some exact duplicate
    rows (of other classes too) and some classes of one image."""
    g = generator or torch.Generator().manual_seed(n * 31 + num_classes)
    labels = torch.randint(num_classes, (n,), generator=g)
    if singletons:
        labels[:singletons] = num_classes + torch.arange(singletons)
    centres = torch.randn(num_classes + singletons, dim, generator=g)
    x = centres[labels] + noise * torch.randn(n, dim, generator=g)
    x = torch.round(x * grid) / grid
    if duplicates:
        source = torch.randint(n, (duplicates,), generator=g)
        target = torch.randint(n, (duplicates,), generator=g)
        x[target] = x[source]
    return x, labels


def implementations():
    impls = [("reference", reference.retrieval_ranks)]
    if ops.has_kernel("retrieval_ranks", torch.device("cpu")):
        impls.append(("op", lambda *a: torch.ops.idml.retrieval_ranks(a[0], a[1], a[4], a[5], a[2], a[6], a[3])))
    return impls


def metrics(impl, x, labels, ks=KS, max_r=1023, precision="fp32", ref=None, ref_labels=None):
    # max_k = max(ks): ranks past max(R, max_k) are only bounded, as the metrics need.
    ranks, num_relevant = impl(x, labels, max_r, precision, ref, ref_labels, max(ks))
    return ops.metrics_from_ranks(ranks, num_relevant, ks)


def assert_same(result, expected):
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key


def test_compiled_op_is_built():
    assert ops.has_kernel("retrieval_ranks", torch.device("cpu")), ops.EXTENSION_ERROR


def test_torch_compile_fullgraph():
    """idml.ops.retrieval_ranks traces as one graph (its output width depends on the data);
    aot_eager, as inductor's C++ compile takes minutes on CI's 2 cores."""
    x, labels = clustered(300, 20, dim=8, duplicates=10)
    compiled = torch.compile(
        lambda x, labels: ops.retrieval_ranks(x, labels, max_k=4), fullgraph=True, backend="aot_eager"
    )
    got, expected = compiled(x, labels), ops.retrieval_ranks(x, labels, max_k=4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("name,impl", implementations())
@pytest.mark.parametrize(
    "n,num_classes,max_r",
    [
        (1, 1, 1023),
        (2, 1, 1023),
        (7, 3, 1023),
        (60, 5, 3),
        (300, 40, 1023),
        (300, 20, 3),
        (1100, 300, 3),
        (1100, 30, 1023),
        (2300, 600, 5),
    ],
)
def test_equals_brute_force(name, impl, n, num_classes, max_r):
    x, labels = clustered(n, num_classes, duplicates=n // 10, singletons=min(3, n // 10))
    assert_same(metrics(impl, x, labels, max_r=max_r), brute_force(x, labels, KS, max_r))


@pytest.mark.parametrize("name,impl", implementations())
def test_massive_ties(name, impl):
    # Entries in {-1, 0, 1}, 3 dimensions: at most 27 distinct rows among 400.
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-1, 2, (400, 3), generator=g).float()
    labels = torch.randint(12, (400,), generator=g)
    for max_r in (1, 3, 1023):
        assert_same(metrics(impl, x, labels, max_r=max_r), brute_force(x, labels, KS, max_r))


@pytest.mark.parametrize("name,impl", implementations())
@pytest.mark.parametrize("nq,nr,max_r", [(1, 5, 1023), (50, 300, 3), (700, 1300, 1023), (1300, 700, 4)])
def test_query_gallery_equals_brute_force(name, impl, nq, nr, max_r):
    g = torch.Generator().manual_seed(nq + nr)
    x, labels = clustered(nq + nr, 40, generator=g, duplicates=30)
    query, gallery = x[:nq], x[nq:]
    query_labels, gallery_labels = labels[:nq], labels[nq:]
    query_labels[:2] = 1000  # queries whose class is absent from the gallery
    expected = brute_force(query, query_labels, KS, max_r, gallery, gallery_labels)
    assert_same(metrics(impl, query, query_labels, max_r=max_r, ref=gallery, ref_labels=gallery_labels), expected)


@pytest.mark.parametrize("name,impl", implementations())
def test_no_query_with_a_relevant_item(name, impl):
    x, labels = clustered(30, 3)
    gallery, gallery_labels = clustered(20, 3)
    ranks, num_relevant = impl(x, labels, 1023, "fp32", gallery, gallery_labels + 10, 8)  # no class shared
    assert ranks.shape == (30, 0) and num_relevant.tolist() == [0] * 30
    ranks, num_relevant = impl(x, torch.arange(30), 1023, "fp32", None, None, 8)  # every class of one image
    assert ranks.shape == (30, 0) and num_relevant.tolist() == [0] * 30
    assert set(ops.metrics_from_ranks(ranks, num_relevant).values()) == {0.0}
    for references in ((None, None), (gallery, gallery_labels)):  # no query at all: no metric is defined
        ranks, num_relevant = impl(x[:0], labels[:0], 1023, "fp32", *references, 8)
        assert ranks.shape == (0, 0) and num_relevant.shape == (0,)
        with pytest.raises(UsageError, match="there is no query"):
            ops.metrics_from_ranks(ranks, num_relevant)


def test_op_ranks_equal_reference_ranks_several_tiles():
    # Past the CPU tile size (4096 x 4096) in both directions, past the band block (256);
    # max_k=None: every rank exact; small max_k: ranks past max(R, max_k) bounded alike.
    x, labels = clustered(4500, 900, dim=4, duplicates=200, singletons=5)
    for max_r, max_k in [(2, None), (1023, None), (3, 5), (1023, 1)]:
        ranks, num_relevant = ops.retrieval_ranks(x, labels, max_r, max_k=max_k)
        expected_ranks, expected_num_relevant = reference.retrieval_ranks(x, labels, max_r, max_k=max_k)
        assert torch.equal(num_relevant, expected_num_relevant)
        assert torch.equal(ranks, expected_ranks)
    gallery, gallery_labels = clustered(4200, 900, dim=4)
    for max_k in (None, 2):
        got = ops.retrieval_ranks(x, labels, 7, "fp32", gallery, gallery_labels, max_k)
        expected = reference.retrieval_ranks(x, labels, 7, "fp32", gallery, gallery_labels, max_k)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_one_huge_class():
    # A class of 4000 of 4500 rows: its segments are gathered in several chunks of rows.
    x, labels = clustered(4500, 200, dim=4, duplicates=100)
    labels[:4000] = 7
    for max_r in (3, 1023):
        got = ops.retrieval_ranks(x, labels, max_r, max_k=8)
        expected = reference.retrieval_ranks(x, labels, max_r, max_k=8)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_ranks_past_the_limit_are_bounded():
    # Query 0's 3 relevant items (rows 1-3) rank 1, 5 and 6 of 9 (rows 4-6 outrank 2 and 3).
    x = torch.tensor([[1.0, 0.0]] + [[1.0, 0.0]] + [[0.0, 1.0]] * 2 + [[0.8, 0.6]] * 3 + [[-1.0, 0.0]] * 3)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert ops.retrieval_ranks(x, labels)[0][0].tolist() == [1, 5, 6]
    assert ops.retrieval_ranks(x, labels, max_k=5)[0][0].tolist() == [1, 5, 6]  # limit max(3, 5)
    assert ops.retrieval_ranks(x, labels, max_k=4)[0][0].tolist() == [1, 5, 5]  # limit 4: 5 = past it
    assert reference.retrieval_ranks(x, labels, max_k=4)[0][0].tolist() == [1, 5, 5]


def test_ties_go_to_the_lower_index():
    # Query 0; items 1 (other class) and 2 (its class) tie: 1 ranks first, so R@1 misses.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    ranks, num_relevant = ops.retrieval_ranks(x, labels, 1023)
    assert ranks[0].tolist() == [2] and ranks[2].tolist() == [1] and ranks[1].tolist() == [3]
    assert num_relevant.tolist() == [1, 1, 1, 1]
    # Relabel so that the lower-index tie is the relevant one.
    ranks, _ = ops.retrieval_ranks(x, torch.tensor([0, 0, 1, 1]), 1023)
    assert ranks[0].tolist() == [1]


def test_a_query_never_takes_a_place_among_its_own_items():
    # Similarities that overflow float32 to -inf tie with each other: query 0's items 1, 2, 3
    # rank in index order, so its relevant items 2 and 3 rank 2 and 3 (the query itself
    # once took a place among the tied -inf items).
    x = torch.tensor([[1e20, 0.0], [-1e20, 0.0], [-1e20, 0.0], [-1e20, 0.0]])
    labels = torch.tensor([0, 1, 0, 0])
    for impl in (ops.retrieval_ranks, reference.retrieval_ranks):
        assert impl(x, labels)[0][0].tolist() == [2, 3], impl


def test_metrics_from_ranks_reads_back_once():
    """The metrics are computed where the ranks are and read back in one transfer: no
    .item() per metric and no boolean indexing (each would wait for a GPU)."""
    from torch.profiler import profile

    ranks, num_relevant = ops.retrieval_ranks(torch.randn(60, 4), torch.randint(0, 6, (60,)))
    with profile() as prof:
        result = ops.metrics_from_ranks(ranks, num_relevant, ks=(1, 5))
    calls = {event.name for event in prof.events()}
    assert not calls & {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}, calls
    assert list(result) == ["R@1", "R@5", "RP", "MAP@R"] and all(type(v) is float for v in result.values())


def test_metrics_from_ranks_refuses_a_k_below_one():
    ranks, num_relevant = ops.retrieval_ranks(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    for ks in [(0, 1), ()]:
        with pytest.raises(ValueError, match="positive integers"):
            ops.metrics_from_ranks(ranks, num_relevant, ks=ks)


@pytest.mark.cuda
def test_cuda_metrics_from_ranks_synchronises_at_most_once():
    """On the GPU: only the final read-back waits for the device (torch's sync debug mode
    warns at every synchronising call)."""
    x, labels = clustered(500, 20)
    ranks, num_relevant = ops.retrieval_ranks(x.cuda(), labels.cuda(), max_k=8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ops.metrics_from_ranks(ranks, num_relevant, ks=(1, 2, 4, 8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs
    assert_same(result, ops.metrics_from_ranks(ranks.cpu(), num_relevant.cpu(), ks=(1, 2, 4, 8)))


def test_query_without_relevant_item_is_an_r_at_k_miss():
    x = torch.eye(3)
    result = ops.retrieval_metrics(x, torch.tensor([0, 0, 1]), ks=(1, 2))
    assert result["R@1"] == pytest.approx(2 / 3) and result["R@2"] == pytest.approx(2 / 3)
    assert result["RP"] == 1.0 and result["MAP@R"] == 1.0  # over the 2 queries with R > 0
    none = ops.retrieval_metrics(x, torch.tensor([0, 1, 2]))
    assert none == {"R@1": 0.0, "R@2": 0.0, "R@4": 0.0, "R@8": 0.0, "RP": 0.0, "MAP@R": 0.0}


def test_bad_arguments():
    x = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="precision"):
        torch.ops.idml.retrieval_ranks(x, torch.zeros(5, dtype=torch.long), None, None, 10, 8, "fp16")
    with pytest.raises(RuntimeError, match="one label per row"):
        torch.ops.idml.retrieval_ranks(x, torch.zeros(4, dtype=torch.long), None, None, 10, 8, "fp32")
    with pytest.raises(ValueError, match="precision"):
        reference.retrieval_ranks(x, torch.zeros(5, dtype=torch.long), 10, "fp16")


def normalised_clusters(n, num_classes, dim=64, noise=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=g)
    x = torch.randn(num_classes, dim, generator=g)[labels] + noise * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1), labels


# Tolerances of the speed modes against fp32 (absolute, on each metric), as documented in
# idml.ops.retrieval_metrics: near-ties may swap when the dot products are rounded.
# (Measured here on CPU for bf16: at most 0.0015 on this data, where R@1 is about 0.4.)
TOLERANCE = {"tf32": 0.005, "bf16": 0.01}


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_speed_modes_within_tolerance_cpu(precision):
    x, labels = normalised_clusters(2000, 100, noise=2.0)  # hard: many near-ties matter
    exact = ops.retrieval_metrics(x, labels, ks=KS)
    fast = ops.retrieval_metrics(x, labels, ks=KS, precision=precision)
    for key in exact:
        assert abs(fast[key] - exact[key]) <= TOLERANCE[precision], key
    if precision == "tf32":  # no TF32 on CPU: exact float32
        assert fast == exact
    # bf16 means bfloat16-rounded inputs, float32 products: the reference does the same.
    ranks = ops.retrieval_ranks(x, labels, 1023, precision)
    expected = reference.retrieval_ranks(x, labels, 1023, precision)
    assert torch.equal(ranks[0], expected[0])


def test_memory_stays_far_below_n_squared_at_sop_size():
    # SOP's test set, n = 60,502 (11,316 classes; narrow rows keep it quick): an n x n float32
    # matrix would be 14.6 GB, more than CI's machine holds. Peak RSS growth must stay small.
    script = textwrap.dedent("""
        import torch, idml
        from idml import ops
        def peak_kib():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1])
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(11316, (60502,), generator=g)
        x = torch.nn.functional.normalize(torch.randn(60502, 16, generator=g), dim=1)
        ops.retrieval_metrics(x[:300], labels[:300])  # load everything once
        before = peak_kib()
        ops.retrieval_metrics(x, labels, max_r=1023)
        print((peak_kib() - before) * 1024)
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 500e6, f"peak RSS grew by {growth / 1e6:.0f} MB (n x n would be 14,600 MB)"


@pytest.mark.cuda
def test_cuda_op_equals_reference_fp32():
    for n, num_classes, max_r in [(7, 3, 1023), (1100, 300, 3), (3000, 40, 1023), (20000, 3000, 5)]:
        x, labels = clustered(n, num_classes, duplicates=n // 10, singletons=3)
        expected = reference.retrieval_ranks(x.double(), labels, max_r)
        got = ops.retrieval_ranks(x.cuda(), labels.cuda(), max_r)
        assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
        expected = reference.retrieval_ranks(x.double(), labels, max_r, max_k=3)
        got = ops.retrieval_ranks(x.cuda(), labels.cuda(), max_r, max_k=3)
        assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
    x, labels = clustered(5000, 200)
    gallery, gallery_labels = clustered(7000, 200)
    expected = reference.retrieval_ranks(x, labels, 9, "fp32", gallery, gallery_labels)
    got = ops.retrieval_ranks(x.cuda(), labels.cuda(), 9, "fp32", gallery.cuda(), gallery_labels.cuda())
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@pytest.mark.cuda
def test_cuda_inputs_on_two_devices_are_refused_by_name():
    x, labels = clustered(50, 5)
    with pytest.raises(UsageError, match="labels must be on cpu like the other inputs"):
        ops.retrieval_ranks(x, labels.cuda())
    with pytest.raises(RuntimeError, match="labels must be on the device of"):  # a CUDA input: the CUDA kernel
        torch.ops.idml.retrieval_ranks(x, labels.cuda(), None, None, 1023, 8, "fp32")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_speed_modes_within_tolerance(precision):
    x, labels = normalised_clusters(20000, 1000, noise=2.0)
    exact = ops.retrieval_metrics(x, labels, ks=KS)
    fast = ops.retrieval_metrics(x.cuda(), labels.cuda(), ks=KS, precision=precision)
    for key in exact:
        assert abs(fast[key] - exact[key]) <= TOLERANCE[precision], key


@pytest.mark.cuda
def test_cuda_memory_stays_far_below_n_squared():
    x, labels = normalised_clusters(40000, 8000, dim=128)
    x, labels = x.cuda(), labels.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ops.retrieval_metrics(x, labels)
    growth = torch.cuda.max_memory_allocated() - before
    assert growth < 600e6, growth  # n x n float32 would be 6.4 GB; the tile is 256 MiB


def test_opcheck():
    x, labels = clustered(60, 5)
    gallery, gallery_labels = clustered(40, 5)
    torch.library.opcheck(torch.ops.idml.retrieval_ranks, (x, labels, None, None, 3, 4, "fp32"))
    torch.library.opcheck(torch.ops.idml.retrieval_ranks, (x, labels, gallery, gallery_labels, 1023, 1, "bf16"))


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_speed_modes_are_exact_on_the_grid(precision):
    """Multiples of 1/8 below 8 in magnitude are exact in bfloat16 and TF32, and so are their
    products and sums in float32: on them both speed modes must give exactly the fp32 ranks
    (tolerance 0), symmetric and query/gallery, with every rank exact or bounded by max_k."""
    x, labels = clustered(3000, 300, duplicates=300, singletons=3)
    gallery, gallery_labels = clustered(2500, 300, duplicates=100)
    assert max(x.abs().max(), gallery.abs().max()) < 8
    for max_r, max_k in [(1023, None), (3, 4)]:
        expected = reference.retrieval_ranks(x.double(), labels, max_r, max_k=max_k)
        got = ops.retrieval_ranks(x.cuda(), labels.cuda(), max_r, precision, max_k=max_k)
        assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1]), (max_r, max_k)
    for max_k in (None, 2):
        expected = reference.retrieval_ranks(x.double(), labels, 7, "fp32", gallery.double(), gallery_labels, max_k)
        got = ops.retrieval_ranks(x.cuda(), labels.cuda(), 7, precision, gallery.cuda(), gallery_labels.cuda(), max_k)
        assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1]), max_k


@pytest.mark.cuda
def test_cuda_query_gallery_with_an_infinite_similarity():
    """A product that overflows to +inf in query/gallery mode counts for its query only (it
    once also counted for the query at the reference's sorted position)."""
    queries, query_labels = clustered(300, 20)
    gallery, gallery_labels = clustered(200, 20, generator=torch.Generator().manual_seed(5))
    queries[0] = queries[0].abs() + 1
    gallery[7] = gallery[7].abs() + 1
    queries[0, 0] = gallery[7, 0] = 1e20
    gallery_labels[7] = query_labels[0] + 1
    assert (queries @ gallery.t()).isinf().sum() == 1
    expected = reference.retrieval_ranks(queries, query_labels, 5, "fp32", gallery, gallery_labels, 4)
    got = ops.retrieval_ranks(queries.cuda(), query_labels.cuda(), 5, "fp32", gallery.cuda(), gallery_labels.cuda(), 4)
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@pytest.mark.cuda
def test_cuda_tf32_setting_is_scoped_to_the_op():
    """fp32 mode ignores a global TF32 setting and tf32 mode uses TF32, whichever API the
    user set it with (the new one alone once made the op raise); the setting is unchanged."""
    x, labels = normalised_clusters(3000, 100, noise=2.0)
    x, labels = x.cuda(), labels.cuda()
    exact = ops.retrieval_ranks(x, labels, 1023, "fp32")[0]
    assert not torch.equal(ops.retrieval_ranks(x, labels, 1023, "tf32")[0], exact), "tf32 mode changed no rank"
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    scenarios = [  # (how the user enables TF32, how the setting reads back)
        (lambda: torch.set_float32_matmul_precision("medium"), torch.get_float32_matmul_precision),
        (lambda: setattr(matmul, "fp32_precision", "tf32"), lambda: matmul.fp32_precision),
    ]
    try:
        for enable, read in scenarios:
            torch.set_float32_matmul_precision("highest")
            matmul.fp32_precision = "none"
            enable()
            setting = read()
            assert torch.equal(ops.retrieval_ranks(x, labels, 1023, "fp32")[0], exact), setting
            assert read() == setting
    finally:
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = "none"


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_inputs_on_a_second_gpu():
    x, labels = clustered(1100, 300)
    expected = reference.retrieval_ranks(x.double(), labels, 5)
    got = ops.retrieval_ranks(x.to("cuda:1"), labels.to("cuda:1"), 5)
    assert got[0].device == torch.device("cuda:1")
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
