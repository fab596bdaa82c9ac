"""Datasets as in-memory uint8 tensors, and batched augmentation on any device.

Every data set becomes uint8 ``(N, 3, H, W)`` images and int64 labels. Raw bytes
in memory cost ~180 MB for CIFAR, let augmentation run batched on the GPU, and
put every random draw under one seeded generator, so runs are reproducible.
``mean``/``std`` come from the full training split (no published constants),
so torchvision sets and image folders are normalised the same way, unless a
run gives its own (:meth:`ImageData.with_transform`).
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from locallearn.errors import ConfigError, DataError, unknown_name
from locallearn.views import ssl_views

DATASETS: tuple[str, ...] = (
    "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder:PATH", "synthetic",
)
AUGMENTS: tuple[str, ...] = ("crop_flip", "crop", "flip", "ssl", "none")

# name -> (torchvision class, display name, augmentation, classes, image side, training
# images, test images): a run needs the shape before loading the set (for the model and
# the probe batch); it is fixed by the format. Digits must not be flipped; clothes are
# left-right symmetric, so Fashion-MNIST keeps the flip.
_TORCHVISION = {
    "cifar10": ("CIFAR10", "CIFAR-10", "crop_flip", 10, 32, 50_000, 10_000),
    "cifar100": ("CIFAR100", "CIFAR-100", "crop_flip", 100, 32, 50_000, 10_000),
    "mnist": ("MNIST", "MNIST", "crop", 10, 28, 60_000, 10_000),
    "fashion_mnist": ("FashionMNIST", "Fashion-MNIST", "crop_flip", 10, 28, 60_000, 10_000),
}
_SYNTHETIC = {"classes": 10, "side": 16, "train": 256, "test": 128}
_FOLDER_LAYOUT = "PATH/train/<class>/<image> and PATH/test/<class>/<image> (or val/)"
_CACHE_VERSION = "1"


@dataclass(frozen=True)
class DataInfo:
    """What a run needs to know of a data set before loading it (:func:`dataset_info`);
    ``image_size`` is ``(C, H, W)`` as loaded (always 3 channels)."""

    name: str
    num_classes: int
    image_size: tuple[int, int, int]
    train_size: int
    test_size: int


@dataclass
class ImageData:
    """A classification data set held in memory as uint8 images and int64 labels."""

    name: str
    train_images: torch.Tensor = field(repr=False)
    train_labels: torch.Tensor = field(repr=False)
    test_images: torch.Tensor = field(repr=False)
    test_labels: torch.Tensor = field(repr=False)
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)

    def with_transform(self, augment: str | None = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None) -> ImageData:
        """This data set (the same tensors) with another augmentation or normalisation.

        None keeps the data set's own: its augmentation, the statistics measured
        on its training split. Bad values are refused as :func:`check_transform` says.
        """
        check_transform(augment, mean, std, self.image_size[0])
        return replace(
            self, augment=augment or self.augment,
            mean=self.mean if mean is None else tuple(float(v) for v in mean),
            std=self.std if std is None else tuple(float(v) for v in std))


def check_transform(augment: str | None, mean: Sequence[float] | None,
                    std: Sequence[float] | None, channels: int) -> None:
    """Refuse (:class:`ConfigError`) an unknown augmentation, or a mean or std that is not
    one finite number per channel (std above 0); None stands for the data set's own."""
    if augment is not None and augment not in AUGMENTS:
        raise unknown_name("augment", augment, AUGMENTS)
    for what, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        if len(values) != channels or not all(math.isfinite(v) for v in values) or (
                what == "std" and min(values) <= 0):
            above = ", above 0" if what == "std" else ""
            raise ConfigError(f"normalisation {what} needs {channels} finite numbers{above} "
                              f"(one per channel); got {tuple(values)}")


def check_subset(split: str, n: int | None, total: int, name: str) -> None:
    """Refuse a ``split`` subset of ``n`` images that the split's ``total`` cannot give."""
    if n is not None and not 1 <= n <= total:
        raise ConfigError(f"{split}_subset={n} must be between 1 and the {total} "
                          f"{split} images of {name}")


