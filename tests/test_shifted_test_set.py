"""shifted_test_set: every variant of every official-style test image, in the class sub-folder layout."""
from __future__ import annotations

import numpy as np
from PIL import Image

import data_loader
import shifted_test_set as sts


def test_writes_each_variant_per_image_into_class_folders(tmp_path):
    src = tmp_path / "test"
    src.mkdir()
    for label in ("A", "nothing"):
        Image.fromarray(np.full((60, 60, 3), 128, np.uint8)).save(src / f"{label}_test.jpg")
    assert sts.make_shifted_set(src, tmp_path / "out") == 2 * len(sts.VARIANTS)
    images = data_loader.scan_image_folder(tmp_path / "out")
    assert images.classes == ["A", "nothing"] and len(images.samples) == 2 * len(sts.VARIANTS)
    variants = {p.stem.split("_", 1)[1] for p in (tmp_path / "out" / "A").iterdir()}
    assert variants == set(sts.VARIANTS)
    dark = np.asarray(Image.open(tmp_path / "out" / "A" / "A_dark.jpg"), dtype=float).mean()
    assert 55 < dark < 75  # half of 128


def test_same_seed_same_images(tmp_path):
    src = tmp_path / "test"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(src / "B_test.png")
    sts.make_shifted_set(src, tmp_path / "a", seed=1)
    sts.make_shifted_set(src, tmp_path / "b", seed=1)
    for f in (tmp_path / "a" / "B").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / "B" / f.name).read_bytes()
