"""Builds the C++/CUDA extension `idml._C` (the package's metadata is in pyproject.toml).

A CUDAExtension is built whenever a CUDA toolkit (nvcc) is found, with or without a GPU;
otherwise a CppExtension. Install after torch: `pip install --no-build-isolation -e .`
(build isolation would fetch a second multi-GB torch).

Environment:
  IDML_CPU_ONLY=1          build the CPU kernels only, even when nvcc is present
  CUDA_HOME=/path          the CUDA toolkit to use (default: found from nvcc, see below)
  TORCH_CUDA_ARCH_LIST     GPU architectures; default: the visible GPUs, else "8.0;9.0+PTX"
  IDML_DEBUG=1             -O0 -g
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_toolkit():
    """The real CUDA toolkit folder (holding bin/nvcc and the cudart library), or None.

    torch guesses CUDA_HOME as the parent of the folder holding the first `nvcc` on PATH;
    on machines where /usr/local/bin/nvcc is a wrapper script that guess is /usr/local and
    the link fails with `cannot find -lcudart`. So each candidate is checked for both files.
    """
    if os.environ.get("IDML_CPU_ONLY") == "1":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for folder in candidates:
        if not folder:
            continue
        has_nvcc = os.path.isfile(os.path.join(folder, "bin", "nvcc"))
        has_cudart = any(
            glob.glob(os.path.join(folder, sub, "libcudart.so*"))
            for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
        )
        if has_nvcc and has_cudart:
            return os.path.realpath(folder)
    return None


CUDA_TOOLKIT = find_cuda_toolkit()
if CUDA_TOOLKIT:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = CUDA_TOOLKIT

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

if CUDA_TOOLKIT:
    cpp_extension.CUDA_HOME = CUDA_TOOLKIT
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a GPU torch would compile for every architecture it knows (slow).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


# The stable ABI (abi3) version the extension is compiled for. torch's BuildExtension
# defines Py_LIMITED_API for py_limited_api extensions itself, as its own minimum CPython
# (3.10 in torch 2.11 and 2.14), so it is defined here only for a torch that does not, and
# the wheel's abi3 tag names the same version.
LIMITED_API = getattr(cpp_extension, "min_supported_cpython", None)  # e.g. "0x030A0000"
LIMITED_API_FLAGS = [] if LIMITED_API else ["-DPy_LIMITED_API=0x03090000"]
ABI3_TAG = f"cp3{int((LIMITED_API or '0x03090000')[4:6], 16)}"  # "0x030A0000" -> "cp310"


def extension():
    debug = os.environ.get("IDML_DEBUG") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-fopenmp"] + LIMITED_API_FLAGS
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    kwargs = dict(
        name="idml._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if CUDA_TOOLKIT:
        kwargs["sources"] += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        kwargs["extra_compile_args"]["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + LIMITED_API_FLAGS
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": ABI3_TAG}},
)
