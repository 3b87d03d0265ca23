"""Shared fixtures: tiny synthetic image folders and image files (odd, broken, huge) the suite makes itself, and the
real images when present."""
from __future__ import annotations

import functools
import io
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# before anything imports mlflow: it decides at import time whether to send usage telemetry
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_ASL = ROOT.parent / "shared" / "asl"
COLOURS = {"A": (200, 40, 40), "B": (40, 180, 40), "C": (40, 60, 200), "D": (200, 200, 40)}


def make_image_folder(root: Path, classes=("A", "B", "C"), per_class: int = 12, size: int = 40,
                      seed: int = 0) -> Path:
    """Write `per_class` JPEGs per class named like the Kaggle frames (`A1.jpg`, `A2.jpg`, ...).

    Each class has its own colour and a bright square in its own corner, plus noise, so a model can learn it
    in a few steps and still has to look at the pixels.
    """
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(1, per_class + 1):
            img = np.array(COLOURS.get(name, (120, 120, 120)), dtype=np.float32) * np.ones((size, size, 3))
            img += rng.normal(0, 25, img.shape)
            q = size // 3
            y, x = [(0, 0), (0, size - q), (size - q, 0), (size - q, size - q)][k % 4]
            img[y:y + q, x:x + q] = 255
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name / f"{name}{n}.jpg", quality=90)
    return root


def write_catalog(path: Path, data_dir: Path, folders: Iterable[str]) -> Path:
    """A data catalog (data_sources.py) of folders already in `data_dir`, each listed file for file, and the set
    'people' of them all: a local copy that the commands taking --data names use as it is, with nothing to
    download (the URLs lead nowhere)."""
    import json

    folders = list(folders)
    entries = {folder: {"kaggle": "someone/photos", "path": folder, "licence": "a test's", "taken": "all",
                        "files": [{"file": p.relative_to(data_dir / folder).as_posix(), "class": p.parent.name}
                                  for p in sorted((data_dir / folder).rglob("*.jpg"))]} for folder in folders}
    path.write_text(json.dumps({"urls": {"file": "http://127.0.0.1:9/{source}", "archive": "http://127.0.0.1:9/a"},
                                "sets": {"people": folders}, "folders": entries}))
    return path


# photos as files someone sends: decoding, limits, damage (image_io, the app, the MLflow model)

def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Blocky random colours: survives JPEG well enough to compare pixels, and every rotation differs."""
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return blocks.repeat(4, axis=0).repeat(4, axis=1)[:height, :width]


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """A 60x30 JPEG tagged 'rotate 90 degrees clockwise to view' (EXIF orientation 6), and its upright pixels.

    The upright pixels come from rotating the decoded raw pixels with numpy, independently of PIL's EXIF code.
    """
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(noise(60, 30)), "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as raw:
        upright = np.rot90(np.asarray(raw.convert("RGB")), k=-1)
    return data, upright


def sixteen_bit_png(gray: np.ndarray) -> bytes:
    return encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")


@functools.cache
def bomb_png() -> bytes:
    """A 12000x12000 PNG of 17 KB: 144 megapixels once decoded."""
    return encode(Image.new("1", (12000, 12000)), "PNG")


def truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(noise(120, 120)), "JPEG", quality=95)
    return data[: len(data) // 2]


def rgba_png() -> tuple[bytes, np.ndarray]:
    """A half-transparent RGBA PNG and what it looks like on a white page."""
    rgb = noise(40, 40)
    alpha = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (40, 1))
    on_white = rgb * (alpha[..., None] / 255) + 255 * (1 - alpha[..., None] / 255)
    return encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), on_white


def write_y4m(path: Path, frames: Iterable[Image.Image], fps: int = 15) -> Path:
    """RGB frames of one size (even width and height) as a .y4m video: raw 4:2:0 YUV in BT.601's limited range,
    what Chromium's fake camera plays (`--use-file-for-fake-video-capture`) and OpenCV reads."""
    with path.open("wb") as out:
        for i, frame in enumerate(frames):
            if i == 0:
                out.write(f"YUV4MPEG2 W{frame.width} H{frame.height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
            # PIL's YCbCr is JPEG's full range; video players expect 16-235 (luma) and 16-240 (chroma)
            y, cb, cr = (np.asarray(plane, dtype=np.float32) for plane in frame.convert("YCbCr").split())
            half = (frame.width // 2, frame.height // 2)
            chroma = [np.asarray(Image.fromarray(c.astype(np.uint8)).resize(half, Image.Resampling.BOX),
                                 dtype=np.float32) for c in (cb, cr)]
            planes = [16 + y * 219 / 255] + [128 + (c - 128) * 224 / 255 for c in chroma]
            out.write(b"FRAME\n" + b"".join(plane.round().astype(np.uint8).tobytes() for plane in planes))
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("synthetic") / "train")


requires_shared = pytest.mark.skipif(not SHARED_ASL.is_dir(), reason="real ASL images (../shared/asl) not present")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run gpu_check.sh on one)")


