"""--loader dali: NVIDIA DALI decodes and augments the image files and yields what the PIL
DataLoader yields, (images, labels, number of unreadable images dropped) per batch: NCHW
float32 on the training device, normalised with the ImageNet mean and std.

On CUDA the JPEGs are decoded on the GPU (DALI's "mixed" decoder) and resized there; on the
CPU DALI's own operators do the work (no GPU needed). DALI is optional
(`pip install nvidia-dali-cuda130`).

Python still decides what is loaded: the batch samplers pick each step's indices for this
rank, and each training draw's crop box and flip are drawn from the draw's own seed exactly
as the PIL path draws them (TrainDraws under SeededSamples). DALI receives the encoded file
bytes with those boxes and flips through an external source. So --IPC batches, per-rank
shards and resuming mid-epoch behave as with --loader pil, and a resumed run sees the same
pixels as an uninterrupted one (tested on the CPU; DALI's readers.file with its own shuffling
could do none of this). The pixels are close to PIL's, not equal: DALI's antialiased linear
resampling is not Pillow's bilinear filter, so a run does not reproduce --loader pil's run
bit for bit (tests/test_dali.py bounds the difference: about one grey level).

Unreadable images: every file's header is parsed with PIL before DALI sees its bytes (the
crop box needs the image's size anyway), so a file that is not an image is skipped with the
PIL path's warning and counted. When DALI fails on a file whose header is fine (a truncated
JPEG, say), that one batch is decoded with PIL instead: PIL skips and counts the unreadable
files, the others keep their crop boxes and flips.
"""
import collections
import io
import types
import warnings
from typing import Iterable, List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from idml.data.datasets import UNREADABLE, ImageFileDataset, Items, collate_valid, warn_unreadable
from idml.data.samplers import SeededSamples
from idml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainDraws, eval_geometry
from idml.errors import UsageError

PREFETCH = 2  # batches DALI prepares ahead of the one being consumed
INPUTS = 4  # what DALI is fed per image: the file bytes and three arguments (TrainArguments, EvalArguments)
DALI_PACKAGE = "nvidia-dali-cuda130"


def import_dali() -> types.SimpleNamespace:
    """DALI's pieces used here, or a UsageError saying what to install."""
    try:
        from nvidia.dali import Pipeline, fn
        from nvidia.dali import types as dali_types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError:
        raise UsageError(f"--loader dali needs NVIDIA DALI, which is not installed: pip install {DALI_PACKAGE} "
                         f"(or use --loader pil)") from None
    return types.SimpleNamespace(Pipeline=Pipeline, fn=fn, types=dali_types, feed_ndarray=feed_ndarray)


def image_files(dataset: Dataset) -> Items:
    """The (path, label) items of an ImageFileDataset, or of a Subset of one."""
    if isinstance(dataset, Subset):
        items = image_files(dataset.dataset)
        return [items[i] for i in dataset.indices]
    if not isinstance(dataset, ImageFileDataset):
        raise UsageError("--loader dali decodes image files, and --dataset digits is embedded in memory: "
                         "use --loader pil for it")
    return dataset.items


class TrainArguments:
    """DALI's per-image arguments for train_transform's draws (TrainDraws): the crop box as
    anchor (x, y) and shape (width, height), and the mirror flag."""

    def __init__(self, image_size: int):
        self.draws = TrainDraws(image_size)

    def __call__(self, image: Image.Image) -> tuple:
        top, left, height, width, flip = self.draws(image)
        return np.array([left, top], np.int32), np.array([width, height], np.int32), np.int32(flip)


