"""The retrieval metrics as the published code computes them (scripts/evaluate.py --published-protocol),
beside the project's (idml.metrics), which differ where the published lists are too short.

The published evaluation L2-normalises the test embeddings and asks scikit-learn's NearestNeighbors
(Euclidean distance) for L + 1 neighbours of every image, L = min(1023, size of the largest class),
then drops the first of them as the query itself. Every metric reads only these L neighbours:

- R@K: whether the query's label is among its first K neighbours, over every query. For K > L there
  are only L, so the published "R@K" is R@L: on SOP (largest class 12) its "R@100" is R@12.
- RP and MAP@R: over the queries whose class has another image, with R = class size - 1 (at most L).

Ties: the published search (scikit-learn's brute force at these widths) leaves equal distances in the
order of its partial sort, which is unspecified; here equal distances rank the lower index first. As
published, the first neighbour is dropped whatever it is: when another image lies at the same distance
as the query itself (a duplicate embedding of a lower index), the query stays in its own list and
counts as a hit, and that other image is the one dropped.
"""

from collections.abc import Sequence

import torch

from idml.errors import UsageError
from idml.metrics import non_finite_rows
from idml.reference import l2_normalize

MAX_LIST_LENGTH = 1023  # the published cap on L
CHUNK_BYTES = 1 << 28  # of float64 distances per block of queries


def class_sizes(labels: torch.Tensor) -> torch.Tensor:
    """The size of each row's class, per row."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse]


def list_length(labels: torch.Tensor, max_length: int = MAX_LIST_LENGTH) -> int:
    """L: how many neighbours the published evaluation lists per query."""
    return min(max_length, int(class_sizes(labels).max()), labels.numel() - 1)


def _nearest_lower_index_first(distances: torch.Tensor, k: int) -> torch.Tensor:
    """The columns of the k smallest distances of each row, nearest first, ties to the lower column.
    topk alone leaves the order (and the choice) among equal values unspecified."""
    threshold = distances.topk(k, dim=1, largest=False).values[:, -1:]
    below, at = distances < threshold, distances == threshold
    room = k - below.sum(dim=1, keepdim=True)  # how many of the ties at the threshold fit
    keep = below | (at & (at.cumsum(dim=1) <= room))
    columns = keep.nonzero()[:, 1].view(-1, k)  # ascending per row, so a stable sort keeps ties in index order
    order = distances.gather(1, columns).sort(dim=1, stable=True).indices
    return columns.gather(1, order)


def neighbour_lists(x: torch.Tensor, length: int) -> torch.Tensor:
    """N x length indices: each row's length + 1 nearest rows by Euclidean distance (float64, as
    |x|^2 + |y|^2 - 2 x.y), the first of them dropped, as published."""
    x = x.double()
    squares = x.square().sum(dim=1)
    chunk = max(1, CHUNK_BYTES // (8 * x.shape[0]))
    lists = []
    for start in range(0, x.shape[0], chunk):
        block = slice(start, start + chunk)
        distances = squares[block, None] + squares[None, :] - 2 * x[block] @ x.T
        lists.append(_nearest_lower_index_first(distances, length + 1)[:, 1:])
    return torch.cat(lists)


def published_metrics(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8), max_length: int = MAX_LIST_LENGTH
) -> dict[str, float]:
    """{"R@k" for k in ks, "RP", "MAP@R"} with the published code's definitions (see the module's
    docstring), as python floats, computed on the embeddings' device."""
    if embeddings.shape[0] < 2:
        raise UsageError(f"retrieval metrics need at least 2 embeddings, got {embeddings.shape[0]}")
    if non_finite_rows(embeddings):
        raise UsageError("some embeddings hold NaN or infinite values, so no retrieval metric of them means anything")
    x = l2_normalize(embeddings.float())
    labels = labels.to(x.device)
    length = list_length(labels, max_length)
    hits = labels[neighbour_lists(x, length)] == labels[:, None]  # N x L
    result = {f"R@{k}": hits[:, :k].any(dim=1).double().mean().item() for k in ks}
    relevant_count = (class_sizes(labels) - 1).clamp(max=length)
    scored = relevant_count > 0  # the published code leaves out queries alone in their class
    if not bool(scored.any()):
        return {**result, "RP": 0.0, "MAP@R": 0.0}  # as published
    hits, relevant_count = hits[scored], relevant_count[scored, None].double()
    ranks = torch.arange(1, length + 1, device=x.device, dtype=torch.float64)
    within_r = hits & (ranks <= relevant_count)
    result["RP"] = (within_r.sum(dim=1, keepdim=True) / relevant_count).mean().item()
    precision_at_hits = within_r.cumsum(dim=1) / ranks * within_r
    result["MAP@R"] = (precision_at_hits.sum(dim=1, keepdim=True) / relevant_count).mean().item()
    return result


def beside(
    project: dict[str, float], embeddings: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]
) -> dict[str, object]:
    """scripts/evaluate.py --published-protocol: the project's metrics and the published code's R@K, RP
    and MAP@R of the same embeddings (its NMI and F1 are the project's: same definitions), named apart."""
    return {
        "project": project,
        "published_protocol": published_metrics(embeddings, labels, ks),
        "published_list_length": list_length(labels),
    }


def heading(length: int) -> str:
    """What the published-protocol numbers are, in one line."""
    return (
        f"published protocol (neighbour lists of {length}, the largest class: R@K for K > {length} "
        f"is R@{length}; equal distances to the lower index, the first neighbour dropped)"
    )
