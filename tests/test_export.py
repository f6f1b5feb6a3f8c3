"""TorchScript export: a trained checkpoint -> scripts/export.py -> a module that loads where
idml cannot be imported and embeds like the eager model; the C++ (libtorch) loader."""

import glob
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from tiny_runs import TINY_DIGITS_RUN

from idml.checkpoint import load_checkpoint, model_from_checkpoint
from idml.cli import train_config
from idml.errors import UsageError
from idml.export import ExportedEmbedder, build_exported, eager_reference, preprocessing_of, quiet_jit
from idml.train import train

pytestmark = pytest.mark.slow  # exports trained models, builds the C++ program with cmake

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}  # the scripts import this checkout's idml

# Runs in a fresh interpreter, outside the repository, with every import of idml refused.
LOAD_WITHOUT_IDML = r"""
import sys
class RefuseIdml:
    def find_spec(self, name, path=None, target=None):
        if name == "idml" or name.startswith("idml."):
            raise ImportError("idml is made unimportable for this test")
sys.meta_path.insert(0, RefuseIdml())
try:
    import idml
except ImportError:
    pass
else:
    raise SystemExit("idml is still importable")
import torch

model_path, inputs_path, outputs_path = sys.argv[1:4]
module = torch.jit.load(model_path)
images = torch.load(inputs_path)
with torch.no_grad():
    embedding, uncertainty = module(images)
torch.save({"embedding": embedding, "uncertainty": uncertainty,
            "modules": sorted(m for m in sys.modules if m.split(".")[0] == "idml")}, outputs_path)
"""


@pytest.fixture(scope="module")
def checkpoint(module_tmp_path):
    logs = module_tmp_path / "export_run"
    train(train_config(TINY_DIGITS_RUN + ["--uncertainty", "softplus", "--LOG_DIR", str(logs)]))
    return glob.glob(str(logs / "logs_digits" / "*" / "checkpoint_last.pt"))[0]


@pytest.fixture(scope="module")
def exported(checkpoint, module_tmp_path):
    out = str(module_tmp_path / "model.pt")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "export.py"), "--resume", checkpoint, "--out", out],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "TorchScript vs eager" in result.stdout
    return out


