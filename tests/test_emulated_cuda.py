"""The CUDA kernels run on machines without a GPU: csrc/cuda/*.cu, rewritten for the host
emulation in tests/emulated_cuda/ (CUDA threads as fibers, block barriers, full-warp
shuffles), built with the C++ compiler and compared with the CPU kernels, on CI's CPU.

What it checks: indexing, partial blocks, launch shapes, reductions, barriers and
warp-synchronous code, float16/bfloat16 handling, the retrieval counting. What only a GPU
checks (tests marked cuda, bench/gpu_check.sh): memory ordering, speed, CUDA's own maths.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils import cpp_extension

pytestmark = pytest.mark.slow  # compiles the CUDA sources for the host emulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
HERE = os.path.join(ROOT, "tests", "emulated_cuda")

# Each rewrite must apply at least once: a .cu file that has changed shape fails here
# instead of being checked in an older form.
REWRITES = [
    (re.compile(r"^#include <(c10/cuda/[^>]+|cuda_runtime\.h)>\n", re.M), ""),  # emulated_cuda.h stands in
    (re.compile(r'#include "\.\./'), '#include "'),  # csrc/ is on the include path
    (re.compile(r"\bat::(b?mm(?:_out)?)\("), r"emulated_\1("),
    # no CUDA dispatch key; the block on one line or several
    (re.compile(r"^TORCH_LIBRARY_IMPL\(idml, CUDA, m\) \{(?:[^\n]*\}\n|\n.*?^\}\n)", re.M | re.S), ""),
]
LAUNCH = re.compile(r"([\w:]+(?:<[^<>()]*>)?)<<<(.+?), 0, stream>>>\(")


def emulated_body(cu_file: str, launcher: str) -> str:
    source = open(os.path.join(CSRC, "cuda", cu_file)).read()
    for pattern, replacement in REWRITES + [(LAUNCH, launcher + r"(\1, \2, ")]:
        source, count = pattern.subn(replacement, source)
        assert count > 0, f"{cu_file}: no match for {pattern.pattern!r}: update tests/test_emulated_cuda.py"
    return source


def test_launches_are_rewritten_to_the_emulated_launchers():
    line = "    kernel<<<launch.grid, launch.block, 0, stream>>>(\n"
    assert LAUNCH.sub(r"launch_threads(\1, \2, ", line) == "    launch_threads(kernel, launch.grid, launch.block, \n"
    line = "row_norms_kernel<scalar_t, acc_t><<<B, kReduceThreads, 0, stream>>>(mu,"
    assert LAUNCH.sub(r"f(\1, \2, ", line) == "f(row_norms_kernel<scalar_t, acc_t>, B, kReduceThreads, mu,"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (C++20)")
def test_cuda_kernels_under_emulation_match_the_cpu_kernels(tmp_path):
    # pa_ism's kernels use barriers and shuffles (fibers); retrieval's threads count independently.
    (tmp_path / "pa_ism_body.inc").write_text(emulated_body("pa_ism.cu", "launch_threads"))
    (tmp_path / "retrieval_body.inc").write_text(emulated_body("retrieval.cu", "launch_sequential"))
    sources = [
        os.path.join(HERE, "check_kernels.cpp"),
        os.path.join(CSRC, "idml.cpp"),
        os.path.join(CSRC, "cpu", "pa_ism.cpp"),
        os.path.join(CSRC, "cpu", "retrieval.cpp"),
    ]
    includes = [f"-I{path}" for path in [str(tmp_path), HERE, CSRC, *cpp_extension.include_paths()]]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    objects = [str(tmp_path / (os.path.basename(source) + ".o")) for source in sources]

    def compile_one(source, target):
        return subprocess.run(
            ["g++", "-std=c++20", "-O1", "-fopenmp", abi, *includes, "-c", source, "-o", target],
            capture_output=True,
            text=True,
            timeout=600,
        )

    with ThreadPoolExecutor(max_workers=2) as pool:  # CI has two cores
        for result in pool.map(compile_one, sources, objects):
            assert result.returncode == 0, result.stderr[-3000:]
    libraries = [flag for path in cpp_extension.library_paths() for flag in (f"-L{path}", f"-Wl,-rpath,{path}")]
    binary = str(tmp_path / "check_kernels")
    link = subprocess.run(
        ["g++", "-fopenmp", *objects, *libraries, "-ltorch_cpu", "-lc10", "-o", binary],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert link.returncode == 0, link.stderr[-3000:]
    result = subprocess.run(
        [binary], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert ", 0 failures" in result.stdout
