"""--loader dali (idml/data/dali.py) against the PIL path on the same files: shapes, labels,
pixels, the same crops and flips per draw, exact resumption, unreadable files, and the
command line. Skipped where DALI is not installed; the CPU pipeline runs everywhere else."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from idml.data import build_dataset  # noqa: E402
from idml.data.datasets import ImageFileDataset  # noqa: E402
from idml.data.samplers import BalancedBatchSampler, RandomBatchSampler  # noqa: E402
from idml.data.synthetic import write_cub  # noqa: E402
from idml.data.transforms import eval_transform, train_transform  # noqa: E402
from idml.errors import UsageError  # noqa: E402
from idml.runtime import eval_loader, train_loader  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
SIZE = 64
# (width, height, PIL mode, format): several sizes and aspects, grey, CMYK and RGBA too
FILES = [
    (160, 120, "RGB", "JPEG"),
    (90, 161, "RGB", "JPEG"),
    (64, 64, "RGB", "JPEG"),
    (300, 75, "RGB", "JPEG"),
    (120, 100, "L", "JPEG"),
    (110, 90, "CMYK", "JPEG"),
    (100, 130, "RGBA", "PNG"),
    (140, 105, "RGB", "PNG"),
]
# Measured on these files on the CPU, where DALI decodes and torch resamples with Pillow's
# filter (after normalisation, where one grey level is 1/255/0.224 = 0.0175): mean |DALI - PIL|
# 2e-5 eval, 2e-4 train, at most one grey level in both.
MEAN_TOLERANCE = 0.001
GREY_LEVEL = 1 / 255 / min((0.229, 0.224, 0.225))
ONE_GREY_LEVEL = GREY_LEVEL * 1.0001  # float rounding of the normalisation
# The GPU pipeline resamples with DALI's own filter: about 0.003 on the CPU, nvJPEG adds its IDCT.
GPU_MEAN_TOLERANCE = 0.03


def photo(width, height, seed):
    """Smooth colour fields with a little texture, like a photo at this size."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(smooth + rng.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    items = []
    for i, (width, height, mode, fmt) in enumerate(FILES * 2):
        path = str(folder / f"{i:02d}.{fmt.lower()}")
        photo(width, height, seed=i).convert(mode).save(path, fmt)
        items.append((path, i % 4))
    return items


def load(loader):
    """Every batch of `loader`, images and labels concatenated, and the dropped count."""
    batches = list(loader)
    images = torch.cat([b[0] for b in batches if b[0] is not None])
    labels = torch.cat([b[1] for b in batches if b[1] is not None])
    return images, labels, sum(len(b[2]) for b in batches), [b[0].shape[0] for b in batches if b[0] is not None]


def test_eval_matches_pils_eval_transform(items):
    dataset = ImageFileDataset(items, eval_transform(SIZE))
    pil_images, pil_labels, _, pil_sizes = load(eval_loader(dataset, 5, 0, CPU, "pil", SIZE))
    images, labels, dropped, sizes = load(eval_loader(dataset, 5, 0, CPU, "dali", SIZE))
    assert images.shape == pil_images.shape == (len(items), 3, SIZE, SIZE) and images.dtype == torch.float32
    assert sizes == pil_sizes == [5, 5, 5, 1] and dropped == 0
    assert torch.equal(labels, pil_labels)
    difference = (images - pil_images).abs()
    assert difference.mean() < MEAN_TOLERANCE and difference.max() <= ONE_GREY_LEVEL, difference.max()


@pytest.mark.parametrize(
    "sampler",
    [
        lambda labels: RandomBatchSampler(labels, 6, seed=3),
        lambda labels: BalancedBatchSampler(labels, 8, images_per_class=2, seed=3, rank=1, world_size=2),
    ],
)
def test_train_crops_and_flips_each_draw_as_the_pil_path_does(items, sampler):
    dataset = ImageFileDataset(items, train_transform(SIZE))
    sampler = sampler(dataset.labels)
    sampler.set_epoch(1)
    pil_images, pil_labels, _, pil_sizes = load(train_loader("pil", dataset, sampler, 5, 0, CPU, SIZE))
    images, labels, _, sizes = load(train_loader("dali", dataset, sampler, 5, 0, CPU, SIZE))
    assert images.shape == pil_images.shape and sizes == pil_sizes == [sampler.rank_batch_size] * len(sampler)
    assert torch.equal(labels, pil_labels)
    difference = (images - pil_images).abs()  # the same boxes and flips, another JPEG decoder
    assert difference.mean() < MEAN_TOLERANCE and difference.max() <= ONE_GREY_LEVEL, difference.max()
    assert -2.2 < images.min() and images.max() < 2.7  # ImageNet-normalised [0, 1]
    other_seed, _, _, _ = load(train_loader("dali", dataset, sampler, 6, 0, CPU, SIZE))
    assert (other_seed - images).abs().mean() > 0.1  # other draws: other crops and flips


