"""The IDML embedding network (docs/method.md, section 1).

A torchvision ResNet up to layer4, global average + global max pooling (summed), and two
linear heads: semantic mu and uncertainty sigma.
"""

import os
import urllib.error

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from idml.choices import ARCHITECTURES, UNCERTAINTY_MODES
from idml.errors import UsageError, require_file, torch_load_failure
from idml.reference import l2_normalize


def _imagenet_weights(arch: str):
    """torchvision's ImageNet weights enum, V1 as in the published code (pretrained=True)."""
    enum_name = {
        "resnet18": "ResNet18_Weights",
        "resnet34": "ResNet34_Weights",
        "resnet50": "ResNet50_Weights",
        "resnet101": "ResNet101_Weights",
    }[arch]
    return getattr(torchvision.models, enum_name).IMAGENET1K_V1


def load_backbone(arch: str, pretrained: str) -> nn.Module:
    """A torchvision ResNet with `pretrained` = 'imagenet', 'none' or a state-dict file."""
    if arch not in ARCHITECTURES:
        raise UsageError(f"--model must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    backbone = getattr(torchvision.models, arch)(weights=None)
    if pretrained == "none":
        return backbone
    if pretrained == "imagenet":
        weights = _imagenet_weights(arch)
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        try:
            state = weights.get_state_dict(progress=False)
        except (urllib.error.URLError, OSError) as error:
            raise UsageError(
                f"could not download the ImageNet weights of {arch} ({error}): download {weights.url} "
                f"on a machine with network access and save it as {cached}, or pass --pretrained PATH "
                f"to a torchvision {arch} state dict, or --pretrained none"
            ) from None
    else:
        require_file(pretrained, "--pretrained expects 'imagenet', 'none' or a weights file")
        try:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UsageError(
                f"--pretrained {pretrained} is not a loadable torch state dict ({torch_load_failure(error)})"
            ) from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is replaced anyway
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        problems = [f"no key {k}" for k in missing if not k.startswith("fc.")] + [
            f"an unexpected key {k}" for k in unexpected
        ]
    except RuntimeError as error:  # shapes of another architecture
        problems = [str(error).splitlines()[1].strip()]
    if problems:
        raise UsageError(f"--pretrained {pretrained}: not a torchvision {arch} state dict ({problems[0]})")
    return backbone


def _conv_frozen_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)) for an eval-mode BatchNorm as ONE convolution: with s = gamma / sqrt(var + eps),
    bn(conv(x, W)) = conv(x, W s) + (beta - mean s). Only the weights are rescaled (a few MB);
    the BatchNorm's own passes over the activations, forward and backward, disappear: in bf16
    channels_last its backward took 20 ms of an 80 ms ResNet-50 training step on an H100."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return _conv2d(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias, conv)


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """F.conv2d(x, weight, bias) with `conv`'s geometry. When the output is one pixel (small
    images: 32 px leave layer4 at 1 x 1) it is one matrix product of the input window that
    pixel sees with the kernel taps that see it, those over the zero padding left out: the
    same sums. oneDNN's backward of a 3 x 3 convolution on 1 x 1 inputs (512 channels,
    batch 240) took 318 ms on an AVX2 CPU, the matrix product 11 ms."""
    plain = (
        conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )
    (kh, kw), (ph, pw), (sh, sw) = conv.kernel_size, (conv.padding if plain else (0, 0)), conv.stride
    height, width = x.shape[-2:]
    rows, cols = min(kh - ph, height), min(kw - pw, width)  # of the window, from the input's top left
    one_pixel = (height + 2 * ph - kh) // sh == 0 and (width + 2 * pw - kw) // sw == 0
    if not (plain and one_pixel and rows > 0 and cols > 0):
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    window = x[:, :, :rows, :cols].reshape(x.shape[0], -1)
    taps = weight[:, :, ph : ph + rows, pw : pw + cols].reshape(weight.shape[0], -1)
    return F.linear(window, taps, bias).reshape(x.shape[0], -1, 1, 1)


