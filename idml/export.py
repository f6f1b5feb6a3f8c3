"""TorchScript export of a trained model: uint8 images in, (embedding, uncertainty) out.

`export_checkpoint(ckpt, out)` writes a `torch.jit.script`-ed `ExportedEmbedder`: a
self-contained copy of the trained network that loads with `torch.jit.load` (Python) or
`torch::jit::load` (C++, libtorch) where idml is not installed. It maps a uint8 batch
(N, 3, H, W) (or (N, 1, H, W), grey) to

    embedding    N x D, the L2-normalised semantic head mu (what retrieval compares)
    uncertainty  N,     |sigma|^2 of the uncertainty head (1 for every image when the
                        model was trained with --uncertainty normalized, as published)

with the evaluation preprocessing inside: resize the shorter side (bilinear, antialiased),
centre crop, scale to [0, 1], mean/std normalisation. All images of one batch share one
size; batch images of different sizes separately. The backbone's BatchNorm layers are
replaced by a fixed (running statistics) normalisation, so `.train()` cannot change the
output, and nothing refers to idml's Python code or its C++ ops.
"""

import contextlib
import copy
import io
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from idml.config import DataConfig
from idml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_size
from idml.errors import UsageError
from idml.files import atomic_write

# The digits are grey scans scaled to [-1, 1] and upsampled straight to the input size.
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)


