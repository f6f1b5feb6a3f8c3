"""Plain-PyTorch versions of every idml operator.

They are the oracle the fused C++/CUDA kernels are tested against, and the fallback when
the extension `idml._C` is not built. Formulas: docs/method.md, sections 2, 3 and 5.
"""

import torch

# x / sqrt(|x|^2 + NORM_EPS): the L2 normalisation of the published code.
NORM_EPS = 1e-12
# Squared distances are clamped below at DISTANCE_EPS before dividing, so that d -> 0
# gives sI -> 1 (the correct limit) instead of inf/NaN.
DISTANCE_EPS = 1e-8


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + NORM_EPS)


def introspective_similarity(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    proxies: torch.Tensor,
    ism: bool = True,
    ism_offset: float = 4.0,
    ism_scale: float = 5.0,
) -> torch.Tensor:
    """B x C matrix sI_ic between samples and proxies, from ONE product mu P^T.

    s = cosine of the raw vectors, d = squared distance of the raw vectors (clamped),
    u = |sigma|^2 (proxies carry no uncertainty), sI = 1 - (1 - s) exp(-(u + a) / (b d)).
    """
    dots = mu @ proxies.t()
    mu_sq = (mu * mu).sum(dim=1, keepdim=True)
    proxy_sq = (proxies * proxies).sum(dim=1).unsqueeze(0)
    cosine = dots / (torch.sqrt(mu_sq + NORM_EPS) * torch.sqrt(proxy_sq + NORM_EPS))
    if not ism:
        return cosine
    distance = (mu_sq + proxy_sq - 2.0 * dots).clamp_min(DISTANCE_EPS)
    uncertainty = (sigma * sigma).sum(dim=1, keepdim=True)
    return 1.0 - (1.0 - cosine) * torch.exp(-(uncertainty + ism_offset) / (ism_scale * distance))