def test_the_gpu_graph_places_the_same_boxes_and_flips(items):
    """DaliResampling, the GPU pipeline's graph (DALI resizes, crops, flips, normalises), run
    with DALI's CPU decoder: its arguments give the PIL path's boxes, flips and centre crops
    within DALI's own filter's difference (measured: mean 0.0031, at most two grey levels)."""
    from idml.data.dali import DaliResampling

    dataset = ImageFileDataset(items, eval_transform(SIZE))
    loaders = [(eval_loader(dataset, 5, 0, CPU, "pil", SIZE), eval_loader(dataset, 5, 0, CPU, "dali", SIZE))]
    dataset = ImageFileDataset(items, train_transform(SIZE))
    sampler = RandomBatchSampler(dataset.labels, 6, seed=3)
    loaders.append(
        (
            train_loader("pil", dataset, sampler, 5, 0, CPU, SIZE),
            train_loader("dali", dataset, sampler, 5, 0, CPU, SIZE),
        )
    )
    for train, (pil, dali) in enumerate(loaders):
        dali.resampling = DaliResampling(dali.dali, bool(train), SIZE, CPU)
        difference = (load(dali)[0] - load(pil)[0]).abs()
        assert difference.mean() < 0.005 and difference.max() <= 2 * ONE_GREY_LEVEL, (train, difference.max())


def test_resuming_mid_epoch_gives_the_same_pixels(items):
    dataset = ImageFileDataset(items, train_transform(SIZE))
    sampler = RandomBatchSampler(dataset.labels, 4, seed=1)
    loader = train_loader("dali", dataset, sampler, 1, 2, CPU, SIZE)
    sampler.set_epoch(2)
    whole = list(loader)
    sampler.set_epoch(2, start_step=2)
    rest = list(loader)
    assert len(rest) == len(whole) - 2
    for (images, labels, _), (expected, expected_labels, _) in zip(rest, whole[2:]):
        assert torch.equal(images, expected) and torch.equal(labels, expected_labels)


