"""Timing helpers of the benchmarks: best-of-n wall time and speed-up ratios measured in
the same run (kept here, not in conftest.py, so that tests/ and bench/ can run together)."""
import time

import torch

RATIOS = []


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, repeat=5, warmup=1):
    """Best wall time of fn() in seconds over `repeat` runs (after `warmup` untimed runs)."""
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


def pedantic_min(benchmark, fn, device, rounds, warmup):
    """(fn's result, its best time in seconds) from benchmark.pedantic. Under
    --benchmark-disable pytest-benchmark calls fn once and keeps no statistics, so the
    time of that call is taken instead."""
    times = []

    def timed():
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        return result

    result = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup)
    return result, min(times) if benchmark.stats is None else benchmark.stats.stats.min


def record_ratio(benchmark, name, baseline_seconds, candidate_seconds):
    """Store baseline/candidate (> 1 means the candidate is faster) for the summary."""
    ratio = baseline_seconds / candidate_seconds
    benchmark.extra_info[f"speedup_vs_{name}"] = ratio
    RATIOS.append((benchmark.name, name, baseline_seconds, candidate_seconds, ratio))
    return ratio
