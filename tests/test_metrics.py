"""idml.metrics.compute_metrics and agreement with pytorch-metric-learning."""

import itertools

import pytest
import torch
import tqdm.std

from idml import cluster, evaluate, metrics, ops, reference
from idml.cli import evaluate_parser, train_parser
from idml.errors import UsageError


def normalised_clusters(n, num_classes, dim=32, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Every class has at least 2 images: no "lone" queries, which PML leaves out of its
    # precision_at_1 while we (like the published code) count them as R@K misses.
    labels = torch.cat(
        [torch.arange(num_classes).repeat(2), torch.randint(num_classes, (n - 2 * num_classes,), generator=g)]
    )
    labels = labels[torch.randperm(n, generator=g)]
    x = torch.randn(num_classes, dim, generator=g)[labels] + noise * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1), labels


@pytest.mark.parametrize("n,num_classes", [(300, 30), (1500, 100), (1200, 12)])
def test_equals_pytorch_metric_learning(n, num_classes):
    accuracy = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    inference = pytest.importorskip("pytorch_metric_learning.utils.inference")
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    x, labels = normalised_clusters(n, num_classes)
    calculator = accuracy.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=inference.CustomKNN(distances.DotProductSimilarity()),
    )
    expected = calculator.get_accuracy(x, labels)
    ours = ops.retrieval_metrics(x, labels, ks=(1,), max_r=n)
    assert ours["R@1"] == pytest.approx(expected["precision_at_1"], abs=1e-9)
    assert ours["RP"] == pytest.approx(expected["r_precision"], abs=1e-9)
    assert ours["MAP@R"] == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-9)


def test_compute_metrics_normalises_then_combines():
    g = torch.Generator().manual_seed(0)
    x, labels = normalised_clusters(600, 20, noise=0.7)
    scaled = x * (0.5 + 3 * torch.rand(600, 1, generator=g))  # normalisation must undo this
    result = metrics.compute_metrics(scaled, labels, ks=(1, 10, 100))
    assert set(result) == {"R@1", "R@10", "R@100", "RP", "MAP@R", "NMI", "F1"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in result.values())
    normalised = reference.l2_normalize(scaled)
    expected = ops.metrics_from_ranks(*reference.retrieval_ranks(normalised.double(), labels), ks=(1, 10, 100))
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key
    ids = cluster.kmeans(normalised, 20, seed=0, runs=10)  # compute_metrics' default
    assert result["NMI"] == cluster.nmi(labels, ids)
    assert result["F1"] == cluster.pairwise_f1(labels, ids)
    assert result["NMI"] > 0.9  # well separated classes


def test_kmeans_runs_default_to_ten_and_to_one_at_sop_size():
    assert evaluate.kmeans_runs("cub") == evaluate.kmeans_runs("digits") == 10
    assert evaluate.kmeans_runs("SOP") == 1
    assert evaluate.kmeans_runs("SOP", 3) == evaluate.kmeans_runs("cars", 3) == 3
    args = train_parser().parse_args(["--kmeans-runs", "4"])
    assert args.kmeans_runs == 4 and evaluate_parser().parse_args(["--resume", "x"]).kmeans_runs is None


def test_compute_metrics_without_clustering():
    x, labels = normalised_clusters(100, 10)
    assert set(metrics.compute_metrics(x, labels, clustering=False)) == {"R@1", "R@2", "R@4", "R@8", "RP", "MAP@R"}


@pytest.mark.cuda
def test_cuda_compute_metrics_equals_cpu():
    x, labels = normalised_clusters(3000, 100)
    on_gpu = metrics.compute_metrics(x.cuda(), labels.cuda())
    on_cpu = metrics.compute_metrics(x, labels)
    for key in ("R@1", "R@2", "R@4", "R@8", "RP", "MAP@R"):
        assert on_gpu[key] == pytest.approx(on_cpu[key], abs=1e-3), key
    assert on_gpu["NMI"] == pytest.approx(on_cpu["NMI"], abs=0.02)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_compute_metrics_refuses_non_finite_embeddings(bad):
    embeddings, labels = torch.randn(20, 8), torch.arange(20) % 4
    embeddings[[3, 11], 2] = bad
    with pytest.raises(UsageError, match="2 of 20 embeddings hold NaN or infinite values"):
        metrics.compute_metrics(embeddings, labels, clustering=False)


def test_progress_bars_name_each_stage_that_lasts_only_when_asked(capsys, monkeypatch):
    x, labels = normalised_clusters(200, 10)
    quiet = metrics.compute_metrics(x, labels)
    assert capsys.readouterr().err == ""
    # Every stage takes milliseconds here: no bar shows, so a log keeps only the results.
    quick = metrics.compute_metrics(x, labels, progress=True)
    assert capsys.readouterr().err == ""
    # A clock that jumps 2 s per reading makes every stage last: each one names itself.
    clock = itertools.count(0.0, 2.0)
    monkeypatch.setattr(tqdm.std, "time", lambda: next(clock))
    slow = metrics.compute_metrics(x, labels, progress=True)
    err = capsys.readouterr().err
    for stage in ("retrieval metrics", "k-means++ seeding", "k-means iterations"):
        assert stage in err, err
    assert slow == quick == quiet
