"""Image search with an exported model (scripts/export.py):

    python scripts/search.py --model model.pt --gallery DIR --query IMG [IMG ...] -k 10

The gallery folder (images in it and its subfolders; hidden files skipped) is embedded once;
the index (embeddings, |sigma|^2, file list, a fingerprint of the folder and of the model)
is cached beside it in DIR/.idml_index.pt, written atomically, and rebuilt when a file is
added, removed or changed (name, size, mtime) or the model is another one. A gallery image
that cannot be decoded is left out with a warning naming it (the index lists it, so a cached
index says so again without decoding it); a query that cannot be, or a model whose
embeddings are not finite, ends the search with one sentence. `search()` returns
each query's k nearest gallery images by cosine similarity, flagged when its uncertainty
|sigma|^2 lies above the gallery's 95th percentile (with --uncertainty normalized, as
published, |sigma|^2 = 1 for every image: the report says so instead); idml/cli.py prints
them.

Only torch, PIL and tqdm are needed at search time: the model is a TorchScript file.
"""

import hashlib
import io
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from idml.errors import UsageError, require_file
from idml.files import atomic_write

INDEX_NAME = ".idml_index.pt"
INDEX_FORMAT = "idml-search-index"
INDEX_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# What PIL raises on a damaged file (idml.data.datasets.UNREADABLE, not imported: searching
# needs neither torchvision nor the training data stack).
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# --- the gallery folder -------------------------------------------------------------------


