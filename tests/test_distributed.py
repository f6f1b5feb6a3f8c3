"""DDP under torchrun (docs/method.md, section 4.3, "Multi-GPU"): 2 gloo processes on the CPU
take the same steps as one process on the same global batch, and sharded evaluation gives
the single-process metrics."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_robustness import corrupt_some_images, finish, wait_for_checkpoint
from test_train import run_script

from idml import distributed
from idml import train as train_module
from idml.checkpoint import load_checkpoint
from idml.cli import train_config
from idml.data.synthetic import write_cub
from idml.errors import UsageError
from idml.train import Trainer

pytestmark = pytest.mark.slow  # torchrun and spawned process groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Deterministic CPU mode; SGD so that parameter updates are linear in the gradients (Adam's
# first step is lr * sign(g), which turns float noise on near-zero gradients into +-lr);
# a learned uncertainty head, whose gradient is not zero up to noise as with "normalized".
RUN = (
    "--dataset digits --model resnet18 --pretrained none --embedding-size 16 --image-size 24 --batch-size 24 "
    "--max-steps 2 --epochs 1 --warm 0 --optimizer sgd --lr 1e-3 --uncertainty softplus --workers 0 "
    "--wandb disabled --eval-clustering 0 --seed 7"
).split()
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


def command(log_dir, processes=None, *extra):
    """scripts/train.py with RUN as a plain process (processes=None) or under torchrun."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
        if processes
        else [sys.executable]
    )
    return [*launcher, os.path.join(ROOT, "scripts", "train.py"), *RUN, "--LOG_DIR", str(log_dir), *extra]


