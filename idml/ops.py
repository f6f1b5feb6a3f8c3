"""Python face of the idml operators (docs/design.md, section 2: op contracts).

Each public function dispatches to the compiled kernels of `idml._C` (torch.ops.idml.*)
when the extension is built and has a kernel for the inputs' device, and otherwise to
the plain-PyTorch reference in idml/reference.py. Fake kernels (for torch.compile) of the
compiled operators are registered here; the loss's autograd is C++ (csrc/autograd.cpp).
"""

import math
import operator
import warnings

import torch

from idml import reference
from idml.errors import UsageError

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
    # "computed": also a kernel registered for all backends at once (CompositeExplicitAutograd).
    return dispatch_key is not None and torch._C._dispatch_has_computed_kernel_for_dispatch_key(
        f"idml::{op_name}", dispatch_key
    )


# Looked up once, so that the functions below stay traceable by torch.compile (fullgraph).
_KERNELS = {
    (op, dev): has_kernel(op, torch.device(dev))
    for op in ("pa_ism_forward", "retrieval_ranks", "kmeans_plus_plus_draws")
    for dev in ("cpu", "cuda")
}


def _kernel_for(op_name: str, tensor: torch.Tensor) -> bool:
    return _KERNELS.get((op_name, tensor.device.type), False)


# --- argument checks ----------------------------------------------------------------------
# Before dispatching, so that the compiled kernels and the reference refuse the same input,
# with one sentence naming the argument (UsageError, a ValueError). Metadata only, except
# the retrieval's finiteness (one host synchronisation per call).


def _check_tensor(where: str, name: str, x, dims: int, kind: str, device: "torch.device | None" = None) -> None:
    """x: a dense tensor of `dims` dimensions, floating (kind "float") or integer ("int"),
    on `device` when given, never on the meta device (it holds no values)."""
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise UsageError(
            f"{where}: {name} must have {dims} dimension{'s' if dims > 1 else ''}, got shape {tuple(x.shape)}"
        )
    if kind == "float" and not x.is_floating_point():
        raise UsageError(f"{where}: {name} must be floating point, got {x.dtype}")
    if kind == "int" and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise UsageError(f"{where}: {name} must hold integers, got {x.dtype}")
    if x.layout != torch.strided:
        raise UsageError(f"{where}: {name} must be a dense tensor, got layout {x.layout}")
    if x.device.type == "meta":
        raise UsageError(f"{where}: {name} is on the meta device, which holds no values")
    if device is not None and x.device != device:
        raise UsageError(f"{where}: {name} must be on {device} like the other inputs, got {x.device}")


