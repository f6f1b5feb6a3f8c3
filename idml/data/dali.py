"""--loader dali: NVIDIA DALI decodes and augments the image files and yields what the PIL
DataLoader yields, (images, labels, paths of the unreadable images dropped) per batch: NCHW
float32 on the training device, normalised with the ImageNet mean and std.

On CUDA the JPEGs are decoded on the GPU (DALI's "mixed" decoder) and DALI resizes, flips
and normalises them there (DaliResampling). On the CPU DALI decodes (only the crop box, when
training) on its own threads and torch resamples the pixels with Pillow's filter
(TorchResampling): DALI's CPU resize costs five times torch's. DALI is optional
(`pip install nvidia-dali-cuda130`).

Python still decides what is loaded: the batch samplers pick each step's indices for this
rank, and each training draw's crop box and flip are drawn from the draw's own seed exactly
as the PIL path draws them (TrainDraws under SeededSamples). DALI receives the encoded file
bytes with those boxes and flips through an external source. So --IPC batches, per-rank
shards and resuming mid-epoch behave as with --loader pil, and a resumed run sees the same
pixels as an uninterrupted one (tested on the CPU; DALI's readers.file with its own shuffling
could do none of this). The pixels are close to PIL's, not equal, so a run does not
reproduce --loader pil's run bit for bit: on the CPU the JPEG decoders differ by at most one
grey level here and there; on the GPU nvJPEG and DALI's antialiased linear filter differ more
(tests/test_dali.py bounds both).

Unreadable images: every file's header is parsed with PIL before DALI sees its bytes (the
crop box needs the image's size anyway), so a file that is not an image is skipped with the
PIL path's warning and counted. A file in a format DALI does not decode (a GIF named .jpg,
say) goes to PIL, with one warning. When DALI fails on a file whose header is fine (a
truncated JPEG, say), the batch's files are decoded with PIL instead: PIL skips and counts
the unreadable ones, the others keep their crop boxes and flips. Each of these is decided
once per file and remembered: later batches hand the file to PIL, or drop it, directly.
"""

import collections
import contextlib
import io
import types
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from idml.data.datasets import UNREADABLE, ImageFileDataset, Items, Unreadable, warn_unreadable
from idml.data.samplers import SeededSamples
from idml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainDraws, eval_geometry
from idml.errors import UsageError

PREFETCH = 2  # batches DALI prepares ahead of the one being consumed
# The image formats (PIL's names) DALI's decoders read; MPO is the JPEG of many cameras.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "PPM", "JPEG2000", "WEBP"})
DALI_PACKAGE = "nvidia-dali-cuda130"


def import_dali() -> types.SimpleNamespace:
    """DALI's pieces used here, or a UsageError saying what to install."""
    try:
        from nvidia.dali import Pipeline, fn
        from nvidia.dali import types as dali_types
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError:
        raise UsageError(
            f"--loader dali needs NVIDIA DALI, which is not installed: pip install {DALI_PACKAGE} (or use --loader pil)"
        ) from None
    return types.SimpleNamespace(Pipeline=Pipeline, fn=fn, types=dali_types, feed_ndarray=feed_ndarray)


def image_files(dataset: Dataset) -> Items:
    """The (path, label) items of an ImageFileDataset, or of a Subset of one."""
    if isinstance(dataset, Subset):
        items = image_files(dataset.dataset)
        return [items[i] for i in dataset.indices]
    if not isinstance(dataset, ImageFileDataset):
        raise UsageError(
            "--loader dali decodes image files, and --dataset digits is embedded in memory: use --loader pil for it"
        )
    return dataset.items


@dataclass(frozen=True)
class NotForDali:
    """What EncodedImages gives for an image in a format DALI does not decode."""

    path: str
    format: str


