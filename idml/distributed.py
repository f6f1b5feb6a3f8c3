"""Multi-process training (docs/method.md, section 4.3, "Multi-GPU"): torchrun's environment,
the process group, and the few collectives training and evaluation need.

`torchrun --nproc_per_node=N scripts/train.py ...` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK set; `session()` joins them in one process group (nccl on GPUs,
gloo on the CPU). Outside torchrun every helper here is a no-op: world_size() is 1,
is_main() is True and the gathers return their input, so the single-process code path is
the distributed one with one rank. Under torchrun with one process the collectives and DDP
run for real (a cheap check of nccl on a single GPU: bench/gpu_check.sh does it).

How a step stays the single-process step on the same global batch (`--batch-size` is the
global batch; each rank loads its contiguous slice, idml/data/samplers.py):
  - the mixup draw (lambda and a permutation of the GLOBAL batch) is seeded identically on
    every rank; the mixed image of global sample j needs x[pi(j)], which may live on another
    rank, so the images are all-gathered (no gradient) before mixing. That costs one
    all-gather of the batch's pixels per step (120 x 3 x 224 x 224 float32 = 72 MB on each
    rank), small next to the forward and backward passes of a ResNet-50 at that size;
  - each rank forwards its own clean and mixed slice; mu and sigma are all-gathered with
    `gather_with_grad`, and every rank computes the same loss on the global batch;
  - backward of the gather is a reduce-scatter (sum): each rank's slice receives the sum of
    the identical gradients of all ranks, world_size x dL/d(its samples); DDP then averages
    the parameter gradients over ranks, which divides that factor away: the parameter
    gradient is exactly dL/dtheta of the global loss (up to float summation order);
  - the proxies (criterion parameters) see the whole batch on every rank, so their gradients
    agree; `average_gradients` all-reduces them anyway so replicas can never drift.
"""

import contextlib
import inspect
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

# torch >= 2.14 renames the tensor collectives (the old names warn that they are deprecated)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_DDP_HAS_FORWARD_SYNC = (
    "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def describe() -> str:
    """', N processes (backend)' under torchrun, '' otherwise: for the run's first line."""
    if not is_distributed():
        return ""
    return f", {world_size()} process{'es' if world_size() > 1 else ''} ({dist.get_backend()})"


def launched_by_torchrun(env=os.environ) -> bool:
    return "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env


def local_rank(env=os.environ) -> int:
    return int(env.get("LOCAL_RANK", 0))


@contextlib.contextmanager
def session(device: torch.device):
    """Inside torchrun: joins the process group for the body, then barrier() and
    destroy_process_group() (a rank that exits without both after autograd collectives aborts
    with SIGABRT, docs/design.md, section 4). Elsewhere: nothing."""
    if not launched_by_torchrun() or is_distributed():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
    )
    finished = False
    try:
        yield
        finished = True
    finally:
        if finished:  # all ranks reach the end together; after an error a barrier could hang
            dist.barrier()
        dist.destroy_process_group()


def shard(length: int, granule: int = 1) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of `length` items, in whole granules of
    `granule` items (the last share ends at `length`): the first ranks get one granule more,
    no item is padded or repeated. With the evaluation batch as the granule, each rank's
    batches hold the images one process's batches would, so the same embeddings bit for bit
    (a convolution's rounding can depend on the batch it is in)."""
    granules = -(-length // granule)
    base, extra = divmod(granules, world_size())
    r = rank()
    start, stop = r * base + min(r, extra), (r + 1) * base + min(r + 1, extra)
    return min(start * granule, length), min(stop * granule, length)


def my_slice(global_length: int) -> slice:
    """This rank's slice of a global batch whose ranks hold equal slices (the samplers')."""
    per_rank = global_length // world_size()
    return slice(rank() * per_rank, (rank() + 1) * per_rank)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x):
        return gather(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world_size(), *grad.shape[1:]))
        _reduce_scatter(out, grad, op=dist.ReduceOp.SUM)
        return out


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The equal-sized slices of all ranks concatenated in rank order, differentiable: this
    rank's slice receives the sum over ranks of the gradients flowing into it."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


def gather(x: torch.Tensor) -> torch.Tensor:
    """Equal-sized slices of all ranks concatenated in rank order (no gradient)."""
    if not is_distributed():
        return x
    out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
    _all_gather(out, x.contiguous())
    return out


def gather_eval(x: torch.Tensor) -> torch.Tensor:
    """Slices of different lengths (evaluation shards, less any unreadable images)
    concatenated in rank order: padded to the longest, all-gathered, trimmed."""
    if not is_distributed():
        return x
    sizes = gather(torch.tensor([x.shape[0]], device=x.device)).tolist()
    if max(sizes) == 0:
        return x
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = gather(padded).split(max(sizes))
    return torch.cat([part[:n] for part, n in zip(gathered, sizes)])


def share_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: trained per rank
    without SyncBatchNorm, they differ, and evaluation must use the model rank 0 saves."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of replicated parameters outside DDP (the proxies)."""
    if not is_distributed():
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size())


def any_rank(value: int, device: torch.device) -> int:
    """The largest of the ranks' values (0 when none is set): a stop request seen by any
    rank stops every rank at the same step."""
    if not is_distributed():
        return value
    flag = torch.tensor(value, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(
    module: torch.nn.Module, device: torch.device, find_unused_parameters: bool, buffers_differ: bool
) -> torch.nn.Module:
    """DistributedDataParallel around `module` when distributed, else `module`. DDP syncs
    the parameters that require gradients when it is built (warm-up freezes some: rebuild
    it when that changes); find_unused_parameters where the loss ignores some (baselines
    ignore sigma, so the uncertainty head gets no gradient). DDP broadcasts rank 0's
    buffers before every forward only where they can differ (`buffers_differ`): frozen or
    synchronised BatchNorm statistics are equal on every rank."""
    if not is_distributed():
        return module
    # torch >= 2.14 names the option forward_sync_buffers and warns (in every process) when
    # broadcast_buffers is passed; its init-time sync of the buffers is harmless here, as they
    # are equal on every rank when DDP is (re)built.
    sync = "forward_sync_buffers" if _DDP_HAS_FORWARD_SYNC else "broadcast_buffers"
    return torch.nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
        **{sync: buffers_differ},
    )


def relaunch_command(argv, gpu: int, device: str, env=os.environ, gpu_count: int = None):
    """torch.distributed.run's arguments when `scripts/train.py --gpu -1` should start the
    DDP run itself (several visible GPUs, not already under torchrun), else None."""
    if gpu != -1 or device == "cpu" or launched_by_torchrun(env):
        return None
    if gpu_count is None:
        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu_count < 2:
        return None
    return ["--standalone", f"--nproc_per_node={gpu_count}", *argv]
