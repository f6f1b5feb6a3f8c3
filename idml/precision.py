"""Numerics of the forward pass: --amp and the memory layout that goes with it.

--amp auto (the default) takes the fast path where it is safe: bf16 autocast with
channels_last weights on a GPU that supports bf16 (tensor-core convolutions want NHWC;
given NHWC weights cuDNN picks the NHWC kernels and converts the NCHW input itself).
With it cuDNN times its convolution algorithms at the first step of each input shape and
keeps the fastest (every training batch has one shape). --amp off reproduces the published
recipe: float32, NCHW, cuDNN's default algorithm choice. The loss and the optimizer
always work in float32 (the fused op accumulates in float32 whatever its inputs).
"""

import contextlib

import torch
from torch import nn


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp as run on `device`: 'auto' becomes 'bf16' on a GPU with bf16 support, else 'off'."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"


def autocast(device: torch.device, amp: str):
    """Mixed precision of the forward pass for a resolved --amp: 'off', 'bf16' or 'fp16'."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def memory_format(device: torch.device, amp: str) -> torch.memory_format:
    """channels_last with mixed precision on a GPU; the published NCHW layout otherwise."""
    return torch.channels_last if device.type == "cuda" and amp != "off" else torch.contiguous_format


def configure_cudnn(device: torch.device, amp: str) -> None:
    """cuDNN autotuning on a GPU with the fast path; its default heuristics with --amp off.
    (A process-wide switch, so the training-step benchmark sets it before every step.)"""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = amp != "off"


def place_model(model: nn.Module, device: torch.device, amp: str) -> nn.Module:
    """`model` moved to `device` in the layout its resolved --amp runs best with."""
    return model.to(device, memory_format=memory_format(device, amp))


def describe(device: torch.device, amp: str) -> str:
    """How the forward pass runs, for the run's first line."""
    if amp == "off":
        return "float32"
    layout = ", channels_last" if memory_format(device, amp) == torch.channels_last else ""
    return f"{amp} autocast{layout}"
