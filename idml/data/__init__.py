"""Datasets by name: the embedded digits and the three image-retrieval benchmarks."""

from idml.data.datasets import SPLITS, ImageFileDataset
from idml.data.digits import DigitsDataset
from idml.data.transforms import eval_transform, train_transform
from idml.errors import UsageError

DEFAULT_IMAGE_SIZE = {"digits": 32}  # every photo dataset: 224


def default_image_size(dataset: str) -> int:
    return DEFAULT_IMAGE_SIZE.get(dataset, 224)


def build_dataset(dataset: str, root: str, train: bool, image_size: int, augment: bool = None):
    """One split of `dataset`; training augmentation when `augment` (default: train)."""
    augment = train if augment is None else augment
    if dataset == "digits":
        return DigitsDataset(train=train, image_size=image_size, augment=augment)
    items = SPLITS[dataset](root, train)
    classes = len({label for _, label in items})
    if classes < 2:  # one class: no loss to learn from, and every neighbour would be a hit
        raise UsageError(
            f"the {'training' if train else 'test'} split of {dataset} under {root} holds "
            f"{classes} class; training and retrieval need at least 2"
        )
    transform = train_transform(image_size) if augment else eval_transform(image_size)
    return ImageFileDataset(items, transform)