def gallery_files(folder: str) -> list[str]:
    """Image files under `folder` (relative paths, sorted), hidden files and folders skipped."""
    if not os.path.isdir(folder):
        raise UsageError(f"--gallery expects a folder of images; {folder} is not a folder")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def folder_fingerprint(folder: str, files: list[str]) -> str:
    """sha256 of the sorted (name, size, mtime in ns) of every gallery file."""
    entries = []
    for name in files:
        stat = os.stat(os.path.join(folder, name))
        entries.append([name, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- images and the model ---------------------------------------------------------------------


def read_image(path: str) -> torch.Tensor:
    """uint8 (3, H, W) of an image file (grey, CMYK, RGBA, palette -> RGB)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the header, or None when the file is not a readable image."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:
        return None


def load_model(path: str, device: torch.device):
    require_file(path, "--model expects a TorchScript file written by scripts/export.py")
    from idml.export import quiet_jit

    try:
        with quiet_jit():
            model = torch.jit.load(path, map_location=device)
    except Exception as error:
        raise UsageError(
            f"--model {path} is not a TorchScript module written by scripts/export.py ({type(error).__name__})"
        ) from None
    if not hasattr(model, "uncertainty_mode"):  # what every exported embedder carries
        raise UsageError(
            f"--model {path} is a TorchScript module, but not one written by scripts/export.py "
            f"(it has no uncertainty_mode attribute)"
        )
    return model.eval()


def unreadable_reason(path: str) -> str | None:
    """Why the image file `path` cannot be decoded in full (a truncated file's header reads
    fine), or None when it can."""
    try:
        read_image(path)
    except UNREADABLE as error:
        return str(error) or type(error).__name__
    return None


def _some(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")


def _skip(path: str, reason: str, skipped: list[str]) -> None:
    warnings.warn(f"skipping {path}: not a readable image ({reason})", stacklevel=3)
    skipped.append(path)


@torch.no_grad()
def embed_paths(model, paths: list[str], device: torch.device, batch_size: int = 32, progress: bool = True):
    """(embeddings N x D, uncertainties N, indices of the paths embedded, paths skipped) on
    the CPU. Images of one size go through the model together; unreadable files are skipped
    with a warning; UsageError naming the images whose embedding or uncertainty is not finite."""
    sizes, skipped = {}, []
    for index, path in enumerate(paths):
        size = image_size(path)
        if size is None:
            _skip(path, "unknown format or damaged header", skipped)
        else:
            sizes.setdefault(size, []).append(index)
    embeddings, uncertainties, order = [], [], []
    bar = tqdm(total=sum(len(v) for v in sizes.values()), desc="embedding", unit="img", disable=not progress)
    for size in sorted(sizes):
        group = sizes[size]
        for start in range(0, len(group), batch_size):
            chunk, pixels = [], []
            for i in group[start : start + batch_size]:
                try:
                    pixels.append(read_image(paths[i]))
                    chunk.append(i)
                except UNREADABLE as error:  # a truncated file: its header was fine
                    _skip(paths[i], str(error) or type(error).__name__, skipped)
            bar.update(len(group[start : start + batch_size]))
            if not chunk:
                continue
            embedding, uncertainty = model(torch.stack(pixels).to(device))
            embeddings.append(embedding.float().cpu())
            uncertainties.append(uncertainty.float().cpu())
            order += chunk
    bar.close()
    if not order:
        return torch.zeros(0, 0), torch.zeros(0), [], skipped
    # Back into the order of `paths`.
    embeddings, uncertainties = torch.cat(embeddings), torch.cat(uncertainties)
    permutation = torch.argsort(torch.tensor(order))
    embeddings, uncertainties, kept = embeddings[permutation], uncertainties[permutation], sorted(order)
    broken = [paths[kept[row]] for row in non_finite(embeddings, uncertainties).tolist()]
    if broken:  # NaN compares false with everything: the ranking would be arbitrary
        raise UsageError(
            f"the model's embedding or uncertainty is NaN or infinite for {len(broken)} of {len(kept)} "
            f"images ({_some(broken)}), so it cannot rank "
            f"them: a diverged or damaged model (scripts/export.py refuses such models)"
        )
    return embeddings, uncertainties, kept, skipped


def non_finite(embeddings: torch.Tensor, uncertainties: torch.Tensor) -> torch.Tensor:
    """Indices of the rows whose embedding or uncertainty holds a NaN or an infinity."""
    finite = torch.isfinite(embeddings).all(dim=1) & torch.isfinite(uncertainties)
    return torch.nonzero(~finite).flatten()


# --- the cached index -------------------------------------------------------------------------


def index_path(folder: str) -> str:
    return os.path.join(folder, INDEX_NAME)


def load_index(folder: str) -> dict | None:
    path = index_path(folder)
    if not os.path.isfile(path):
        return None
    try:
        index = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # unreadable (another version, damaged): rebuild it
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
        return None
    if len(non_finite(index["embeddings"], index["uncertainties"])):  # cached from a model that gave NaN
        return None
    return index


def build_index(
    model,
    folder: str,
    files: list[str],
    fingerprint: str,
    model_id: str,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> dict:
    paths = [os.path.join(folder, f) for f in files]
    embeddings, uncertainties, kept, skipped = embed_paths(model, paths, device, batch_size, progress)
    if not kept:
        raise UsageError(
            f"--gallery {folder} holds no readable images (looked for {', '.join(IMAGE_EXTENSIONS)} files)"
        )
    # The unreadable files are remembered: while the folder is unchanged they are not decoded again.
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "fingerprint": fingerprint,
        "model": model_id,
        "files": [files[i] for i in kept],
        "embeddings": embeddings,
        "uncertainties": uncertainties,
        "skipped": [os.path.relpath(path, folder) for path in skipped],
    }


def save_index(folder: str, index: dict) -> bool:
    buffer = io.BytesIO()
    torch.save(index, buffer)
    try:
        atomic_write(index_path(folder), lambda f: f.write(buffer.getbuffer()))
    except (OSError, UsageError) as error:  # a read-only gallery still works, just without the cache
        warnings.warn(
            f"could not cache the index in {index_path(folder)} ({error}); it is rebuilt next time", stacklevel=2
        )
        return False
    return True


def gallery_index(
    model,
    model_path: str,
    folder: str,
    device: torch.device,
    batch_size: int = 32,
    progress: bool = True,
    rebuild: bool = False,
) -> tuple[dict, str]:
    """(index, how): the cached index when the folder and the model are unchanged (and not
    `rebuild`), else a new one, which replaces the cache only once it is complete."""
    files = gallery_files(folder)
    if not files:
        raise UsageError(f"--gallery {folder} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
    fingerprint, model_id = folder_fingerprint(folder, files), file_sha256(model_path)
    index = None if rebuild else load_index(folder)
    if index is not None and index["fingerprint"] == fingerprint and index["model"] == model_id:
        return index, "cached index of"
    index = build_index(model, folder, files, fingerprint, model_id, device, batch_size, progress)
    return index, "indexed" if save_index(folder, index) else "indexed (not cached)"


# --- queries ------------------------------------------------------------------------------------


def nearest(index: dict, embedding: torch.Tensor, k: int) -> list[tuple[float, str]]:
    """The k most similar gallery images (cosine; ties to the earlier file)."""
    similarity = index["embeddings"] @ embedding.float().cpu()
    order = torch.sort(similarity, descending=True, stable=True).indices[:k]
    return [(float(similarity[i]), index["files"][i]) for i in order.tolist()]


def uncertainty_report(value: float, gallery: torch.Tensor, mode: str, percentile: float) -> tuple[str, bool]:
    """(line to print, flagged) for a query's |sigma|^2 against the gallery's distribution."""
    if mode == "normalized":
        return (
            "uncertainty: not informative for this model (trained with --uncertainty normalized, as published: "
            "|sigma|^2 = 1 for every image); train with --uncertainty relu or softplus to get it"
        ), False
    threshold = float(torch.quantile(gallery.double(), percentile / 100.0))
    median = float(gallery.double().median())
    flagged = value > threshold
    line = (
        f"uncertainty |sigma|^2 = {value:.4g} (gallery median {median:.4g}, "
        f"{percentile:g}th percentile {threshold:.4g})"
    )
    if flagged:
        line = (
            f"HIGH UNCERTAINTY: |sigma|^2 = {value:.4g} is above the gallery's {percentile:g}th percentile "
            f"({threshold:.4g}; median {median:.4g}): treat these matches with caution"
        )
    return line, flagged


def search(
    model_path: str,
    gallery: str,
    queries: list[str],
    k: int,
    device: torch.device,
    batch_size: int = 32,
    percentile: float = 95.0,
    rebuild: bool = False,
    progress: bool = True,
) -> tuple[str, list[dict]]:
    """Each query's k nearest gallery images: (a sentence on the index used, one result per
    query with "query", "uncertainty" |sigma|^2, "high_uncertainty", "uncertainty_mode",
    "report" (uncertainty_report's line) and "neighbours" [(similarity, path)])."""
    for query in queries:  # decoded in full before the gallery is indexed: a truncated file's header reads fine
        reason = unreadable_reason(query) if os.path.isfile(query) else "no such file"
        if reason is not None:
            raise UsageError(f"--query expects image files; {query} is not a readable image ({reason})")
    model = load_model(model_path, device)
    index, how = gallery_index(model, model_path, gallery, device, batch_size, progress, rebuild)
    info = f"{how} {len(index['files'])} images in {gallery} ({index_path(gallery)})"
    skipped = [os.path.join(gallery, name) for name in index.get("skipped", [])]
    if skipped:
        info += f"; {len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''} left out ({_some(skipped)})"
    mode = str(model.uncertainty_mode)
    embeddings, uncertainties, _, _ = embed_paths(model, queries, device, batch_size, progress=False)
    results = []
    for number, query in enumerate(queries):
        value = float(uncertainties[number])
        report, flagged = uncertainty_report(value, index["uncertainties"], mode, percentile)
        neighbours = [
            (similarity, os.path.join(gallery, name)) for similarity, name in nearest(index, embeddings[number], k)
        ]
        results.append(
            {
                "query": query,
                "uncertainty": value,
                "high_uncertainty": flagged,
                "uncertainty_mode": mode,
                "report": report,
                "neighbours": neighbours,
            }
        )
    return info, results
