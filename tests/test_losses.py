"""idml.losses.ProxyAnchorISM: the module around idml.ops.pa_ism_loss."""

import math

import pytest
import torch

from idml import ops, reference
from idml.losses import ProxyAnchorISM


def test_proxies_are_initialised_as_published():
    torch.manual_seed(3)
    criterion = ProxyAnchorISM(num_classes=2000, embedding_size=64)
    torch.manual_seed(3)
    expected = torch.randn(2000, 64)
    torch.nn.init.kaiming_normal_(expected, mode="fan_out")
    assert isinstance(criterion.proxies, torch.nn.Parameter) and criterion.proxies.shape == (2000, 64)
    torch.testing.assert_close(criterion.proxies.data, expected)
    # Kaiming-normal with fan_out = num_classes for a (C, D) weight: std sqrt(2 / C).
    assert criterion.proxies.std().item() == pytest.approx(math.sqrt(2 / 2000), rel=0.05)


@pytest.mark.parametrize("ism", [True, False])
def test_forward_is_the_fused_loss(ism):
    assert ops.has_kernel("pa_ism_forward", torch.device("cpu"))
    criterion = ProxyAnchorISM(
        num_classes=50, embedding_size=16, margin=0.2, alpha=16.0, ism=ism, ism_offset=3.0, ism_scale=2.0
    )
    mu, sigma = torch.randn(24, 16, requires_grad=True), torch.randn(24, 16).relu().requires_grad_()
    labels = torch.randint(0, 50, (24,))
    loss = criterion(mu, sigma, labels)
    expected = reference.pa_ism_loss(mu, sigma, labels, criterion.proxies, 0.2, 16.0, ism, 3.0, 2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    loss.backward()
    assert criterion.proxies.grad is not None and criterion.proxies.grad.abs().sum() > 0
    assert mu.grad.abs().sum() > 0
    # --ism 0 is plain Proxy Anchor: sigma plays no part.
    assert (sigma.grad.abs().sum() > 0) == ism


def test_defaults_and_repr():
    criterion = ProxyAnchorISM(num_classes=5, embedding_size=4)
    assert (criterion.margin, criterion.alpha, criterion.ism, criterion.ism_offset, criterion.ism_scale) == (
        0.1,
        32.0,
        True,
        4.0,
        5.0,
    )
    assert "num_classes=5" in repr(criterion) and "ism=True" in repr(criterion)
