"""Where the time of each GPU target goes, from torch.profiler: the device's busy time, the
time it waits for the host, kernel launches and the costliest kernels per call.

A missed target is either host-bound (launches, Python, synchronisation: the device waits)
or device-bound (a kernel is slow); this table tells which, from the same single run of
bench/gpu_check.sh that measures the targets. On the CPU it runs too (device columns empty;
the test suite runs it at small scale so that it does not rot).

    python bench/gpu_profile.py [--scale small|full] [--device cuda|cpu] [--out FOLDER]

Prints one markdown table; FOLDER/profile.txt gets each case's full operator table.
"""

import argparse
import os
import re
import sys
import time
import traceback

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import forward_backward, make_inputs, three_matmuls  # noqa: E402
from bench_metrics import embeddings, size_of, twenty_lloyd_iterations  # noqa: E402
from bench_train_step import SIZES as STEP_SIZES  # noqa: E402
from bench_train_step import Step
from timing import synchronize  # noqa: E402

from idml import cluster, ops  # noqa: E402

LOSS_SHAPES = {"small": (120, 100), "full": (120, 11318)}


def loss_cases(scale, device):
    B, C = LOSS_SHAPES[scale]
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        inputs = make_inputs(B, C, dtype, device)
        name = str(dtype).removeprefix("torch.")
        yield f"loss fwd+bwd B={B} C={C} {name}", lambda inputs=inputs: forward_backward(ops.pa_ism_loss, *inputs)
        # The two ops called bare: what the fwd+bwd row's host time has beyond them is autograd
        # and Python's (the H100's first run: host-bound, 0.3 ms per call even at C = 100).
        # (The schemas' default hyperparameters are pa_ism_loss's.)
        detached = [t.detach() for t in inputs]
        _, *saved = torch.ops.idml.pa_ism_forward(*detached)
        grad = torch.ones((), device=device)
        yield f"its forward op alone {name}", lambda d=detached: torch.ops.idml.pa_ism_forward(*d)
        yield (
            f"its backward op alone {name}",
            lambda d=detached, s=saved, g=grad: torch.ops.idml.pa_ism_backward(g, *d, *s),
        )
        yield f"its three matmuls {name}", three_matmuls(inputs[0], inputs[3])


def metrics_cases(scale, device):
    precisions = ("fp32", "tf32") if device.type == "cuda" else ("fp32",)
    for name in ("cub", "sop"):
        n, num_classes, ks = size_of(name, scale)
        x, labels = embeddings(n, num_classes, device)
        for precision in precisions:
            yield (
                f"metrics {name} n={n} {precision}",
                lambda x=x, labels=labels, ks=ks, p=precision: ops.retrieval_metrics(x, labels, ks=ks, precision=p),
            )


def kmeans_cases(scale, device):
    x, start, run = twenty_lloyd_iterations(scale, device)
    yield f"k-means 20 iterations n={x.shape[0]} k={start.shape[0]}", run
    # The first 512 of k-means++'s k sequential draws: each one's host and device time (the
    # H100's first run: 200 us per draw at SOP size, from Python).
    draws = min(512, x.shape[0])
    yield f"k-means++ {draws} draws n={x.shape[0]}", lambda: cluster.kmeans_plus_plus(x, draws)


def step_cases(scale, device):
    for fast in (True, False):
        step = Step(device, *STEP_SIZES[scale], fast=fast)
        yield f"training step {'idml' if fast else 'published'} {STEP_SIZES[scale][0]}", step


CASES = {"loss": loss_cases, "metrics": metrics_cases, "kmeans": kmeans_cases, "step": step_cases}


def profile_case(fn, device, repeat):
    """Per call: (wall ms, host ms, device-busy ms, device operations (kernels, copies), the
    top kernels), and the operator table. Host time: until fn returns, without waiting for
    the device. Wall and host from plain calls, the rest from profiled ones."""
    fn()  # warm-up: autotuning, allocator, lazy initialisation
    synchronize(device)
    wall, host = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        synchronize(device)
        wall.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeat):
            fn()
        synchronize(device)
    rows = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (min(wall) * 1e3, min(host) * 1e3, *summarize(rows, repeat), rows.table(sort_by=sort_by, row_limit=25))


def summarize(rows, repeat):
    """(device-busy ms, device operations, top-3 text) per call from key_averages rows: the
    device's own events (kernels, copies, fills), not the spans of record_function
    annotations on the device timeline (the optimizer's step is one), which cover kernels
    already counted. torch's own table leaves those out the same way."""
    device_rows = [
        row
        for row in rows
        if row.device_type == torch.autograd.DeviceType.CUDA and not getattr(row, "is_user_annotation", False)
    ]
    busy_us = sum(row.self_device_time_total for row in device_rows)
    operations = sum(row.count for row in device_rows)
    top = sorted(device_rows, key=lambda row: row.self_device_time_total, reverse=True)[:3]
    top_text = "; ".join(
        f"{short_kernel_name(row.key)} {row.self_device_time_total / repeat / 1e3:.3f} ms" for row in top
    )
    return busy_us / repeat / 1e3, operations / repeat, top_text


def short_kernel_name(name: str, limit: int = 60) -> str:
    """'void at::native::(anonymous namespace)::foo_kernel<4, ...>(...)' -> 'foo_kernel<4, ...>'."""
    name = name.replace("(anonymous namespace)::", "")
    head, rest = re.match(r"(?:void )?([^<(]*)(.*)", name).groups()  # the name, then <template>(arguments)
    return (head.split("::")[-1] + rest)[:limit]


def profile_cases(groups, scale, device, repeat, tables) -> int:
    """Prints a row per case and writes its operator table; returns how many failed. One
    failing case (or group set-up) does not cost the others their rows."""
    failed = 0
    for group in groups:
        try:
            for name, fn in CASES[group](scale, device):
                try:
                    wall, host, busy, launches, top, table = profile_case(fn, device, repeat)
                except Exception:
                    failed += 1
                    print(f"| {name} | failed: {traceback.format_exc(limit=1).splitlines()[-1]} |||||", flush=True)
                    continue
                idle = f"{max(0.0, 1 - busy / wall):.0%}" if device.type == "cuda" else "-"
                if device.type == "cuda" and not launches:  # CUPTI recorded nothing: no device columns
                    busy, idle, top = float("nan"), "?", "no device events recorded (CUPTI unavailable?)"
                print(
                    f"| {name} | {wall:.3f} | {host:.3f} | {busy:.3f} | {idle} | {launches:.0f} | {top} |", flush=True
                )
                tables.write(f"## {name}\n{table}\n\n")
        except Exception:
            failed += 1
            print(f"| {group} | failed: {traceback.format_exc(limit=1).splitlines()[-1]} |||||", flush=True)
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=("small", "full"), default="full")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--repeat", type=int, default=3, help="calls timed and profiled per case")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/idml_gpu_check"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    print(
        f"profile ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
        f"torch {torch.__version__}, {args.scale} scale, best of {args.repeat} calls):"
    )
    print("| case | wall ms | host ms | device busy ms | device idle | device ops | top kernels |")
    print("|---|---|---|---|---|---|---|", flush=True)
    with open(os.path.join(args.out, "profile.txt"), "w") as tables:
        try:
            failed = profile_cases(args.cases.split(","), args.scale, device, args.repeat, tables)
        except KeyboardInterrupt:  # SIGINT from gpu_check.sh's time limit: the rows so far stand
            print("| stopped by SIGINT (time limit): the cases after the last row were not profiled |||||||")
            return 124
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