def train(log_dir, processes=None, *extra):
    result = subprocess.run(
        command(log_dir, processes, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(str(log_dir), "logs_digits", "*"))
    return run_dir, result


@pytest.fixture(scope="module")
def runs(module_tmp_path):
    single, _ = train(module_tmp_path / "single")
    ddp, result = train(module_tmp_path / "ddp", processes=2)
    one_process, one_process_result = train(module_tmp_path / "ddp1", processes=1)
    initial = Trainer(train_config(RUN + ["--LOG_DIR", str(module_tmp_path / "init")]))
    return types.SimpleNamespace(
        single=single,
        ddp=ddp,
        result=result,
        one_process=one_process,
        one_process_result=one_process_result,
        initial={"model": initial.parts.model.state_dict(), "criterion": initial.parts.criterion.state_dict()},
    )


def test_two_processes_take_the_single_process_steps(runs):
    a = load_checkpoint(os.path.join(runs.single, "checkpoint_last.pt"))
    b = load_checkpoint(os.path.join(runs.ddp, "checkpoint_last.pt"))
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (1, 0)
    worst = 0.0
    for part in ("model", "criterion"):
        for name, start in runs.initial[part].items():
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
    a = [json.loads(line) for line in open(os.path.join(runs.single, "metrics.jsonl"))]
    b = [json.loads(line) for line in open(os.path.join(runs.ddp, "metrics.jsonl"))]
    assert [e["epoch"] for e in a] == [e["epoch"] for e in b] == [0, 1]
    assert a[0] == b[0]  # the same weights: exactly the same metrics (896 images over 2 shards)
    # After training the weights differ by float rounding (see UPDATE_RTOL): a tie may flip.
    assert b[1].pop("loss") == pytest.approx(a[1].pop("loss"), rel=1e-5)
    assert b[1] == pytest.approx(a[1], abs=1e-3)


def test_only_rank_0_prints_and_writes(runs):
    stdout = runs.result.stdout
    assert stdout.count("training IDML on digits") == 1 and ", 2 processes (gloo)" in stdout
    assert stdout.count("[epoch 1/1] unseen classes") == 1
    assert sorted(os.listdir(runs.ddp)) == sorted(os.listdir(runs.single))


def test_one_process_under_torchrun_runs_the_collectives_and_takes_the_same_steps(runs):
    """torchrun --nproc_per_node=1 joins a process group of one (gloo here, nccl on a GPU:
    bench/gpu_check.sh) and runs DDP and the gathers for real; the steps stay the plain ones."""
    assert ", 1 process (gloo)" in runs.one_process_result.stdout
    a = load_checkpoint(os.path.join(runs.single, "checkpoint_last.pt"))
    b = load_checkpoint(os.path.join(runs.one_process, "checkpoint_last.pt"))
    for part in ("model", "criterion"):
        for name, value in a[part].items():
            torch.testing.assert_close(b[part][name], value, rtol=1e-6, atol=1e-7, msg=f"{part}.{name}")


def test_per_process_batch_norm_records_the_metrics_of_the_model_rank_0_saves(tmp_path):
    """--bn-freeze 0 on 2 CPU processes: BatchNorm statistics are trained per process (no
    SyncBatchNorm on the CPU), so every evaluation must use rank 0's, which the checkpoint
    holds: the recorded metrics are those of the saved model evaluated in one process."""
    run_dir, result = train(tmp_path, 2, "--bn-freeze", "0")
    assert "BatchNorm statistics are per process" in result.stdout
    recorded = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][-1]
    evaluated = run_script(
        "evaluate.py", "--resume", os.path.join(run_dir, "checkpoint_last.pt"), "--workers", "0", "--json", env=ENV
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    for name in ("R@1", "R@2", "RP", "MAP@R"):
        assert metrics[name] == pytest.approx(recorded[name], abs=1e-6), name


def test_sigterm_to_torchrun_stops_every_rank_after_one_step_and_resumes(tmp_path):
    """torchrun forwards SIGTERM to both ranks; they agree on the next step that synchronises
    anyway (here a checkpoint every 4 steps), rank 0 saves it, and the run resumes from it."""
    extra = ("--max-steps", "30", "--checkpoint-every", "4")
    process = subprocess.Popen(
        command(tmp_path, 2, *extra), cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    path = wait_for_checkpoint(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert code != 0 and err.count("stopped by SIGTERM") == 1, err[-3000:]  # rank 0 reports it
    stopped = load_checkpoint(path)
    assert stopped["epoch"] == 0 and 0 < stopped["step"] < 30 and stopped["step"] % 4 == 0
    resumed = subprocess.run(
        command(tmp_path, 2, *extra, "--resume", path), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {path} at epoch 1, step {stopped['step']}" in resumed.stdout
    assert (load_checkpoint(path)["epoch"], load_checkpoint(path)["step"]) == (1, 0)


def test_unreadable_images_under_torchrun_are_skipped_and_the_shares_refilled(tmp_path):
    """Both processes keep equal shares (the gathers need them) when one loses images: the run
    trains, warns, counts the images against --max-bad-images and stops past the limit."""
    write_cub(str(tmp_path / "data"), 4, 6)
    bad = corrupt_some_images(str(tmp_path / "data"), 2)
    cub = [
        "--dataset",
        "cub",
        "--data-root",
        str(tmp_path / "data"),
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--max-steps",
        "3",
    ]
    result = subprocess.run(
        command(tmp_path / "ok", 2, *cub), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping unreadable image" in result.stderr and any(os.path.basename(p) in result.stderr for p in bad)
    refused = subprocess.run(
        command(tmp_path / "refused", 2, *cub, "--max-bad-images", "0"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode != 0 and "more than --max-bad-images 0" in refused.stderr


def test_a_share_refill_repeats_the_readable_images():
    images, labels = torch.arange(3.0).view(3, 1), torch.tensor([4, 5, 6])
    refilled, refilled_labels = train_module.refill_share(images, labels, 4)
    assert refilled.view(-1).tolist() == [0, 1, 2, 0, 1, 2, 0] and refilled_labels.tolist() == [4, 5, 6, 4, 5, 6, 4]
    with pytest.raises(UsageError, match="all 3 images of this process's share"):
        train_module.refill_share(None, None, 3)


def _gather_eval_worker(rank, world, port, length, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start, stop = distributed.shard(length)
        mine = torch.arange(start, stop, dtype=torch.float32)[:, None].repeat(1, 3)
        if rank == 1:
            mine = mine[1:]  # an unreadable image dropped from this share
        if rank == 2:
            mine = mine[:0]  # every image of this share unreadable
        gathered = distributed.gather_eval(mine)
        nothing = distributed.gather_eval(mine[:0])
        batch_norm = torch.nn.BatchNorm1d(2)
        batch_norm.running_mean.fill_(rank + 1)  # running statistics that differ per rank
        distributed.share_buffers(batch_norm)
        means = distributed.gather(batch_norm.running_mean[None])
        if rank == 0:
            queue.put(((start, stop), gathered[:, 0].tolist(), tuple(nothing.shape), means.tolist()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_three_ranks_gather_uneven_shards_in_order_without_duplicates():
    length, world = 896, 3  # the digits test split, not divisible by 3
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_gather_eval_worker, args=(world, free_port(), length, queue), nprocs=world)
    (start, stop), gathered, nothing, means = queue.get()
    assert (start, stop) == (0, 299)  # shares 299, 299, 298; the third one empty
    assert gathered == [float(i) for i in range(598) if i != 299]
    assert nothing == (0, 3)
    assert means == [[1.0, 1.0]] * world  # rank 0's BatchNorm statistics on every rank


@pytest.mark.parametrize("granule", [1, 24, 1000])
def test_shards_cover_every_item_once_in_whole_granules(monkeypatch, granule):
    for world in (1, 2, 3, 4, 7):
        monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
        covered = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            start, stop = distributed.shard(896, granule)
            assert all(end % granule == 0 or end == 896 for end in (start, stop))
            covered += list(range(start, stop))
        assert covered == list(range(896))


def test_gpu_minus_one_relaunches_only_with_several_gpus_outside_torchrun():
    argv = ["scripts/train.py", "--gpu", "-1", "--batch-size", "120"]
    assert distributed.relaunch_command(argv, -1, "auto", env={}, gpu_count=4) == [
        "--standalone",
        "--nproc_per_node=4",
        *argv,
    ]
    assert distributed.relaunch_command(argv, -1, "auto", env={}, gpu_count=1) is None
    assert distributed.relaunch_command(argv, 0, "auto", env={}, gpu_count=4) is None
    assert distributed.relaunch_command(argv, -1, "cpu", env={}, gpu_count=4) is None
    torchrun_env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    assert distributed.relaunch_command(argv, -1, "auto", env=torchrun_env, gpu_count=4) is None


def test_a_self_started_ddp_run_that_fails_exits_with_its_processes_code(tmp_path, monkeypatch, capfd):
    """--gpu -1 on several GPUs runs torchrun in-process: bad input in its processes ends
    with their one sentence and exit code 2, not torchrun's ChildFailedError traceback."""
    from idml.cli import run_guarded, train_main

    script = os.path.join(ROOT, "scripts", "train.py")
    monkeypatch.setattr(
        distributed,
        "relaunch_command",  # as on a 2-GPU machine
        lambda argv, gpu, device: ["--standalone", "--nproc_per_node=2", script, *argv[1:]],
    )
    with pytest.raises(SystemExit) as stop:
        run_guarded(
            train_main,
            [
                "--gpu",
                "-1",
                "--dataset",
                "cub",
                "--data-root",
                str(tmp_path / "nowhere"),
                "--pretrained",
                "none",
                "--wandb",
                "disabled",
            ],
        )
    assert stop.value.code == 2
    err = capfd.readouterr().err
    assert "error: CUB-200-2011 folder not found" in err and "Traceback" not in err


def test_helpers_are_no_ops_in_one_process():
    x = torch.randn(5, 2, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_with_grad(x) is x and distributed.gather_eval(x) is x
    assert distributed.my_slice(6) == slice(0, 6) and distributed.shard(7) == (0, 7)
    assert distributed.any_rank(15, torch.device("cpu")) == 15
