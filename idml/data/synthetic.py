"""Writes a small dataset in one of the real on-disk layouts, for tests and smoke runs:

    python scripts/synthetic.py --layout {cub,cars,sop} --out DIR [--classes N] [--per-class N]

Each class is a colour and a shape drawn at random positions, saved as JPEGs of varied
sizes; every fifth image is greyscale (as in the real data sets). Cars196 gets a
cars_annos.mat written with scipy in the real file's structure, SOP the Ebay_*.txt lists.
"""
import os

import numpy as np
from PIL import Image, ImageDraw

LAYOUTS = ("cub", "cars", "sop")


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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (image.convert("L") if grey else image).save(path, "JPEG", quality=90)


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
    fields = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
              ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    records = []
    for index, label, image, grey in _images(num_classes, per_class, seed):
        relative = f"car_ims/{index + 1:06d}.jpg"
        _save(image, os.path.join(folder, relative), grey)
        w, h = image.size
        # loadmat gives every MATLAB scalar back as a 1x1 array and a string as a 1-element array.
        records.append((np.array([relative]), np.array([[1]], np.uint8), np.array([[1]], np.uint8),
                        np.array([[w]], np.uint16), np.array([[h]], np.uint16),
                        np.array([[label + 1]], np.uint8), np.array([[index % 2]], np.uint8)))
    annotations = np.empty((1, len(records)), dtype=fields)
    for i, record in enumerate(records):
        annotations[0, i] = record
    class_names = np.empty((1, num_classes), dtype=object)
    for c in range(num_classes):
        class_names[0, c] = np.array([f"Synthetic Car {c + 1}"])
    scipy.io.savemat(os.path.join(folder, "cars_annos.mat"),
                     {"annotations": annotations, "class_names": class_names})


def write_sop(out: str, num_classes: int, per_class: int, seed: int = 0,
              folder_name: str = "Stanford_Online_Products") -> None:
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
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(lines) + "\n")


WRITERS = {"cub": write_cub, "cars": write_cars, "sop": write_sop}