class EncodedImages(Dataset):
    """(label, file bytes, geometry) of each (path, label) item, where geometry is what
    `geometry` computes from the image's header (TrainDraws, or eval_geometry's resize and
    crop); Unreadable, with the PIL path's warning, for a file whose header PIL cannot read;
    NotForDali for one in a format DALI does not decode."""

    def __init__(self, items: Items, geometry: Callable[[Image.Image], tuple]):
        self.items, self.geometry = items, geometry

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        try:
            with open(path, "rb") as f:
                encoded = f.read()
            with Image.open(io.BytesIO(encoded)) as image:  # parses the header only
                if image.format not in DALI_FORMATS:
                    return NotForDali(path, str(image.format))
                geometry = self.geometry(image)
        except UNREADABLE as error:
            warn_unreadable(path, error)
            return Unreadable(path)
        return label, np.frombuffer(encoded, dtype=np.uint8), geometry


def crop_boxes(geometries: list[tuple]) -> list[list[np.ndarray]]:
    """DALI's image_slice arguments for TrainDraws' boxes: anchors (x, y), shapes (width, height)."""
    return [
        [np.array([left, top], np.int32) for top, left, *_ in geometries],
        [np.array([width, height], np.int32) for _, _, height, width, _ in geometries],
    ]


class DaliResampling:
    """On the GPU, DALI does it all: decodes (nvJPEG), crops, resizes, flips and normalises,
    and the batch is copied into a torch tensor on the same device. (On the CPU it works too,
    with DALI's CPU decoder, but TorchResampling is faster there and closer to Pillow.)"""

    arguments = 3  # per image besides the file bytes: the crop box and flip, or the resize and crop

    def __init__(self, dali, train: bool, image_size: int, device: torch.device):
        self.dali, self.train, self.image_size, self.device = dali, train, image_size, device

    def inputs(self, geometries: list[tuple]) -> list[list]:
        """DALI's per-image arguments besides the file bytes."""
        if self.train:
            return crop_boxes(geometries) + [[np.int32(flip) for *_, flip in geometries]]
        size = self.image_size
        return [
            [np.array(resized, np.float32) for resized, _ in geometries],
            # crop_mirror_normalize places the crop by its relative position (y, x)
            [np.float32(top / max(height - size, 1)) for (height, _), (top, _) in geometries],
            [np.float32(left / max(width - size, 1)) for (_, width), (_, left) in geometries],
        ]

    def graph(self, encoded, inputs):
        fn, dali_types = self.dali.fn, self.dali.types
        # Pillow's antialiased bilinear filter; subpixel_scale=False maps the whole source onto
        # the whole output, as Pillow does.
        resample = dict(interp_type=dali_types.INTERP_LINEAR, antialias=True, subpixel_scale=False)
        normalise = dict(
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
            output_layout="CHW",
            dtype=dali_types.FLOAT,
        )
        size, decoder = self.image_size, "mixed" if self.device.type == "cuda" else "cpu"
        if self.train:
            anchor, shape, mirror = inputs
            images = fn.resize(decode(self.dali, decoder, encoded, anchor, shape), size=(size, size), **resample)
            return fn.crop_mirror_normalize(images, mirror=mirror, **normalise)
        resized, crop_y, crop_x = inputs
        images = fn.resize(decode(self.dali, decoder, encoded), size=resized, **resample)
        return fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_y=crop_y, crop_pos_x=crop_x, **normalise)

    def to_torch(self, images, geometries: list[tuple]) -> torch.Tensor:
        out = torch.empty((len(geometries), 3, self.image_size, self.image_size), device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.dali.feed_ndarray(images.as_tensor(), out, cuda_stream=stream)
        return out


class TorchResampling:
    """On the CPU, DALI decodes (only the crop box, when training) and torch resizes, crops,
    flips and normalises each image: torch's antialiased bilinear resize of uint8 pixels is
    Pillow's filter and costs about a fifth of DALI's CPU resize."""

    def __init__(self, dali, train: bool, image_size: int):
        self.dali, self.train, self.image_size = dali, train, image_size
        self.arguments = 2 if train else 0  # the crop box, for decoding only the box
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255

    def inputs(self, geometries: list[tuple]) -> list[list]:
        return crop_boxes(geometries) if self.train else []

    def graph(self, encoded, inputs):
        return decode(self.dali, "cpu", encoded, *inputs)

    def to_torch(self, images, geometries: list[tuple]) -> torch.Tensor:
        with one_torch_thread():
            return self._resample(images, geometries)

    def _resample(self, images, geometries: list[tuple]) -> torch.Tensor:
        size = self.image_size
        out = torch.empty((len(geometries), 3, size, size))
        for i, geometry in enumerate(geometries):
            pixels = torch.from_numpy(np.asarray(images[i])).permute(2, 0, 1).unsqueeze(0)  # a 1CHW view of HWC
            if self.train:
                image = resize(pixels, (size, size))
                if geometry[-1]:
                    image = image.flip(-1)
            else:
                resized, (top, left) = geometry
                image = resize(pixels, resized)[:, top : top + size, left : left + size]
            torch.sub(image, self.mean, out=out[i]).div_(self.std)
        return out


@contextlib.contextmanager
def one_torch_thread():
    """Runs torch's operators on the calling thread alone. DALI's threads decode the next
    batches meanwhile; torch's own threads would spin-wait between these small per-image
    operations and take DALI's cores (1.45x -> 1.86x PIL's images per second on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resize(pixels: torch.Tensor, size: tuple) -> torch.Tensor:
    """Pillow's bilinear resize (antialiased when shrinking) of 1CHW uint8 pixels, as CHW uint8."""
    return torch.nn.functional.interpolate(
        pixels, size=tuple(size), mode="bilinear", antialias=True, align_corners=False
    )[0]


def decode(dali, device: str, encoded, anchor=None, shape=None):
    """RGB pixels (HWC uint8) of the encoded images, only the box at anchor with shape if given.
    PIL ignores the EXIF orientation and so do the geometries, computed from the stored size."""
    options = dict(device=device, output_type=dali.types.RGB, adjust_orientation=False)
    if anchor is None:
        return dali.fn.decoders.image(encoded, **options)
    return dali.fn.decoders.image_slice(encoded, anchor, shape, **options)


@dataclass
class Batch:
    """One batch of indices split between DALI and PIL: DALI's share (its positions in the
    batch, labels, file bytes, geometries), PIL's decoded (position, image, label) and the
    paths of the unreadable files dropped."""

    items: list
    positions: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    encoded: list = field(default_factory=list)
    geometries: list = field(default_factory=list)
    pil: list = field(default_factory=list)
    dropped: list = field(default_factory=list)


class DaliLoader:
    """Iterates over (images, labels, dropped) of `batches` like DataLoader(..., collate_fn=
    collate_valid): `batches` yields lists of dataset indices, or of (index, draw) pairs for
    training (`seed` given: train_transform's augmentation, each draw seeded as in
    SeededSamples); without `seed`, eval_transform's resize and centre crop.

    `dataset` is the ImageFileDataset (or a Subset of one) the PIL path would load, with its
    transform: it decodes the batches DALI cannot. `workers` sets DALI's CPU threads (at
    least one). Each iteration builds its own pipeline, so an epoch left early (--max-steps)
    leaves nothing queued for the next."""

    def __init__(
        self,
        dataset: Dataset,
        batches: Iterable[list],
        batch_size: int,
        image_size: int,
        device: torch.device,
        workers: int,
        seed: int | None = None,
    ):
        items = image_files(dataset)
        dali = import_dali()
        self.dali, self.batches, self.batch_size, self.device = dali, batches, batch_size, device
        self.threads, train = max(workers, 1), seed is not None
        if device.type == "cuda":
            self.resampling = DaliResampling(dali, train, image_size, device)
        else:
            self.resampling = TorchResampling(dali, train, image_size)
        geometry = TrainDraws(image_size) if train else lambda image: eval_geometry(*image.size, image_size)
        encoded = EncodedImages(items, geometry)
        self.samples = SeededSamples(encoded, seed) if train else encoded
        self.pil = SeededSamples(dataset, seed) if train else dataset
        self.items, self.train = items, train
        # Decided once per file, for every later epoch: the indices that go to PIL, and those
        # neither decodes (dropped without decoding again; BadImageBudget counts each once).
        self.for_pil, self.unreadable = set(), set()

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        # What each batch became, in the batches' order (Batch); a batch without files for
        # DALI (all unreadable or PIL's) is not given to it, which takes no empty batch.
        pending = collections.deque()
        batches = iter(self.batches)

        def source():
            while True:
                batch = self._split(next(batches))  # StopIteration ends DALI's epoch
                pending.append(batch)
                if batch.positions:
                    return [batch.encoded] + self.resampling.inputs(batch.geometries)

        pipe = self._pipeline(source)
        while True:
            try:
                (outcome,) = pipe.run()  # the output of the oldest batch DALI was given
            except StopIteration:
                outcome = None
            except RuntimeError as error:
                if "decoders.image" not in str(error):  # only decoding errors have a PIL fallback
                    raise
                outcome = error
            while pending and not pending[0].positions:  # batches before it that DALI was not given
                yield self._assemble(pending.popleft(), None)
            if outcome is None:
                return
            batch = pending.popleft()
            if isinstance(outcome, RuntimeError):
                self._decode_with_pil(batch)
                yield self._assemble(batch, None)
            else:
                yield self._assemble(batch, self.resampling.to_torch(outcome, batch.geometries))

    def _split(self, items: list) -> Batch:
        """The batch's files for DALI, those PIL decodes now, and the unreadable ones."""
        batch = Batch(items)
        for position, item in enumerate(items):
            index = item[0] if self.train else item
            if index in self.unreadable:
                batch.dropped.append(self.items[index][0])
                continue
            if index in self.for_pil:
                self._add_pil(batch, position, item)
                continue
            sample = self.samples[item]
            if isinstance(sample, NotForDali):
                self.for_pil.add(index)
                warnings.warn(
                    f"decoding {sample.path} with PIL: it is a {sample.format} file, which DALI does not "
                    f"decode (whatever its name says)",
                    stacklevel=4,
                )
                self._add_pil(batch, position, item)
            elif isinstance(sample, Unreadable):
                self.unreadable.add(index)
                batch.dropped.append(sample.path)
            else:
                label, encoded, geometry = sample
                batch.positions.append(position)
                batch.labels.append(label)
                batch.encoded.append(encoded)
                batch.geometries.append(geometry)
        return batch

    def _add_pil(self, batch: Batch, position: int, item) -> None:
        """PIL's decoding of one item into `batch` (dropped, and remembered, if PIL cannot)."""
        sample = self.pil[item]
        if isinstance(sample, Unreadable):
            self.unreadable.add(item[0] if self.train else item)
            batch.dropped.append(sample.path)
        else:
            batch.pil.append((position, *sample))

    def _assemble(self, batch: Batch, images: torch.Tensor | None):
        """(images, labels, dropped) of a batch in its order: DALI's `images` (None when it
        was not given the batch) and PIL's."""
        dropped = tuple(batch.dropped)
        if not batch.pil:  # DALI's alone (or nothing): already in the batch's order
            return (None, None, dropped) if images is None else (images, torch.tensor(batch.labels), dropped)
        rows = [] if images is None else list(zip(batch.positions, images, batch.labels))
        rows += [(position, image.to(self.device), label) for position, image, label in batch.pil]
        rows.sort(key=lambda row: row[0])
        return torch.stack([image for _, image, _ in rows]), torch.tensor([label for *_, label in rows]), dropped

    def _pipeline(self, source):
        """source's file bytes and arguments -> DALI's graph (the resampling's) -> the images."""
        gpu = self.device.type == "cuda"
        device_id = (torch.cuda.current_device() if self.device.index is None else self.device.index) if gpu else None
        pipe = self.dali.Pipeline(
            batch_size=self.batch_size, num_threads=self.threads, device_id=device_id, prefetch_queue_depth=PREFETCH
        )
        with pipe:
            encoded, *inputs = self.dali.fn.external_source(
                source, num_outputs=1 + self.resampling.arguments, batch=True
            )
            pipe.set_outputs(self.resampling.graph(encoded, inputs))
        return pipe

    def _decode_with_pil(self, batch: Batch) -> None:
        """DALI failed on `batch`: PIL decodes its share; a file PIL cannot decode either is
        what failed, and is dropped from now on."""
        warnings.warn(
            f"DALI could not decode an image of a batch of {len(batch.items)}: decoding that batch with PIL",
            stacklevel=4,
        )
        for position in batch.positions:
            self._add_pil(batch, position, batch.items[position])
        batch.positions, batch.labels, batch.encoded, batch.geometries = [], [], [], []
