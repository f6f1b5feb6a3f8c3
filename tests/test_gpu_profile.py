"""bench/gpu_profile.py, the diagnostics of bench/gpu_check.sh, runs here on the CPU at small
scale, so that its first run on a lent GPU is not also its first run at all."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from gpu_profile import short_kernel_name, summarize  # noqa: E402

pytestmark = pytest.mark.slow  # profiles a training step in a subprocess


def test_profile_prints_a_row_per_case_and_writes_the_tables(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "bench/gpu_profile.py",
            "--device",
            "cpu",
            "--scale",
            "small",
            "--repeat",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )  # a script run as a file imports this checkout's idml
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    names = [cells[0].strip() for cells in rows[1:]]  # after the header
    assert names == [
        "loss fwd+bwd B=120 C=100 float32",
        "its forward op alone float32",
        "its backward op alone float32",
        "its three matmuls float32",
        "metrics cub n=1500 fp32",
        "metrics sop n=4000 fp32",
        "k-means 20 iterations n=4000 k=748",
        "k-means++ 512 draws n=4000",
        "training step idml resnet18",
        "training step published resnet18",
    ], result.stdout
    for cells in rows[1:]:
        assert float(cells[1]) > 0 and float(cells[2]) > 0  # wall and host ms
        assert cells[3:6] == [" 0.000 ", " - ", " 0 "]  # no device: busy 0, idle and operations empty
    tables = (tmp_path / "profile.txt").read_text()
    assert tables.count("## ") == len(names) and "idml::pa_ism_forward" in tables and "idml::retrieval_ranks" in tables
    assert "idml::kmeans_plus_plus_draws" in tables


def row(name, device_type, us, count, annotation=False):
    return SimpleNamespace(
        key=name, device_type=device_type, self_device_time_total=us, count=count, is_user_annotation=annotation
    )


def test_summary_counts_the_device_events_but_not_annotation_spans():
    """The device columns as a GPU run computes them, from rows like torch.profiler's: the
    optimizer's record_function span on the device timeline covers kernels counted already."""
    rows = [
        row("aten::mm", DeviceType.CPU, 0.0, 2),
        row("void at::native::(anonymous namespace)::fill_kernel<float>(float*)", DeviceType.CUDA, 30.0, 2),
        row("sm90_xmma_gemm_f32f32_f32f32_f32_tn_n", DeviceType.CUDA, 300.0, 2),
        row("Memcpy DtoH (Device -> Pinned)", DeviceType.CUDA, 10.0, 2),
        row("Optimizer.step#AdamW.step", DeviceType.CUDA, 5000.0, 2, annotation=True),
    ]
    busy_ms, operations, top = summarize(rows, repeat=2)
    assert busy_ms == pytest.approx(0.17) and operations == 3
    assert top == (
        "sm90_xmma_gemm_f32f32_f32f32_f32_tn_n 0.150 ms; fill_kernel<float>(float*) 0.015 ms; "
        "Memcpy DtoH (Device -> Pinned) 0.005 ms"
    )


def test_short_kernel_names():
    assert (
        short_kernel_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>")
        == "vectorized_elementwise_kernel<4, at::native::FillFunctor<flo"
    )
    assert (
        short_kernel_name("void idml::(anonymous namespace)::count_kernel(idml::retrieval::Tile)")
        == "count_kernel(idml::retrieval::Tile)"
    )
