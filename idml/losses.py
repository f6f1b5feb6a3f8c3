"""Losses of IDML (IDML_METHOD.md section 3)."""
import torch
from torch import nn

from idml import ops


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
    ):
        super().__init__()
        # As published: randn, then Kaiming-normal (fan_out). The first draw is overwritten,
        # but it keeps the random stream, hence every later draw, identical to the published code.
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_size))
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
