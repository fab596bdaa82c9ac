"""Tests of locallearn.data: loading, caching, subsets, augmentation and loaders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets
from PIL import Image

from locallearn import data as D
from locallearn.errors import ConfigError, DataError

CLASSES = ["ant", "bee", "cat"]


def _pixel(split: str, cls: int, i: int) -> tuple[int, int, int]:
    """A colour that encodes where an image came from, so decoded pixels can be checked."""
    return (10 + 40 * cls, 5 + 10 * i, 200 if split == "train" else 100)


def make_folder(root: Path, test_name: str = "test", per_class: int = 4, size=(6, 5)) -> Path:
    """A tiny lossless image folder; classes are created out of sorted order."""
    for split, n in (("train", per_class), (test_name, 2)):
        for cls, name in reversed(list(enumerate(CLASSES))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, _pixel(split, cls, i)).save(folder / f"{i:02d}.png")
    return root


def decode_counter(monkeypatch) -> list[int]:
    """Count calls of the decoder while keeping its behaviour."""
    calls = [0]
    real = D._decode_images

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(D, "_decode_images", counting)
    return calls


def test_imagefolder_loads_sorted_classes_labels_and_pixels(tmp_path):
    root = make_folder(tmp_path / "imgs")
    data = D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert data.classes == CLASSES
    assert data.name == f"imagefolder:{root.resolve()}"
    assert data.train_images.shape == (12, 3, 5, 6) and data.test_images.shape == (6, 3, 5, 6)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.num_classes == 3 and data.image_size == (3, 5, 6)
    assert data.augment == "crop_flip"
    for k, (y, i) in enumerate([(c, i) for c in range(3) for i in range(4)]):
        expected = torch.tensor(_pixel("train", y, i), dtype=torch.uint8)[:, None, None]
        assert torch.equal(data.train_images[k], expected.expand(3, 5, 6))
    x = data.train_images.double() / 255
    assert data.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-12)
    assert data.std == pytest.approx(x.std((0, 2, 3), unbiased=False).tolist(), abs=1e-12)


def test_imagefolder_accepts_val_as_test_split(tmp_path):
    root = make_folder(tmp_path / "imgs", test_name="val")
    data = D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.test_images[0, 2, 0, 0] == 100  # the blue value marks the val images


def test_imagefolder_converts_grayscale_and_rgba_to_rgb(tmp_path):
    root = make_folder(tmp_path / "imgs")
    Image.new("L", (6, 5), 77).save(root / "train" / "ant" / "gray.png")
    Image.new("RGBA", (6, 5), (1, 2, 3, 50)).save(root / "train" / "ant" / "rgba.png")
    data = D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert data.train_images.shape == (14, 3, 5, 6)
    # Files sort as 00..03.png, gray.png, rgba.png inside ant/.
    assert (data.train_images[4] == 77).all()
    assert data.train_images[5, :, 0, 0].tolist() == [1, 2, 3]


def test_imagefolder_with_differing_sizes_names_both(tmp_path):
    root = make_folder(tmp_path / "imgs")
    Image.new("RGB", (9, 7)).save(root / "train" / "bee" / "big.png")
    with pytest.raises(DataError, match="6x5.*9x7") as err:
        D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_imagefolder_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root, cache = make_folder(tmp_path / "imgs"), tmp_path / "cache"
    calls = decode_counter(monkeypatch)
    first = D.load_dataset(f"imagefolder:{root}", cache_dir=cache)
    assert calls[0] == 2 and len(list(cache.glob("*.npy"))) == 2
    assert not list(cache.glob("*.tmp"))
    second = D.load_dataset(f"imagefolder:{root}", cache_dir=cache)
    assert calls[0] == 2  # both splits came from the cache
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_images, second.test_images)
    # Changing one file changes the key of its split only.
    Image.new("RGB", (6, 5), (9, 9, 9)).save(root / "test" / "cat" / "00.png")
    os.utime(root / "test" / "cat" / "00.png", ns=(1, 1))
    third = D.load_dataset(f"imagefolder:{root}", cache_dir=cache)
    assert calls[0] == 3
    assert third.test_images[4, :, 0, 0].tolist() == [9, 9, 9]


def test_imagefolder_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    root, cache = make_folder(tmp_path / "imgs"), tmp_path / "cache"
    first = D.load_dataset(f"imagefolder:{root}", cache_dir=cache)
    files = sorted(cache.glob("*.npy"))
    files[0].write_bytes(b"not an array")
    files[1].write_bytes(files[1].read_bytes()[:100])  # truncated
    calls = decode_counter(monkeypatch)
    second = D.load_dataset(f"imagefolder:{root}", cache_dir=cache)
    assert calls[0] == 2
    assert torch.equal(first.train_images, second.train_images)
    assert all(np.load(f).dtype == np.uint8 for f in files)  # rewritten and readable


def test_imagefolder_unreadable_image_is_a_data_error(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "ant" / "broken.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="broken.png"):
        D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda p: "cifar1O", ConfigError, "did you mean cifar10"),
        (lambda p: "imagefolder", ConfigError, "imagefolder:PATH"),
        (lambda p: f"imagefolder:{p / 'absent'}", DataError, "does not exist; expected"),
        (lambda p: f"imagefolder:{(p / 'x' / 'test').mkdir(parents=True) or p / 'x'}",
         DataError, "has no train/ directory"),
        (lambda p: f"imagefolder:{(p / 'x' / 'train').mkdir(parents=True) or p / 'x'}",
         DataError, "neither test/ nor val/"),
    ],
)
def test_dataset_info_errors_are_one_line(tmp_path, make, error, pattern):
    with pytest.raises(error, match=pattern) as err:
        D.dataset_info(make(tmp_path), tmp_path)
    assert "\n" not in str(err.value)


def test_dataset_info_accepts_known_spellings(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_download_reachable", lambda urls, timeout=3.0: True)
    for spec, name in (("cifar10", "cifar10"), ("CIFAR-100", "cifar100"),
                       ("fashion-mnist", "fashion_mnist"), ("synthetic", "synthetic")):
        assert D.dataset_info(spec, tmp_path).name == name
    info = D.dataset_info(f"imagefolder:{make_folder(tmp_path / 'imgs')}", tmp_path)
    assert (info.num_classes, info.image_size, info.train_size) == (3, (3, 5, 6), 12)


def test_an_incomplete_torchvision_folder_fails_in_one_line_while_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://example.invalid/")
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert D.dataset_info("cifar10", tmp_path).num_classes == 10  # looked for, not read
    with pytest.raises(DataError, match="could not find or download CIFAR-10 in ") as err:
        D.load_dataset("cifar10", tmp_path)
    assert "\n" not in str(err.value) and "imagefolder:PATH" in str(err.value)


@pytest.mark.parametrize(("name", "cls", "attr"), [
    ("cifar10", "CIFAR10", "url"), ("mnist", "MNIST", "mirrors"),
])
def test_failed_download_is_one_line_data_error(tmp_path, monkeypatch, name, cls, attr):
    # ".invalid" never resolves (RFC 2606), so this fails the same with or without network.
    url = "http://example.invalid/"
    monkeypatch.setattr(getattr(torchvision.datasets, cls), attr, url if attr == "url" else [url])
    with pytest.raises(DataError, match="could not find or download") as err:
        D.load_dataset(name, tmp_path)
    assert "\n" not in str(err.value)


class FakeTorchvisionSet:
    """Stands in for a downloaded torchvision set: raw ``.data``/``.targets`` as they ship."""

    classes = ["a", "b"]

    def __init__(self, root, train, download):
        n = 4 if train else 2
        if self.gray:
            self.data = torch.arange(n * 2 * 3, dtype=torch.uint8).view(n, 2, 3)
            self.targets = torch.tensor([0, 1] * (n // 2))
        else:
            self.data = np.arange(n * 2 * 3 * 3, dtype=np.uint8).reshape(n, 2, 3, 3)
            self.targets = [0, 1] * (n // 2)


@pytest.mark.parametrize(("name", "cls", "gray"), [("mnist", "MNIST", True),
                                                    ("cifar10", "CIFAR10", False)])
def test_torchvision_arrays_become_uint8_nchw(tmp_path, monkeypatch, name, cls, gray):
    fake = type("Fake", (FakeTorchvisionSet,), {"gray": gray})
    monkeypatch.setattr(torchvision.datasets, cls, fake)
    data = D.load_dataset(name, tmp_path, test_subset=2)
    assert data.train_images.shape == (4, 3, 2, 3) and data.train_images.dtype == torch.uint8
    assert data.train_labels.tolist() == [0, 1, 0, 1] and data.train_labels.dtype == torch.int64
    raw = torch.as_tensor(fake(tmp_path, True, False).data)
    expected = raw[:, None].expand(-1, 3, -1, -1) if gray else raw.permute(0, 3, 1, 2)
    assert torch.equal(data.train_images, expected)
    assert data.augment == ("crop" if gray else "crop_flip") and data.classes == ["a", "b"]


def test_balanced_subset_is_balanced_and_seeded():
    labels = torch.arange(1000) % 10
    idx = D.balanced_subset(labels, 200, seed=0)
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 200
    assert labels[idx].bincount().tolist() == [20] * 10
    assert torch.equal(idx, D.balanced_subset(labels, 200, seed=0))
    assert not torch.equal(idx, D.balanced_subset(labels, 200, seed=1))
    counts = labels[D.balanced_subset(labels, 23, seed=3)].bincount(minlength=10)
    assert counts.sum() == 23 and set(counts.tolist()) == {2, 3}
    assert (labels[D.balanced_subset(labels, 4, seed=0)].bincount(minlength=10) <= 1).all()


def test_balanced_subset_spreads_what_a_small_class_lacks():
    labels = torch.tensor([0] * 2 + [1] * 50 + [2] * 50)
    counts = labels[D.balanced_subset(labels, 30, seed=0)].bincount().tolist()
    assert counts == [2, 14, 14]
    assert len(D.balanced_subset(labels, len(labels), seed=5)) == len(labels)


def test_subset_too_large_is_a_config_error():
    with pytest.raises(ConfigError, match="between 1 and 10"):
        D.balanced_subset(torch.arange(10), 11, seed=0)
    with pytest.raises(ConfigError, match="train_subset=300 .* 256 train"):
        D.load_dataset("synthetic", train_subset=300)


def reference_crop_flip(images, mean, std, padding, generator, flip):
    """torchvision-style per-sample crop (and flip) of zero-padded raw images, then normalise."""
    b, _, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    flips = torch.rand(b, 1, generator=generator) < 0.5 if flip else torch.zeros(b, 1, dtype=bool)
    out = []
    for k in range(b):
        padded = F.pad(images[k], (padding,) * 4)
        crop = padded[:, dy[k, 0]:dy[k, 0] + h, dx[k, 0]:dx[k, 0] + w]
        out.append(crop.flip(-1) if flips[k, 0] else crop)
    x = torch.stack(out).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture
def batch():
    return torch.randint(0, 256, (64, 3, 8, 10), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def test_unknown_augment_is_a_config_error():
    with pytest.raises(ConfigError, match="did you mean crop_flip"):
        D.BatchTransform(MEAN, STD, "crop-flip")


def test_transform_none_is_plain_normalisation(batch):
    out = D.BatchTransform(MEAN, STD, "none")(batch, torch.Generator().manual_seed(0))
    expected = (batch.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


@pytest.mark.parametrize("augment", ["crop_flip", "crop"])
def test_transform_matches_per_sample_reference(batch, augment):
    t = D.BatchTransform(MEAN, STD, augment, padding=3)
    out = t(batch, torch.Generator().manual_seed(7))
    ref = reference_crop_flip(batch, MEAN, STD, 3, torch.Generator().manual_seed(7),
                              flip=augment == "crop_flip")
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(out, t(batch, torch.Generator().manual_seed(7)))  # reproducible
    assert not torch.equal(out, t(batch, torch.Generator().manual_seed(8)))
    plain = D.BatchTransform(MEAN, STD, "none")(batch)
    assert (out != plain).flatten(1).any(1).sum() > len(batch) // 2  # most samples moved


def test_flip_is_horizontal_only():
    # Rows are constant, so only a vertical flip (or a vertical shift) could change them.
    rows = torch.arange(8, dtype=torch.uint8).mul(30).view(1, 1, 8, 1).expand(32, 3, 8, 8)
    flipped = D.BatchTransform((0.0,) * 3, (1.0,) * 3, "crop_flip", padding=0)(
        rows, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, rows.float() / 255)
    ramp = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8).expand(32, 3, 8, 8)
    out = D.BatchTransform((0.0,) * 3, (1.0,) * 3, "crop_flip", padding=0)(
        ramp, torch.Generator().manual_seed(0))
    is_flipped = out[:, 0, 0, 0] > out[:, 0, 0, 7]
    assert 0 < is_flipped.sum() < 32
    assert torch.equal(out[is_flipped], ramp[is_flipped].flip(-1).float() / 255)
    assert torch.equal(out[~is_flipped], ramp[~is_flipped].float() / 255)


def test_flip_alone_flips_without_shifting():
    # A ramp across columns: a crop would shift it, a flip reverses it.
    ramp = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8).expand(32, 3, 8, 8)
    t = D.BatchTransform((0.0,) * 3, (1.0,) * 3, "flip")
    out = t(ramp, torch.Generator().manual_seed(0))
    is_flipped = out[:, 0, 0, 0] > out[:, 0, 0, 7]
    assert 0 < is_flipped.sum() < 32
    assert torch.equal(out[is_flipped], ramp[is_flipped].flip(-1).float() / 255)
    assert torch.equal(out[~is_flipped], ramp[~is_flipped].float() / 255)
    assert torch.equal(out, t(ramp, torch.Generator().manual_seed(0)))  # reproducible


def test_with_transform_replaces_augmentation_and_statistics():
    data = D.load_dataset("synthetic")
    seed = data.with_transform("flip", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert (seed.augment, seed.mean, seed.std) == (
        "flip", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert seed.train_images is data.train_images and data.augment == "none"  # data untouched
    kept = data.with_transform()
    assert (kept.augment, kept.mean, kept.std) == (data.augment, data.mean, data.std)
    x = D.BatchTransform(seed.mean, seed.std)(seed.train_images[:4])
    want = (seed.train_images[:4].float() / 255 - torch.tensor(seed.mean).view(1, 3, 1, 1)) \
        / torch.tensor(seed.std).view(1, 3, 1, 1)
    assert torch.allclose(x, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(augment="flop"), "unknown augment 'flop'; did you mean flip"),
    (dict(mean=(0.5, 0.5)), r"mean needs 3 finite numbers \(one per channel\); got \(0.5, 0.5\)"),
    (dict(std=(0.2, 0.0, 0.2)), "std needs 3 finite numbers, above 0"),
    (dict(std=(0.2, float("nan"), 0.2)), "std needs 3 finite numbers, above 0"),
])
def test_with_transform_refuses_bad_settings_in_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        D.load_dataset("synthetic").with_transform(**kwargs)
    assert "\n" not in str(info.value)


def test_normalised_synthetic_data_has_zero_mean_unit_std():
    data = D.load_dataset("synthetic")
    x = D.BatchTransform(data.mean, data.std)(data.train_images)
    assert x.mean((0, 2, 3)).abs().max() < 1e-4
    assert (x.std((0, 2, 3)) - 1).abs().max() < 1e-3
    assert data.augment == "none"


def test_synthetic_is_deterministic_balanced_and_learnable():
    a, b = D.load_dataset("synthetic", seed=0), D.load_dataset("synthetic", seed=5)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.shape == (256, 3, 16, 16) and a.test_images.shape == (128, 3, 16, 16)
    assert set(a.train_labels.bincount().tolist()) == {25, 26}
    assert set(a.test_labels.bincount().tolist()) == {12, 13}
    # Nearest class mean, fitted on train: far above the 10% of chance on test.
    xtr, xte = a.train_images.flatten(1).float(), a.test_images.flatten(1).float()
    centres = torch.stack([xtr[a.train_labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(xte, centres).argmin(1) == a.test_labels).float().mean()
    assert accuracy > 0.9
    # ...while a single pixel is a poor guide, so there is something to learn.
    pixel_tr, pixel_te = xtr[:, :1], xte[:, :1]
    centres1 = torch.stack([pixel_tr[a.train_labels == c].mean(0) for c in range(10)])
    assert (torch.cdist(pixel_te, centres1).argmin(1) == a.test_labels).float().mean() < 0.5


def test_loaders_are_seeded_and_yield_uint8(tmp_path):
    data = D.load_dataset("synthetic")
    train, test = D.make_loaders(data, batch_size=32, seed=3)
    x, y = next(iter(train))
    assert x.dtype == torch.uint8 and x.shape == (32, 3, 16, 16) and y.dtype == torch.int64

    def order(seed, epochs=2):
        loader = D.make_loaders(data, 32, seed)[0]
        return torch.cat([y for _ in range(epochs) for _, y in loader])

    # The same seed gives the same order epoch after epoch; epochs differ from each other.
    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))
    assert not torch.equal(order(3)[:256], order(3)[256:])
    assert test.batch_size == 64 and torch.equal(torch.cat([y for _, y in test]), data.test_labels)
    assert D.make_loaders(data, 32, 0, eval_batch_size=100)[1].batch_size == 100
    assert len(D.make_loaders(data, 100, 0, drop_last=True)[0]) == 2


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def test_real_cifar10_files_decode(cifar10_path, tmp_path):
    # A copy of a few real files per class: decodes real JPEGs in a fraction of a second.
    for split, n in (("train", 3), ("test", 2)):
        for name in CIFAR10_CLASSES:
            (tmp_path / "c10" / split / name).mkdir(parents=True)
            for f in sorted((cifar10_path / split / name).iterdir())[:n]:
                shutil.copy(f, tmp_path / "c10" / split / name / f.name)
    data = D.load_dataset(f"imagefolder:{tmp_path / 'c10'}", cache_dir=tmp_path / "cache")
    assert data.classes == CIFAR10_CLASSES
    assert data.train_labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert data.image_size == (3, 32, 32) and data.test_images.shape == (20, 3, 32, 32)
    assert 0.3 < data.mean[0] < 0.7 and data.train_images.float().std() > 20


@pytest.mark.slow
def test_real_cifar10_full_split_statistics_and_cache(cifar10_path, tmp_path, monkeypatch):
    # Decodes all 60,000 files once (~8 s on 2 cores), then loads again from the cache.
    calls = decode_counter(monkeypatch)
    spec = f"imagefolder:{cifar10_path}"
    data = D.load_dataset(spec, train_subset=200, test_subset=100, cache_dir=tmp_path)
    assert data.classes == CIFAR10_CLASSES
    assert data.train_labels.bincount().tolist() == [20] * 10
    assert data.test_labels.bincount().tolist() == [10] * 10
    assert data.image_size == (3, 32, 32) and data.test_images.shape == (100, 3, 32, 32)
    # Statistics of the full training split, as measured in shared/data/README.md.
    assert data.mean == pytest.approx((0.4913, 0.4821, 0.4465), abs=2e-4)
    assert data.std == pytest.approx((0.2452, 0.2428, 0.2606), abs=2e-4)
    again = D.load_dataset(spec, train_subset=200, test_subset=100, cache_dir=tmp_path)
    assert calls[0] == 2 and torch.equal(again.train_images, data.train_images)
