"""The image-retrieval datasets on disk: CUB-200-2011, Cars196, Stanford Online Products.

Each `*_split` function reads one dataset's real layout under `root` (docs/method.md,
section 6) and returns the (path, label) list of one split, labels renumbered 0..n-1 in
the order of the original class ids. Bad layouts raise UsageError naming what was
expected where.
"""

import os
import re
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image
from torch.utils.data import Dataset, default_collate

from idml.errors import UsageError

Items = list[tuple[str, int]]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

CUB_LAYOUT = "CUB_200_2011/images/<NNN.Name>/<file>.jpg"
CARS_LAYOUT = "cars196/car_ims/<file>.jpg and cars196/cars_annos.mat"
SOP_LAYOUT = "Stanford_Online_Products/Ebay_train.txt, Ebay_test.txt and the image folders they list"


def _is_hidden(name: str) -> bool:
    # macOS writes '._name' resource forks beside copied files: they are not images.
    return name.startswith(".")


def _renumber(items: Items) -> Items:
    """Labels 0..n-1 in the order of the original ids."""
    ids = sorted({label for _, label in items})
    index = {original: new for new, original in enumerate(ids)}
    return [(path, index[label]) for path, label in items]


def _require(path: str, layout: str, dataset: str, kind: str = "folder") -> None:
    exists = os.path.isdir(path) if kind == "folder" else os.path.isfile(path)
    if not exists:
        raise UsageError(f"{dataset} {kind} not found: expected {path} (layout: <data-root>/{layout})")


def _listdir(folder: str, dataset: str) -> list[str]:
    """The names in `folder`, hidden ones left out; UsageError when it cannot be read."""
    try:
        return [name for name in os.listdir(folder) if not _is_hidden(name)]
    except OSError as error:
        raise UsageError(f"{dataset}: cannot read the folder {folder} ({error.strerror})") from None


def _is_class_folder(path: str) -> bool:
    """Whether `path` is a folder (a plain file is not a class); UsageError for a link that
    loops or leads nowhere, which would otherwise drop a class and shift the split silently."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as error:
        raise UsageError(
            f"CUB-200-2011: {path} cannot be opened ({error.strerror}): expected a class folder "
            f"(remove it or repair the link)"
        ) from None


CLASS_ID = re.compile(r"-?[0-9]+")  # ASCII digits only: int() also takes '\u0663' and str.isdigit() '\u00b2'


def _text_lines(list_file: str, dataset: str = "") -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 list file; UsageError naming the first line that is not UTF-8."""
    with open(list_file, "rb") as f:
        lines = f.read().splitlines()
    for number, raw in enumerate(lines, start=1):
        try:
            yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")  # the BOM some editors write
        except UnicodeDecodeError as error:
            raise UsageError(
                f"{dataset}line {number} of {list_file} is not UTF-8 text (byte {raw[error.start]:#04x} "
                f"at column {error.start + 1})"
            ) from None