def dataset_info(spec: str, root: str | Path = "data") -> DataInfo:
    """Check a data set is there (or can be downloaded) and say what it holds, cheaply,
    before anything is built or written: for a torchvision set its folder (looked for, not
    read) or else a connection to its download host, for an image folder its listing and
    the first image's header (no pixel is decoded).

    Raises:
        ConfigError: the name is unknown (close matches are named).
        DataError: the data is neither there nor downloadable (naming the folder and how
            to supply it), or an image folder is missing, lacks ``train/`` and ``test/`` (or
            ``val/``), has fewer than 2 classes or an empty class.
    """
    if spec.startswith("imagefolder:"):
        path, test_dir = _folder_path(spec)
        classes, train_files, test_files = _list_folder(path, test_dir)
        first = train_files[0][0]
        try:
            with Image.open(first) as im:  # the header only: no pixel is decoded
                width, height = im.size
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"cannot read image {first!r}: {err}") from err
        return DataInfo(f"imagefolder:{path.resolve()}", len(classes), (3, height, width),
                        len(train_files), len(test_files))
    name = _known_name(spec, root)
    if name == "synthetic":
        side = _SYNTHETIC["side"]
        return DataInfo(name, _SYNTHETIC["classes"], (3, side, side), _SYNTHETIC["train"],
                        _SYNTHETIC["test"])
    _check_torchvision_files(name, Path(root))
    classes, side, train_size, test_size = _TORCHVISION[name][3:]
    return DataInfo(name, classes, (3, side, side), train_size, test_size)


def _check_torchvision_files(name: str, root: Path) -> None:
    """Refuse a torchvision set whose folder is not in ``root`` when no download host
    answers. An incomplete folder fails while loading, still before anything is written."""
    import torchvision.datasets  # slow import, only needed here

    cls_name, display = _TORCHVISION[name][:2]
    cls = getattr(torchvision.datasets, cls_name)
    cifar = hasattr(cls, "base_folder")  # CIFAR's unpacked batches, else MNIST's raw files
    folder = cls.base_folder if cifar else f"{cls.__name__}/raw"
    if (root / folder).is_dir() or _download_reachable([cls.url] if cifar else cls.mirrors):
        return  # torchvision downloads it when the run loads it
    raise DataError(f"{display} is not in {str(root)!r} (no {folder}/) and no download host "
                    f"answers; on a machine with internet run torchvision.datasets.{cls_name}("
                    f"{str(root)!r}, download=True) and copy that folder here, point --data-root "
                    "at a copy, or pass --dataset imagefolder:PATH for an image-folder copy")


def _download_reachable(urls: Sequence[str], timeout: float = 3.0) -> bool:
    """Whether any of ``urls``' hosts accepts a TCP connection within ``timeout`` seconds."""
    for url in map(urlparse, urls):
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            return True
        except (OSError, UnicodeError):  # no route, no name, refused, timed out
            continue
    return False


def _known_name(spec: str, root: str | Path) -> str:
    """The name in :data:`DATASETS` that ``spec`` spells, ignoring case, ``-`` and ``_``;
    refuses an unknown name, or a data root that is a file."""
    squash = spec.lower().replace("-", "").replace("_", "")
    name = next((n for n in DATASETS if n.replace("_", "") == squash), None)
    if name is None:
        raise unknown_name("dataset", spec, DATASETS)
    if Path(root).is_file():
        raise DataError(f"data root {str(root)!r} is a file, not a directory")
    return name


def load_dataset(spec: str, root: str | Path = "data", *, train_subset: int | None = None,
                 test_subset: int | None = None, seed: int = 0,
                 cache_dir: str | Path | None = None) -> ImageData:
    """Load a data set into memory.

    Args:
        spec: one of :data:`DATASETS`; ``imagefolder:PATH`` reads ``PATH/train`` and
            ``PATH/test`` (or ``PATH/val``), one subfolder per class.
        root: folder of the torchvision data sets (downloaded there when missing).
        train_subset: keep a class-balanced subset of this many training images
            (see :func:`balanced_subset`); ``mean``/``std`` still describe the full split.
        test_subset: the same for the test split.
        seed: seeds the subsets.
        cache_dir: where decoded image folders are cached; default ``$LOCALLEARN_CACHE``
            or ``~/.cache/locallearn``.

    Raises:
        ConfigError: unknown name, or a subset larger than its split.
        DataError: data that cannot be found, downloaded or decoded.
    """
    if spec.startswith("imagefolder:"):
        if cache_dir is None:
            cache_dir = os.environ.get("LOCALLEARN_CACHE") or Path.home() / ".cache" / "locallearn"
        data = _load_imagefolder(*_folder_path(spec), Path(cache_dir))
    elif (name := _known_name(spec, root)) == "synthetic":
        data = _synthetic()
    else:
        data = _load_torchvision(name, Path(root))
    for split, n in (("train", train_subset), ("test", test_subset)):
        if n is None:
            continue
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        check_subset(split, n, len(labels), data.name)
        keep = balanced_subset(labels, n, seed)
        setattr(data, f"{split}_images", images[keep])
        setattr(data, f"{split}_labels", labels[keep])
    return data


