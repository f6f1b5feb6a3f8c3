"""Timing helpers of the benchmarks: best-of-n wall time and speed-up ratios measured in
the same run (kept here, not in conftest.py, so that tests/ and bench/ can run together)."""

import time

import torch

RATIOS = []
# --benchmark-disable (the quick mode the test command runs): pytest-benchmark calls each
# function once and keeps no statistics, so every time here is one run, and the speed
# targets, which one noisy run on a shared machine cannot judge, are reported, not asserted.
QUICK = False


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeat=5, warmup=1):
    """Best wall time of fn() in seconds over `repeat` runs (after `warmup` untimed runs);
    one run in the quick mode."""
    if QUICK:
        repeat, warmup = 1, 0
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def record_ratio(benchmark, name, baseline_seconds, candidate_seconds):
    """Store baseline/candidate (> 1 means the candidate is faster) for the summary."""
    ratio = baseline_seconds / candidate_seconds
    benchmark.extra_info[f"speedup_vs_{name}"] = ratio
    RATIOS.append((benchmark.name, name, baseline_seconds, candidate_seconds, ratio))
    return ratio


def benchmarked_time(benchmark, fn, device, rounds, warmup_rounds=1):
    """fn timed by pytest-benchmark until the device has finished it: its best round in
    seconds (in the quick mode, one run)."""
    if QUICK:
        return best_time(fn, device)

    def finished():
        result = fn()
        synchronize(device)
        return result

    benchmark.pedantic(finished, rounds=rounds, warmup_rounds=warmup_rounds)
    return benchmark.stats.stats.min


def full_size_on_cpu(device, bench_scale) -> bool:
    """A full-size run on the CPU takes seconds to minutes per call: time it once, unwarmed."""
    return device.type == "cpu" and bench_scale == "full"


def alternated_best(fns, device, rounds=3):
    """Best wall time of each function over `rounds` rounds that call them in turn (in every
    mode, the quick one included), so that a burst of load on a shared machine hits all alike."""
    times = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[i] = min(times[i], time.perf_counter() - start)
    return times


def check_floor(ratio: float, floor: float, message: str) -> None:
    """A speed-up floor far under the target, asserted in every mode, the test command's too:
    it fails when the compiled path silently falls back to plain PyTorch or slows down by
    several times, and the floors are low enough that a loaded 2-core machine meets them."""
    assert ratio >= floor, f"{message}: {ratio:.2f}x, below the floor of {floor}x"


def check_target(met: bool, message: str) -> None:
    """A speed target: asserted when benchmarking, reported in the quick mode."""
    if QUICK:
        if not met:
            print(f"speed target missed in the quick mode (not asserted): {message}")
        return
    assert met, message
