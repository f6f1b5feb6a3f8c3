"""Bad input to the tools and the data layer (issue #21, "nothing silently wrong"): each case
ends with one sentence and exit code 2, or one warning, and never destroys data. The
commands run in this process (idml.cli's mains under run_guarded), on tiny files."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from idml.cli import export_main, run_guarded, search_main, synthetic_main
from idml.config import TrainConfig
from idml.data.datasets import cub_split, custom_split
from idml.errors import UsageError
from idml.metrics import compute_metrics
from idml.models import IDMLNet

MODEL_ARGS = {
    "dataset": "cub",
    "image_size": 32,
    "model": "resnet18",
    "embedding_size": 8,
    "l2_norm": 1,
    "uncertainty": "softplus",
    "bn_freeze": 1,
}


def refused(capsys, main, *args) -> str:
    """main(args) under the command line's guard: exit code 2 and one line on stderr (after
    any progress bar), returned."""
    capsys.readouterr()
    assert run_guarded(main, [str(a) for a in args]) == 2
    err = capsys.readouterr().err
    line = err.rstrip("\n").split("\n")[-1]
    assert line.startswith("error: ") and "Traceback" not in err, err
    return line


def tiny_model(nan_outputs: bool = False) -> IDMLNet:
    """Finite weights throughout; with `nan_outputs` a negative BatchNorm variance makes every
    output NaN (what a damaged or diverged run can leave)."""
    torch.manual_seed(0)
    model = IDMLNet("resnet18", 8, "none", uncertainty="softplus").eval()
    if nan_outputs:
        model.backbone.bn1.running_var.fill_(-1.0)
    return model


def write_images(folder, count, size=(40, 30)):
    rng = np.random.default_rng(len(str(folder)))
    paths = []
    for number in range(count):
        path = os.path.join(folder, f"{number}.jpg")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")
        paths.append(path)
    return paths


def truncated_copy(source, path):
    """The first half of `source`: the header reads fine, decoding fails."""
    data = open(source, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return str(path)


def exported_model(path, nan_outputs=False):
    """An exported module written directly (as an older export would have, unchecked)."""
    from idml.export import build_exported, save_scripted

    _, scripted = build_exported(tiny_model(nan_outputs), TrainConfig.from_dict(MODEL_ARGS).data)
    save_scripted(scripted, str(path))
    return str(path)


# --- 3: export and search of a model whose outputs are NaN ----------------------------------------


def test_export_refuses_a_model_whose_outputs_are_not_finite(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "format": "idml-checkpoint",
            "version": 1,
            "args": MODEL_ARGS,
            "model": tiny_model(nan_outputs=True).state_dict(),
        },
        checkpoint,
    )
    out = tmp_path / "model.pt"
    err = refused(capsys, export_main, "--resume", checkpoint, "--out", out)
    assert "embedding or uncertainty of a random check batch is NaN or infinite, so it is not exported" in err
    assert not out.exists()


def test_export_refuses_a_checkpoint_with_non_finite_weights(tmp_path, capsys):
    state = tiny_model().state_dict()
    state["semantic.weight"][0, 0] = float("inf")
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"format": "idml-checkpoint", "version": 1, "args": MODEL_ARGS, "model": state}, checkpoint)
    err = refused(capsys, export_main, "--resume", checkpoint, "--out", tmp_path / "model.pt")
    assert "hold NaN or infinite values (e.g. semantic.weight)" in err


def test_search_refuses_a_model_whose_embeddings_are_not_finite(tmp_path, capsys):
    model = exported_model(tmp_path / "nan.pt", nan_outputs=True)
    gallery = write_images(str(tmp_path / "gallery"), 2)
    err = refused(
        capsys,
        search_main,
        "--model",
        model,
        "--gallery",
        tmp_path / "gallery",
        "--query",
        gallery[0],
        "--device",
        "cpu",
    )
    assert "embedding or uncertainty is NaN or infinite for 2 of 2 images" in err and gallery[0] in err
    assert not (tmp_path / "gallery" / ".idml_index.pt").exists()


# --- 4: synthetic.py never writes over or among real data --------------------------------------


def tree(folder):
    """{relative path: bytes} of every file under `folder`."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


@pytest.mark.parametrize(
    "layout, real",
    [
        ("cars", {"cars196/cars_annos.mat": b"real annotations", "cars196/car_ims/000001.jpg": b"real car"}),
        ("sop", {"Stanford_Online_Products/Ebay_train.txt": b"real list"}),
        ("cub", {"CUB_200_2011/images/001.Black_footed_Albatross/a.jpg": b"real bird"}),
    ],
)
def test_synthetic_refuses_a_real_data_root_even_with_force(tmp_path, capsys, layout, real):
    for name, data in real.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(data)
    args = ["--layout", layout, "--out", tmp_path, "--classes", "4", "--per-class", "1"]
    assert "is not empty: synthetic.py writes only into a new or empty folder" in refused(capsys, synthetic_main, *args)
    assert "did not write (it has no .idml-synthetic file)" in refused(capsys, synthetic_main, *args, "--force")
    assert tree(tmp_path) == real