@pytest.fixture(scope="session")
def trained_run(synthetic_dir, tmp_path_factory) -> Path:
    """A tiny trained model folder (offline-pretrained Lite0, 64 px, 2 epochs): what pt_train.py writes."""
    import pt_train

    out = tmp_path_factory.mktemp("trained") / "run"
    code = pt_train.main(["--xtrain_path", str(synthetic_dir), "--save_dir", str(out), "--arch", "efficientnet_lite0",
                          "--weights", "imagenet", "--img_size", "64", "--total_epochs", "2", "--batch_size", "8",
                          "--num_workers", "0", "--val_split", "0.25", "--seed", "0"])
    assert code == 0
    return out


HAND_CLASSES = ("A", "B", "L")


@pytest.fixture(scope="session")
def hand_run(tmp_path_factory) -> Path:
    """A tiny hand-aware model (the default, --hands crop) trained on real frames: 3 letters x 40 frames."""
    if not SHARED_ASL.is_dir():
        pytest.skip("real ASL images (../shared/asl) not present")
    import shutil

    import pt_train

    data = tmp_path_factory.mktemp("hands") / "train"
    for name in HAND_CLASSES:
        (data / name).mkdir(parents=True)
        for n in range(5, 1205, 30):  # 40 frames spread over the class's first 1,200
            shutil.copy(SHARED_ASL / "train" / name / f"{name}{n}.jpg", data / name)
    out = tmp_path_factory.mktemp("hand_trained") / "run"
    code = pt_train.main(["--xtrain_path", str(data), "--save_dir", str(out), "--arch", "efficientnet_lite0",
                          "--img_size", "64", "--total_epochs", "1", "--hand_epochs", "8", "--batch_size", "16",
                          "--num_workers", "0", "--seed", "0"])
    assert code == 0
    return out


HAND_WORD = "BALL"  # spelled with the letters of `hand_run`


@pytest.fixture(scope="session")
def hand_word(hand_run) -> tuple[dict[str, Path], str]:
    """A photo of each letter of `hand_run` that the model reads steadily, and the word to fingerspell with them:
    HAND_WORD less the letters without one. A photo is the first of another person's (external/<letter>/, among
    the first 10) that the model reads as its letter both as it is and after JPEG at several qualities, as a
    camera's frames reach it. Tests that spell the word so check the pipeline, not how well a tiny model reads
    another person's hand (it reads none of their A's steadily: the word is BLL)."""
    import io

    import predict

    predictor = predict.load_predictor(hand_run, backend="onnx")

    def variants(photo: Image.Image) -> list[Image.Image]:
        out = [photo]
        for quality in (60, 75, 85, 95):
            buf = io.BytesIO()
            photo.save(buf, "JPEG", quality=quality)
            out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        return out

    photos = {}
    for letter in HAND_CLASSES:
        for path in sorted((SHARED_ASL / "external" / letter).glob("*.jpg"), key=lambda p: int(p.stem))[:10]:
            verdicts = [predictor.verdict(r) for r in predictor.read(variants(Image.open(path).convert("RGB")))]
            if all(v.answered and v.label == letter for v in verdicts):
                photos[letter] = path
                break
    word = "".join(letter for letter in HAND_WORD if letter in photos)
    assert len(set(word)) >= 2 and len(set(word)) < len(word), f"'{word}' has no change of letter or no repeat"
    return photos, word


def no_hand_frame(size: tuple[int, int]) -> Image.Image:
    """A plain grey frame: no hand in view."""
    return Image.new("RGB", size, (128, 128, 128))


def spelling_frames(photos: dict, word: str, per_letter: int, gap: int, lead: int | None = None,
                    trail: int | None = None) -> list[Image.Image]:
    """The frames of `word` fingerspelled: each letter's photo for `per_letter` frames, `gap` frames without a
    hand between two same letters, and `lead` and `trail` (default `gap`) frames without a hand around the word."""
    grey = no_hand_frame(Image.open(photos[word[0]]).size)
    frames = [grey] * (gap if lead is None else lead)
    for before, letter in zip([None, *word], word):
        if letter == before:
            frames += [grey] * gap
        frames += [Image.open(photos[letter]).convert("RGB")] * per_letter
    return frames + [grey] * (gap if trail is None else trail)
