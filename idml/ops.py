"""Python face of the idml operators (DESIGN.md, op contracts).

Each public function dispatches to the compiled kernels of `idml._C` (torch.ops.idml.*)
when the extension is built and has a kernel for the inputs' device, and otherwise to
the plain-PyTorch reference in idml/reference.py. Fake kernels (for torch.compile) and
autograd formulas of the compiled operators are registered here.
"""
import warnings

import torch

from idml import reference

try:
    from idml import _C  # noqa: F401  (loading the library registers torch.ops.idml.*)

    EXTENSION_ERROR = None
except ImportError as error:  # not built, or built against another torch
    EXTENSION_ERROR = error
    warnings.warn(
        f"idml: the compiled extension idml._C could not be loaded ({error}); falling back to "
        "the slower plain-PyTorch reference ops. Build it with "
        "`pip install --no-build-isolation -e .` from the repository root.",
        stacklevel=2,
    )


def has_kernel(op_name: str, device: torch.device) -> bool:
    """Whether torch.ops.idml.<op_name> exists with a kernel for `device`'s backend."""
    if EXTENSION_ERROR is not None or not hasattr(torch.ops.idml, op_name):
        return False
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return dispatch_key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"idml::{op_name}", dispatch_key
    )


# --- introspective Proxy Anchor loss -------------------------------------------------

# Looked up once, so that pa_ism_loss stays traceable by torch.compile (fullgraph).
_PA_ISM_KERNEL = {dev: has_kernel("pa_ism_forward", torch.device(dev)) for dev in ("cpu", "cuda")}


def pa_ism_loss(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    margin: float = 0.1,
    alpha: float = 32.0,
    ism: bool = True,
    ism_offset: float = 4.0,
    ism_scale: float = 5.0,
) -> torch.Tensor:
    """Proxy Anchor loss on the introspective similarity, a scalar (IDML_METHOD.md s. 3).

    Runs the fused kernels of idml._C when they exist for the inputs' device, else the
    reference. The loss is float32 (float64 for float64 inputs); gradients come back in
    each input's dtype. Inputs of different floating dtypes (e.g. bf16 embeddings from
    autocast with float32 proxies) are computed in their promoted dtype.
    """
    if not _PA_ISM_KERNEL.get(mu.device.type, False):
        return reference.pa_ism_loss(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale)
    dtype = torch.promote_types(torch.promote_types(mu.dtype, sigma.dtype), proxies.dtype)
    loss, _, _, _, _ = torch.ops.idml.pa_ism_forward(
        mu.to(dtype), sigma.to(dtype), labels, proxies.to(dtype),
        float(margin), float(alpha), bool(ism), float(ism_offset), float(ism_scale),
    )
    return loss


def _pa_ism_stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if EXTENSION_ERROR is None and hasattr(torch.ops.idml, "pa_ism_forward"):

    @torch.library.register_fake("idml::pa_ism_forward")
    def _pa_ism_forward_fake(mu, sigma, labels, proxies, margin=0.1, alpha=32.0, ism=True,
                             ism_offset=4.0, ism_scale=5.0):
        stats = _pa_ism_stats_dtype(mu.dtype)
        batch, num_classes = mu.shape[0], proxies.shape[0]
        return (
            mu.new_empty((), dtype=stats),
            mu.new_empty((batch, num_classes), dtype=stats),
            mu.new_empty((2, batch), dtype=stats),
            mu.new_empty((3, num_classes), dtype=stats),
            mu.new_empty((), dtype=stats),
        )

    @torch.library.register_fake("idml::pa_ism_backward")
    def _pa_ism_backward_fake(grad_loss, mu, sigma, labels, proxies, dots, row_stats, col_stats,
                              num_positive, margin=0.1, alpha=32.0, ism=True, ism_offset=4.0,
                              ism_scale=5.0):
        return torch.empty_like(mu), torch.empty_like(sigma), torch.empty_like(proxies)

    def _pa_ism_setup_context(ctx, inputs, output):
        mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale = inputs
        _, dots, row_stats, col_stats, num_positive = output
        ctx.save_for_backward(mu, sigma, labels, proxies, dots, row_stats, col_stats, num_positive)
        ctx.hyper = (margin, alpha, ism, ism_offset, ism_scale)

    def _pa_ism_backward(ctx, grad_loss, *unused_grads):
        # Only the loss is differentiable: the other outputs are saved statistics.
        grad_mu, grad_sigma, grad_proxies = torch.ops.idml.pa_ism_backward(
            grad_loss, *ctx.saved_tensors, *ctx.hyper
        )
        return grad_mu, grad_sigma, None, grad_proxies, None, None, None, None, None

    torch.library.register_autograd(
        "idml::pa_ism_forward", _pa_ism_backward, setup_context=_pa_ism_setup_context
    )


# --- retrieval metrics ------------------------------------------------------------------
