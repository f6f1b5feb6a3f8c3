"""Image transforms of the published recipe (docs/method.md, section 4.2), sized by
--image-size: train RandomResizedCrop + horizontal flip, eval Resize(size * 256/224) +
CenterCrop(size); ImageNet mean/std normalisation."""

import torch
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(image_size: int) -> int:
    """Eval resize before the centre crop: 256 for 224, same ratio otherwise."""
    return round(image_size * 256 / 224)


def train_transform(image_size: int):
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TrainDraws:
    """The random draws train_transform(image_size) makes for an image, in its order: the
    RandomResizedCrop box, then the RandomHorizontalFlip coin. Only the image's size is read
    (a PIL image opened without decoding will do), so another decoder (idml/data/dali.py)
    can apply the same crops and flips under the same seeds."""

    def __init__(self, image_size: int):
        self.crop, self.flip = train_transform(image_size).transforms[:2]

    def __call__(self, image) -> tuple[int, int, int, int, bool]:
        """(top, left, height, width, flip)."""
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        return top, left, height, width, bool(torch.rand(1) < self.flip.p)


def eval_geometry(width: int, height: int, image_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """What eval_transform(image_size) does to a width x height image, computed as torchvision
    does: the (height, width) after Resize (the longer side truncated) and the (top, left)
    corner of the CenterCrop (Python's round, halves to even)."""
    short, long = sorted((width, height))
    resized = (resize_size(image_size), int(resize_size(image_size) * long / short))
    resized_height, resized_width = resized if height <= width else resized[::-1]
    corner = (int(round((resized_height - image_size) / 2.0)), int(round((resized_width - image_size) / 2.0)))
    return (resized_height, resized_width), corner


def eval_transform(image_size: int):
    return transforms.Compose(
        [
            transforms.Resize(resize_size(image_size)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
