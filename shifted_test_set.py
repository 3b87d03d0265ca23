"""Make a "shifted" test set from the official test images: new crops, light and backgrounds the model never saw.

The 28 official test images share the training room, so they say little about a new setting. Each one is
turned into the variants below, written as `OUT/<class>/<class>_<variant>.jpg` (the class sub-folder layout
that evaluate.py reads):

- zoom_in: the central 70% of the image, resized back up (a closer camera);
- zoom_out: the image shrunk to 60% on a random smooth colour gradient (a farther camera, a new wall);
- dark / bright: brightness x0.5 and x1.5 (another light);
- low_contrast: contrast x0.5 and a warm colour cast (another camera's white balance);
- rotated: rotated by +-12 degrees, the corners filled by a gradient (a tilted camera);
- noisy_blur: Gaussian blur (radius 1.5) plus sensor noise (sigma 12) and JPEG quality 30 (a cheap webcam);
- textured_bg: the image shrunk to 75% and pasted off-centre on a random noise texture (a cluttered room).

Usage: python shifted_test_set.py --src ../shared/asl/test --out data/shifted_test [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from image_io import load_rgb

Variant = Callable[[Image.Image, random.Random], Image.Image]


def _gradient(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    a, b = (np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32) for _ in range(2))
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8))


def _texture(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    noise = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))


def _paste_scaled(img: Image.Image, background: Image.Image, scale: float, rng: random.Random) -> Image.Image:
    small = img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC)
    x, y = rng.randint(0, img.width - small.width), rng.randint(0, img.height - small.height)
    background.paste(small, (x, y))
    return background


def zoom_in(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    return img.crop((int(0.15 * w), int(0.15 * h), int(0.85 * w), int(0.85 * h))).resize(img.size, Image.BICUBIC)


def zoom_out(img: Image.Image, rng: random.Random) -> Image.Image:
    return _paste_scaled(img, _gradient(img.size, rng), 0.6, rng)


def dark(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(0.5)


def bright(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.5)


def low_contrast(img: Image.Image, rng: random.Random) -> Image.Image:
    warm = np.asarray(ImageEnhance.Contrast(img).enhance(0.5), dtype=np.float32) * np.array([1.1, 1.0, 0.85])
    return Image.fromarray(warm.clip(0, 255).astype(np.uint8))


def rotated(img: Image.Image, rng: random.Random) -> Image.Image:
    angle = rng.choice((-12, 12))
    mask = Image.new("L", img.size, 255).rotate(angle, Image.BILINEAR)
    return Image.composite(img.rotate(angle, Image.BILINEAR), _gradient(img.size, rng), mask)


def noisy_blur(img: Image.Image, rng: random.Random) -> Image.Image:
    blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 12, blurred.shape)
    buffer = io.BytesIO()
    Image.fromarray((blurred + noise).clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=30)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def textured_bg(img: Image.Image, rng: random.Random) -> Image.Image:
    return _paste_scaled(img, _texture(img.size, rng), 0.75, rng)


VARIANTS: dict[str, Variant] = {f.__name__: f for f in (zoom_in, zoom_out, dark, bright, low_contrast, rotated,
                                                          noisy_blur, textured_bg)}


def make_shifted_set(src: Path, out: Path, seed: int = 0) -> int:
    """Write every variant of every `<class>_test.jpg` in `src`; returns the number of images written."""
    rng = random.Random(seed)
    count = 0
    for path in sorted(src.glob("*_test.*")):
        label = path.stem.rsplit("_test", 1)[0]
        img = load_rgb(path)
        (out / label).mkdir(parents=True, exist_ok=True)
        for name, variant in VARIANTS.items():
            variant(img, rng).save(out / label / f"{label}_{name}.jpg", quality=95)
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True, help="folder of <class>_test.jpg images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = make_shifted_set(args.src, args.out, args.seed)
    if n == 0:
        raise SystemExit(f"error: no <class>_test.jpg images in {args.src}")
    print(f"wrote {n} images ({len(VARIANTS)} variants each) to {args.out}")


if __name__ == "__main__":
    main()