def test_synthetic_force_rewrites_only_its_own_folder(tmp_path, capsys):
    out = tmp_path / "synthetic"
    args = ["--layout", "cub", "--out", out, "--per-class", "1"]
    assert run_guarded(synthetic_main, [str(a) for a in args + ["--classes", "8"]]) == 0
    assert (out / ".idml-synthetic").is_file()
    assert "--force rewrites" in refused(capsys, synthetic_main, *args, "--classes", "4")
    # Fewer classes: the old class folders go, so the split is the one a fresh run writes.
    assert run_guarded(synthetic_main, [str(a) for a in args + ["--classes", "4", "--force"]]) == 0
    fresh = tmp_path / "fresh"
    assert (
        run_guarded(
            synthetic_main, [str(a) for a in ["--layout", "cub", "--out", fresh, "--per-class", "1", "--classes", "4"]]
        )
        == 0
    )
    assert tree(out).keys() == tree(fresh).keys()
    assert len(cub_split(str(out), train=False)) == 2
    # A file put there since is not the tool's: --force leaves the whole folder alone.
    (out / "CUB_200_2011" / "images" / "mine.txt").write_text("mine")
    before = tree(out)
    err = refused(capsys, synthetic_main, *args, "--classes", "4", "--force")
    assert "holds 1 files synthetic.py did not write (e.g. CUB_200_2011/images/mine.txt)" in err
    assert tree(out) == before


# --- 5: unreadable images and list files: one sentence or one warning ----------------------------


def test_search_skips_truncated_gallery_images_and_remembers_them(tmp_path, capsys):
    model = exported_model(tmp_path / "model.pt")
    gallery = tmp_path / "gallery"
    good = write_images(str(gallery), 3)
    broken_jpeg = truncated_copy(good[0], gallery / "broken.jpg")
    Image.open(good[1]).save(gallery / "whole.png")
    broken_png = truncated_copy(gallery / "whole.png", gallery / "broken.png")
    os.unlink(gallery / "whole.png")
    args = [str(a) for a in ("--model", model, "--gallery", gallery, "--query", good[2], "-k", "1", "--device", "cpu")]
    with pytest.warns(UserWarning) as caught:
        assert run_guarded(search_main, args) == 0
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(skipped) == 2 and broken_jpeg in " ".join(skipped) and broken_png in " ".join(skipped)
    out = capsys.readouterr().out
    assert "indexed 3 images" in out and good[2] in out.splitlines()[-1]
    with warnings.catch_warnings():  # the cached index: the broken files are not decoded again
        warnings.simplefilter("error")
        assert run_guarded(search_main, args) == 0
    out = capsys.readouterr().out
    assert "cached index of 3 images" in out and "2 unreadable files left out" in out and broken_png in out


def test_search_refuses_a_truncated_query(tmp_path, capsys):
    model = exported_model(tmp_path / "model.pt")
    good = write_images(str(tmp_path / "gallery"), 2)
    query = truncated_copy(good[0], tmp_path / "query.jpg")
    err = refused(
        capsys, search_main, "--model", model, "--gallery", tmp_path / "gallery", "--query", query, "--device", "cpu"
    )
    assert f"--query expects image files; {query} is not a readable image (image file is truncated" in err


