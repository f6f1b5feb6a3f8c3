"""Shared options for the benchmark suites (`pytest bench/ --benchmark-only`).

--bench-scale small (default, what CI runs) keeps every size CPU-friendly; full uses the
real sizes of docs/performance.md (SOP: 60,502 x 512, C = 11,318), meant for the GPU machine or a
patient CPU. Every benchmark measures its baseline in the same run and records the ratio
in `benchmark.extra_info`, printed at the end of the session.
"""

import pytest
import timing
import torch
from timing import RATIOS


def pytest_addoption(parser):
    parser.addoption(
        "--bench-scale",
        choices=("small", "full"),
        default="small",
        help="problem sizes of the benchmarks (default: small)",
    )


def pytest_configure(config):
    timing.QUICK = bool(config.getoption("benchmark_disable", False))


@pytest.fixture
def bench_scale(request):
    return request.config.getoption("--bench-scale")


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


def machine() -> str:
    """What ran the benchmarks: the GPU's name (or the CPU's core count) and torch's version."""
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"


def pytest_terminal_summary(terminalreporter):
    """The speed-ups as one markdown table, ready for docs/performance.md."""
    if not RATIOS:
        return
    terminalreporter.section(f"speed-ups measured in this run ({machine()}): baseline time / candidate time")
    terminalreporter.write_line("| benchmark | candidate | baseline | ratio |")
    terminalreporter.write_line("|---|---|---|---|")
    for test, baseline, base_s, cand_s, ratio in RATIOS:
        terminalreporter.write_line(
            f"| {test} | {cand_s * 1e3:.3f} ms | {baseline} {base_s * 1e3:.3f} ms | {ratio:.2f}x |"
        )
