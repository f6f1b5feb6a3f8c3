"""Image transforms of the published recipe (IDML_METHOD.md section 4), sized by
--image-size: train RandomResizedCrop + horizontal flip, eval Resize(size * 256/224) +
CenterCrop(size); ImageNet mean/std normalisation."""
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(image_size: int) -> int:
    """Eval resize before the centre crop: 256 for 224, same ratio otherwise."""
    return round(image_size * 256 / 224)


def train_transform(image_size: int):
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int):
    return transforms.Compose([
        transforms.Resize(resize_size(image_size)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