class EvalArguments:
    """DALI's per-image arguments for eval_transform: the (height, width) to resize to and the
    centre crop's relative position (y, x), from torchvision's own arithmetic (eval_geometry;
    DALI would round the longer side and half-pixel corners differently)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> tuple:
        (height, width), (top, left) = eval_geometry(*image.size, self.image_size)
        margin_y, margin_x = max(height - self.image_size, 1), max(width - self.image_size, 1)
        return np.array([height, width], np.float32), np.float32(top / margin_y), np.float32(left / margin_x)


class EncodedImages(Dataset):
    """(label, file bytes, *DALI's arguments for the image) of each (path, label) item, or
    None, with the PIL path's warning, for a file whose header PIL cannot read."""

    def __init__(self, items: Items, arguments):
        self.items, self.arguments = items, arguments

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        try:
            with open(path, "rb") as f:
                encoded = f.read()
            with Image.open(io.BytesIO(encoded)) as image:  # parses the header only
                arguments = self.arguments(image)
        except UNREADABLE as error:
            warn_unreadable(path, error)
            return None
        return (label, np.frombuffer(encoded, dtype=np.uint8), *arguments)


def build_pipeline(dali, source, train: bool, image_size: int, batch_size: int, device: torch.device,
                   threads: int):
    """DALI's decode -> crop and resize -> flip -> normalise, fed by `source` with the
    columns of EncodedImages samples after the label."""
    fn, dali_types = dali.fn, dali.types
    gpu = device.type == "cuda"
    device_id = (torch.cuda.current_device() if device.index is None else device.index) if gpu else None
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id,
                         prefetch_queue_depth=PREFETCH)
    # PIL ignores the EXIF orientation and so do the arguments, computed from the stored size.
    decoder = dict(device="mixed" if gpu else "cpu", output_type=dali_types.RGB, adjust_orientation=False)
    # Pillow's antialiased bilinear filter; subpixel_scale=False maps the whole source onto
    # the whole output, as Pillow does.
    resample = dict(interp_type=dali_types.INTERP_LINEAR, antialias=True, subpixel_scale=False)
    normalise = dict(mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
                     output_layout="CHW", dtype=dali_types.FLOAT)
    with pipe:
        if train:
            encoded, anchor, shape, mirror = fn.external_source(source, num_outputs=INPUTS, batch=True)
            images = fn.decoders.image_slice(encoded, anchor, shape, **decoder)  # decodes the box only
            images = fn.resize(images, size=(image_size, image_size), **resample)
            images = fn.crop_mirror_normalize(images, mirror=mirror, **normalise)
        else:
            encoded, size, crop_y, crop_x = fn.external_source(source, num_outputs=INPUTS, batch=True)
            images = fn.resize(fn.decoders.image(encoded, **decoder), size=size, **resample)
            images = fn.crop_mirror_normalize(images, crop=(image_size, image_size), crop_pos_y=crop_y,
                                              crop_pos_x=crop_x, **normalise)
        pipe.set_outputs(images)
    return pipe


class DaliLoader:
    """Iterates over (images, labels, dropped) of `batches` like DataLoader(..., collate_fn=
    collate_valid): `batches` yields lists of dataset indices, or of (index, draw) pairs for
    training (`seed` given: train_transform's augmentation, each draw seeded as in
    SeededSamples); without `seed`, eval_transform's resize and centre crop.

    `dataset` is the ImageFileDataset (or a Subset of one) the PIL path would load, with its
    transform: it decodes the batches DALI cannot. `workers` sets DALI's CPU threads (at
    least one). Each iteration builds its own pipeline, so an epoch left early (--max-steps)
    leaves nothing queued for the next."""

    def __init__(self, dataset: Dataset, batches: Iterable[List], batch_size: int, image_size: int,
                 device: torch.device, workers: int, seed: Optional[int] = None):
        items = image_files(dataset)
        self.dali = import_dali()
        self.batches, self.batch_size, self.image_size = batches, batch_size, image_size
        self.device, self.threads, self.train = device, max(workers, 1), seed is not None
        encoded = EncodedImages(items, (TrainArguments if self.train else EvalArguments)(image_size))
        self.samples = SeededSamples(encoded, seed) if self.train else encoded
        self.pil = SeededSamples(dataset, seed) if self.train else dataset

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        # What each batch became, in the batches' order: (batch, labels, dropped); labels None
        # for a batch of unreadable files only, which DALI is not given (it takes no empty batch).
        pending = collections.deque()
        batches = iter(self.batches)

        def source():
            while True:
                batch = next(batches)  # StopIteration ends DALI's epoch
                samples = [self.samples[item] for item in batch]
                valid = [sample for sample in samples if sample is not None]
                pending.append((batch, [sample[0] for sample in valid] or None, len(samples) - len(valid)))
                if valid:
                    return [list(column) for column in zip(*valid)][1:]

        pipe = build_pipeline(self.dali, source, self.train, self.image_size, self.batch_size, self.device,
                              self.threads)
        while True:
            try:
                (outcome,) = pipe.run()  # the output of the oldest batch DALI was given
            except StopIteration:
                outcome = None
            except RuntimeError as error:
                if "decoders.image" not in str(error):  # only decoding errors have a PIL fallback
                    raise
                outcome = error
            while pending and pending[0][1] is None:  # batches before it that DALI was not given
                yield None, None, pending.popleft()[2]
            if outcome is None:
                return
            batch, labels, dropped = pending.popleft()
            if isinstance(outcome, RuntimeError):
                yield self._decode_with_pil(batch)
            else:
                yield self._to_torch(outcome), torch.tensor(labels), dropped

    def _to_torch(self, images) -> torch.Tensor:
        out = torch.empty((len(images), 3, self.image_size, self.image_size), device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.dali.feed_ndarray(images.as_tensor(), out, cuda_stream=stream)
        return out

    def _decode_with_pil(self, batch):
        warnings.warn(f"DALI could not decode an image of a batch of {len(batch)}: decoding that batch with PIL",
                      stacklevel=3)
        images, labels, dropped = collate_valid([self.pil[item] for item in batch])
        return (None if images is None else images.to(self.device)), labels, dropped
