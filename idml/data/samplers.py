"""Batch samplers of the published recipe, deterministic per (seed, epoch), and sharded:
with world_size ranks each rank yields its own contiguous slice of every global batch
(`batch_size` is the global batch).

For exact resumption, even mid-epoch and whatever the number of loader processes, every
draw carries its own augmentation seed: the samplers yield (index, draw) pairs and
SeededSamples seeds torch's generator from (seed, draw) before loading that image.
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from idml.errors import UsageError


class EpochBatchSampler(Sampler):
    """Base: draws the epoch's global batches from a generator seeded by (seed, epoch)."""

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise UsageError(
                f"--batch-size {batch_size} (the global batch) must be divisible by "
                f"the number of processes, {world_size}"
            )
        if batch_size > len(labels):
            raise UsageError(f"--batch-size {batch_size} is larger than the training set ({len(labels)} images)")
        self.labels = np.asarray(labels)
        self.num_batches = len(labels) // batch_size  # the last incomplete batch is dropped
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields epoch `epoch`'s batches from step `start_step` on."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.num_batches - self.start_step

    @property
    def rank_batch_size(self) -> int:
        """The size of this rank's share of every global batch."""
        return self.batch_size // self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        per_rank = self.rank_batch_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        for step, batch in enumerate(self.global_batches(rng)):
            if step >= self.start_step:  # earlier batches are drawn all the same: the stream stays identical
                first_draw = (self.epoch * self.num_batches + step) * self.batch_size
                draws = np.arange(first_draw, first_draw + self.batch_size)
                yield list(zip(batch[mine].tolist(), draws[mine].tolist()))

    def global_batches(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        raise NotImplementedError


class RandomBatchSampler(EpochBatchSampler):
    """Shuffled batches."""

    def global_batches(self, rng):
        order = rng.permutation(len(self.labels))
        for b in range(self.num_batches):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]


class BalancedBatchSampler(EpochBatchSampler):
    """--IPC n: each batch holds batch/n classes drawn without replacement and n images of
    each, drawn with replacement (as published, so classes smaller than n still work)."""

    def __init__(self, labels, batch_size, images_per_class, seed, rank=0, world_size=1):
        super().__init__(labels, batch_size, seed, rank, world_size)
        classes = np.unique(self.labels)
        if batch_size % images_per_class:
            raise UsageError(f"--batch-size {batch_size} must be a multiple of --IPC {images_per_class}")
        self.classes_per_batch = batch_size // images_per_class
        if self.classes_per_batch > len(classes):
            raise UsageError(
                f"--batch-size {batch_size} / --IPC {images_per_class} = {self.classes_per_batch} "
                f"classes per batch, but the training set has only {len(classes)}"
            )
        self.images_per_class = images_per_class
        self.members = [np.flatnonzero(self.labels == c) for c in classes]

    def global_batches(self, rng):
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.members), self.classes_per_batch, replace=False)
            yield np.concatenate([rng.choice(self.members[c], self.images_per_class, replace=True) for c in chosen])


class SeededSamples(Dataset):
    """Loads (index, draw) items with torch's generator seeded from (seed, draw), so that an
    image's random augmentation depends on the draw alone, not on which process loads it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, draw = item
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator, the one fork_rng restores (torch.manual_seed would also
            # reseed the GPUs', and takes 100 times longer).
            torch.default_generator.manual_seed(self.seed * 1_000_003 + draw)
            return self.dataset[index]