def write_lists(root, train_lines, test_lines):
    """train.txt and test.txt (bytes) under root, with the images they name that lie under it."""
    for lines in (train_lines, test_lines):
        for line in lines:
            path = os.path.normpath(line.rpartition(b" ")[0].decode("utf-8", "replace"))
            if line.count(b" ") and not os.path.isabs(path) and not path.startswith(".."):
                os.makedirs(
                    os.path.dirname(os.path.join(root, line.rpartition(b" ")[0].decode("utf-8", "replace"))),
                    exist_ok=True,
                )
                Image.new("RGB", (8, 8)).save(os.path.join(root, path), "JPEG")
    (root / "train.txt").write_bytes(b"\n".join(train_lines) + b"\n")
    (root / "test.txt").write_bytes(b"\n".join(test_lines) + b"\n")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b"a/caf\xe9.jpg 1", r"line 2 of .*train.txt is not UTF-8 text \(byte 0xe9 at column 6\)"),
        ("a/two.jpg \u00b2".encode(), r"line 2 of .*train.txt should read 'relative/path.jpg class_id'"),
        ("a/two.jpg \u0663".encode(), r"line 2 of .*train.txt should read 'relative/path.jpg class_id'"),
        (b"a/two.jpg", r"line 2 of .*train.txt should read 'relative/path.jpg class_id'"),
        (b"a/two.jpg -1", r"class id -1 on line 2 of .*train.txt is out of range"),
        # 6: paths outside --data-root
        (b"../../etc/passwd 1", r"line 2 of .*train.txt names ../../etc/passwd, which lies outside --data-root"),
        (b"a/../../x.jpg 1", r"line 2 of .*train.txt names a/../../x.jpg, which lies outside --data-root"),
        (b"/etc/passwd 1", r"line 2 of .*train.txt names /etc/passwd, which lies outside --data-root"),
    ],
)
def test_custom_list_lines_are_refused_naming_file_and_line(tmp_path, bad_line, message):
    write_lists(tmp_path, [b"a/one.jpg 0", bad_line], [b"b/one.jpg 5", b"b/two.jpg 6"])
    with pytest.raises(UsageError, match=message):
        custom_split(str(tmp_path), train=True)


def test_custom_paths_inside_the_root_still_load(tmp_path):
    write_lists(
        tmp_path,
        [b"a/one.jpg 0", "a/caf\u00e9.jpg 1".encode(), b"a/./b/../two.jpg 2"],
        [b"b/one.jpg 5", b"b/two.jpg 6"],
    )
    assert [label for _, label in custom_split(str(tmp_path), train=True)] == [0, 1, 2]


# --- 8 and 6: degenerate evaluations ----------------------------------------------------------


def test_one_test_class_is_refused_not_scored_one():
    embeddings = torch.randn(6, 4)
    with pytest.raises(
        UsageError, match="the test set holds 1 class, so retrieval and clustering metrics are undefined"
    ):
        compute_metrics(embeddings, torch.zeros(6, dtype=torch.long))


def test_singleton_test_classes_are_refused_not_scored_zero():
    with pytest.raises(UsageError, match="every one of the 5 test images is the only one of its class"):
        compute_metrics(torch.randn(5, 4), torch.arange(5), clustering=False)


def test_singleton_queries_are_counted_in_a_warning_and_left_out_of_rp():
    # Two pairs, each image nearest its pair, and two singletons: R@1 = 4/6, RP = MAP@R = 1.
    embeddings = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    with pytest.warns(
        UserWarning,
        match="2 of 6 test images are the only one of their class: as queries they "
        "count as misses in R@K and are left out of RP and MAP@R",
    ):
        result = compute_metrics(embeddings, labels, ks=(1,), clustering=False)
    assert result == {"R@1": pytest.approx(4 / 6), "RP": 1.0, "MAP@R": 1.0}


def test_zero_width_embeddings_are_refused():
    with pytest.raises(UsageError, match=r"N x D embeddings with D >= 1, got shape \(6, 0\)"):
        compute_metrics(torch.zeros(6, 0), torch.tensor([0, 0, 1, 1, 2, 2]))


def test_a_class_folder_that_is_a_link_loop_is_named(tmp_path):
    from idml.data.synthetic import write_cub

    write_cub(str(tmp_path), 4, 1)
    loop = tmp_path / "CUB_200_2011" / "images" / "002.Loop"
    os.symlink(loop, loop)  # points at itself: stat fails with ELOOP
    with pytest.raises(UsageError, match=f"CUB-200-2011: {loop} cannot be opened .*expected a class folder"):
        cub_split(str(tmp_path), train=True)


def test_an_unreadable_class_folder_is_named(tmp_path, monkeypatch):
    from idml.data.synthetic import write_cub

    write_cub(str(tmp_path), 4, 1)
    listdir = os.listdir
    unreadable = str(tmp_path / "CUB_200_2011" / "images" / "001.Synthetic_Bird_1")

    def refuse(path):  # a folder without read permission (tests may run as root, who may read anything)
        if str(path) == unreadable:
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refuse)
    with pytest.raises(UsageError, match=f"cannot read the folder {unreadable} .Permission denied."):
        cub_split(str(tmp_path), train=True)


def test_marker_lists_what_synthetic_wrote(tmp_path):
    assert (
        run_guarded(
            synthetic_main, ["--layout", "sop", "--out", str(tmp_path / "d"), "--classes", "4", "--per-class", "1"]
        )
        == 0
    )
    record = json.loads((tmp_path / "d" / ".idml-synthetic").read_text())
    assert record["complete"] and sorted(record["files"]) == sorted(
        n for n in tree(tmp_path / "d") if n != ".idml-synthetic"
    )