def _load_torchvision(name: str, root: Path) -> ImageData:
    import torchvision.datasets  # slow import, only needed here

    cls_name, display, augment = _TORCHVISION[name][:3]
    cls = getattr(torchvision.datasets, cls_name)
    try:  # no timeout of ours: the check refused a host that did not answer (dataset_info)
        train, test = (cls(root, train=t, download=True) for t in (True, False))
    except (OSError, RuntimeError, EOFError) as err:  # URLError is an OSError
        raise DataError(f"could not find or download {display} in {str(root)!r} (no network?); "
                        "download it on a machine with internet into that folder, or pass "
                        "--dataset imagefolder:PATH for an image-folder copy") from err

    def images(ds) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(ds.data))
        if x.ndim == 3:  # grayscale (N, H, W)
            return x[:, None].repeat(1, 3, 1, 1)
        return x.permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)

    train_images = images(train)
    mean, std = channel_stats(train_images)
    return ImageData(
        name, train_images, torch.as_tensor(train.targets, dtype=torch.int64),
        images(test), torch.as_tensor(test.targets, dtype=torch.int64),
        list(train.classes), mean, std, augment)


def _folder_path(spec: str) -> tuple[Path, Path]:
    """The folder of an ``imagefolder:PATH`` spec and its test split (``test/`` or ``val/``),
    once its layout is checked."""
    raw = spec[len("imagefolder:"):]
    if not raw:
        raise ConfigError("imagefolder needs a path: --dataset imagefolder:PATH")
    path = Path(raw).expanduser()
    test_dir = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    if not path.is_dir():
        problem = "does not exist" if not path.exists() else "is not a directory"
    elif not (path / "train").is_dir():
        problem = "has no train/ directory"
    elif test_dir is None:
        problem = "has neither test/ nor val/ directory"
    else:
        return path, test_dir
    raise DataError(f"image folder {str(path)!r} {problem}; expected {_FOLDER_LAYOUT}")


def _load_imagefolder(path: Path, test_dir: Path, cache_dir: Path) -> ImageData:
    classes, train_files, test_files = _list_folder(path, test_dir)
    train_images = _cached_split(path / "train", [p for p, _ in train_files], cache_dir)
    test_images = _cached_split(test_dir, [p for p, _ in test_files], cache_dir)
    if train_images.shape[1:] != test_images.shape[1:]:
        (th, tw), (sh, sw) = train_images.shape[2:], test_images.shape[2:]
        raise DataError(f"image folder {str(path)!r}: train images are {tw}x{th} but "
                        f"{test_dir.name} images are {sw}x{sh}; resize them to one size")
    mean, std = channel_stats(train_images)
    labels = [torch.tensor([y for _, y in files], dtype=torch.int64)
              for files in (train_files, test_files)]
    return ImageData(f"imagefolder:{path.resolve()}", train_images, labels[0], test_images,
                     labels[1], classes, mean, std, "crop_flip")


