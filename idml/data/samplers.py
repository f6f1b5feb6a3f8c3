"""Batch samplers of the published recipe, deterministic per (seed, epoch) so that a run
can be resumed exactly, and sharded: with world_size ranks each rank yields its own
contiguous slice of every global batch (`batch_size` is the global batch)."""
from typing import Iterator, List, Sequence

import numpy as np
from torch.utils.data import Sampler

from idml.errors import UsageError


class EpochBatchSampler(Sampler):
    """Base: draws the epoch's global batches from a generator seeded by (seed, epoch)."""

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise UsageError(f"--batch-size {batch_size} (the global batch) must be divisible by "
                             f"the number of processes, {world_size}")
        if batch_size > len(labels):
            raise UsageError(f"--batch-size {batch_size} is larger than the training set ({len(labels)} images)")
        self.labels = np.asarray(labels)
        self.num_batches = len(labels) // batch_size  # the last incomplete batch is dropped
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[List[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        per_rank = self.batch_size // self.world_size
        for batch in self.global_batches(rng):
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()

    def global_batches(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        raise NotImplementedError


class RandomBatchSampler(EpochBatchSampler):
    """Shuffled batches."""

    def global_batches(self, rng):
        order = rng.permutation(len(self.labels))
        for b in range(self.num_batches):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


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
            raise UsageError(f"--batch-size {batch_size} / --IPC {images_per_class} = {self.classes_per_batch} "
                             f"classes per batch, but the training set has only {len(classes)}")
        self.images_per_class = images_per_class
        self.members = [np.flatnonzero(self.labels == c) for c in classes]

    def global_batches(self, rng):
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.members), self.classes_per_batch, replace=False)
            yield np.concatenate([rng.choice(self.members[c], self.images_per_class, replace=True) for c in chosen])
