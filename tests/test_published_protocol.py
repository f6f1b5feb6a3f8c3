"""The published code's retrieval metrics (idml.published_protocol) beside the project's."""

import math

import pytest
import torch
from tiny_runs import TINY_DIGITS_RUN

from idml.metrics import compute_metrics
from idml.published_protocol import list_length, published_metrics


def on_circle(degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


def project_metrics(embeddings, labels, ks):
    return compute_metrics(embeddings, labels, ks=ks, clustering=False)


def test_lists_as_long_as_the_largest_class_truncate_recall_at_larger_k():
    # Angles chosen without ties; each query's first same-class neighbour (worked out by hand) is
    # at rank 3, 4, 5, 3, 4, 3, 3. The largest class has 3 images, so the published lists hold 3.
    embeddings = on_circle([0, 10, 22, 30, 100, 110, 205])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    ks = (1, 2, 4, 8)
    assert list_length(labels) == 3
    published, project = published_metrics(embeddings, labels, ks), project_metrics(embeddings, labels, ks)
    assert published["R@1"] == project["R@1"] == 0 and published["R@2"] == project["R@2"] == 0
    assert project["R@4"] == pytest.approx(6 / 7) and project["R@8"] == pytest.approx(1.0)
    assert published["R@4"] == published["R@8"] == pytest.approx(4 / 7)  # both really R@3


def test_where_the_lists_are_long_enough_both_protocols_agree():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(10)  # L = 10 >= every k
    embeddings = torch.randn(8, 16, generator=g)[labels] + 1.5 * torch.randn(80, 16, generator=g)
    ks = (1, 2, 4, 8)
    published, project = published_metrics(embeddings, labels, ks), project_metrics(embeddings, labels, ks)
    assert set(published) == set(project) == {"R@1", "R@2", "R@4", "R@8", "RP", "MAP@R"}
    assert 0.2 < published["MAP@R"] < 0.9  # neither trivial nor perfect
    for name in published:
        assert published[name] == pytest.approx(project[name], abs=1e-9), name


def test_a_duplicate_of_lower_index_is_dropped_and_the_query_counts_itself():
    # Rows 0 and 1 are the same point in different classes: for query 1 both lie at distance 0, the
    # lower index ranks first and is dropped as published, so query 1 finds itself (a hit). The
    # project leaves every query out of its own list.
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    published, project = published_metrics(embeddings, labels, (1, 2)), project_metrics(embeddings, labels, (1, 2))
    assert published["R@1"] == pytest.approx(1 / 4) and project["R@1"] == 0
    assert published["R@2"] == project["R@2"] == pytest.approx(3 / 4)
    assert published["RP"] == published["MAP@R"] == pytest.approx(1 / 4)


def test_among_equal_distances_the_lower_indices_are_listed():
    # Twelve copies of one point, three per class: every query's list is rows 1, 2, 3 (row 0 dropped),
    # labels 0, 0, 1, so classes 0 and 1 find their label within 3 and classes 2 and 3 do not. The
    # project lists the three lowest rows other than the query: only class 0 finds its label.
    embeddings = torch.tensor([[1.0, 0.0]]).repeat(12, 1)
    labels = torch.arange(4).repeat_interleave(3)
    published, project = published_metrics(embeddings, labels, (1, 3)), project_metrics(embeddings, labels, (1, 3))
    assert published["R@1"] == project["R@1"] == pytest.approx(3 / 12)
    assert published["R@3"] == pytest.approx(6 / 12) and project["R@3"] == pytest.approx(3 / 12)


def published_by_scikit_learn(embeddings, labels, ks):
    """The published definitions, written out over scikit-learn's neighbour lists (no ties here)."""
    neighbors = pytest.importorskip("sklearn.neighbors")
    x = torch.nn.functional.normalize(embeddings, dim=1).numpy()
    labels = labels.tolist()
    sizes = {label: labels.count(label) for label in labels}
    length = min(1023, max(sizes.values()))
    lists = neighbors.NearestNeighbors(n_neighbors=length + 1).fit(x).kneighbors(x, length + 1)[1][:, 1:]
    found = [[labels[j] == labels[i] for j in row] for i, row in enumerate(lists)]
    result = {f"R@{k}": sum(any(row[:k]) for row in found) / len(found) for k in ks}
    precisions, averages = [], []
    for i, row in enumerate(found):
        r = min(sizes[labels[i]] - 1, length)
        if r == 0:
            continue
        precisions.append(sum(row[:r]) / r)
        averages.append(sum(sum(row[: j + 1]) / (j + 1) for j in range(r) if row[j]) / r)
    return {**result, "RP": sum(precisions) / len(precisions), "MAP@R": sum(averages) / len(averages)}


def test_equals_the_published_definitions_over_scikit_learn_neighbours():
    g = torch.Generator().manual_seed(1)
    sizes = [1, 2, 3, 5, 7, 4, 2, 6]  # a class alone (no RP / MAP@R of its query), L = 7 < 8 and 16
    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    embeddings = torch.randn(len(sizes), 12, generator=g)[labels] + torch.randn(len(labels), 12, generator=g)
    ks = (1, 2, 4, 8, 16)
    expected = published_by_scikit_learn(embeddings, labels, ks)
    got = published_metrics(embeddings, labels, ks)
    assert got["R@8"] == got["R@16"]
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def test_blocks_of_queries_give_the_same_lists(monkeypatch):
    from idml import published_protocol

    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 6, (50,), generator=g)
    embeddings = torch.randn(50, 8, generator=g)
    whole = published_metrics(embeddings, labels)
    monkeypatch.setattr(published_protocol, "CHUNK_BYTES", 8 * 50 * 7)  # blocks of 7 queries
    assert published_metrics(embeddings, labels) == whole