def _check_finite(where: str, name: str, x: torch.Tensor) -> None:
    """One host synchronisation; the failing case alone counts the rows."""
    if torch.compiler.is_compiling():  # data-dependent; the compiled op checks it itself
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise UsageError(
            f"{where}: {bad} of {x.shape[0]} rows of {name} hold NaN or infinite values, "
            f"so no similarity of them means anything"
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
    """Proxy Anchor loss on the introspective similarity, a scalar (docs/method.md, section 3).

    Runs the fused kernels of idml._C when they exist for the inputs' device, else the
    reference. The loss is float32 (float64 for float64 inputs); gradients come back in
    each input's dtype. Inputs of different floating dtypes (e.g. bf16 embeddings from
    autocast with float32 proxies) are computed in their promoted dtype, float16 and
    bfloat16 on the CPU in float32.

    Shapes, dtypes, devices and hyperparameters are checked (UsageError), not the values:
    a NaN input gives a NaN loss, which is how training notices that it diverged.
    """
    _check_loss_arguments(mu, sigma, labels, proxies, margin, alpha, ism_offset, ism_scale)
    if labels.dtype != torch.long:
        labels = labels.long()
    if not _kernel_for("pa_ism_forward", mu):
        return reference.pa_ism_loss(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale)
    dtype = mu.dtype
    if not mu.dtype == sigma.dtype == proxies.dtype:
        dtype = torch.promote_types(torch.promote_types(mu.dtype, sigma.dtype), proxies.dtype)
    if dtype in (torch.float16, torch.bfloat16) and mu.device.type == "cpu":  # the CPU kernels' types
        dtype = torch.float32
    if dtype != mu.dtype or dtype != sigma.dtype or dtype != proxies.dtype:
        mu, sigma, proxies = mu.to(dtype), sigma.to(dtype), proxies.to(dtype)
    # The overload itself: calling the packet torch.ops.idml.pa_ism_loss resolves the
    # overload from the arguments on every call (about 15 us of host time).
    return torch.ops.idml.pa_ism_loss.default(
        mu, sigma, labels, proxies, float(margin), float(alpha), bool(ism), float(ism_offset), float(ism_scale)
    )


def _check_loss_arguments(mu, sigma, labels, proxies, margin, alpha, ism_offset, ism_scale) -> None:
    where = "pa_ism_loss"
    _check_tensor(where, "mu", mu, 2, "float")
    _check_tensor(where, "sigma", sigma, 2, "float", mu.device)
    _check_tensor(where, "labels", labels, 1, "int", mu.device)
    _check_tensor(where, "proxies", proxies, 2, "float", mu.device)
    (batch, width), classes = mu.shape, proxies.shape[0]
    if sigma.shape[0] != batch or labels.shape[0] != batch:
        raise UsageError(
            f"{where}: mu, sigma and labels must have one row per sample, got {batch}, "
            f"{sigma.shape[0]} and {labels.shape[0]}"
        )
    if batch == 0 or width == 0:
        raise UsageError(
            f"{where}: mu must hold at least one sample of at least one column, got shape {tuple(mu.shape)}"
        )
    if proxies.shape[1] != width or classes == 0:
        raise UsageError(
            f"{where}: proxies must hold at least one proxy of mu's width {width}, got shape {tuple(proxies.shape)}"
        )
    for name, value, positive in (
        ("margin", margin, False),
        ("alpha", alpha, True),
        ("ism_offset", ism_offset, False),
        ("ism_scale", ism_scale, True),
    ):
        number = _as_float(value)
        if not math.isfinite(number) or (positive and number <= 0):
            raise UsageError(f"{where}: {name} must be a {'positive ' if positive else ''}finite number, got {value!r}")


def _as_float(value) -> float:
    """float(value), NaN for what is no real number (a string, a tensor of several values)."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def _pa_ism_stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_devices(op_name: str, *tensors: torch.Tensor, cpu_scalar: "torch.Tensor | None" = None) -> None:
    """The fake kernels' share of the C++ kernels' device checks (`cpu_scalar` may also be
    on the CPU). They also serve the meta device, whose tensors hold no values: the kernels
    would have nothing to compute, so the operators refuse them (torch.compile calls the
    fake kernels with fake tensors, whose device is the real one's) instead of returning
    uninitialised results on another input's device."""
    devices = {t.device for t in tensors if t is not None}
    if any(device.type == "meta" for device in devices | {getattr(cpu_scalar, "device", None)} if device):
        raise NotImplementedError(
            f"idml::{op_name} has no kernel for tensors on the meta device (they hold no "
            f"values); run it on cpu or cuda tensors"
        )
    if len(devices) > 1:
        raise RuntimeError(f"idml::{op_name}: all inputs must be on the same device, got {sorted(map(str, devices))}")


if EXTENSION_ERROR is None and hasattr(torch.ops.idml, "pa_ism_forward"):

    @torch.library.register_fake("idml::pa_ism_forward")
    def _pa_ism_forward_fake(
        mu, sigma, labels, proxies, margin=0.1, alpha=32.0, ism=True, ism_offset=4.0, ism_scale=5.0
    ):
        _fake_devices("pa_ism_forward", mu, sigma, labels, proxies)
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
    def _pa_ism_backward_fake(
        grad_loss,
        mu,
        sigma,
        labels,
        proxies,
        dots,
        row_stats,
        col_stats,
        num_positive,
        margin=0.1,
        alpha=32.0,
        ism=True,
        ism_offset=4.0,
        ism_scale=5.0,
    ):
        _fake_devices(
            "pa_ism_backward",
            mu,
            sigma,
            labels,
            proxies,
            dots,
            row_stats,
            col_stats,
            num_positive,
            cpu_scalar=grad_loss,
        )
        # Contiguous, as the kernels return them (empty_like would copy the inputs' strides).
        return mu.new_empty(mu.shape), sigma.new_empty(sigma.shape), proxies.new_empty(proxies.shape)

    @torch.library.register_fake("idml::pa_ism_loss")
    def _pa_ism_loss_fake(mu, sigma, labels, proxies, margin=0.1, alpha=32.0, ism=True, ism_offset=4.0, ism_scale=5.0):
        _fake_devices("pa_ism_loss", mu, sigma, labels, proxies)
        return mu.new_empty((), dtype=_pa_ism_stats_dtype(mu.dtype))


# --- retrieval metrics ------------------------------------------------------------------

_reference_ops = reference  # the functions below take an argument named `reference`


def retrieval_ranks(
    emb: torch.Tensor,
    labels: torch.Tensor,
    max_r: int = 1023,
    precision: str = "fp32",
    reference: "torch.Tensor | None" = None,
    reference_labels: "torch.Tensor | None" = None,
    max_k: "int | None" = None,
) -> "tuple[torch.Tensor, torch.Tensor]":
    """Ranks of each query's best R = min(#relevant, max_r) same-class items.

    Returns (ranks [n, cap] int64, num_relevant [n] int64): ranks[q, t] is the 1-based
    position, in q's ranking of all candidates, of q's (t+1)-th relevant item (0 for
    t >= R). Exact up to max(R, max_k); a larger rank is reported as max(R, max_k) + 1
    (the metrics need no more, and the CPU kernel stops counting there). max_k=None:
    every rank exact. Similarity is the dot product of the rows; equal similarities rank
    the lower (reference) index first. Without `reference` every row is a query against
    all other rows (itself excluded); with it, against the reference rows.

    Refuses (UsageError) what has no meaningful ranking: rows that are not N x D matrices
    with D >= 1, non-finite rows (one host synchronisation), labels that are not one
    integer per row, max_r or max_k below 1, an unknown precision.
    """
    _check_retrieval_arguments("retrieval_ranks", emb, labels, max_r, precision, reference, reference_labels, max_k)
    if max_k is None:
        max_k = max(1, emb.shape[0] if reference is None else reference.shape[0])
    if _kernel_for("retrieval_ranks", emb):
        return torch.ops.idml.retrieval_ranks(emb, labels, reference, reference_labels, max_r, max_k, precision)
    return _reference_ops.retrieval_ranks(emb, labels, max_r, precision, reference, reference_labels, max_k)


def _check_retrieval_arguments(where, emb, labels, max_r, precision, reference, reference_labels, max_k) -> None:
    if (reference is None) != (reference_labels is None):
        raise UsageError(f"{where}: give both reference and reference_labels, or neither")
    rows = [("emb", emb, "labels", labels)]
    if reference is not None:
        rows.append(("reference", reference, "reference_labels", reference_labels))
    for name, x, labels_name, x_labels in rows:
        _check_tensor(where, name, x, 2, "float", None if name == "emb" else emb.device)
        if x.shape[1] == 0:
            raise UsageError(
                f"{where}: {name} must have at least one column, got shape {tuple(x.shape)} "
                f"(embeddings of width 0 are all equal)"
            )
        if x.shape[1] != emb.shape[1]:
            raise UsageError(f"{where}: reference must have emb's width {emb.shape[1]}, got shape {tuple(x.shape)}")
        _check_tensor(where, labels_name, x_labels, 1, "int", emb.device)
        if x_labels.shape[0] != x.shape[0]:
            raise UsageError(
                f"{where}: {labels_name} must hold one label per row of {name} ({x.shape[0]}), got {x_labels.shape[0]}"
            )
    for name, value in (("max_r", max_r), ("max_k", max_k)):
        if value is not None and not _is_positive_integer(value):
            raise UsageError(f"{where}: {name} must be a positive integer, got {value!r}")
    if precision not in ("fp32", "tf32", "bf16"):
        raise UsageError(f"{where}: precision must be 'fp32', 'tf32' or 'bf16', got {precision!r}")
    for name, x, _, _ in rows:
        _check_finite(where, name, x)


def _is_positive_integer(value) -> bool:
    try:
        return not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        return False


def _checked_ks(where: str, ks) -> "tuple[int, ...]":
    """ks as a tuple of positive ints (R@K's K)."""
    try:
        values = tuple(ks)
    except TypeError:
        values = ()
    if not values or not all(_is_positive_integer(k) for k in values):
        raise UsageError(f"{where}: ks must be one or more positive integers, got {ks!r}")
    return tuple(operator.index(k) for k in values)


if EXTENSION_ERROR is None and hasattr(torch.ops.idml, "retrieval_ranks"):

    @torch.library.register_fake("idml::retrieval_ranks")
    def _retrieval_ranks_fake(queries, query_labels, references, reference_labels, max_r, max_k, precision):
        _fake_devices("retrieval_ranks", queries, query_labels, references, reference_labels)
        cap = torch.library.get_ctx().new_dynamic_size()
        n = queries.shape[0]
        return queries.new_empty((n, cap), dtype=torch.long), queries.new_empty((n,), dtype=torch.long)


def metrics_from_ranks(ranks: torch.Tensor, num_relevant: torch.Tensor, ks=(1, 2, 4, 8)) -> dict:
    """R@K, RP and MAP@R (docs/method.md, section 5) from retrieval_ranks' output.

    R@K is a share of ALL queries, a query without any relevant item counting as a miss,
    as the published code does (pytorch-metric-learning instead leaves such "lone" queries
    out of its precision_at_1). RP and MAP@R average over queries with R > 0, R capped at
    max_r. The t-th relevant item (in rank order) is among the R nearest iff its rank is
    <= R, and then contributes precision t / rank to MAP@R. Without any query no metric is
    defined (UsageError), nor with negative ranks (checked in the one read-back).
    """
    where = "metrics_from_ranks"
    ks = _checked_ks(where, ks)
    _check_tensor(where, "ranks", ranks, 2, "int")
    _check_tensor(where, "num_relevant", num_relevant, 1, "int", ranks.device)
    n = num_relevant.shape[0]
    if ranks.shape[0] != n:
        raise UsageError(
            f"{where}: ranks must have one row per query ({n}, as num_relevant), got shape {tuple(ranks.shape)}"
        )
    if n == 0:
        raise UsageError(f"{where}: there is no query, so no metric is defined")
    names = [f"R@{k}" for k in ks] + ["RP", "MAP@R"]
    if ranks.shape[1] == 0:  # no query with a relevant item
        return dict.fromkeys(names, 0.0)
    ranks, num_relevant = ranks.long(), num_relevant.long()
    # All on the device and read back once (on a GPU each .item() or copy from the host
    # would wait for it), in few operations: at CUB size their launches, not their
    # arithmetic, set the pace on a GPU.
    # A listed item counts iff 0 < rank <= R (the lists are 0-padded past R, so a query
    # without relevant items counts nothing and adds 0 to the sums).
    counted = (ranks > 0) & (ranks <= num_relevant.unsqueeze(1))
    t = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=torch.float64)
    precision_terms = torch.where(counted, t / ranks, 0.0)
    per_query = torch.stack([counted.sum(dim=1), precision_terms.sum(dim=1)]) / num_relevant.clamp_min(1)  # RP, AP@R
    averages = per_query.sum(dim=1) / (num_relevant > 0).sum().clamp_min(1)
    # R@K from a histogram of the first relevant item's rank (0: the query has none).
    largest = max(ks)
    first = ranks[:, 0].clamp(0, largest + 1)  # a negative rank is refused below, after the one read-back
    histogram = torch.zeros(largest + 2, dtype=torch.long, device=ranks.device)
    histogram.scatter_add_(0, first, torch.ones_like(first))
    within = histogram[1:].cumsum(dim=0)  # within[k - 1]: queries whose first relevant item ranks <= k
    # One index per k: indexing with ks as a tensor would copy it from the host, which waits for the GPU.
    recall = torch.stack([within[k - 1] for k in ks]).double() / n
    negative = ((ranks < 0).any() | (num_relevant < 0).any()).double().view(1)
    *values, negative = torch.cat([recall, averages, negative]).tolist()
    if negative:
        raise UsageError(f"{where}: ranks and num_relevant must not be negative (as retrieval_ranks returns them)")
    return dict(zip(names, values))


def retrieval_metrics(
    emb: torch.Tensor,
    labels: torch.Tensor,
    ks=(1, 2, 4, 8),
    max_r: int = 1023,
    precision: str = "fp32",
    reference: "torch.Tensor | None" = None,
    reference_labels: "torch.Tensor | None" = None,
) -> dict:
    """{"R@k" for k in ks, "RP", "MAP@R"} as python floats, exact (docs/method.md, section 5).

    Rows are compared by their dot product: pass L2-normalised rows for cosine retrieval.
    Without `reference` every row is a query against all other rows (itself excluded);
    with `reference`/`reference_labels` the rows of `emb` are queries against the
    reference set (query/gallery mode, nothing excluded). Ties rank the lower (reference)
    index first. R = number of relevant items, capped at max_r. See metrics_from_ranks.

    precision: "fp32" (exact float32 dot products, the default); "tf32" (CUDA TF32 tensor
    cores; exact float32 on CPU) and "bf16" (inputs rounded to bfloat16, float32
    accumulation) are speed modes that may reorder near-ties: on normalised embeddings
    each metric stays within 0.005 (tf32) / 0.01 (bf16) of fp32, absolute (tested in
    tests/test_retrieval_op.py on random clustered data; real data may differ).
    Memory: O(tile x n) for the tiles plus O(n x min(max_r, largest class)) for the lists.
    """
    ks = _checked_ks("retrieval_metrics", ks)
    ranks, num_relevant = retrieval_ranks(emb, labels, max_r, precision, reference, reference_labels, max(ks))
    return metrics_from_ranks(ranks, num_relevant, ks)


# --- k-means++ seeding ------------------------------------------------------------------


def kmeans_plus_plus_draws(
    x: torch.Tensor,
    sq_norms: torch.Tensor,
    uniforms: torch.Tensor,
    closest: torch.Tensor,
    centroids: torch.Tensor,
    start: int,
    stop: int,
) -> None:
    """Draws k-means++ centroids start..stop-1 into `centroids` and updates `closest`, in
    place, each the best of uniforms.shape[1] candidates (reference.kmeans_plus_plus_draws;
    the operator runs the same loop from C++)."""
    if _kernel_for("kmeans_plus_plus_draws", x):
        torch.ops.idml.kmeans_plus_plus_draws.default(x, sq_norms, uniforms, closest, centroids, start, stop)
    else:
        reference.kmeans_plus_plus_draws(x, sq_norms, uniforms, closest, centroids, start, stop)
