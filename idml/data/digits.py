"""The embedded default data: scikit-learn's bundled handwritten digits (1,797 real 8x8
scans shipped inside the scikit-learn wheel, nothing is downloaded). Classes 0-4 train,
5-9 are the unseen test classes. Images are upsampled to the input size in memory.

Symmetry classes (training split only). Five training classes are too few for a metric
to transfer: the Proxy Anchor loss pulls every image onto one of 5 proxies, the network
learns exactly the 5 directions that separate 0-4, and images of the unseen digits 5-9
land on mixtures of those directions, so the unseen classes end no better (usually worse)
than the untrained network, while the training classes reach MAP@R 0.98. More classes
are the remedy, and the 8 symmetries of the square (4 rotations, each also mirrored) make
them from the same 899 scans: a rotated or mirrored "2" is another shape, not a "2", so
each (digit, symmetry) pair is its own class: 5 x 8 = 40 training classes of 899 images
each. Only images of 0-4 are used; the test split (5-9, upright) is untouched.
`symmetry_classes=False` gives the plain 5-class training split.
"""

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms

TRAIN_DIGITS = (0, 1, 2, 3, 4)
SYMMETRIES = 8  # rotations by 0, 90, 180, 270 degrees, each without and with a mirror


def apply_symmetry(image: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k in 0..7) of a C x H x W image."""
    if k >= 4:
        image = image.flip(-1)
    return torch.rot90(image, k % 4, (-2, -1)) if k % 4 else image


class DigitsDataset(Dataset):
    def __init__(self, train: bool, image_size: int, augment: bool = False, symmetry_classes: bool = True):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # scans are 0..16
        targets = torch.tensor(digits.target)
        keep = torch.isin(targets, torch.tensor(TRAIN_DIGITS)) != (not train)
        images = images[keep].unsqueeze(1)
        # Labels 0..4 in both splits (digit 5 -> 0 in the test split).
        digit_labels = (targets[keep] - (0 if train else len(TRAIN_DIGITS))).tolist()
        upsampled = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        # Grey -> 3 channels, centred like the ImageNet-normalised photos.
        self.images = ((upsampled - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
        # Item i is scan i % n under symmetry i // n, of class digit * SYMMETRIES + symmetry.
        self.symmetries = SYMMETRIES if train and symmetry_classes else 1
        self.labels = [digit * self.symmetries + k for k in range(self.symmetries) for digit in digit_labels]
        self.augment = augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        symmetry, scan = divmod(index, len(self.images))
        image = apply_symmetry(self.images[scan], symmetry)
        if self.augment:
            image = AUGMENT(image)
        return image, self.labels[index]


# The digits' counterpart of the photos' random resized crop: small shifts, rotations and
# scalings, background-filled (a horizontal flip would turn digits into other shapes).
AUGMENT = transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=-1.0)
