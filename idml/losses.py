"""Losses of IDML (docs/method.md, section 3)."""

import torch
from torch import nn

from idml import ops
from idml.choices import LOSSES
from idml.config import LossConfig


class ProxyAnchorISM(nn.Module):
    """Proxy Anchor loss on the introspective similarity, with one learnable proxy per class.

    `forward(mu, sigma, labels)` takes the raw outputs of the semantic and uncertainty heads
    and int64 labels in [0, num_classes); it returns the scalar loss (fused kernels of
    idml.ops.pa_ism_loss). With `ism=False` it is the plain Proxy Anchor loss, through the
    same kernel.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        ism: bool = True,
        ism_offset: float = 4.0,
        ism_scale: float = 5.0,
        device: "torch.device | str | None" = None,
    ):
        super().__init__()
        # As published: randn on the CPU, moved to the training device, then Kaiming-normal
        # (fan_out) there: on a GPU from the GPU's generator. The first draw is overwritten, but
        # it keeps the CPU's random stream, hence every later draw, identical to the published code.
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size).to(device))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = margin
        self.alpha = alpha
        self.ism = ism
        self.ism_offset = ism_offset
        self.ism_scale = ism_scale

    def forward(self, mu: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ops.pa_ism_loss(
            mu, sigma, labels, self.proxies, self.margin, self.alpha, self.ism, self.ism_offset, self.ism_scale
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
            f"alpha={self.alpha}, ism={self.ism}, ism_offset={self.ism_offset}, ism_scale={self.ism_scale}"
        )


# --- the published baselines (Proxy-Anchor-CVPR2020's losses.py), through pytorch-metric-learning ---


def _pml():
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError:
        from idml.errors import UsageError

        raise UsageError(
            "the baseline losses (--loss Proxy_NCA, MS, Contrastive, Triplet, NPair) need "
            "pytorch-metric-learning: pip install pytorch-metric-learning"
        ) from None
    return losses, miners


class BaselineLoss(nn.Module):
    """A published baseline: `forward(mu, sigma, labels)` ignores sigma and applies the
    pytorch-metric-learning loss (after its miner, when it has one) to (mu, labels), in
    float32. Proxy-based losses hold their proxies as parameters of this module (so they
    train at 100 x lr, as published)."""

    def __init__(self, name: str, loss_func: nn.Module, miner: nn.Module = None):
        super().__init__()
        self.name = name
        self.loss_func = loss_func
        self.miner = miner

    def forward(self, mu: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mu = mu.float()
        if self.miner is None:
            return self.loss_func(mu, labels)
        return self.loss_func(mu, labels, self.miner(mu, labels))

    def extra_repr(self) -> str:
        return f"name={self.name}"


def baseline_loss(name: str, num_classes: int, embedding_size: int) -> BaselineLoss:
    """The baselines with the published hyperparameters of Proxy-Anchor-CVPR2020 (losses.py)."""
    losses, miners = _pml()
    if name == "Proxy_NCA":
        return BaselineLoss(
            name, losses.ProxyNCALoss(num_classes=num_classes, embedding_size=embedding_size, softmax_scale=32)
        )
    if name == "MS":
        return BaselineLoss(
            name, losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
        )
    if name == "Contrastive":  # no miner, as published
        return BaselineLoss(name, losses.ContrastiveLoss(neg_margin=0.5))
    if name == "Triplet":
        return BaselineLoss(
            name,
            losses.TripletMarginLoss(margin=0.1),
            miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard"),
        )
    if name == "NPair":  # the published code passes no arguments (its l2_reg=0 is commented out)
        return BaselineLoss(name, losses.NPairsLoss())
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")


def build_criterion(
    config: LossConfig, embedding_size: int, num_classes: int, device: "torch.device | None" = None
) -> nn.Module:
    """The training criterion of --loss on `device`: Proxy Anchor (+ ISM) or a published baseline."""
    if config.loss == "Proxy_Anchor":
        return ProxyAnchorISM(
            num_classes,
            embedding_size,
            margin=config.mrg,
            alpha=config.alpha,
            ism=bool(config.ism),
            ism_offset=config.ism_offset,
            ism_scale=config.ism_scale,
            device=device,
        )
    return baseline_loss(config.loss, num_classes, embedding_size).to(device)