def _list_folder(path: Path, test_dir: Path
                 ) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Classes and ``(file, label)`` lists of the train and test splits of an image folder
    (whose layout :func:`_folder_path` checked), as torchvision's ``make_dataset`` lists them
    (a sorted walk, links followed; the image cache's key depends on that order). Refuses
    with a one-line :class:`DataError` a split or class without images, a single class,
    test classes that train/ lacks."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    train_dir = path / "train"
    try:  # torchvision's errors are one line: no class folder, a class without images
        classes, index = find_classes(train_dir)
        train_files = make_dataset(train_dir, index, IMG_EXTENSIONS)
        extra = sorted(set(find_classes(test_dir)[0]) - set(classes))
        test_files = make_dataset(test_dir, index, IMG_EXTENSIONS, allow_empty=True)
    except OSError as err:
        raise DataError(f"image folder {str(path)!r}: {str(err).strip()} (expected "
                        f"{_FOLDER_LAYOUT})") from err
    if len(classes) < 2:
        raise DataError(f"image folder {str(path)!r} has 1 class ({classes[0]}) in train/; "
                        "a classifier needs at least 2 classes")
    if extra:
        raise DataError(f"{test_dir.name}/ of {str(path)!r} has classes that train/ "
                        f"lacks: {', '.join(extra)}")
    if not test_files:
        raise DataError(f"no images found in {str(test_dir)!r}; expected {_FOLDER_LAYOUT}")
    return classes, train_files, test_files


def _cached_split(split_dir: Path, paths: list[str], cache_dir: Path) -> torch.Tensor:
    """Decoded images of one split, from a ``.npy`` cache keyed by path, names, sizes, mtimes."""
    key = hashlib.sha256(f"{_CACHE_VERSION}\n{split_dir.resolve()}\n".encode())
    prefix = os.path.join(split_dir, "")  # paths are listed under it; cheaper than relpath
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as err:  # e.g. a broken link
            raise DataError(f"cannot read image {p!r}: {err}") from err
        key.update(f"{p.removeprefix(prefix)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    cache = cache_dir / f"imagefolder-{split_dir.name}-{key.hexdigest()[:24]}.npy"
    try:
        arr = np.load(cache, allow_pickle=False)
        if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[:2] == (len(paths), 3):
            return torch.from_numpy(arr)
    except (OSError, ValueError, EOFError):  # missing or corrupt: decode again
        pass
    arr = _decode_images(paths, split_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash or a concurrent run never sees half a file.
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as f:
            np.save(f, arr)
        os.replace(f.name, cache)
    except OSError as err:
        warnings.warn(f"could not write the image cache in {cache_dir}: {err}", stacklevel=2)
    return torch.from_numpy(arr)


def _decode_images(paths: list[str], split_dir: Path) -> np.ndarray:
    """Decode image files with PIL into one uint8 ``(N, 3, H, W)`` array.

    Serial on purpose: a fork pool is ~1.7x faster on 2 cores, but forking a process
    that holds torch threads (or CUDA) is unsafe, spawn start-up eats the gain, and
    the cache makes decoding a one-time cost.
    """
    out = np.empty(0)
    for i, p in enumerate(tqdm(paths, desc=f"decoding {split_dir.name}", unit="img",
                               disable=None, leave=True)):  # shows how long it took
        try:
            with Image.open(p) as im:  # closes the file on every error too
                # Sizes are in the header: a mismatch fails before any pixel is decoded.
                if i and im.size != (out.shape[2], out.shape[1]):
                    raise DataError(
                        f"images in {str(split_dir)!r} differ in size: {out.shape[2]}x"
                        f"{out.shape[1]} ({paths[0]}) vs {im.size[0]}x{im.size[1]} ({p}); "
                        "resize them to one size")
                pixels = np.asarray(im.convert("RGB"))  # grayscale repeats, alpha is dropped
        # PIL's own one-line errors: unreadable, truncated, past its decompression-bomb limit.
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read image {p!r}: {err}") from err
        if i == 0:
            out = np.empty((len(paths), *pixels.shape), np.uint8)
        out[i] = pixels
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _synthetic() -> ImageData:
    """10 classes of 3x16x16 images: a fixed random pattern per class plus noise.

    A fixed generator (not the run's seed) makes it the same data everywhere; the
    noise is large enough that single pixels do not give the class away.
    """
    g = torch.Generator().manual_seed(20240917)
    k, side = _SYNTHETIC["classes"], _SYNTHETIC["side"]
    patterns = torch.rand(k, 3, side, side, generator=g) * 160 + 48

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % k
        labels = labels[torch.randperm(n, generator=g)]
        noisy = patterns[labels] + 48 * torch.randn(n, 3, side, side, generator=g)
        return noisy.round().clamp(0, 255).to(torch.uint8), labels

    (xtr, ytr), (xte, yte) = split(_SYNTHETIC["train"]), split(_SYNTHETIC["test"])
    mean, std = channel_stats(xtr)
    return ImageData("synthetic", xtr, ytr, xte, yte, [f"class{i}" for i in range(k)],
                     mean, std, "none")


def channel_stats(images: torch.Tensor
                  ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std of uint8 ``(N, C, H, W)`` images, in [0, 1] units.

    Moments come from a 256-bin histogram per channel, in float64: exact, and ~5x
    faster than summing float64 chunks of the images.
    """
    values = torch.arange(256, dtype=torch.float64)
    hist = torch.stack([torch.bincount(images[:, c].flatten().cpu(), minlength=256)
                        for c in range(images.shape[1])]).double()
    count = hist.sum(1)
    mean = (hist * values).sum(1) / count
    std = ((hist * values.square()).sum(1) / count - mean.square()).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded subset of ``n`` samples with equal counts per class.

    Classes get ``n // k`` samples each; the ``n % k`` left over go one each to
    classes picked by the seed. A class with too few samples gives all it has and
    the rest is spread over the others. With ``n`` below the number of classes,
    some classes are absent.

    ``n`` must be between 1 and ``len(labels)`` (else a :class:`ConfigError`).
    """
    if not 1 <= n <= len(labels):
        raise ConfigError(f"subset size {n} must be between 1 and {len(labels)}")
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = torch.zeros_like(counts)
    remaining = n
    while remaining:  # water-filling: each pass fills a class or uses up ``remaining``
        open_ = torch.nonzero(quota < counts).flatten()
        share, extra = divmod(remaining, len(open_))
        if share == 0:
            quota[open_[torch.randperm(len(open_), generator=g)[:extra]]] += 1
            break
        add = torch.minimum(counts[open_] - quota[open_], torch.tensor(share))
        quota[open_] += add
        remaining -= int(add.sum())
    picked = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:q]])
    return torch.cat(picked).sort().values


class BatchTransform:
    """Batched augmentation and normalisation of uint8 images on the batch's device.

    ``crop_flip`` matches torchvision's ``RandomCrop(size, padding)`` (zero padding
    of the raw image) followed by ``RandomHorizontalFlip(0.5)``; ``crop`` omits the
    flip, ``flip`` the crop (what the seed paper's CIFAR code uses); ``ssl`` draws
    self-supervised views (:func:`locallearn.views.ssl_views`). Random numbers
    come from ``generator`` (drawn on its device, CPU unless given otherwise), or
    from torch's default generator when it is ``None``.

    ``mean`` and ``std`` are per channel, in [0, 1] units; ``padding`` is the crop's, in
    pixels.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: str = "none",
                 padding: int = 4):
        if augment not in AUGMENTS:
            raise unknown_name("augment", augment, AUGMENTS)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        # A constant channel has std 0; a floor keeps its normalised values finite (zero).
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).clamp_min(1e-6)
        self.augment, self.padding = augment, padding
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """Augment (if configured) and normalise uint8 ``(B, C, H, W)`` images to float32."""
        if self.augment == "ssl":  # views are floats in [0, 1] already
            x = ssl_views(images, generator)
        else:
            x = (images if self.augment == "none" else self._augment(images, generator))
            x = x.float().div_(255)
        if x.device not in self._on_device:  # copy the stats to each device only once
            self._on_device[x.device] = (self.mean.to(x.device), self.std.to(x.device))
        mean, std = self._on_device[x.device]
        return x.sub_(mean).div_(std)

    def _augment(self, images: torch.Tensor, generator: torch.Generator | None
                 ) -> torch.Tensor:
        b, _, h, w = images.shape
        p, dev = self.padding, images.device
        rng = generator.device if generator is not None else torch.device("cpu")
        if self.augment == "flip":
            flip = torch.rand(b, generator=generator, device=rng) < 0.5
            return torch.where(flip.to(dev).view(-1, 1, 1, 1), images.flip(3), images)
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=rng)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=rng)
        rows = dy + torch.arange(h, device=rng)
        cols = dx + torch.arange(w, device=rng)
        if self.augment == "crop_flip":
            flip = torch.rand(b, 1, generator=generator, device=rng) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)  # reading the window backwards flips it
        padded = F.pad(images, (p, p, p, p))  # zeros in raw pixel units, like RandomCrop
        batch = torch.arange(b, device=dev)[:, None, None]
        # Advanced indices split by a slice move to the front: result is (B, H, W, C).
        out = padded[batch, :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()


def dropped_images(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Training images an epoch leaves out: a last batch of one image (or any, with ``drop_last``).

    A batch of one image breaks BatchNorm in training mode wherever a map is
    1x1 (and a batch statistic of one sample means nothing anyway), so that
    image waits for the next epoch's shuffle instead.
    """
    rest = n % batch_size
    return rest if drop_last or rest == 1 else 0


def make_loaders(data: ImageData, batch_size: int, seed: int, eval_batch_size: int | None = None,
                 drop_last: bool = False) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders yielding ``(uint8 images, int64 labels)`` batches.

    The training order is shuffled by a generator seeded with ``seed``, so it is the
    same in every run; the test loader keeps the data order. No workers: the data
    is already in memory. The training loader drops a last batch of one image
    (see :func:`dropped_images`), or any incomplete last batch with ``drop_last``.
    """
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise ConfigError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
    drop = dropped_images(len(data.train_labels), batch_size, drop_last) > 0
    train = DataLoader(TensorDataset(data.train_images, data.train_labels),
                       batch_size=batch_size, shuffle=True, drop_last=drop,
                       generator=torch.Generator().manual_seed(seed), num_workers=0)
    test = DataLoader(TensorDataset(data.test_images, data.test_labels),
                      batch_size=eval_batch_size or 2 * batch_size, shuffle=False, num_workers=0)
    return train, test