def test_export_loads_without_idml_and_matches_the_eager_model(checkpoint, exported, tmp_path):
    generator = torch.Generator().manual_seed(1)
    # Not square and not the input size: the resize and the centre crop both act.
    images = torch.randint(0, 256, (5, 3, 48, 40), dtype=torch.uint8, generator=generator)
    torch.save(images, tmp_path / "images.pt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_IDML, exported, str(tmp_path / "images.pt"), str(tmp_path / "out.pt")],
        cwd=outside,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["modules"] == []

    # Eager: the wrapper's preprocessing run eagerly, then the IDMLNet of the checkpoint.
    model, config = model_from_checkpoint(checkpoint)
    wrapper = ExportedEmbedder(model, **preprocessing_of(config.data))
    expected_embedding, expected_uncertainty = eager_reference(model, wrapper, images)
    assert loaded["embedding"].shape == (5, 16) and loaded["uncertainty"].shape == (5,)
    torch.testing.assert_close(loaded["embedding"], expected_embedding, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["uncertainty"], expected_uncertainty, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded["embedding"].norm(dim=1), torch.ones(5))
    assert loaded["uncertainty"].std() > 0  # softplus: a per-image uncertainty


def test_preprocessing_matches_the_digits_pipeline(checkpoint):
    """For a digits model the wrapper feeds the network what the digits dataset feeds it."""
    import torch.nn.functional as F

    model, config = model_from_checkpoint(checkpoint)
    wrapper = ExportedEmbedder(model, **preprocessing_of(config.data))
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    expected = F.interpolate(grey.float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    expected = ((expected - 0.5) / 0.5).expand(-1, 3, -1, -1)
    torch.testing.assert_close(wrapper.preprocess(grey), expected, rtol=0, atol=2e-6)


def test_photo_preprocessing_scripted_equals_eager_and_ignores_train_mode(checkpoint):
    model, config = model_from_checkpoint(checkpoint)
    photo = replace(config.data, dataset="cub", image_size=40)  # resize 46, crop 40, ImageNet mean/std
    wrapper, scripted = build_exported(model, photo)
    images = torch.randint(0, 256, (3, 3, 61, 77), dtype=torch.uint8)
    assert wrapper.preprocess(images).shape == (3, 3, 40, 40)
    embedding, uncertainty = scripted(images)
    expected_embedding, expected_uncertainty = eager_reference(model, wrapper, images)
    torch.testing.assert_close(embedding, expected_embedding, rtol=0, atol=1e-5)
    torch.testing.assert_close(uncertainty, expected_uncertainty, rtol=1e-5, atol=1e-5)
    scripted.train()  # BatchNorm is fixed: train mode changes nothing
    torch.testing.assert_close(scripted(images)[0], embedding, rtol=0, atol=0)
    with pytest.raises(Exception, match="uint8"):
        scripted(images.float())


def test_export_of_a_missing_checkpoint_exits_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "export.py"),
            "--resume",
            str(tmp_path / "nope.pt"),
            "--out",
            str(tmp_path / "m.pt"),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 2
    assert "checkpoint not found" in result.stderr and "Traceback" not in result.stderr


CPP_BUILD = os.path.join(ROOT, "build", "embed_cpp")


def _write_ppm(path, image):
    """Binary PPM (P6) of a uint8 (3, H, W) tensor."""
    height, width = image.shape[1:]
    with open(path, "wb") as f:
        f.write(f"P6\n# test image\n{width} {height}\n255\n".encode())
        f.write(image.permute(1, 2, 0).contiguous().numpy().tobytes())


def test_cpp_program_embeds_like_python(exported, tmp_path):
    """Builds scripts/embed_cpp (cmake + libtorch), runs it on one image, compares with Python.
    Skipped when cmake or torch's CMake package is missing or the build exceeds 2 minutes."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the C++ program cannot be built here")
    prefix = torch.utils.cmake_prefix_path
    if not os.path.isfile(os.path.join(prefix, "Torch", "TorchConfig.cmake")):
        pytest.skip(f"this torch installation ships no CMake package ({prefix}/Torch/TorchConfig.cmake)")
    start = time.monotonic()
    try:
        configure = subprocess.run(
            [
                "cmake",
                "-S",
                os.path.join(ROOT, "scripts", "embed_cpp"),
                "-B",
                CPP_BUILD,
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DCMAKE_PREFIX_PATH={prefix}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-3000:]
        build = subprocess.run(
            ["cmake", "--build", CPP_BUILD, "-j", "2"],
            capture_output=True,
            text=True,
            timeout=max(1.0, 120 - (time.monotonic() - start)),
        )
    except subprocess.TimeoutExpired:
        pytest.skip("building the C++ program took over 2 minutes on this machine")
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    image = torch.randint(0, 256, (3, 45, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    _write_ppm(tmp_path / "query.ppm", image)
    result = subprocess.run(
        [os.path.join(CPP_BUILD, "embed_image"), exported, str(tmp_path / "query.ppm")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    cpp_embedding = torch.tensor([float(v) for v in lines["embedding"].split()])
    cpp_uncertainty = float(lines["uncertainty"])
    with quiet_jit():
        module = torch.jit.load(exported)
    with torch.no_grad():
        embedding, uncertainty = module(image.unsqueeze(0))
    torch.testing.assert_close(cpp_embedding, embedding[0], rtol=0, atol=1e-5)
    assert cpp_uncertainty == pytest.approx(float(uncertainty[0]), rel=1e-5)


def test_a_checkpoint_with_non_finite_weights_is_refused(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    state.pop("sha256", None)  # the digest, where there is one, is of the finite weights
    state["model"]["semantic.weight"][0, 0] = float("nan")
    path = str(tmp_path / "diverged.pt")
    torch.save(state, path)  # save_checkpoint refuses to write it: a file from elsewhere, or damaged
    with pytest.raises(UsageError, match="1 weight tensors hold NaN or infinite values .e.g. semantic.weight."):
        model_from_checkpoint(path)
