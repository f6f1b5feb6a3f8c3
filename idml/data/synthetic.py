"""Writes a small dataset in one of the real on-disk layouts, for tests and smoke runs:

    python scripts/synthetic.py --layout {cub,cars,sop} --out DIR [--classes N] [--per-class N] [--force]

Each class is a colour and a shape drawn at random positions, saved as JPEGs of varied
sizes; every fifth image is greyscale (as in the real data sets). Cars196 gets a
cars_annos.mat written with scipy in the real file's structure, SOP the Ebay_*.txt lists.

`write_dataset` (the command) writes only into a new or empty folder, which it marks with a
.idml-synthetic file listing what it wrote; --force writes again only into such a folder,
and only when every file in it is one it wrote: it never writes over or beside real data.
"""

import json
import os

import numpy as np
from PIL import Image, ImageDraw

from idml.errors import UsageError
from idml.files import atomic_write, atomic_write_text

MARKER = ".idml-synthetic"


def _class_image(rng: np.random.Generator, label: int, num_classes: int) -> Image.Image:
    width, height = (int(v) for v in rng.integers(48, 160, size=2))
    background = tuple(int(v) for v in rng.integers(0, 80, size=3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    hue = 255 * label // max(num_classes - 1, 1)
    colour = (hue, 255 - hue, (hue * 7) % 256)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + width // 3, y0 + height // 3
        (draw.ellipse if label % 2 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


def _save(image: Image.Image, path: str, grey: bool) -> None:
    atomic_write(path, lambda f: (image.convert("L") if grey else image).save(f, "JPEG", quality=90))


def _images(num_classes: int, per_class: int, seed: int):
    """(index, label, image, grey) for every image, classes in order."""
    rng = np.random.default_rng(seed)
    index = 0
    for label in range(num_classes):
        for _ in range(per_class):
            yield index, label, _class_image(rng, label, num_classes), index % 5 == 4
            index += 1


def write_cub(out: str, num_classes: int, per_class: int, seed: int = 0) -> None:
    images = os.path.join(out, "CUB_200_2011", "images")
    for index, label, image, grey in _images(num_classes, per_class, seed):
        folder = f"{label + 1:03d}.Synthetic_Bird_{label + 1}"
        _save(image, os.path.join(images, folder, f"Synthetic_Bird_{index:04d}.jpg"), grey)


def write_cars(out: str, num_classes: int, per_class: int, seed: int = 0) -> None:
    import scipy.io

    folder = os.path.join(out, "cars196")
    fields = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    records = []
    for index, label, image, grey in _images(num_classes, per_class, seed):
        relative = f"car_ims/{index + 1:06d}.jpg"
        _save(image, os.path.join(folder, relative), grey)
        w, h = image.size
        # loadmat gives every MATLAB scalar back as a 1x1 array and a string as a 1-element array.
        records.append(
            (
                np.array([relative]),
                np.array([[1]], np.uint8),
                np.array([[1]], np.uint8),
                np.array([[w]], np.uint16),
                np.array([[h]], np.uint16),
                np.array([[label + 1]], np.uint8),
                np.array([[index % 2]], np.uint8),
            )
        )
    annotations = np.empty((1, len(records)), dtype=fields)
    for i, record in enumerate(records):
        annotations[0, i] = record
    class_names = np.empty((1, num_classes), dtype=object)
    for c in range(num_classes):
        class_names[0, c] = np.array([f"Synthetic Car {c + 1}"])
    atomic_write(
        os.path.join(folder, "cars_annos.mat"),
        lambda f: scipy.io.savemat(f, {"annotations": annotations, "class_names": class_names}),
    )


def write_sop(
    out: str, num_classes: int, per_class: int, seed: int = 0, folder_name: str = "Stanford_Online_Products"
) -> None:
    folder = os.path.join(out, folder_name)
    super_classes = ("bicycle", "chair")
    rows = []
    for index, label, image, grey in _images(num_classes, per_class, seed):
        super_class = label % len(super_classes)
        relative = f"{super_classes[super_class]}_final/{label + 1}_{index}.JPG"
        _save(image, os.path.join(folder, relative), grey)
        rows.append((index + 1, label + 1, super_class + 1, relative))
    half = num_classes // 2
    for name, keep in (("Ebay_train.txt", lambda c: c <= half), ("Ebay_test.txt", lambda c: c > half)):
        lines = ["image_id class_id super_class_id path"]
        lines += [f"{i} {c} {s} {p}" for i, c, s, p in rows if keep(c)]
        atomic_write_text(os.path.join(folder, name), "\n".join(lines) + "\n")


WRITERS = {"cub": write_cub, "cars": write_cars, "sop": write_sop}


def write_dataset(layout: str, out: str, num_classes: int, per_class: int, seed: int = 0, force: bool = False) -> None:
    """WRITERS[layout] into `out`, a new or empty folder, or with `force` one that holds only
    files a previous write_dataset wrote (they are removed first, so the result is what a
    fresh run writes); UsageError for any other folder, before anything is written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; expected a folder to write the data set into")
    existing = _files_under(out) if os.path.isdir(out) else []
    if existing or (os.path.isdir(out) and os.listdir(out)):
        _claim_for_rewrite(out, existing, force)
    marker = os.path.join(out, MARKER)
    # Claimed before the first image: an interrupted run leaves a folder that --force may redo.
    atomic_write_text(marker, json.dumps({"complete": False}) + "\n")
    WRITERS[layout](out, num_classes, per_class, seed)
    written = [name for name in _files_under(out) if name != MARKER]
    atomic_write_text(marker, json.dumps({"complete": True, "files": written}, indent=0) + "\n")


def _files_under(folder: str) -> list:
    """Relative paths of every file (links included) under `folder`, hidden ones too."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, name), folder) for name in files]
        # A link to a folder is not descended into; it is something the folder holds all the same.
        found += [
            os.path.relpath(os.path.join(root, name), folder)
            for name in dirs
            if os.path.islink(os.path.join(root, name))
        ]
    return sorted(found)


def _claim_for_rewrite(out: str, existing: list, force: bool) -> None:
    """Removes the files of a previous synthetic data set in `out`, or refuses."""
    marker = os.path.join(out, MARKER)
    if not force:
        raise UsageError(
            f"--out {out} is not empty: synthetic.py writes only into a new or empty folder "
            f"(--force rewrites a synthetic data set it wrote there before)"
        )
    if not os.path.isfile(marker):
        raise UsageError(
            f"--out {out} holds files synthetic.py did not write (it has no {MARKER} file), so "
            f"even --force does not write there: choose a new or empty folder"
        )
    try:
        with open(marker) as f:
            record = json.load(f)
        owned = set(record["files"]) if record["complete"] else None
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"--out {out}: {marker} is damaged, so which files synthetic.py wrote is unknown: "
            f"choose a new or empty folder"
        ) from None
    # After an interrupted run the list is missing; the folder held only synthetic files when it began.
    foreign = [name for name in existing if name != MARKER and owned is not None and name not in owned]
    if foreign:
        raise UsageError(
            f"--out {out} holds {len(foreign)} files synthetic.py did not write (e.g. {foreign[0]}), "
            f"so even --force does not write there: move them, or choose a new or empty folder"
        )
    for name in existing:
        os.unlink(os.path.join(out, name))
    for root, dirs, _ in os.walk(out, topdown=False):  # the folders the files were in, now empty
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path) and not os.listdir(path):
                os.rmdir(path)