def _log1p_sum_exp(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per column c: log(1 + sum_{i: mask_ic} exp(z_ic)), stable (m = max(0, max z))."""
    masked = z.masked_fill(~mask, float("-inf"))
    m = masked.amax(dim=0).clamp_min(0.0)
    return m + torch.log(torch.exp(-m) + torch.exp(masked - m).sum(dim=0))


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
    """Proxy Anchor loss on the introspective similarity (docs/method.md, section 3).

    Computed in float32 at least (float64 stays float64), whatever the input precision,
    like the fused kernels that accumulate in float32.
    """
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu, sigma, proxies = mu.to(dtype), sigma.to(dtype), proxies.to(dtype)
    num_classes = proxies.shape[0]
    similarity = introspective_similarity(mu, sigma, proxies, ism, ism_offset, ism_scale)
    positive = labels.view(-1, 1) == torch.arange(num_classes, device=labels.device).view(1, -1)
    pos_term = _log1p_sum_exp(-alpha * (similarity - margin), positive)
    neg_term = _log1p_sum_exp(alpha * (similarity + margin), ~positive)
    has_positive = positive.any(dim=0)
    # Columns without positives give log(1 + 0) = 0; divide by |P+| (at least 1).
    num_positive_proxies = has_positive.sum().clamp_min(1)
    return pos_term.sum() / num_positive_proxies + neg_term.sum() / num_classes


# --- retrieval metrics (docs/method.md, section 5) ----------------------------------------


def round_for_precision(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Inputs as the op's GEMM sees them: bf16 rounds to bfloat16; fp32/tf32 unchanged."""
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be 'fp32', 'tf32' or 'bf16', got {precision!r}")
    return x.to(torch.bfloat16).to(x.dtype) if precision == "bf16" else x


def retrieval_ranks(
    emb: torch.Tensor,
    labels: torch.Tensor,
    max_r: int = 1023,
    precision: str = "fp32",
    reference: "torch.Tensor | None" = None,
    reference_labels: "torch.Tensor | None" = None,
    max_k: "int | None" = None,
) -> "tuple[torch.Tensor, torch.Tensor]":
    """Plain-PyTorch idml.ops.retrieval_ranks: blocks of queries, each fully sorted.

    Computed in the inputs' precision, float32 at least (float64 stays float64); "tf32"
    is treated as exact fp32 here, "bf16" rounds the inputs to bfloat16 first.
    """
    if (reference is None) != (reference_labels is None):
        raise ValueError("give both reference and reference_labels, or neither")
    dtype = torch.promote_types(emb.dtype, torch.float32)
    queries = round_for_precision(emb.to(dtype), precision)
    symmetric = reference is None
    refs = queries if symmetric else round_for_precision(reference.to(dtype), precision)
    ref_labels = labels if symmetric else reference_labels
    n, n_ref = queries.shape[0], refs.shape[0]
    sorted_ref_labels = ref_labels.sort().values
    class_size = torch.searchsorted(sorted_ref_labels, labels, right=True) - torch.searchsorted(
        sorted_ref_labels, labels
    )
    num_relevant = (class_size - int(symmetric)).clamp_max(max_r)
    cap = int(num_relevant.max()) if n else 0
    ranks = torch.zeros(n, cap, dtype=torch.long, device=emb.device)
    if cap == 0:
        return ranks, num_relevant
    block = max(1, (1 << 22) // n_ref)
    for q0 in range(0, n, block):
        rows = torch.arange(q0, min(n, q0 + block), device=emb.device)
        order = torch.sort(queries[rows] @ refs.t(), dim=1, descending=True, stable=True).indices
        relevant = ref_labels[order] == labels[rows].unsqueeze(1)
        position = torch.arange(1, n_ref + 1, device=emb.device).expand(len(rows), -1)
        if symmetric:  # itself is no candidate: positions count the other items only
            others = order != rows.unsqueeze(1)
            relevant &= others
            position = others.cumsum(1)
        # Positions of relevant items, in rank order first (non-relevant pushed past the end).
        positions = torch.where(relevant, position, n_ref + 1).sort(dim=1).values[:, :cap]
        keep = torch.arange(cap, device=emb.device) < num_relevant[rows].unsqueeze(1)
        ranks[rows] = torch.where(keep, positions, 0)
    if max_k is not None:  # ranks above max(R, max_k) reported as max(R, max_k) + 1
        above = num_relevant.clamp_min(max_k).unsqueeze(1) + 1
        ranks = torch.where(ranks > above, above, ranks)
    return ranks, num_relevant


# --- k-means++ seeding (docs/method.md, section 5: k-means for NMI and F1) -------------------


def squared_distances_to_row(
    x: torch.Tensor, sq_norms: torch.Tensor, index: torch.Tensor, row: torch.Tensor
) -> torch.Tensor:
    """|x - x_i|^2 = |x|^2 + |x_i|^2 - 2 x.x_i for every row of x, clamped at 0; i = index
    (one element), row = x_i as stored among the centroids (the C++ operator multiplies by
    that copy, and a product's rounding may depend on where its vector lies), sq_norms = |x|^2."""
    return torch.addmv(sq_norms + sq_norms.index_select(0, index), x, row, alpha=-2.0).clamp_min_(0.0)


def kmeans_plus_plus_draws(
    x: torch.Tensor,
    sq_norms: torch.Tensor,
    uniforms: torch.Tensor,
    closest: torch.Tensor,
    centroids: torch.Tensor,
    start: int,
    stop: int,
) -> None:
    """Draws centroids start..stop-1 of k-means++ (D^2 sampling), in place. `closest` holds
    the squared distance of every row to its nearest centroid so far (float64); each of
    uniforms[c] (float64 [k, trials]) times sum(closest) falls on a candidate row in the
    running sum of `closest`. One trial: draw c is that row. Several (greedy k-means++, as
    scikit-learn's): the candidate that leaves the least sum of `closest`, the first on
    ties. `closest` then takes the distances to it into account. No host synchronisation."""
    n, trials = x.shape[0], uniforms.shape[1]
    for c in range(start, stop):
        cumulative = closest.cumsum(0)
        indices = torch.searchsorted(cumulative, uniforms[c] * cumulative[-1:], right=True).clamp_max_(n - 1)
        if trials == 1:  # a matrix-vector product, bit for bit the single draw's centroids
            torch.index_select(x, 0, indices, out=centroids[c : c + 1])
            torch.minimum(closest, squared_distances_to_row(x, sq_norms, indices, centroids[c]), out=closest)
            continue
        candidates = x.index_select(0, indices)
        distances = torch.add(sq_norms, sq_norms.index_select(0, indices).unsqueeze(1))
        # max(distance, 0) then the least with `closest` (never negative), in one pass.
        reduced = distances.addmm_(candidates, x.t(), alpha=-2.0).clamp(closest.new_zeros(()), closest)
        best = reduced.sum(dim=1).argmin(dim=0, keepdim=True)
        torch.index_select(candidates, 0, best, out=centroids[c : c + 1])
        torch.index_select(reduced, 0, best, out=closest.unsqueeze(0))
