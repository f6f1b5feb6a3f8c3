"""bench/gpu_profile.py, the diagnostics of bench/gpu_check.sh, runs here on the CPU at small
scale, so that its first run on a lent GPU is not also its first run at all."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_prints_a_row_per_case_and_writes_the_tables(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/gpu_profile.py", "--device", "cpu", "--scale", "small", "--repeat", "1",
         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    names = [cells[0].strip() for cells in rows[1:]]  # after the header
    assert names == ["loss fwd+bwd B=120 C=100 float32", "its three matmuls float32",
                     "metrics cub n=1500 fp32", "metrics sop n=4000 fp32", "k-means 20 iterations n=4000 k=748",
                     "training step idml resnet18", "training step published resnet18"], result.stdout
    for cells in rows[1:]:
        wall, host = float(cells[1]), float(cells[2])
        assert 0 < host <= wall  # on the CPU the host does all the work: the call returns when done
    tables = (tmp_path / "profile.txt").read_text()
    assert tables.count("## ") == len(names) and "idml::pa_ism_forward" in tables and "idml::retrieval_ranks" in tables
