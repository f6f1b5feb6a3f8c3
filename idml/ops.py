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
    """Proxy Anchor loss on the introspective similarity, a scalar (IDML_METHOD.md s. 3)."""
    return reference.pa_ism_loss(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale)


# --- retrieval metrics ------------------------------------------------------------------
