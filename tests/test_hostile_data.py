"""Hostile data: a last batch of one image, decompression bombs, links, one class."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from locallearn import cli, create_rule, split
from locallearn import data as D
from locallearn.errors import ConfigError, DataError
from locallearn.trainer import TrainConfig, Trainer

# resnet18_cifar keeps 8x8 images down to 1x1 in layer4, where BatchNorm cannot
# train on a batch of one image.
FAST = ["--model", "resnet18_cifar", "--epochs", "1", "--no-plane", "--no-progress"]


def make_folder(root: Path, classes=("a", "b"), per_class: int = 9, size=(8, 8)) -> Path:
    """A lossless image folder: ``per_class`` train and 1 test image per class."""
    for split_name, n in (("train", per_class), ("test", 1)):
        for c, name in enumerate(classes):
            folder = root / split_name / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, (40 + 100 * c, 10 * i, 7)).save(folder / f"{i:02d}.png")
    return root


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` pixels but holds none: PIL opens it in
    microseconds and fails if it ever decodes it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(capsys, tmp_path, message: str, *argv) -> str:
    """The run exits 2 with one line naming the problem and leaves no output behind."""
    output = tmp_path / "runs"
    code, out, err = run(capsys, *argv, "--output", output)
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("run.py: error: ") and message in line, line
    # Only a hidden lock file may remain: records.Lock never deletes its file, by design.
    assert not [p for p in output.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert "record" not in out
    return line


def record_of(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "runs").glob("*.json")
    return json.loads(path.read_text())


# A last batch of one image.

@pytest.mark.parametrize("rule, opts", [
    ("e2e", []),
    ("layerwise", ["--rule-opt", "aux_hidden=8"]),
    # Epoch 2 trains the second part on cached inputs: the cached loader drops too.
    ("sequential", ["--rule-opt", "cache_features=true", "--blocks", "2", "--epochs", "2"]),
])
def test_a_last_batch_of_one_image_is_dropped(capsys, tmp_path, rule, opts):
    root = make_folder(tmp_path / "imgs")  # 18 training images, batches of 17 and 1
    code, out, err = run(capsys, *FAST, "--rule", rule, *opts, "--dataset",
                         f"imagefolder:{root}", "--batch-size", "17", "--cache-dir",
                         tmp_path / "cache", "--output", tmp_path / "runs")
    assert code == 0, err
    record = record_of(tmp_path)
    assert record["status"] == "complete"
    assert [e["dropped_images"] for e in record["history"]] == [1] * len(record["history"])


def test_a_subset_leaving_one_image_is_dropped(capsys, tmp_path):
    code, _, err = run(capsys, *FAST, "--rule", "e2e", "--dataset", "synthetic",
                       "--train-subset", "65", "--batch-size", "64", "--test-subset", "20",
                       "--output", tmp_path / "runs")
    assert code == 0, err
    record = record_of(tmp_path)
    assert record["status"] == "complete" and record["history"][0]["dropped_images"] == 1


def test_full_batches_drop_nothing():
    data = D.load_dataset("synthetic", train_subset=64)
    for size, batches in ((64, 1), (32, 2), (1, 64), (63, 1)):
        assert len(D.make_loaders(data, size, 0)[0]) == batches
    assert D.dropped_images(64, 63) == 1 and D.dropped_images(64, 62) == 0
    assert D.dropped_images(64, 60, drop_last=True) == 4
    data = D.load_dataset("synthetic", train_subset=65)
    loader = D.make_loaders(data, 64, 0)[0]
    assert loader.drop_last and [len(y) for _, y in loader] == [64]


@pytest.fixture(scope="module")
def sequential_trainer():
    torch.manual_seed(0)
    data = D.load_dataset("synthetic", train_subset=33, test_subset=10)
    stack = split(timm.create_model("resnet18_cifar", num_classes=10), "stage", 2,
                  input_size=data.image_size)
    rule = create_rule("sequential", cache_features=True, aux_hidden=8)
    return Trainer(stack, rule, data, TrainConfig(epochs=2, batch_size=16, progress=False))


def test_cached_inputs_drop_a_last_batch_of_one_image(sequential_trainer):
    trainer = sequential_trainer
    assert trainer.dropped_images == 1 and len(trainer.train_loader) == 2
    loader = trainer.executor.cached_inputs(1)
    assert [len(y) for _, _, y in loader] == [16, 16]
    entry = trainer._train_epoch(1)  # the cached path
    assert entry["dropped_images"] == 1


@pytest.mark.parametrize("args, message", [
    (["--train-subset", "1", "--batch-size", "8"], "a training set of 1 image gives no "
     "training batch"),
    (["--batch-size", "1", "--train-subset", "4"], "BatchNorm needs at least 2 images per "
     "training batch; use --batch-size 2"),
])
def test_batches_that_cannot_train_batchnorm_are_refused(capsys, tmp_path, args, message):
    assert_refused(capsys, tmp_path, message, *FAST, "--rule", "layerwise", "--dataset",
                   "synthetic", "--test-subset", "10", *args)


def test_batch_size_one_is_refused_before_training(monkeypatch):
    data = D.load_dataset("synthetic", train_subset=4)
    stack = split(timm.create_model("resnet18_cifar", num_classes=10), "stage",
                  input_size=data.image_size)
    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("trained"))
    refusal = r"--batch-size 1 cannot train BatchNorm2d 'e2e\.blocks\..*': BatchNorm needs"
    with pytest.raises(ConfigError, match=refusal):
        Trainer(stack, create_rule("e2e"), data, TrainConfig(batch_size=1, progress=False))


# Decompression bombs and huge images.

def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path):
    # 20000^2 pixels is past twice PIL's limit: PIL refuses it on opening, before decoding.
    root = make_folder(tmp_path / "imgs")
    bomb = png_header(root / "train" / "a" / "bomb.png", 20000, 20000)
    with pytest.raises(DataError, match="decompression bomb") as err:
        D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert str(bomb) in str(err.value) and "\n" not in str(err.value)


def test_a_decompression_bomb_is_one_line_through_the_cli(capsys, tmp_path):
    root = make_folder(tmp_path / "imgs")
    png_header(root / "train" / "b" / "00.png", 20000, 20000)
    assert_refused(capsys, tmp_path, "00.png", *FAST, "--dataset", f"imagefolder:{root}",
                   "--cache-dir", tmp_path / "cache")


def test_a_huge_image_of_another_size_fails_before_it_is_decoded(tmp_path):
    root = make_folder(tmp_path / "imgs")
    png_header(root / "train" / "a" / "zz.png", 9000, 9000)  # under PIL's limit; no pixels
    with pytest.raises(DataError, match=r"differ in size: 8x8 .* vs 9000x9000 \(.*zz.png\)"):
        D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")


def test_a_broken_link_to_an_image_is_a_data_error(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="cannot read image .*gone.png"):
        D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")


# Links.

def test_links_to_files_and_outside_are_followed(tmp_path):
    root = make_folder(tmp_path / "imgs", classes=("b", "a", "c"), per_class=2)
    outside = tmp_path / "elsewhere"
    (outside / "deep").mkdir(parents=True)
    for name in ("x.PNG", "deep/y.JpG", "notes.txt"):
        Image.new("RGB", (8, 8)).save(outside / name, format="PNG")
    (root / "train" / "a" / "ext").symlink_to(outside)
    (root / "train" / "c" / "copy.png").symlink_to(root / "train" / "b" / "00.png")
    (root / "train" / "b" / "sub" / "z").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "b" / "sub" / "z" / "w.BMP")
    (root / "train" / "b" / "README").write_text("not an image")
    (root / "train" / "b" / ".hidden.png").write_bytes((root / "train/b/00.png").read_bytes())
    data = D.load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert data.classes == ["a", "b", "c"] and len(data.train_labels) == 6 + 2 + 2 + 1
    assert data.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 3


# Classes.

def test_a_single_class_is_refused_at_check_time(capsys, tmp_path):
    root = make_folder(tmp_path / "imgs", classes=("only",))
    with pytest.raises(DataError, match=r"has 1 class \(only\) in train/; a classifier needs "
                                        r"at least 2"):
        D.dataset_info(f"imagefolder:{root}")
    assert_refused(capsys, tmp_path, "has 1 class", "--check", "--dataset", f"imagefolder:{root}")


@pytest.mark.parametrize("junk", [None, "notes.txt"])
def test_an_empty_class_folder_is_refused(tmp_path, junk):
    root = make_folder(tmp_path / "imgs", classes=("a", "b", "c"))
    for f in (root / "train" / "b").iterdir():
        f.unlink()
    if junk:
        (root / "train" / "b" / junk).write_text("no image")
    with pytest.raises(DataError, match=r"no valid file for the classes b\. ") as err:
        D.dataset_info(f"imagefolder:{root}")
    assert "\n" not in str(err.value)


def test_a_train_split_without_class_folders_is_refused(tmp_path):
    root = make_folder(tmp_path / "imgs")
    for d in (root / "train").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    with pytest.raises(DataError, match="find any class folder in"):
        D.dataset_info(f"imagefolder:{root}")
    os.mkdir(root / "train" / "a")  # one empty class: the empty class is named first
    with pytest.raises(DataError, match="no valid file for the classes a"):
        D.dataset_info(f"imagefolder:{root}")
