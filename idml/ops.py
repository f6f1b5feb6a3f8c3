"""Python face of the idml operators (DESIGN.md, op contracts).

Each public function dispatches to the compiled kernels of `idml._C` (torch.ops.idml.*)
when the extension is built and has a kernel for the inputs' device, and otherwise to
the plain-PyTorch reference in idml/reference.py. Fake kernels (for torch.compile) of the
compiled operators are registered here; the loss's autograd is C++ (csrc/autograd.cpp).
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
    # "computed": also a kernel registered for all backends at once (CompositeExplicitAutograd).
    return dispatch_key is not None and torch._C._dispatch_has_computed_kernel_for_dispatch_key(
        f"idml::{op_name}", dispatch_key
    )


# Looked up once, so that the functions below stay traceable by torch.compile (fullgraph).
_KERNELS = {(op, dev): has_kernel(op, torch.device(dev))
            for op in ("pa_ism_forward", "retrieval_ranks", "kmeans_plus_plus_draws") for dev in ("cpu", "cuda")}


def _kernel_for(op_name: str, tensor: torch.Tensor) -> bool:
    return _KERNELS.get((op_name, tensor.device.type), False)


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
    """Proxy Anchor loss on the introspective similarity, a scalar (IDML_METHOD.md s. 3).

    Runs the fused kernels of idml._C when they exist for the inputs' device, else the
    reference. The loss is float32 (float64 for float64 inputs); gradients come back in
    each input's dtype. Inputs of different floating dtypes (e.g. bf16 embeddings from
    autocast with float32 proxies) are computed in their promoted dtype.
    """
    if not _kernel_for("pa_ism_forward", mu):
        return reference.pa_ism_loss(mu, sigma, labels, proxies, margin, alpha, ism, ism_offset, ism_scale)
    if not mu.dtype == sigma.dtype == proxies.dtype:
        dtype = torch.promote_types(torch.promote_types(mu.dtype, sigma.dtype), proxies.dtype)
        mu, sigma, proxies = mu.to(dtype), sigma.to(dtype), proxies.to(dtype)
    # The overload itself: calling the packet torch.ops.idml.pa_ism_loss resolves the
    # overload from the arguments on every call (15 us of host time, bench/RESULTS.md).
    return torch.ops.idml.pa_ism_loss.default(
        mu, sigma, labels, proxies, float(margin), float(alpha), bool(ism), float(ism_offset), float(ism_scale)
    )


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
        # Contiguous, as the kernels return them (empty_like would copy the inputs' strides).
        return mu.new_empty(mu.shape), sigma.new_empty(sigma.shape), proxies.new_empty(proxies.shape)

    @torch.library.register_fake("idml::pa_ism_loss")
    def _pa_ism_loss_fake(mu, sigma, labels, proxies, margin=0.1, alpha=32.0, ism=True, ism_offset=4.0,
                          ism_scale=5.0):
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
    """
    if max_k is None:
        max_k = max(1, emb.shape[0] if reference is None else reference.shape[0])
    if _kernel_for("retrieval_ranks", emb):
        return torch.ops.idml.retrieval_ranks(emb, labels, reference, reference_labels, max_r, max_k, precision)
    return _reference_ops.retrieval_ranks(emb, labels, max_r, precision, reference, reference_labels, max_k)


if EXTENSION_ERROR is None and hasattr(torch.ops.idml, "retrieval_ranks"):

    @torch.library.register_fake("idml::retrieval_ranks")
    def _retrieval_ranks_fake(queries, query_labels, references, reference_labels, max_r, max_k, precision):
        cap = torch.library.get_ctx().new_dynamic_size()
        n = queries.shape[0]
        return queries.new_empty((n, cap), dtype=torch.long), queries.new_empty((n,), dtype=torch.long)


def metrics_from_ranks(ranks: torch.Tensor, num_relevant: torch.Tensor, ks=(1, 2, 4, 8)) -> dict:
    """R@K, RP and MAP@R (IDML_METHOD.md section 5) from retrieval_ranks' output.

    R@K is a share of ALL queries, a query without any relevant item counting as a miss,
    as the published code does (pytorch-metric-learning instead leaves such "lone" queries
    out of its precision_at_1). RP and MAP@R average over queries with R > 0, R capped at
    max_r. The t-th relevant item (in rank order) is among the R nearest iff its rank is
    <= R, and then contributes precision t / rank to MAP@R.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"metrics_from_ranks: ks must be one or more positive integers, got {ks}")
    names = [f"R@{k}" for k in ks] + ["RP", "MAP@R"]
    n = num_relevant.shape[0]
    if n == 0 or ranks.shape[1] == 0:  # no query, or none with a relevant item
        return dict.fromkeys(names, 0.0)
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
    first = ranks[:, 0].clamp_max(largest + 1)
    histogram = torch.zeros(largest + 2, dtype=torch.long, device=ranks.device)
    histogram.scatter_add_(0, first, torch.ones_like(first))
    within = histogram[1:].cumsum(dim=0)  # within[k - 1]: queries whose first relevant item ranks <= k
    # One index per k: indexing with ks as a tensor would copy it from the host, which waits for the GPU.
    recall = torch.stack([within[k - 1] for k in ks]).double() / n
    return dict(zip(names, torch.cat([recall, averages]).tolist()))


def retrieval_metrics(
    emb: torch.Tensor,
    labels: torch.Tensor,
    ks=(1, 2, 4, 8),
    max_r: int = 1023,
    precision: str = "fp32",
    reference: "torch.Tensor | None" = None,
    reference_labels: "torch.Tensor | None" = None,
) -> dict:
    """{"R@k" for k in ks, "RP", "MAP@R"} as python floats, exact (IDML_METHOD.md s. 5).

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
    ranks, num_relevant = retrieval_ranks(emb, labels, max_r, precision, reference, reference_labels, max(ks))
    return metrics_from_ranks(ranks, num_relevant, ks)


# --- k-means++ seeding ------------------------------------------------------------------


def kmeans_plus_plus_draws(x: torch.Tensor, sq_norms: torch.Tensor, uniforms: torch.Tensor,
                           closest: torch.Tensor, centroids: torch.Tensor, start: int, stop: int) -> None:
    """Draws k-means++ centroids start..stop-1 into `centroids` and updates `closest`, in
    place, each the best of uniforms.shape[1] candidates (reference.kmeans_plus_plus_draws;
    the operator runs the same loop from C++)."""
    if _kernel_for("kmeans_plus_plus_draws", x):
        torch.ops.idml.kmeans_plus_plus_draws.default(x, sq_norms, uniforms, closest, centroids, start, stop)
    else:
        reference.kmeans_plus_plus_draws(x, sq_norms, uniforms, closest, centroids, start, stop)
