"""The fast path by default (--amp auto, channels_last on GPUs) and --compile."""

import pytest
import torch
from tiny_runs import TINY_MODEL

from idml.cli import train_config
from idml.precision import configure_cudnn, describe, memory_format, resolve_amp
from idml.train import Trainer

TINY = TINY_MODEL + "--dataset digits --batch-size 16 --max-steps 2 --eval-clustering 0".split()


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "off")])
def test_auto_amp_is_bf16_only_on_a_gpu_that_supports_it(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    cuda = torch.device("cuda")
    assert resolve_amp("auto", cuda) == expected
    assert resolve_amp("auto", torch.device("cpu")) == "off"
    assert resolve_amp("fp16", torch.device("cpu")) == "fp16"  # an explicit choice is kept
    assert resolve_amp("off", cuda) == "off"


def test_channels_last_goes_with_mixed_precision_on_gpus_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (
        memory_format(cuda, "bf16") == torch.channels_last and describe(cuda, "bf16") == "bf16 autocast, channels_last"
    )
    assert memory_format(cuda, "off") == torch.contiguous_format and describe(cuda, "off") == "float32"
    assert memory_format(cpu, "bf16") == torch.contiguous_format and describe(cpu, "bf16") == "bf16 autocast"


def test_cudnn_autotunes_with_the_fast_path_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    configure_cudnn(torch.device("cpu"), "bf16")
    assert torch.backends.cudnn.benchmark is False  # the CPU has no cuDNN to tune
    configure_cudnn(torch.device("cuda"), "bf16")
    assert torch.backends.cudnn.benchmark is True
    configure_cudnn(torch.device("cuda"), "off")  # the published recipe: cuDNN's defaults
    assert torch.backends.cudnn.benchmark is False


def trainer(tmp_path, *extra):
    args = train_config(TINY + ["--LOG_DIR", str(tmp_path), "--optimizer", "sgd", "--lr", "0.1", *extra])
    return Trainer(args)


def parameter_changes(run):
    """What the run's steps (--max-steps) change in every trained parameter, the proxies included."""

    def parameters():
        both = [*run.parts.model.named_parameters(), *run.parts.criterion.named_parameters()]
        return [(name, p) for name, p in both if p.requires_grad]  # frozen BatchNorm stays

    before = {name: p.detach().clone() for name, p in parameters()}
    run.train_epoch(0)
    return {name: p.detach() - before[name] for name, p in parameters()}


@pytest.mark.slow
def test_compiled_training_equals_eager_training(tmp_path):
    """--compile 1 (inductor on the model and the loss with its fused op) takes the same
    two SGD steps as eager; its checkpoints keep the plain parameter names."""
    learned = ("--uncertainty", "softplus")  # the normalized head gets only rounding noise as gradient
    eager, compiled = trainer(tmp_path / "eager", *learned), trainer(tmp_path / "compiled", *learned, "--compile", "1")
    expected, got = parameter_changes(eager), parameter_changes(compiled)
    assert "proxies" in expected
    for name, change in expected.items():  # inductor fuses in another order: float32 rounding only
        scale = float(change.abs().max())
        assert scale > 0, f"{name} did not train"
        torch.testing.assert_close(got[name], change, rtol=1e-3, atol=1e-3 * scale, msg=name)
    assert compiled._checkpoint()["model"].keys() == eager._checkpoint()["model"].keys()


@pytest.mark.cuda
def test_default_gpu_step_runs_bf16_channels_last_close_to_float32(tmp_path):
    # One step: the gradients' bf16 rounding alone. After a second SGD step at lr 0.1 from a
    # random init the two runs are at different points: layer4.1.conv2 then differed by 0.106
    # on an H100 and by 0.107 with CPU bf16 autocast, which gives 0.009 (semantic) and 0.033
    # (layer4.1.conv2) for one step.
    fast = trainer(tmp_path / "fast", "--max-steps", "1")
    published = trainer(tmp_path / "fp32", "--amp", "off", "--max-steps", "1")
    assert fast.amp == "bf16" and published.amp == "off"
    assert torch.backends.cudnn.benchmark is False  # the last trainer built (--amp off) set it
    conv = fast.model.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert published.model.backbone.conv1.weight.is_contiguous()
    expected, got = parameter_changes(published), parameter_changes(fast)
    for name in ("semantic.weight", "backbone.layer4.1.conv2.weight"):  # bf16: about 3 significant digits
        relative = (got[name] - expected[name]).norm() / expected[name].norm()
        assert relative < 0.05, f"{name}: bf16 step differs from float32 by {float(relative):.3f} (relative)"


@pytest.mark.cuda
def test_a_gpu_training_step_never_waits_for_the_gpu(tmp_path):
    """No host synchronisation inside a step (docs/design.md, section 4): CUDA's sync debug mode turns any
    synchronising call (.item(), nonzero, a blocking copy) into an error."""
    run = trainer(tmp_path, "--optimizer", "adamw")  # the default optimizer
    run.parts.model.train()
    run.forward_pair = run.parts.model
    images, labels, _ = next(iter(run.parts.train_loader))
    images, labels = images.to(run.parts.device, non_blocking=True), labels.to(run.parts.device, non_blocking=True)
    run.train_step(images, labels)  # the first step allocates (cuBLAS workspaces, pinned buffers)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.train_step(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
