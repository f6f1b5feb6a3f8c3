"""The embedded default data: scikit-learn's bundled handwritten digits (1,797 real 8x8
scans shipped inside the scikit-learn wheel, nothing is downloaded). Classes 0-4 train,
5-9 are the unseen test classes. Images are upsampled to the input size in memory."""
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms

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
            image = AUGMENT(image)
        return image, self.labels[index]


# The digits' counterpart of the photos' random resized crop: small shifts, rotations and
# scalings, background-filled (a horizontal flip would turn digits into other shapes).
AUGMENT = transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=-1.0)
