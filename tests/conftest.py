import os
import shutil
import signal

import pytest
import torch

# A CUDA test takes seconds; minutes mean a hang or a pathological slowdown, and the GPU
# machine is lent for minutes in all (a SIGALRM here, so no pytest-timeout is needed).
CUDA_TEST_SECONDS = 120


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; bench/gpu_check.sh runs them)")
    config.addinivalue_line(
        "markers",
        "slow: trains, runs scripts or torchrun, or compiles; `-m 'not slow'` is the fast tier for the edit-test loop",
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def module_tmp_path(tmp_path_factory, request):
    """A folder for one test module's shared fixtures, removed after its last test: the runs
    they train write checkpoints (hundreds of MB) that no later module reads."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Gives every test the environment it started with. torchrun run in-process (the
    --gpu -1 relaunch) sets OMP_NUM_THREADS=1 in this process's environment; every later
    subprocess then ran on one thread, summed floats in another order and (on an Intel
    AVX-512 CPU) moved a near-tie: evaluate.py's MAP@R came out 1e-6 off the training's."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _cuda_time_limit(request):
    """Fails a CUDA test that runs past CUDA_TEST_SECONDS, so that the others still run. The
    alarm interrupts Python code only: a kernel that never returns is left to the time
    limits of bench/gpu_check.sh."""
    if "cuda" not in request.keywords:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{request.node.nodeid} ran past {CUDA_TEST_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(CUDA_TEST_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