def _folded_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock / Bottleneck forward with each BatchNorm folded into its conv."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        pairs.append((block.conv3, block.bn3))
    identity = x if block.downsample is None else _conv_frozen_bn(block.downsample[0], block.downsample[1], x)
    out = x
    for k, (conv, bn) in enumerate(pairs):
        out = _conv_frozen_bn(conv, bn, out)
        if k < len(pairs) - 1:
            out = F.relu(out, inplace=True)
    return F.relu(out + identity, inplace=True)


def _batch_norms_foldable(backbone: nn.Module) -> bool:
    """Whether every normalisation layer is a plain BatchNorm2d in eval mode (running
    statistics, affine): then folding is exact. Training-mode or SyncBatchNorm: no."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return all(type(m) is nn.BatchNorm2d and not m.training and m.affine and m.track_running_stats for m in norms)


class IDMLNet(nn.Module):
    """images -> (mu, sigma), each B x embedding_size.

    uncertainty='normalized' (published): sigma is L2-normalised like mu when l2_norm, so
    |sigma|^2 = 1 for every image and the uncertainty head learns nothing.
    'relu' / 'softplus': sigma = that non-negative map of the head's output, never
    normalised, so |sigma|^2 varies per image and the head learns.

    fold_batch_norm: while every BatchNorm is in eval mode (always with bn_freeze, the
    published default), each one is folded into the convolution before it (see
    _conv_frozen_bn): the same function, without a BatchNorm pass forward and backward.
    False keeps torchvision's layer-by-layer forward (the published recipe's, for benchmarks).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        embedding_size: int = 512,
        pretrained: str = "imagenet",
        l2_norm: bool = True,
        uncertainty: str = "normalized",
        bn_freeze: bool = True,
        fold_batch_norm: bool = True,
    ):
        super().__init__()
        if uncertainty not in UNCERTAINTY_MODES:
            raise UsageError(f"--uncertainty must be one of {', '.join(UNCERTAINTY_MODES)}, got {uncertainty!r}")
        backbone = load_backbone(arch, pretrained)
        num_features = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        # The published order of random draws, so that a seed gives the published initial model:
        # both heads are created (PyTorch's default init of each), then the semantic weight is
        # drawn again, Kaiming-normal (fan_out). The uncertainty head keeps its default init.
        self.semantic = nn.Linear(num_features, embedding_size)
        self.uncertainty_head = nn.Linear(num_features, embedding_size)
        nn.init.kaiming_normal_(self.semantic.weight, mode="fan_out")
        nn.init.zeros_(self.semantic.bias)
        self.arch, self.embedding_size = arch, embedding_size
        self.l2_norm, self.uncertainty, self.bn_freeze = l2_norm, uncertainty, bn_freeze
        self.fold_batch_norm = fold_batch_norm
        if bn_freeze:
            for module in self.batch_norms():
                module.weight.requires_grad_(False)
                module.bias.requires_grad_(False)

    def batch_norms(self):
        return [m for m in self.backbone.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.bn_freeze:  # frozen BatchNorm stays in eval mode in every epoch
            for module in self.batch_norms():
                module.eval()
        return self

    def set_warmup(self, active: bool) -> None:
        """During warm-up only the semantic head (and the proxies) train."""
        frozen_bn = {id(p) for m in self.batch_norms() for p in m.parameters()} if self.bn_freeze else set()
        for parameter in list(self.backbone.parameters()) + list(self.uncertainty_head.parameters()):
            if id(parameter) not in frozen_bn:
                parameter.requires_grad_(not active)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        if self.fold_batch_norm and _batch_norms_foldable(b):
            x = b.maxpool(F.relu(_conv_frozen_bn(b.conv1, b.bn1, images), inplace=True))
            for block in (*b.layer1, *b.layer2, *b.layer3, *b.layer4):
                x = _folded_block(block, x)
        else:
            x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
            x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)).flatten(1)

    def forward(self, images: torch.Tensor):
        h = self.features(images)
        mu, sigma = self.semantic(h), self.uncertainty_head(h)
        if self.l2_norm:
            mu = l2_normalize(mu)
        if self.uncertainty == "normalized":
            sigma = l2_normalize(sigma) if self.l2_norm else sigma
        elif self.uncertainty == "relu":
            sigma = F.relu(sigma)
        else:
            sigma = F.softplus(sigma)
        return mu, sigma
