"""Plots (PNG) of a run and of an evaluation, with matplotlib's Agg renderer.

Per run folder: `loss_recall.png` (training loss and R@K per epoch, rewritten after every
evaluation) and `uncertainty_histogram.png` (|sigma|^2 of every test image at the end).
`scripts/evaluate.py --plots DIR`: `recall_at_k.png` (R@K for K = 1, 2, 4, ...) and
`query_grid.png` (example queries and their nearest neighbours, correct ones framed green,
wrong ones red).

matplotlib is imported lazily and only through `matplotlib.figure.Figure` (no pyplot, no
global backend): a missing matplotlib skips the plots with one note instead of failing a run.
Every file is written atomically (idml.files).
"""

import io
import os
import warnings

import torch

from idml.files import atomic_write

_warned = False


def have_matplotlib() -> bool:
    """True when matplotlib imports; else False, with one note per process."""
    global _warned
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        if not _warned:
            warnings.warn("matplotlib is not installed, so no plots are written (pip install matplotlib)", stacklevel=3)
            _warned = True
        return False
    return True


def _figure(width: float, height: float):
    """A matplotlib Figure (no pyplot, no global backend), or None without matplotlib."""
    if not have_matplotlib():
        return None
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure, path: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    return path


# --- per run --------------------------------------------------------------------------------


def history_plot(run_dir: str, history: list[dict]) -> str | None:
    """loss_recall.png: mean training loss per epoch (left), R@K per epoch (right)."""
    figure = _figure(10, 4)
    if figure is None:
        return None
    loss_axis, recall_axis = figure.subplots(1, 2)
    trained = [e for e in history if e.get("loss") is not None]
    loss_axis.plot([e["epoch"] for e in trained], [e["loss"] for e in trained], marker="o")
    loss_axis.set(title="training loss", xlabel="epoch", ylabel="mean loss per step")
    ks = [name for name in (history[0] if history else {}) if name.startswith("R@")]
    for name in ks:
        recall_axis.plot([e["epoch"] for e in history], [100 * e[name] for e in history], marker="o", label=name)
    recall_axis.set(title="recall on the unseen classes", xlabel="epoch", ylabel="%", ylim=(0, 100))
    if ks:
        recall_axis.legend()
    from matplotlib.ticker import MaxNLocator

    for axis in (loss_axis, recall_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(figure, os.path.join(run_dir, "loss_recall.png"))


@torch.no_grad()
def uncertainty_histogram(path: str, values: torch.Tensor, mode: str) -> str | None:
    figure = _figure(6, 4)
    if figure is None:
        return None
    axis = figure.subplots()
    values = values.double()
    axis.hist(values.numpy(), bins=min(50, max(5, values.numel() // 10)), color="tab:purple")
    title = f"uncertainty |sigma|^2 of {values.numel()} test images (--uncertainty {mode})"
    if mode == "normalized":
        title += "\n(normalized: |sigma|^2 = 1 for every image, as published)"
    axis.set(title=title, xlabel="|sigma|^2", ylabel="images")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def uncertainty_plot(run_dir: str, values: torch.Tensor, mode: str) -> str | None:
    """uncertainty_histogram.png of the test set's |sigma|^2 from the last evaluation."""
    if not have_matplotlib():
        return None
    return uncertainty_histogram(os.path.join(run_dir, "uncertainty_histogram.png"), values.cpu(), mode)


# --- per evaluation ---------------------------------------------------------------------------


def recall_curve_ks(num_images: int) -> list[int]:
    """1, 2, 4, ... up to the number of other images (at most 1024)."""
    ks, k = [], 1
    while k < num_images and k <= 1024:
        ks.append(k)
        k *= 2
    return ks or [1]


def recall_at_k_plot(path: str, embeddings: torch.Tensor, labels: torch.Tensor, title: str = "") -> str | None:
    """recall_at_k.png: R@K for K = 1, 2, 4, ... (each test image a query against the others)."""
    from idml.metrics import compute_metrics

    figure = _figure(6, 4)
    if figure is None:
        return None
    ks = recall_curve_ks(embeddings.shape[0])
    metrics = compute_metrics(embeddings, labels, ks=tuple(ks), clustering=False)
    recalls = [100 * metrics[f"R@{k}"] for k in ks]
    axis = figure.subplots()
    axis.plot(ks, recalls, marker="o")
    axis.set_xscale("log", base=2)
    axis.set(title=title or "recall at K", xlabel="K", ylabel="R@K (%)", ylim=(0, 100.5))
    for k, r in zip(ks, recalls):
        if k in (1, 2, 4, 8):
            axis.annotate(f"{r:.1f}", (k, r), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    axis.grid(alpha=0.3, which="both")
    return _save(figure, path)


def nearest_neighbours(embeddings: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (len(queries) x k) of the k most similar other images (cosine; ties to the lower index)."""
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    similarity = x[queries] @ x.T
    similarity[torch.arange(len(queries)), queries] = -float("inf")  # never the query itself
    # A stable descending sort keeps equal similarities in index order.
    return torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :k]


def _display_image(dataset, index: int):
    """An H x W x 3 float array in [0, 1] of one image, for display."""
    items = getattr(dataset, "items", None)
    if items is not None:  # image files: show the file itself
        import numpy as np
        from PIL import Image

        with Image.open(items[index][0]) as image:
            image = image.convert("RGB")
            image.thumbnail((160, 160))
            return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
    image = dataset[index][0].float()  # a normalised tensor: rescale to [0, 1]
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    return image.permute(1, 2, 0)


def query_grid_plot(
    path: str, dataset, embeddings: torch.Tensor, labels: torch.Tensor, num_queries: int = 6, k: int = 5, seed: int = 0
) -> str | None:
    """query_grid.png: one row per query (drawn at random with `seed`), then its k nearest
    neighbours framed green (same class) or red (another class)."""
    from matplotlib.patches import Rectangle

    figure = _figure(1.6 * (k + 1), 1.75 * num_queries)
    if figure is None:
        return None
    embeddings, labels = embeddings.cpu(), labels.cpu()
    num_queries = min(num_queries, embeddings.shape[0])
    k = min(k, embeddings.shape[0] - 1)
    queries = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))[:num_queries]
    neighbours = nearest_neighbours(embeddings, queries, k)
    axes = figure.subplots(num_queries, k + 1, squeeze=False)
    for row, query in enumerate(queries.tolist()):
        for column in range(k + 1):
            axis = axes[row][column]
            index = query if column == 0 else int(neighbours[row, column - 1])
            axis.imshow(_display_image(dataset, index).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_title(f"query (class {int(labels[query])})", fontsize=8)
                colour = "black"
            else:
                correct = bool(labels[index] == labels[query])
                colour = "green" if correct else "red"
                axis.set_title(f"#{column} (class {int(labels[index])})", fontsize=8, color=colour)
            axis.add_patch(Rectangle((0, 0), 1, 1, transform=axis.transAxes, fill=False, edgecolor=colour, linewidth=4))
    return _save(figure, path)


def evaluation_plots(
    out_dir: str, dataset, embeddings: torch.Tensor, labels: torch.Tensor, title: str = ""
) -> list[str]:
    """recall_at_k.png and query_grid.png in out_dir (scripts/evaluate.py --plots)."""
    written = [
        recall_at_k_plot(os.path.join(out_dir, "recall_at_k.png"), embeddings, labels, title),
        query_grid_plot(os.path.join(out_dir, "query_grid.png"), dataset, embeddings, labels),
    ]
    return [p for p in written if p is not None]
