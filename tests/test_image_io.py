"""image_io: the one image policy, that every reader of images follows it (a decompression bomb included), and the
limits on a photo someone sends."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import data_loader
import evaluate
import image_cache
import image_io
from conftest import (bomb_png, encode, exif_rotated_jpeg, make_image_folder, noise, rgba_png, sixteen_bit_png,
                      truncated_jpeg)


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


# ---------------------------------------------------------------------------------------------- sent photos

def test_a_photo_is_decoded_upright():
    data, upright = exif_rotated_jpeg()
    image = image_io.decode_photo(data, "phone.jpg")
    assert image.size == (30, 60) and np.array_equal(np.asarray(image), upright)


def test_a_grayscale_rgba_cmyk_or_16_bit_photo_is_decoded_to_rgb():
    gray = noise(40, 40)[..., 0]
    assert np.array_equal(np.asarray(image_io.decode_photo(encode(Image.fromarray(gray), "PNG"), "g.png")),
                          np.dstack([gray] * 3))
    decoded = np.asarray(image_io.decode_photo(sixteen_bit_png(gray), "deep.png")).astype(int)
    assert np.abs(decoded - np.dstack([gray] * 3)).max() <= 1  # not clipped to white
    data, on_white = rgba_png()
    assert np.abs(np.asarray(image_io.decode_photo(data, "a.png")).astype(int) - on_white).max() <= 1
    rgb = noise(64, 64)
    cmyk = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert np.abs(np.asarray(image_io.decode_photo(cmyk, "print.jpg")).astype(int) - rgb).mean() < 10


def test_large_photos_are_downscaled_keeping_their_shape():
    data = encode(Image.fromarray(noise(4000, 3000)), "JPEG", quality=70)
    image = image_io.decode_photo(data, "camera.jpg")
    assert image.size == (image_io.MAX_SIDE, image_io.MAX_SIDE * 3 // 4) and image.mode == "RGB"


@pytest.mark.parametrize("data, message", [
    (b"", "is empty"),
    (b"%PDF-1.7 this is a document, not a picture", "not a readable image"),
    (truncated_jpeg(), "truncated or damaged"),
    (b"\0" * (image_io.MAX_PHOTO_MB * 2**20 + 1), f"the limit is {image_io.MAX_PHOTO_MB} MB"),
])
def test_unusable_photos_are_refused_with_the_reason(data, message):
    with pytest.raises(image_io.ImageError, match=message):
        image_io.decode_photo(data, "upload.jpg")


@pytest.mark.parametrize("make", [lambda: encode(Image.new("1", (8000, 7000)), "PNG"), bomb_png],
                         ids=["over the photo limit", "over PIL's limit"])
def test_huge_photos_are_refused_before_decoding(make):
    with pytest.raises(image_io.ImageTooLarge, match=r"too large .*Downscale it"):
        image_io.decode_photo(make(), "huge.png")