def cub_split(root: str, train: bool) -> Items:
    """CUB-200-2011: classes are the sorted image folders; the first 100 train, the rest test."""
    images = os.path.join(root, "CUB_200_2011", "images")
    _require(images, CUB_LAYOUT, "CUB-200-2011")
    classes = sorted(d for d in _listdir(images, "CUB-200-2011") if _is_class_folder(os.path.join(images, d)))
    if len(classes) < 2:
        raise UsageError(
            f"CUB-200-2011: expected class folders like 001.Black_footed_Albatross in {images}, found {len(classes)}"
        )
    half = len(classes) // 2
    chosen = classes[:half] if train else classes[half:]
    items = []
    for label, name in enumerate(chosen):
        folder = os.path.join(images, name)
        files = sorted(f for f in _listdir(folder, "CUB-200-2011") if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UsageError(f"CUB-200-2011: class folder {folder} holds no images (expected <file>.jpg)")
        items += [(os.path.join(folder, f), label) for f in files]
    return items


def cars_split(root: str, train: bool) -> Items:
    """Cars196: cars_annos.mat lists (relative path, bbox, 1-based class, test flag);
    classes 1-98 train, 99-196 test (the test flag is not used, as published)."""
    import scipy.io

    folder = os.path.join(root, "cars196")
    annotations_file = os.path.join(folder, "cars_annos.mat")
    _require(annotations_file, CARS_LAYOUT, "Cars196", kind="file")
    try:
        annotations = scipy.io.loadmat(annotations_file)["annotations"][0]
        entries = [(str(a["relative_im_path"][0]), int(a["class"][0][0])) for a in annotations]
    except Exception as error:
        raise UsageError(
            f"Cars196: {annotations_file} is not a readable cars_annos.mat "
            f"(expected an 'annotations' struct with relative_im_path and class): {error}"
        ) from None
    num_classes = max(c for _, c in entries)
    half = num_classes // 2
    items = [(os.path.join(folder, path), c) for path, c in entries if (c <= half) == train]
    if not items:
        raise UsageError(f"Cars196: {annotations_file} lists no images of the {'train' if train else 'test'} classes")
    missing = [path for path, _ in items if not os.path.isfile(path)]
    if missing:
        raise UsageError(
            f"Cars196: {len(missing)} images listed in {annotations_file} are missing, "
            f"e.g. {missing[0]} (layout: <data-root>/{CARS_LAYOUT})"
        )
    return _renumber(items)


SOP_FOLDERS = ("Stanford_Online_Products", "Standford_Online_Products")  # the seed README's spelling too


def sop_split(root: str, train: bool) -> Items:
    """Stanford Online Products: Ebay_train.txt / Ebay_test.txt, a header line then
    `image_id class_id super_class_id path` per image."""
    folders = [os.path.join(root, name) for name in SOP_FOLDERS]
    folder = next((f for f in folders if os.path.isdir(f)), None)
    if folder is None:
        raise UsageError(
            f"Stanford Online Products folder not found: expected {folders[0]} "
            f"(or {folders[1]}) with Ebay_train.txt and Ebay_test.txt"
        )
    list_file = os.path.join(folder, "Ebay_train.txt" if train else "Ebay_test.txt")
    _require(list_file, SOP_LAYOUT, "Stanford Online Products", kind="file")
    items = []
    for number, line in _text_lines(list_file, "Stanford Online Products: "):
        if number == 1 or not line.strip():  # the header
            continue
        fields = line.split()
        if len(fields) != 4 or not CLASS_ID.fullmatch(fields[1]):
            raise UsageError(
                f"Stanford Online Products: line {number} of {list_file} should read "
                f"'image_id class_id super_class_id path', got {line!r}"
            )
        items.append((os.path.join(folder, fields[3]), int(fields[1])))
    if not items:
        raise UsageError(f"Stanford Online Products: {list_file} lists no images")
    return _renumber(items)


CUSTOM_LAYOUT = "train.txt and test.txt, one 'relative/path.jpg class_id' per line (class ids: integers >= 0)"


def custom_split(root: str, train: bool) -> Items:
    """Your own images: <data-root>/train.txt and test.txt list `relative/path class_id`,
    paths relative to <data-root>; the test classes should be unseen in training (a warning
    says when some are not)."""
    list_file = os.path.join(root, "train.txt" if train else "test.txt")
    items = _custom_list(root, list_file)
    missing = [path for path, _ in items if not os.path.isfile(path)]
    if missing:
        raise UsageError(f"{len(missing)} images listed in {list_file} are missing, e.g. {missing[0]}")
    if not train:  # only train.txt's class ids are needed here: its images are checked when it is built
        trained = {label for _, label in _custom_list(root, os.path.join(root, "train.txt"))}
        seen = trained & {label for _, label in items}
        if seen:
            warnings.warn(
                f"{len(seen)} class ids of {list_file} also occur in train.txt "
                f"(e.g. {min(seen)}): the test metrics are then not on unseen classes",
                stacklevel=2,
            )
    return _renumber(items)


def _custom_list(root: str, list_file: str) -> Items:
    """The (path, class id) lines of `list_file`, class ids as written, paths under `root`."""
    _require(list_file, CUSTOM_LAYOUT, "custom data set", kind="file")
    items = []
    for number, line in _text_lines(list_file):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.rpartition(" ")
        if not path.strip() or not CLASS_ID.fullmatch(label):
            raise UsageError(
                f"line {number} of {list_file} should read 'relative/path.jpg class_id' "
                f"(class_id in digits 0-9), got {line!r}"
            )
        if int(label) < 0:
            raise UsageError(
                f"class id {label} on line {number} of {list_file} is out of range: expected an integer >= 0"
            )
        items.append((_under_root(root, path, list_file, number), int(label)))
    if not items:
        raise UsageError(f"{list_file} lists no images (expected {CUSTOM_LAYOUT})")
    return items


def _under_root(root: str, path: str, list_file: str, number: int) -> str:
    """root/path, refused when `path` is absolute or climbs out of `root` with '..'. Checked
    on the names, not through links: a data root may link to the disk its images are on."""
    joined = os.path.normpath(os.path.join(root, path))
    if os.path.isabs(path) or os.path.relpath(joined, os.path.normpath(root)).split(os.sep)[0] == os.pardir:
        raise UsageError(
            f"line {number} of {list_file} names {path}, which lies outside --data-root {root}: "
            f"expected a path relative to it"
        )
    return os.path.join(root, path)


SPLITS = {"cub": cub_split, "cars": cars_split, "SOP": sop_split, "custom": custom_split}


UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on a bad file


def warn_unreadable(path: str, error: Exception) -> None:
    warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=3)


class ImageFileDataset(Dataset):
    """(path, label) items decoded with PIL; grey, CMYK and RGBA images become RGB."""

    def __init__(self, items: Items, transform=None):
        self.items = items
        self.transform = transform
        self.labels = [label for _, label in items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        """(image, label), or Unreadable(path) for a corrupt or truncated file (with a
        warning): collate_valid drops it and the loops count it against --max-bad-images."""
        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except UNREADABLE as error:
            warn_unreadable(path, error)
            return Unreadable(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


@dataclass(frozen=True)
class Unreadable:
    """What a dataset gives for an image it could not decode."""

    path: str


def drop_unreadable(samples) -> tuple[list, tuple[str, ...]]:
    """(the readable samples, the paths of the unreadable ones)."""
    valid = [sample for sample in samples if not isinstance(sample, Unreadable)]
    return valid, tuple(sample.path for sample in samples if isinstance(sample, Unreadable))


def collate_valid(batch):
    """(images, labels, paths of the unreadable images dropped); images None if all were."""
    valid, dropped = drop_unreadable(batch)
    if not valid:
        return None, None, dropped
    return (*default_collate(valid), dropped)


class BadImageBudget:
    """Counts unreadable images, each once however often it is met (every epoch, every
    evaluation); more than `limit` stops the run with one clear sentence. Under torchrun
    each process counts the images it meets."""

    def __init__(self, limit: int):
        self.limit, self.paths = limit, set()

    def add(self, dropped: Sequence[str]) -> None:
        self.paths.update(dropped)
        if len(self.paths) > self.limit:
            raise UsageError(
                f"{len(self.paths)} images could not be decoded, more than --max-bad-images "
                f"{self.limit} (their paths are in the warnings above): repair or remove them, or "
                f"raise the limit"
            )
