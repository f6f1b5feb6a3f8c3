"""DDP under torchrun (IDML_METHOD.md section 4, "Multi-GPU"): 2 gloo processes on the CPU
take the same steps as one process on the same global batch, and sharded evaluation gives
the single-process metrics."""
import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from idml import distributed
from idml.checkpoint import load_checkpoint
from idml.cli import train_parser
from idml.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Deterministic CPU mode; SGD so that parameter updates are linear in the gradients (Adam's
# first step is lr * sign(g), which turns float noise on near-zero gradients into +-lr);
# a learned uncertainty head, whose gradient is not zero up to noise as with "normalized".
RUN = ["--dataset", "digits", "--model", "resnet18", "--pretrained", "none", "--embedding-size", "16",
       "--image-size", "24", "--batch-size", "24", "--max-steps", "2", "--epochs", "1", "--warm", "0",
       "--optimizer", "sgd", "--lr", "1e-3", "--uncertainty", "softplus",
       "--workers", "0", "--wandb", "disabled", "--eval-clustering", "0", "--seed", "7"]
# PYTHONPATH: a script run as a file would otherwise import whichever idml is installed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ROOT}
# Summation order differs (gradients reduced over ranks, the loss on a gathered batch) and
# each rank convolves 24 images where one process convolves 48 (other CPU kernels): the
# 2-step updates agree to ~1e-6 relative (L2 norm of the difference / of the update) for
# the heads, proxies and deeper layers, ~5e-4 for conv1 and layer1, where a max-pool or ReLU
# near a tie can route a gradient differently. A world_size factor error would be ~0.5-1.
UPDATE_RTOL = 2e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(log_dir, processes=1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                 f"--master_port={free_port()}"] if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, os.path.join(ROOT, "scripts", "train.py"), *RUN, "--LOG_DIR", str(log_dir)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, = glob.glob(os.path.join(str(log_dir), "logs_digits", "*"))
    return run_dir, result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single, _ = train(tmp_path_factory.mktemp("single"))
    ddp, result = train(tmp_path_factory.mktemp("ddp"), processes=2)
    initial = Trainer(train_parser().parse_args(RUN + ["--LOG_DIR", str(tmp_path_factory.mktemp("init"))]))
    return single, ddp, result, {"model": initial.model.state_dict(), "criterion": initial.criterion.state_dict()}


def test_two_processes_take_the_single_process_steps(runs):
    single, ddp, _, initial = runs
    a = load_checkpoint(os.path.join(single, "checkpoint_last.pt"))
    b = load_checkpoint(os.path.join(ddp, "checkpoint_last.pt"))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (1, 0)
    worst = 0.0
    for part in ("model", "criterion"):
        for name, start in initial[part].items():
            if not start.is_floating_point():
                continue
            step_a, step_b = a[part][name] - start, b[part][name] - start
            scale = step_a.norm()
            if scale == 0:  # not trained (running statistics of frozen BatchNorm)
                assert torch.equal(step_b, step_a), f"{part}.{name}"
                continue
            error = float((step_b - step_a).norm() / scale)
            worst = max(worst, error)
            assert error < UPDATE_RTOL, f"{part}.{name}: updates differ by {error:.2e} of their size"
    print(f"largest relative difference of the 2-step updates: {worst:.2e}")


def test_sharded_evaluation_gives_the_single_process_metrics(runs):
    single, ddp, _, _ = runs
    a = [json.loads(line) for line in open(os.path.join(single, "metrics.jsonl"))]
    b = [json.loads(line) for line in open(os.path.join(ddp, "metrics.jsonl"))]
    assert [e["epoch"] for e in a] == [e["epoch"] for e in b] == [0, 1]
    assert a[0] == b[0]  # the same weights: exactly the same metrics (896 images over 2 shards)
    # After training the weights differ by float rounding (see UPDATE_RTOL): a tie may flip.
    assert b[1].pop("loss") == pytest.approx(a[1].pop("loss"), rel=1e-5)
    assert b[1] == pytest.approx(a[1], abs=1e-3)


def test_only_rank_0_prints_and_writes(runs):
    single, ddp, result, _ = runs
    assert result.stdout.count("training IDML on digits") == 1
    assert result.stdout.count("[epoch 1/1] unseen classes") == 1
    assert sorted(os.listdir(ddp)) == sorted(os.listdir(single))


def _gather_eval_worker(rank, world, port, length, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start, stop = distributed.shard(length)
        mine = torch.arange(start, stop, dtype=torch.float32)[:, None].repeat(1, 3)
        if rank == 1:
            mine = mine[1:]  # an unreadable image dropped from this share
        gathered = distributed.gather_eval(mine)
        if rank == 0:
            queue.put(((start, stop), gathered[:, 0].tolist()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_three_ranks_gather_uneven_shards_in_order_without_duplicates():
    length, world = 896, 3  # the digits test split, not divisible by 3
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_gather_eval_worker, args=(world, free_port(), length, queue), nprocs=world)
    (start, stop), gathered = queue.get()
    assert (start, stop) == (0, 299)  # shares 299, 299, 298
    assert gathered == [float(i) for i in range(length) if i != 299]


def test_shards_cover_every_item_once(monkeypatch):
    for world in (1, 2, 3, 4, 7):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        covered = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda: r)
            covered += list(range(*distributed.shard(896)))
        assert covered == list(range(896))


def test_gpu_minus_one_relaunches_only_with_several_gpus_outside_torchrun():
    argv = ["scripts/train.py", "--gpu", "-1", "--batch-size", "120"]
    assert distributed.relaunch_command(argv, -1, "auto", env={}, gpu_count=4) == [
        "--standalone", "--nproc_per_node=4", *argv]
    assert distributed.relaunch_command(argv, -1, "auto", env={}, gpu_count=1) is None
    assert distributed.relaunch_command(argv, 0, "auto", env={}, gpu_count=4) is None
    assert distributed.relaunch_command(argv, -1, "cpu", env={}, gpu_count=4) is None
    torchrun_env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    assert distributed.relaunch_command(argv, -1, "auto", env=torchrun_env, gpu_count=4) is None


def test_helpers_are_no_ops_in_one_process():
    x = torch.randn(5, 2, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_with_grad(x) is x and distributed.gather_eval(x) is x
    assert distributed.my_slice(6) == slice(0, 6) and distributed.shard(7) == (0, 7)
    assert distributed.any_rank(15, torch.device("cpu")) == 15
