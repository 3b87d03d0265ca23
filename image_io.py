"""The one image policy: how every module opens a file or upload as an upright RGB image, and what counts as
a bad image.

`load_rgb` decodes (EXIF rotation applied; grayscale, 16-bit, palette, alpha and CMYK converted to RGB) and
`read_size` reads the header only. Both refuse images over PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, about
89 megapixels: a small file that claims more is a "decompression bomb") and turn every way a damaged file
fails inside PIL into one `ImageError` naming the file and the problem. The scan, the datasets, the decoded-
image cache, evaluate.py and the app all go through here, so a file is good or bad the same way everywhere:
training and evaluation skip and count bad files, the app shows the message.
"""
from __future__ import annotations

import os
import struct
import warnings
from typing import BinaryIO

from PIL import Image, ImageOps

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# What PIL raises for damaged files, depending on the format and where the damage is (UnidentifiedImageError
# is an OSError, a truncated file an OSError or EOFError, a broken header a SyntaxError or struct.error).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

Source = str | os.PathLike | BinaryIO


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


class ImageTooLarge(ImageError):
    """More pixels than PIL's limit (a decompression bomb, or a giant scan)."""


def _name(source: Source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else str(getattr(source, "name", "the image"))


def _open(source: Source) -> Image.Image:
    """`Image.open` that treats PIL's decompression-bomb warning as the refusal it stands for (PIL only raises
    above twice its limit) and reports every failure as an ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(source)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLarge(f"'{_name(source)}' has more pixels than the limit of {Image.MAX_IMAGE_PIXELS / 1e6:.0f} "
                            "megapixels (a decompression bomb or a giant scan); downscale it.") from None
    except DECODE_ERRORS as err:
        raise ImageError(f"'{_name(source)}' is not a readable image ({type(err).__name__}: {err}).") from None


def read_size(source: Source) -> tuple[int, int]:
    """Width and height from the header alone (nothing is decoded); an ImageError for anything unusable."""
    with _open(source) as im:
        if im.width < 1 or im.height < 1:
            raise ImageError(f"'{_name(source)}' has no pixels ({im.width}x{im.height}).")
        return im.size


def load_rgb(source: Source) -> Image.Image:
    """Decode an image as upright RGB (EXIF rotation applied; grayscale, 16-bit, palette, alpha and CMYK
    converted, transparency composited on white); an ImageError for anything unusable."""
    with _open(source) as im:
        try:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grayscale: scale to 8 bits first, a plain convert("RGB") would clip to white
                im = im.point(lambda v: v / 256).convert("L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba)
            return im.convert("RGB")
        except DECODE_ERRORS as err:
            raise ImageError(f"'{_name(source)}' could not be decoded: the file is truncated or damaged "
                             f"({type(err).__name__}: {err}).") from None