def test_an_epoch_left_early_does_not_leak_into_the_next(items):
    dataset = ImageFileDataset(items, eval_transform(SIZE))
    loader = eval_loader(dataset, 3, 0, CPU, "dali", SIZE)
    first = next(iter(loader))
    for _ in iter(loader):
        break
    again = next(iter(loader))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def truncate(path, out):
    """A copy of the JPEG `path` cut in half: its header is valid, only decoding fails."""
    data = open(path, "rb").read()
    open(out, "wb").write(data[: len(data) // 2])
    return str(out)


def test_unreadable_files_are_skipped_and_counted(items, tmp_path):
    good = items[:4]
    not_an_image, truncated = str(tmp_path / "text.jpg"), truncate(good[0][0], tmp_path / "truncated.jpg")
    open(not_an_image, "w").write("not an image")
    # batches of 2: one file PIL cannot identify, one DALI cannot decode, nothing readable, all good
    listed = [
        (not_an_image, 0),
        good[0],
        good[1],
        (truncated, 1),
        (not_an_image, 2),
        (not_an_image, 3),
        good[2],
        good[3],
    ]
    dataset = ImageFileDataset(listed, eval_transform(SIZE))
    with pytest.warns(UserWarning) as caught:
        batches = list(eval_loader(dataset, 2, 0, CPU, "dali", SIZE))
    messages = " ".join(str(w.message) for w in caught)
    assert "skipping unreadable image" in messages and "text.jpg" in messages and "truncated.jpg" in messages
    assert "decoding that batch with PIL" in messages  # the batch holding the truncated file
    assert [len(b[2]) for b in batches] == [1, 1, 2, 0]
    assert [b[1].tolist() for b in batches if b[1] is not None] == [[0], [1], [2, 3]]
    assert batches[2][:2] == (None, None)
    pil_images, _, _, _ = load(eval_loader(ImageFileDataset(good, eval_transform(SIZE)), 4, 0, CPU, "pil", SIZE))
    images = torch.cat([b[0] for b in batches if b[0] is not None])
    assert (images - pil_images).abs().mean() < MEAN_TOLERANCE
    # nothing readable in the first and in the last batch: still in order
    listed = [(not_an_image, 0), (not_an_image, 1), good[0], good[1], (not_an_image, 2), (not_an_image, 3)]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = list(eval_loader(ImageFileDataset(listed, eval_transform(SIZE)), 2, 0, CPU, "dali", SIZE))
    assert [(b[1] if b[1] is None else b[1].tolist(), b[2]) for b in batches] == [
        (None, (not_an_image, not_an_image)),
        ([0, 1], ()),
        (None, (not_an_image, not_an_image)),
    ]


def test_a_training_batch_dali_cannot_decode_is_the_pil_paths_batch(items, tmp_path):
    listed = items[:5] + [(truncate(items[0][0], tmp_path / "truncated.jpg"), 1)]
    dataset = ImageFileDataset(listed, train_transform(SIZE))
    sampler = RandomBatchSampler(dataset.labels, 3, seed=2)
    with pytest.warns(UserWarning, match="truncated.jpg"):
        pil = list(train_loader("pil", dataset, sampler, 4, 0, CPU, SIZE))
    with pytest.warns(UserWarning) as caught:
        dali = list(train_loader("dali", dataset, sampler, 4, 0, CPU, SIZE))
    assert any("decoding that batch with PIL" in str(w.message) for w in caught)
    assert [b[2] for b in dali] == [b[2] for b in pil] and sorted(len(b[2]) for b in dali) == [0, 1]
    for (images, labels, dropped), (pil_images, pil_labels, _) in zip(dali, pil):
        assert torch.equal(labels, pil_labels)
        assert torch.equal(images, pil_images) if dropped else (images - pil_images).abs().mean() < MEAN_TOLERANCE


def test_digits_and_missing_dali_are_refused_with_what_to_do(monkeypatch):
    with pytest.raises(UsageError, match="--dataset digits is embedded in memory: use --loader pil"):
        eval_loader(build_dataset("digits", "", train=False, image_size=16), 8, 0, CPU, "dali", 16)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now fails
    dataset = ImageFileDataset([("unused.jpg", 0)], eval_transform(SIZE))
    with pytest.raises(UsageError, match="needs NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130"):
        eval_loader(dataset, 8, 0, CPU, "dali", SIZE)


@pytest.mark.cuda
def test_gpu_pipeline_yields_on_the_gpu_close_to_pil(items):
    """The "mixed" decoder (nvJPEG); its IDCT and chroma upsampling are not libjpeg's, so
    the bound is looser (not yet measured: no GPU machine has had DALI)."""
    cuda = torch.device("cuda")
    dataset = ImageFileDataset(items, eval_transform(SIZE))
    pil_images, pil_labels, _, _ = load(eval_loader(dataset, 5, 0, CPU, "pil", SIZE))
    images, labels, _, _ = load(eval_loader(dataset, 5, 2, cuda, "dali", SIZE))
    assert images.device.type == "cuda" and torch.equal(labels, pil_labels)
    assert (images.cpu() - pil_images).abs().mean() < GPU_MEAN_TOLERANCE


def run(script, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_training_and_evaluation_end_to_end(tmp_path):
    write_cub(str(tmp_path), 4, 6)
    common = ["--dataset", "cub", "--data-root", str(tmp_path), "--loader", "dali", "--workers", "0"]
    result = run(
        "train.py",
        *common,
        "--model",
        "resnet18",
        "--pretrained",
        "none",
        "--embedding-size",
        "16",
        "--image-size",
        "32",
        "--batch-size",
        "6",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--warm",
        "0",
        "--wandb",
        "disabled",
        "--eval-clustering",
        "0",
        "--LOG_DIR",
        str(tmp_path / "logs"),
    )
    assert result.returncode == 0, result.stderr
    run_dir = os.path.join(tmp_path, "logs", "logs_cub", os.listdir(tmp_path / "logs" / "logs_cub")[0])
    history = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [entry["epoch"] for entry in history] == [0, 1] and history[1]["loss"] > 0
    result = run("evaluate.py", *common, "--resume", os.path.join(run_dir, "checkpoint_last.pt"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["R@1"] == history[1]["R@1"]


@pytest.mark.slow
def test_digits_with_dali_exits_2_with_one_sentence():
    result = run("train.py", "--loader", "dali", "--pretrained", "none", "--model", "resnet18", "--wandb", "disabled")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: --loader dali decodes image files, and --dataset digits is embedded in memory: use --loader pil for it"
    )


def test_a_file_dali_cannot_decode_is_decided_once_and_warned_about_once(items, tmp_path):
    """A GIF named .jpg goes to PIL from the start, with one warning in all, the others of its
    batch to DALI; a truncated JPEG is decoded once, then dropped without another try."""
    gif = str(tmp_path / "animation.jpg")
    photo(70, 50, seed=9).convert("P").save(gif, "GIF")
    truncated = truncate(items[0][0], tmp_path / "truncated.jpg")
    listed = items[:3] + [(gif, 1)] + items[3:5] + [(truncated, 2)]
    dataset = ImageFileDataset(listed, eval_transform(SIZE))
    loader = eval_loader(dataset, 4, 0, CPU, "dali", SIZE)
    with pytest.warns(UserWarning) as caught:
        first = list(loader)
    messages = [str(w.message) for w in caught]
    assert sum(gif in m and "GIF file, which DALI does not decode" in m for m in messages) == 1, messages
    assert sum("truncated.jpg" in m for m in messages) == 1, messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next epoch: every decision remembered, nothing said again
        again = list(loader)
    pil_images, pil_labels, _, _ = load(eval_loader(dataset, 4, 0, CPU, "pil", SIZE))
    for batches in (first, again):
        images, labels, dropped, _ = load(batches)
        assert torch.equal(labels, pil_labels) and dropped == 1 and [b[2] for b in batches] == [(), (truncated,)]
        assert (images - pil_images).abs().max() <= ONE_GREY_LEVEL
        assert torch.equal(images[3], pil_images[3])  # the GIF: PIL's pixels
