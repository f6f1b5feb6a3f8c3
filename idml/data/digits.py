"""The embedded default data: scikit-learn's bundled handwritten digits (1,797 real 8x8
scans shipped inside the scikit-learn wheel, nothing is downloaded). Classes 0-4 train,
5-9 are the unseen test classes. Images are upsampled to the input size in memory."""
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

TRAIN_DIGITS = (0, 1, 2, 3, 4)


class DigitsDataset(Dataset):
    def __init__(self, train: bool, image_size: int, augment: bool = False):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # scans are 0..16
        targets = torch.tensor(digits.target)
        keep = torch.isin(targets, torch.tensor(TRAIN_DIGITS)) != (not train)
        images = images[keep].unsqueeze(1)
        # Labels 0..4 in both splits (digit 5 -> 0 in the test split).
        self.labels = (targets[keep] - (0 if train else len(TRAIN_DIGITS))).tolist()
        upsampled = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        # Grey -> 3 channels, centred like the ImageNet-normalised photos.
        self.images = ((upsampled - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
        self.augment = augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if self.augment:
            image = _random_shift(image, max_shift=max(1, image.shape[-1] // 16))
        return image, self.labels[index]


def _random_shift(image: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate by up to max_shift pixels, filling with the background value: the
    digits' counterpart of the random crop (a flip would turn digits into other shapes)."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
    shifted = torch.full_like(image, -1.0)
    h, w = image.shape[-2:]
    shifted[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return shifted