@pytest.mark.slow
def test_evaluate_gives_both_sets_named_apart(tmp_path, capsys):
    import glob
    import json

    from idml.cli import evaluate_main, train_config
    from idml.train import train

    state = train(train_config([*TINY_DIGITS_RUN, "--max-steps", "1", "--LOG_DIR", str(tmp_path / "logs")]))
    (checkpoint,) = glob.glob(str(tmp_path / "logs" / "logs_digits" / "*" / "checkpoint_last.pt"))
    capsys.readouterr()
    evaluate_main(["--resume", checkpoint, "--workers", "0", "--kmeans-runs", "1", "--json", "--published-protocol"])
    both = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(both) == {"project", "published_protocol", "published_list_length"}
    trained = state.history[-1]  # (the reloaded model's embeddings may differ from training's by rounding)
    for name in ("R@1", "R@2", "R@4", "R@8", "RP", "MAP@R"):
        assert both["project"][name] == pytest.approx(trained[name], abs=1e-4), name
    assert set(both["published_protocol"]) == {"R@1", "R@2", "R@4", "R@8", "RP", "MAP@R"}
    assert both["published_list_length"] >= 8  # digits' test classes are large: no R@K is truncated
    for name in both["published_protocol"]:  # near-ties (float64 distances here) and duplicates may differ
        assert both["published_protocol"][name] == pytest.approx(both["project"][name], abs=1e-3), name


def test_evaluate_text_names_the_two_sets(monkeypatch, capsys):
    from idml import evaluate
    from idml.cli import evaluate_main

    project = {"R@1": 0.5, "R@10": 0.7, "R@100": 0.99, "RP": 0.3, "MAP@R": 0.2, "NMI": 0.8, "F1": 0.4}
    published = {"R@1": 0.5, "R@10": 0.7, "R@100": 0.9, "RP": 0.3, "MAP@R": 0.2}
    both = {"project": project, "published_protocol": published, "published_list_length": 12}
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda args: (both, []))
    evaluate_main(["--resume", "unused.pt", "--published-protocol"])
    text = capsys.readouterr().out
    assert text.index("project's metrics:\nR@1     50.00\n") < text.index("published protocol (neighbour lists of 12")
    assert "R@100   99.00\n" in text and "R@100   90.00\n" in text and text.count("NMI ") == 1