class EvalBatchNorm2d(nn.Module):
    """BatchNorm2d that always normalises with its running statistics (eval mode, frozen)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.register_buffer("weight", bn.weight.detach().clone())
        self.register_buffer("bias", bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.eps = float(bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _freeze_batch_norms(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, EvalBatchNorm2d(child))
        else:
            _freeze_batch_norms(child)
    return module


class ExportedEmbedder(nn.Module):
    """Scriptable: uint8 images (N, C, H, W) -> (embedding N x D, uncertainty N)."""

    def __init__(self, model, resize: int, crop: int, mean, std):
        super().__init__()
        backbone = _freeze_batch_norms(copy.deepcopy(model.backbone).cpu().float().eval())
        self.conv1, self.bn1, self.relu, self.maxpool = backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            backbone.layer1,
            backbone.layer2,
            backbone.layer3,
            backbone.layer4,
        )
        self.semantic = nn.Linear(model.semantic.in_features, model.semantic.out_features)
        self.semantic.load_state_dict(model.semantic.state_dict())
        self.uncertainty_head = nn.Linear(model.uncertainty_head.in_features, model.uncertainty_head.out_features)
        self.uncertainty_head.load_state_dict(model.uncertainty_head.state_dict())
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.resize_size = int(resize)
        self.crop_size = int(crop)
        self.embedding_size = int(model.embedding_size)
        self.uncertainty_mode = str(model.uncertainty)
        self.l2_norm = bool(model.l2_norm)
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    @torch.jit.export
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 1 or 3, H, W) -> normalised float (N, 3, crop, crop)."""
        if images.dim() != 4 or (images.size(1) != 3 and images.size(1) != 1):
            raise ValueError("expected a uint8 image batch of shape (N, 3, H, W) or (N, 1, H, W)")
        if images.dtype != torch.uint8:
            raise ValueError("expected uint8 images (0..255)")
        x = images.to(self.mean.device).float() / 255.0
        if x.size(1) == 1:
            x = x.expand(-1, 3, -1, -1)
        height, width = x.size(2), x.size(3)
        # Shorter side to resize_size, the longer one in proportion (torchvision's Resize(int)).
        if height <= width:
            new_h, new_w = self.resize_size, int(self.resize_size * width / height)
        else:
            new_h, new_w = int(self.resize_size * height / width), self.resize_size
        if new_h != height or new_w != width:
            x = F.interpolate(x, size=[new_h, new_w], mode="bilinear", align_corners=False, antialias=True)
        crop = self.crop_size
        if new_h < crop or new_w < crop:
            raise ValueError("the resized image is smaller than the crop")
        top = int(round((new_h - crop) / 2.0))
        left = int(round((new_w - crop) / 2.0))
        x = x[:, :, top : top + crop, left : left + crop]
        return (x - self.mean) / self.std

    @torch.jit.export
    def embed_preprocessed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images -> (L2-normalised mu, |sigma|^2)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        h = (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)).flatten(1)
        mu, sigma = self.semantic(h), self.uncertainty_head(h)
        # Retrieval compares normalised mu (evaluation normalises whatever --l2-norm was).
        embedding = mu / torch.sqrt((mu * mu).sum(dim=1, keepdim=True) + 1e-12)
        if self.uncertainty_mode == "normalized":
            if self.l2_norm:
                sigma = sigma / torch.sqrt((sigma * sigma).sum(dim=1, keepdim=True) + 1e-12)
        elif self.uncertainty_mode == "relu":
            sigma = F.relu(sigma)
        else:
            sigma = F.softplus(sigma)
        return embedding, (sigma * sigma).sum(dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_preprocessed(self.preprocess(images))

    @torch.jit.export
    def info(self) -> list[str]:
        return [
            f"embedding_size={self.embedding_size}",
            f"input={self.crop_size}",
            f"resize={self.resize_size}",
            f"uncertainty={self.uncertainty_mode}",
        ]


def preprocessing_of(data: DataConfig) -> dict:
    """The eval preprocessing of a run's data configuration."""
    from idml.data import default_image_size

    size = data.image_size or default_image_size(data.dataset)
    if data.dataset == "digits":
        return dict(resize=size, crop=size, mean=DIGITS_MEAN, std=DIGITS_STD)
    return dict(resize=resize_size(size), crop=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@contextlib.contextmanager
def quiet_jit():
    """torch >= 2.10 warns that torch.jit.script/save/load are deprecated; they still work and
    are what libtorch (C++) loads, so the warning is only noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
        yield


def build_exported(model, data: DataConfig):
    """(eager ExportedEmbedder, its torch.jit.script-ed module)."""
    wrapper = ExportedEmbedder(model, **preprocessing_of(data))
    with quiet_jit():
        return wrapper, torch.jit.script(wrapper)


def save_scripted(module: torch.jit.ScriptModule, out: str) -> None:
    buffer = io.BytesIO()
    with quiet_jit():
        torch.jit.save(module, buffer)
    atomic_write(out, lambda f: f.write(buffer.getbuffer()))


def export_checkpoint(checkpoint: str, out: str) -> dict:
    """Write the TorchScript module of `checkpoint` to `out`; check it against the eager
    model on a random batch. Returns a summary (the max abs differences included)."""
    from idml.checkpoint import model_from_checkpoint

    model, config = model_from_checkpoint(checkpoint)  # refuses non-finite weights
    wrapper, scripted = build_exported(model, config.data)
    generator = torch.Generator().manual_seed(0)
    size = preprocessing_of(config.data)["resize"]
    images = torch.randint(0, 256, (2, 3, size + 7, size), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        eager_embedding, eager_uncertainty = eager_reference(model, wrapper, images)
        # Finite weights can still give NaN (a negative BatchNorm variance, an overflow): checked
        # before anything is written, so no search ever ranks by NaN similarities.
        if not all(bool(torch.isfinite(t).all()) for t in (*scripted(images), eager_embedding, eager_uncertainty)):
            raise UsageError(
                f"{checkpoint}: the model's embedding or uncertainty of a random check batch is NaN "
                f"or infinite, so it is not exported (a diverged or damaged run; use an earlier "
                f"checkpoint)"
            )
    save_scripted(scripted, out)
    with quiet_jit():
        loaded = torch.jit.load(out, map_location="cpu")
    with torch.no_grad():
        embedding, uncertainty = loaded(images)
    return {
        "out": out,
        "embedding_size": int(embedding.shape[1]),
        "input_size": preprocessing_of(config.data)["crop"],
        "uncertainty": config.model.uncertainty,
        "max_embedding_diff": float((embedding - eager_embedding).abs().max()),
        "max_uncertainty_diff": float((uncertainty - eager_uncertainty).abs().max()),
    }


@torch.no_grad()
def eager_reference(model, wrapper: ExportedEmbedder, images: torch.Tensor):
    """The eager IDMLNet's (L2-normalised mu, |sigma|^2) on the wrapper's preprocessing run eagerly."""
    mu, sigma = model.eval()(wrapper.preprocess(images))
    mu = mu / torch.sqrt((mu * mu).sum(dim=1, keepdim=True) + 1e-12)
    return mu, (sigma * sigma).sum(dim=1)
