"""Datasets in their real on-disk layouts (written by idml.data.synthetic), digits, samplers."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from idml.data import build_dataset
from idml.data.datasets import BadImageBudget, cars_split, cub_split, sop_split
from idml.data.samplers import BalancedBatchSampler, RandomBatchSampler
from idml.data.synthetic import write_cars, write_cub, write_sop
from idml.errors import UsageError

CLASSES, PER_CLASS = 6, 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_cub(root, CLASSES, PER_CLASS)
    write_cars(root, CLASSES, PER_CLASS)
    write_sop(root, CLASSES, PER_CLASS)
    return root


@pytest.mark.parametrize("split", [cub_split, cars_split, sop_split])
def test_splits_hold_disjoint_halves_of_the_classes(root, split):
    train, test = split(root, True), split(root, False)
    assert len(train) == len(test) == CLASSES // 2 * PER_CLASS
    assert sorted({label for _, label in train}) == sorted({label for _, label in test}) == list(range(CLASSES // 2))
    assert not {path for path, _ in train} & {path for path, _ in test}
    assert all(os.path.isfile(path) for path, _ in train + test)


def test_cub_classes_are_the_sorted_folders_and_hidden_files_are_skipped(root, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(root + "/CUB_200_2011", copy + "/CUB_200_2011")
    images = copy + "/CUB_200_2011/images"
    first = sorted(os.listdir(images))[0]
    open(os.path.join(images, first, "._resource_fork.jpg"), "wb").write(b"not an image")
    train = cub_split(copy, True)
    assert all(first in path for path, label in train if label == 0)
    assert not any(os.path.basename(path).startswith("._") for path, _ in train)


def test_cars_split_follows_the_annotation_classes(root):
    import scipy.io

    annotations = scipy.io.loadmat(os.path.join(root, "cars196", "cars_annos.mat"))["annotations"][0]
    expected = sorted(str(a["relative_im_path"][0]) for a in annotations if int(a["class"][0][0]) > CLASSES // 2)
    got = sorted(os.path.relpath(path, os.path.join(root, "cars196")) for path, _ in cars_split(root, False))
    assert got == expected


def test_sop_accepts_the_seed_readme_spelling(tmp_path):
    write_sop(str(tmp_path), 4, 3, folder_name="Standford_Online_Products")
    assert len(sop_split(str(tmp_path), True)) == 6


def test_images_decode_to_rgb_tensors_grey_ones_included(root):
    dataset = build_dataset("cub", root, train=False, image_size=40)
    modes = {Image.open(path).mode for path, _ in dataset.items}
    assert "L" in modes  # the generator writes grey JPEGs too
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 40, 40) and image.dtype == torch.float32
        assert label == dataset.labels[index]


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "L"])
def test_other_colour_modes_become_rgb(tmp_path, mode):
    from idml.data.datasets import ImageFileDataset

    path = str(tmp_path / "image.png" if mode == "RGBA" else tmp_path / "image.jpg")
    Image.new(mode, (20, 10)).save(path)
    image, _ = ImageFileDataset([(path, 0)])[0]
    assert image.mode == "RGB" and image.size == (20, 10)


@pytest.mark.parametrize("width, height", [(160, 120), (90, 161), (64, 64)])
def test_train_draws_are_the_crops_and_flips_of_train_transform(width, height):
    """What --loader dali relies on: under the same seed, TrainDraws gives the crop box and
    the flip that train_transform draws."""
    import torchvision.transforms.functional as F

    from idml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainDraws, train_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        expected = train_transform(40)(image)
        torch.manual_seed(seed)
        top, left, crop_height, crop_width, flip = TrainDraws(40)(image)
        crop = F.resized_crop(image, top, left, crop_height, crop_width, [40, 40])
        got = F.normalize(F.to_tensor(F.hflip(crop) if flip else crop), IMAGENET_MEAN, IMAGENET_STD)
        assert torch.equal(got, expected)
        flips.add(flip)
    assert flips == {False, True}


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (300, 300), (97, 301), (257, 256)])
@pytest.mark.parametrize("image_size", [224, 64, 50])
def test_eval_geometry_is_what_eval_transform_does(width, height, image_size):
    """Sizes and crop corners as torchvision computes them, half-pixel corners included."""
    import torchvision.transforms.functional as F

    from idml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_geometry, eval_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    (resized_height, resized_width), (top, left) = eval_geometry(width, height, image_size)
    crop = F.crop(F.resize(image, [resized_height, resized_width]), top, left, image_size, image_size)
    got = F.normalize(F.to_tensor(crop), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(got, eval_transform(image_size)(image))


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("cub", "CUB_200_2011/images"),
        ("cars", "cars196/cars_annos.mat"),
        ("SOP", "Stanford_Online_Products"),
    ],
)
def test_missing_dataset_names_the_expected_path(tmp_path, dataset, message):
    with pytest.raises(UsageError, match=message):
        build_dataset(dataset, str(tmp_path), train=True, image_size=32)


def test_malformed_sop_list_names_the_line(tmp_path):
    write_sop(str(tmp_path), 4, 2)
    list_file = tmp_path / "Stanford_Online_Products" / "Ebay_train.txt"
    list_file.write_text(list_file.read_text() + "this line is broken\n")
    with pytest.raises(UsageError, match="line 6 of .*Ebay_train.txt"):
        sop_split(str(tmp_path), True)


def test_cars_with_a_missing_image_is_reported(tmp_path):
    write_cars(str(tmp_path), 4, 2)
    os.remove(tmp_path / "cars196" / "car_ims" / "000001.jpg")
    with pytest.raises(UsageError, match="missing, e.g. .*000001.jpg"):
        cars_split(str(tmp_path), True)


def test_empty_cub_class_is_reported(tmp_path):
    write_cub(str(tmp_path), 4, 2)
    folder = tmp_path / "CUB_200_2011" / "images" / "005.Empty"
    folder.mkdir()
    with pytest.raises(UsageError, match="005.Empty holds no images"):
        cub_split(str(tmp_path), False)


def test_digits_split_unseen_classes():
    from idml.data.digits import SYMMETRIES, DigitsDataset

    plain = DigitsDataset(train=True, image_size=24, symmetry_classes=False)
    train = build_dataset("digits", "", train=True, image_size=24)
    test = build_dataset("digits", "", train=False, image_size=24)
    assert len(plain) + len(test) == 1797
    assert sorted(set(plain.labels)) == sorted(set(test.labels)) == [0, 1, 2, 3, 4]
    # training: each (digit 0-4, symmetry of the square) pair is a class, from the same scans
    assert len(train) == SYMMETRIES * len(plain) and sorted(set(train.labels)) == list(range(5 * SYMMETRIES))
    for k in range(SYMMETRIES):
        item = k * len(plain) + 7
        assert train.labels[item] == plain.labels[7] * SYMMETRIES + k
    upright, _ = DigitsDataset(train=True, image_size=24)[7]  # no augmentation: exact
    mirrored, _ = DigitsDataset(train=True, image_size=24)[4 * len(plain) + 7]
    turned, _ = DigitsDataset(train=True, image_size=24)[2 * len(plain) + 7]
    assert torch.equal(mirrored, upright.flip(-1)) and torch.equal(turned, upright.flip(-1).flip(-2))
    image, _ = test[0]
    assert image.shape == (3, 24, 24) and -1.0 <= image.min() and image.max() <= 1.0
    # the test split is not augmented: the same image twice
    assert torch.equal(test[3][0], test[3][0])


def indices(batches):
    return [[index for index, _ in batch] for batch in batches]


def test_random_sampler_drops_the_last_batch_and_is_deterministic_per_epoch():
    labels = list(range(25))
    sampler = RandomBatchSampler(labels, batch_size=10, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == 2 and all(len(b) == 10 for b in first)
    assert len(set(sum(indices(first), []))) == 20
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert indices(second) != indices(first)
    # every draw of the run carries its own number (its augmentation seed)
    draws = [draw for batch in first + second for _, draw in batch]
    assert len(set(draws)) == len(draws)


def test_resuming_mid_epoch_yields_the_remaining_batches():
    sampler = BalancedBatchSampler(np.repeat(np.arange(6), 5), batch_size=6, images_per_class=2, seed=1)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start_step=3)
    assert len(sampler) == len(whole) - 3 and list(sampler) == whole[3:]


def test_seeded_samples_augment_by_draw_not_by_call_order():
    from idml.data.samplers import SeededSamples

    dataset = SeededSamples(build_dataset("digits", "", train=True, image_size=16), seed=1)
    a, b = dataset[(3, 100)][0], dataset[(3, 101)][0]
    torch.rand(5)  # whatever happened in between
    assert torch.equal(dataset[(3, 100)][0], a) and not torch.equal(a, b)


def test_balanced_sampler_batches_hold_ipc_images_of_each_class():
    labels = np.repeat(np.arange(10), 7)
    sampler = BalancedBatchSampler(labels, batch_size=12, images_per_class=3, seed=0)
    for batch in indices(sampler):
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 4 and (counts == 3).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda labels, rank, world: RandomBatchSampler(labels, 12, 5, rank, world),
        lambda labels, rank, world: BalancedBatchSampler(labels, 12, 3, 5, rank, world),
    ],
)
def test_rank_shards_make_up_the_global_batch(make):
    labels = np.repeat(np.arange(8), 6)
    whole = list(make(labels, 0, 1))
    shards = [list(make(labels, rank, 3)) for rank in range(3)]  # (index, draw) pairs
    for step, batch in enumerate(whole):
        assert sum((shard[step] for shard in shards), []) == batch


def test_sampler_rejects_a_batch_larger_than_the_training_set():
    with pytest.raises(UsageError, match="larger than the training set"):
        RandomBatchSampler(list(range(5)), batch_size=8, seed=0)


def write_custom(root, lines_train, lines_test):
    from PIL import Image as PILImage

    for name in {line.rpartition(" ")[0] for line in lines_train + lines_test}:
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        PILImage.new("RGB", (12, 9), (30, 60, 90)).save(os.path.join(root, name))
    open(os.path.join(root, "train.txt"), "w").write("\n".join(lines_train) + "\n")
    open(os.path.join(root, "test.txt"), "w").write("\n".join(lines_test) + "\n")


def test_custom_lists_with_spaces_in_paths(tmp_path):
    from idml.data.datasets import custom_split

    write_custom(str(tmp_path), ["a/one.jpg 7", "a/two words.jpg 7", "b/three.jpg 12"], ["c/four.jpg 3"])
    train = custom_split(str(tmp_path), True)
    assert [label for _, label in train] == [0, 0, 1]
    assert train[1][0] == os.path.join(str(tmp_path), "a/two words.jpg")
    assert custom_split(str(tmp_path), False) == [(os.path.join(str(tmp_path), "c/four.jpg"), 0)]


@pytest.mark.parametrize(
    "line, message",
    [
        ("a/one.jpg -2", "class id -2 on line 2 of .*train.txt is out of range"),
        ("a/one.jpg cat", "line 2 of .*train.txt should read 'relative/path.jpg class_id'"),
        ("a/missing.jpg 1", "1 images listed in .*train.txt are missing"),
    ],
)
def test_custom_list_errors_name_the_line(tmp_path, line, message):
    from idml.data.datasets import custom_split

    write_custom(str(tmp_path), ["a/one.jpg 0"], ["a/one.jpg 1"])
    with open(tmp_path / "train.txt", "a") as f:
        f.write(line + "\n")
    with pytest.raises(UsageError, match=message):
        custom_split(str(tmp_path), True)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_with_one_class_is_refused(tmp_path, split):
    lists = {"train": ["a/one.jpg 0", "a/two.jpg 1"], "test": ["b/one.jpg 5", "b/two.jpg 6"]}
    lists[split] = ["a/one.jpg 3", "a/two.jpg 3"]
    write_custom(str(tmp_path), lists["train"], lists["test"])
    name = "training" if split == "train" else "test"
    with pytest.raises(
        UsageError, match=f"the {name} split of custom under .* holds 1 class; training and retrieval need at least 2"
    ):
        build_dataset("custom", str(tmp_path), train=split == "train", image_size=32)


def test_custom_test_classes_seen_in_training_are_warned_about(tmp_path):
    from idml.data.datasets import custom_split

    write_custom(str(tmp_path), ["a/one.jpg 0", "a/two.jpg 4"], ["b/one.jpg 4", "b/two.jpg 9"])
    with pytest.warns(UserWarning, match=r"1 class ids of .*test.txt also occur in train.txt \(e.g. 4\)"):
        custom_split(str(tmp_path), False)


def test_an_unreadable_image_met_again_counts_once():
    budget = BadImageBudget(1)
    for _ in range(3):  # the same bad image at every epoch or evaluation
        budget.add(("a.jpg",))
    with pytest.raises(UsageError, match="2 images could not be decoded, more than --max-bad-images 1"):
        budget.add(("b.jpg", "a.jpg"))
