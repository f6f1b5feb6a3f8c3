"""Training-data loading: --loader dali against --loader pil (torchvision transforms in
DataLoader worker processes), the same JPEGs, the same sampler, the same output shapes.

Images: photo-like JPEGs of 500 x 375 and 375 x 500 pixels (quality 90, about 50 KB),
train_transform's augmentation to 224 px, measured per epoch of the sampler. PIL gets as
many worker processes as DALI gets threads: 2 on CPU (the development machine's cores), 4
on CUDA (docs/performance.md, section 2: at most 4 CPU threads per GPU). Sizes: small =
batch 32, 8 batches; full = batch 120, 20 batches. Targets (docs/performance.md, section 2):
DALI's CPU pipeline >= 1.5x PIL's images per second, asserted at full scale; at small scale
on the CPU, no slower than PIL. The GPU pipeline: >= 3000 images per second on one H100/H200
at full scale. Skipped where DALI is not installed (the
GPU machine has none).
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from timing import benchmarked_time, best_time, check_target, record_ratio, synchronize

pytest.importorskip("nvidia.dali")

from idml.data.datasets import ImageFileDataset  # noqa: E402
from idml.data.samplers import RandomBatchSampler  # noqa: E402
from idml.data.transforms import train_transform  # noqa: E402
from idml.runtime import train_loader  # noqa: E402

SIZES = {"small": (32, 8), "full": (120, 20)}  # batch, batches per epoch
FILES = 64  # distinct JPEGs; the epoch cycles through them
IMAGE_SIZE = 224
THREADS = {"cpu": 2, "cuda": 4}
CPU_TARGET = 1.5
CPU_MARGIN = 0.9  # small scale: "no slower", allowing for timing noise on a shared machine
GPU_TARGET = 3000  # images per second


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Photo-like JPEGs: smooth colour fields with fine texture, in both orientations."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(FILES):
        width, height = (500, 375) if i % 2 else (375, 500)
        coarse = Image.fromarray(rng.integers(0, 256, (height // 25, width // 25, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"{i:03d}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def epoch(loader, device) -> int:
    """Consumes one epoch onto `device`; returns the number of images."""
    count = 0
    for images, _, _ in loader:
        count += images.to(device, non_blocking=True).shape[0]
    synchronize(device)
    return count


def test_training_images_per_second(benchmark, jpegs, device, bench_scale):
    batch, batches = SIZES[bench_scale]
    items = [(jpegs[i % FILES], i % 16) for i in range(batch * batches)]
    dataset = ImageFileDataset(items, train_transform(IMAGE_SIZE))
    sampler = RandomBatchSampler(dataset.labels, batch, seed=1)
    threads = min(THREADS[device.type], os.cpu_count())
    pil = train_loader("pil", dataset, sampler, 1, threads, device, IMAGE_SIZE)
    dali = train_loader("dali", dataset, sampler, 1, threads, device, IMAGE_SIZE)

    (pil_images, pil_labels, _), (dali_images, dali_labels, _) = next(iter(pil)), next(iter(dali))
    assert dali_images.shape == pil_images.shape == (batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(dali_labels, pil_labels) and dali_images.device.type == device.type

    dali_seconds = benchmarked_time(benchmark, lambda: epoch(dali, device), device, rounds=3)
    pil_seconds = float("inf")
    for _ in range(2):  # alternating rounds: a burst of load from other jobs hits both alike
        pil_seconds = min(pil_seconds, best_time(lambda: epoch(pil, device), device, repeat=3))
        dali_seconds = min(dali_seconds, best_time(lambda: epoch(dali, device), device, repeat=3))
    images = batch * batches
    ratio = record_ratio(benchmark, "pil_dataloader", pil_seconds, dali_seconds)
    benchmark.extra_info["images_per_second"] = images / dali_seconds
    benchmark.extra_info["pil_images_per_second"] = images / pil_seconds
    speeds = f"DALI {images / dali_seconds:.0f} img/s, PIL {images / pil_seconds:.0f} img/s"
    if device.type == "cpu":
        check_target(ratio >= (CPU_TARGET if bench_scale == "full" else CPU_MARGIN), speeds)
    if bench_scale == "full" and device.type == "cuda":
        check_target(images / dali_seconds >= GPU_TARGET, speeds)
