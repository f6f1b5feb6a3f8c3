"""What training and evaluation share: the device, the seeds, the data loaders (--loader pil
or dali), the model built from a run's configuration."""

import random
import warnings

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from idml.config import ModelConfig
from idml.data.datasets import collate_valid
from idml.data.samplers import EpochBatchSampler, SeededSamples
from idml.distributed import launched_by_torchrun, local_rank
from idml.errors import UsageError
from idml.models import IDMLNet


def resolve_device(device: str, gpu: int) -> torch.device:
    """--device auto|cpu|cuda with --gpu N (-1: all visible GPUs, one process each: see
    idml.distributed; under torchrun, the process's own GPU LOCAL_RANK)."""
    if device == "cpu":
        return torch.device("cpu")
    if launched_by_torchrun() and torch.cuda.is_available():  # one GPU per process: LOCAL_RANK's
        return torch.device("cuda", local_rank())
    if not torch.cuda.is_available():
        if device == "cuda":
            raise UsageError("--device cuda was given but no CUDA GPU is visible (torch.cuda.is_available() is False)")
        if gpu != 0:
            warnings.warn(f"--gpu {gpu} was given but no GPU is visible: running on the CPU", stacklevel=2)
        return torch.device("cpu")
    if gpu >= torch.cuda.device_count():
        raise UsageError(f"--gpu {gpu} was given but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda", max(gpu, 0))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loader_options(workers: int, device: torch.device) -> dict:
    return dict(
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0, collate_fn=collate_valid
    )


def train_loader(
    loader: str, dataset, sampler: EpochBatchSampler, seed: int, workers: int, device: torch.device, image_size: int
):
    """--loader pil|dali: batches (images, labels, dropped) of the sampler's draws, each
    augmented from its own seed."""
    if loader == "dali":
        from idml.data.dali import DaliLoader

        return DaliLoader(dataset, sampler, sampler.rank_batch_size, image_size, device, workers, seed=seed)
    return DataLoader(SeededSamples(dataset, seed), batch_sampler=sampler, **loader_options(workers, device))


def eval_loader(
    dataset, batch_size: int, workers: int, device: torch.device, loader: str = "pil", image_size: int = None
):
    """--loader pil|dali: batches (images, labels, dropped) of `dataset` in order."""
    if loader == "dali":
        from idml.data.dali import DaliLoader

        batches = BatchSampler(range(len(dataset)), batch_size, drop_last=False)
        return DaliLoader(dataset, batches, batch_size, image_size, device, workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(workers, device))


def build_model(config: ModelConfig) -> IDMLNet:
    return IDMLNet(
        arch=config.model,
        embedding_size=config.embedding_size,
        pretrained=config.pretrained,
        l2_norm=bool(config.l2_norm),
        uncertainty=config.uncertainty,
        bn_freeze=bool(config.bn_freeze),
    )
