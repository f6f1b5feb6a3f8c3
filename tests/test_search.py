"""scripts/search.py on a generated gallery: the query's own image first, the cached index
reused and rebuilt when the folder changes, the uncertainty flag."""

import json
import os
import subprocess
import sys

import pytest
import torch

from idml.cli import run_guarded, search_main
from idml.config import DataConfig
from idml.data.synthetic import _class_image
from idml.errors import UsageError
from idml.export import build_exported, save_scripted
from idml.models import IDMLNet
from idml.search import INDEX_NAME, uncertainty_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}


def write_gallery(folder, num_classes=3, per_class=4, seed=0):
    """JPEGs of varied sizes (one subfolder per class) and one grey PNG."""
    import numpy as np

    rng = np.random.default_rng(seed)
    paths = []
    for label in range(num_classes):
        for number in range(per_class):
            path = os.path.join(folder, f"class{label}", f"{number}.jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _class_image(rng, label, num_classes).save(path, "JPEG", quality=90)
            paths.append(path)
    grey = os.path.join(folder, "grey.png")
    _class_image(rng, 0, num_classes).convert("L").save(grey)
    paths.append(grey)
    open(os.path.join(folder, "notes.txt"), "w").write("not an image")
    return paths


def write_model(path, uncertainty):
    torch.manual_seed(0)
    model = IDMLNet("resnet18", 16, "none", uncertainty=uncertainty).eval()
    _, scripted = build_exported(model, DataConfig(dataset="cub", image_size=32))
    save_scripted(scripted, path)


def search(*args):
    """scripts/search.py in a fresh process."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "search.py"), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def search_here(capsys, *args, code=0):
    """scripts/search.py's main in this process (faster): (stdout, stderr)."""
    capsys.readouterr()
    assert run_guarded(search_main, list(args)) == code
    return capsys.readouterr()


@pytest.fixture(scope="module")
def softplus_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    write_model(path, "softplus")
    return path


def test_query_from_the_gallery_comes_back_first(tmp_path, softplus_model, capsys):
    gallery = str(tmp_path / "gallery")
    paths = write_gallery(gallery)
    query = paths[5]
    first = search("--model", softplus_model, "--gallery", gallery, "--query", query, "-k", "3", "--device", "cpu")
    assert "indexed 13 images" in first.stdout
    assert "embedding" in first.stderr  # the progress bar
    ranked = [line.split() for line in first.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(ranked) == 3
    assert ranked[0][0] == "1" and ranked[0][2] == query and float(ranked[0][1]) == pytest.approx(1.0, abs=1e-4)
    assert float(ranked[1][1]) <= float(ranked[0][1])
    assert os.path.isfile(os.path.join(gallery, INDEX_NAME))

    # Second search: the cached index; every query of the gallery finds itself first (JSON output).
    again = search_here(capsys, "--model", softplus_model, "--gallery", gallery, "--query", *paths, "-k", "2", "--json")
    assert "cached index of 13 images" in again.err
    results = [json.loads(line) for line in again.out.splitlines()]
    assert [r["neighbours"][0]["path"] for r in results] == paths
    assert all(r["uncertainty_mode"] == "softplus" and r["uncertainty"] > 0 for r in results)

    # A new image: the index is rebuilt and finds it.
    extra = os.path.join(gallery, "class1", "new.jpg")
    from PIL import Image

    Image.open(paths[0]).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(extra)
    rebuilt = search_here(capsys, "--model", softplus_model, "--gallery", gallery, "--query", extra, "-k", "1")
    assert "indexed 14 images" in rebuilt.out and extra in rebuilt.out


def test_normalized_model_says_its_uncertainty_is_uninformative(tmp_path, capsys):
    model = str(tmp_path / "normalized.pt")
    write_model(model, "normalized")
    gallery = str(tmp_path / "gallery")
    paths = write_gallery(gallery, num_classes=2, per_class=2)
    result = search_here(capsys, "--model", model, "--gallery", gallery, "--query", paths[0], "-k", "2")
    assert "not informative" in result.out and "HIGH UNCERTAINTY" not in result.out


def test_uncertainty_flag_above_the_gallery_percentile():
    gallery = torch.arange(1, 101, dtype=torch.float32)
    line, flagged = uncertainty_report(99.0, gallery, "relu", 95.0)
    assert flagged and line.startswith("HIGH UNCERTAINTY")
    line, flagged = uncertainty_report(50.0, gallery, "relu", 95.0)
    assert not flagged and "median" in line


def test_bad_arguments_exit_2(tmp_path, softplus_model, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    image = write_gallery(str(tmp_path / "gallery"), num_classes=1, per_class=1)[0]
    for args, expected in [
        (["--gallery", str(empty), "--query", softplus_model], "is not a readable image"),
        (["--gallery", str(tmp_path / "none"), "--query", image], "is not a folder"),
        (["--gallery", str(empty), "--query", image], "holds no images"),
    ]:
        result = search_here(capsys, "--model", softplus_model, *args, code=2)
        assert expected in result.err
    foreign = str(tmp_path / "foreign.pt")
    torch.jit.script(torch.nn.Linear(3, 2)).save(foreign)
    for model, expected in [
        (foreign, "is a TorchScript module, but not one written by scripts/export.py"),
        (str(empty), f"{empty} is a folder"),
    ]:
        result = search_here(capsys, "--model", model, "--gallery", str(empty), "--query", image, code=2)
        assert expected in result.err


def test_a_gallery_that_cannot_hold_the_index_is_still_searched(tmp_path, softplus_model, capsys, monkeypatch):
    def read_only(path, write, mode="wb"):
        raise UsageError(f"cannot write {path} (Read-only file system)")

    gallery = str(tmp_path / "gallery")
    query = write_gallery(gallery)[0]
    monkeypatch.setattr("idml.search.atomic_write", read_only)
    with pytest.warns(UserWarning, match="could not cache the index .*Read-only file system"):
        result = search_here(capsys, "--model", softplus_model, "--gallery", gallery, "--query", query, "-k", "2")
    assert "indexed (not cached) 13 images" in result.out
    assert not os.path.exists(os.path.join(gallery, INDEX_NAME))
