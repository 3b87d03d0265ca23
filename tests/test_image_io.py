"""image_io: the one image policy, and that every reader of images follows it (a decompression bomb included)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import data_loader
import evaluate
import image_cache
import image_io
from conftest import make_image_folder


def bomb(path):
    """A 14000x14000 1-bit PNG: tens of KB on disk, 196 megapixels decoded (over twice PIL's limit)."""
    Image.new("1", (14000, 14000)).save(path)
    return path


def warning_sized(path):
    """100 megapixels: over PIL's limit, under twice it, where PIL only warns."""
    Image.new("1", (10000, 10000)).save(path)
    return path


def truncated(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(buffer, "JPEG",
                                                                                                   quality=95)
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])  # the header survives, half the pixels not
    return path


@pytest.mark.parametrize("make, error, message", [
    (bomb, image_io.ImageTooLarge, "more pixels than the limit"),
    (warning_sized, image_io.ImageTooLarge, "more pixels than the limit"),
    (lambda p: (p.write_bytes(b"%PDF-1.7 not a picture"), p)[1], image_io.ImageError, "not a readable image"),
    (truncated, image_io.ImageError, "truncated or damaged"),
], ids=["bomb", "over the limit", "not an image", "truncated"])
def test_bad_images_raise_one_error_naming_file_and_problem(tmp_path, make, error, message):
    path = make(tmp_path / "bad.png")
    with pytest.raises(error, match=message) as err:
        image_io.load_rgb(path)
    assert str(path) in str(err.value) and isinstance(err.value, ValueError)


def test_read_size_reads_the_header_only(tmp_path):
    assert image_io.read_size(make_image_folder(tmp_path, ("A",), per_class=1) / "A" / "A1.jpg") == (40, 40)
    with pytest.raises(image_io.ImageTooLarge):
        image_io.read_size(bomb(tmp_path / "b.png"))


@pytest.fixture
def folder_with_bad_files(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4)
    bomb(root / "A" / "A99.png")
    truncated(root / "B" / "B99.jpg")
    return root


def test_the_scan_skips_and_counts_a_bomb(folder_with_bad_files):
    images = data_loader.scan_image_folder(folder_with_bad_files)
    assert str(folder_with_bad_files / "A" / "A99.png") in images.skipped
    assert len(images.samples) == 13  # the truncated file has a good header: the datasets skip it when decoding


def test_datasets_cache_and_evaluate_skip_what_does_not_decode(folder_with_bad_files, tmp_path):
    images = data_loader.scan_image_folder(folder_with_bad_files)
    cfg = {"resize_size": 16, "crop_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    bad = images.samples.index((str(folder_with_bad_files / "B" / "B99.jpg"), 1))
    dataset = data_loader.ImageDataset(images.samples, data_loader.eval_transform(cfg))
    assert dataset[bad][1] == images.samples[bad + 1][1] and dataset[bad][0].shape == (3, 16, 16)  # the next one
    cached = image_cache.cached_dataset(images.samples, cfg, augment=False, cache_dir=tmp_path / "cache")
    assert len(cached) == len(images.samples) - 1
    files = evaluate._ImageFiles([p for p, _ in images.samples], data_loader.eval_transform(cfg))
    assert files[bad] == (None, bad) and files[0][0] is not None
