"""--augment ssl: the batched self-supervised views against torchvision's per-image ops."""

import json

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from locallearn import views as V
from locallearn.data import BatchTransform

OPS = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
       "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


@pytest.fixture
def images():
    return torch.randint(0, 256, (24, 3, 12, 10), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(OPS))
def test_each_colour_operation_is_torchvisions_with_one_factor_per_image(images, name):
    x = images.float() / 255
    factors = torch.linspace(-0.1, 0.1, len(x)) if name == "hue" else torch.linspace(0.5, 1.5,
                                                                                    len(x))
    ours = V.adjust(x, name, factors)
    ref = torch.stack([OPS[name](img, float(f)) for img, f in zip(x, factors, strict=True)])
    assert torch.allclose(ours, ref, atol=2e-6, rtol=0)
    assert not torch.allclose(ours, x, atol=1e-3)  # the factors were not all neutral


def test_resized_crop_is_torchvisions_bilinear_crop_then_resize(images):
    x = images.float() / 255
    boxes = torch.tensor([[1, 2, 5, 7], [0, 0, 12, 10], [3, 1, 8, 4], [2, 2, 6, 6]] * 6)
    flip = torch.arange(len(x)) % 3 == 0
    ours = V.resized_crop(x, boxes, flip)
    for img, box, f, out in zip(x, boxes, flip, ours, strict=True):
        ref = TF.resized_crop(img, *box.tolist(), [12, 10], antialias=False,
                              interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(out, TF.hflip(ref) if f else ref, atol=1e-6, rtol=0)


def test_crop_boxes_are_drawn_as_random_resized_crop_draws_them():
    boxes = V.crop_boxes((32, 32), 20000, torch.Generator().manual_seed(3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() \
        and (left + w <= 32).all() and (h > 0).all() and (w > 0).all()
    torch.manual_seed(3)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.08, 1.0],
                                                     [3 / 4, 4 / 3]) for _ in range(20000)])
    for ours, theirs in ((h * w, ref[:, 2] * ref[:, 3]), (h, ref[:, 2]), (top, ref[:, 0])):
        # Means of 20,000 draws: their standard error is below 1 % of these values.
        assert abs(ours.double().mean() / theirs.double().mean() - 1) < 0.03
    assert (h * w == 1024).float().mean() < 0.1  # the full image only as a rare draw


@pytest.mark.parametrize("size, box", [((32, 32), [0, 0, 32, 32]), ((10, 40), [0, 13, 10, 13]),
                                       ((40, 10), [13, 0, 13, 10])])
def test_an_image_where_no_try_fits_gets_the_centre_crop_of_the_nearest_ratio(size, box):
    assert V.crop_boxes(size, 2, attempts=0).tolist() == [box, box]


def _reference_views(images, generator):
    """The same random draws, in the same order, spent on torchvision's per-image ops."""
    n = len(images)
    boxes = V.crop_boxes(images.shape[-2:], n, generator)
    flip = torch.rand(n, generator=generator) < 0.5
    factors = {k: (1 - s) + 2 * s * torch.rand(n, generator=generator) if k != "hue"
               else -s + 2 * s * torch.rand(n, generator=generator) for k, s in V.JITTER.items()}
    order = torch.rand(n, 4, generator=generator).argsort(1)
    jitter, gray, solarize = (torch.rand(n, generator=generator) < p
                              for p in (V.P_JITTER, V.P_GRAY, V.P_SOLARIZE))
    out = []
    for i, img in enumerate(images.float() / 255):
        img = TF.resized_crop(img, *boxes[i].tolist(), list(img.shape[-2:]), antialias=False)
        img = TF.hflip(img) if flip[i] else img
        if jitter[i]:
            for k in order[i].tolist():
                name = list(V.JITTER)[k]
                img = OPS[name](img, float(factors[name][i]))
        img = TF.rgb_to_grayscale(img, 3) if gray[i] else img
        out.append(TF.solarize(img, 128 / 255) if solarize[i] else img)
    return torch.stack(out)


def test_ssl_views_are_torchvisions_pipeline_image_by_image(images):
    ours = V.ssl_views(images, torch.Generator().manual_seed(5))
    ref = _reference_views(images, torch.Generator().manual_seed(5))
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert ours.dtype == torch.float32 and 0 <= ours.min() and ours.max() <= 1


def test_two_draws_are_two_different_views_and_a_seed_repeats_one(images):
    g = torch.Generator().manual_seed(1)
    first, second = V.ssl_views(images, g), V.ssl_views(images, g)
    assert (first != second).flatten(1).any(1).all()
    assert torch.equal(first, V.ssl_views(images, torch.Generator().manual_seed(1)))


def test_about_a_fifth_of_the_views_are_gray():
    x = torch.randint(0, 256, (4000, 3, 8, 8), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    v = V.ssl_views(x, torch.Generator().manual_seed(0))
    gray = ((v[:, 0] == v[:, 1]) & (v[:, 1] == v[:, 2])).flatten(1).all(1).float().mean()
    assert 0.17 < gray < 0.23  # p = 0.2; 4,000 draws give a standard error of 0.006


def test_one_channel_images_get_crops_brightness_contrast_and_solarisation():
    x = torch.randint(0, 256, (16, 1, 9, 9), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    v = V.ssl_views(x, torch.Generator().manual_seed(0))
    assert v.shape == (16, 1, 9, 9) and not torch.equal(v, x.float() / 255)


def test_batch_transform_ssl_normalises_the_views(images):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = BatchTransform(mean, std, "ssl")(images, torch.Generator().manual_seed(2))
    views = V.ssl_views(images, torch.Generator().manual_seed(2))
    expected = (views - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)


def test_a_run_with_ssl_views_trains_blockwise_ssl_and_records_them(run_main, tmp_path):
    r = run_main("--rule", "blockwise_ssl", "--model", "resnet32_cifar", "--dataset",
                 "synthetic", "--train-subset", "64", "--test-subset", "32", "--epochs", "1",
                 "--batch-size", "32", "--augment", "ssl", "--no-plane", "--no-progress",
                 "--probe-images", "40", "--probe-epochs", "1", "--output", tmp_path)
    assert r.returncode == 0, r.stderr
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["config"]["augment"] == "ssl" and record["status"] == "complete"
