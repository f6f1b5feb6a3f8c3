"""Plots: a short run writes loss_recall.png and uncertainty_histogram.png; scripts/evaluate.py
--plots writes recall_at_k.png and query_grid.png; all valid PNGs."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tiny_runs import TINY_DIGITS_RUN

from idml.cli import train_config
from idml.plots import nearest_neighbours, query_grid_plot, recall_curve_ks
from idml.train import train

pytestmark = pytest.mark.slow  # trains a tiny run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_size=(200, 150)):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


def test_run_and_evaluation_plots_are_valid_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    train(train_config(TINY_DIGITS_RUN + ["--uncertainty", "relu", "--LOG_DIR", str(tmp_path / "logs")]))
    run_dir = glob.glob(str(tmp_path / "logs" / "logs_digits" / "*"))[0]
    assert_png(os.path.join(run_dir, "loss_recall.png"))
    assert_png(os.path.join(run_dir, "uncertainty_histogram.png"))

    plots = tmp_path / "plots"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "evaluate.py"),
            "--resume",
            os.path.join(run_dir, "checkpoint_last.pt"),
            "--workers",
            "0",
            "--json",
            "--plots",
            str(plots),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert '"R@1"' in result.stdout.strip().splitlines()[-1]
    assert_png(str(plots / "recall_at_k.png"))
    assert_png(str(plots / "query_grid.png"))


def test_query_grid_of_image_files_frames_right_and_wrong(tmp_path):
    """Photos are shown from their files; a neighbour of the query's class is framed green."""
    pytest.importorskip("matplotlib")
    from idml.data.datasets import ImageFileDataset, cub_split
    from idml.data.synthetic import write_cub

    write_cub(str(tmp_path / "data"), 4, 3)
    dataset = ImageFileDataset(cub_split(str(tmp_path / "data"), train=False))
    labels = torch.tensor(dataset.labels)
    embeddings = torch.nn.functional.one_hot(labels).float() + 0.01 * torch.randn(len(labels), 2)
    path = query_grid_plot(str(tmp_path / "grid.png"), dataset, embeddings, labels, num_queries=3, k=3)
    assert_png(path)
    neighbours = nearest_neighbours(embeddings, torch.arange(len(labels)), 2)
    assert (labels[neighbours] == labels[:, None]).all()  # two other images of each class, found first
    assert (neighbours != torch.arange(len(labels))[:, None]).all()


def test_recall_curve_ks():
    assert recall_curve_ks(10) == [1, 2, 4, 8]
    assert recall_curve_ks(5000)[-1] == 1024


def test_without_matplotlib_plots_are_skipped_with_one_note(monkeypatch, tmp_path, recwarn):
    from idml import plots

    monkeypatch.setattr(plots, "_warned", False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    history = [{"epoch": 0, "loss": None, "R@1": 0.5}, {"epoch": 1, "loss": 1.0, "R@1": 0.6}]
    assert plots.history_plot(str(tmp_path), history) is None
    assert plots.history_plot(str(tmp_path), history) is None
    assert sum("matplotlib is not installed" in str(w.message) for w in recwarn) == 1
    assert not os.listdir(tmp_path)
