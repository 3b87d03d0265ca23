"""The one image policy: how every module opens a file or upload as an upright RGB image, and what counts as
a bad image.

`load_rgb` decodes (EXIF rotation applied; grayscale, 16-bit, palette, alpha and CMYK converted to RGB) and
`read_size` reads the header only. Both refuse images over PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`, about
89 megapixels: a small file that claims more is a "decompression bomb") and turn every way a damaged file
fails inside PIL into one `ImageError` naming the file and the problem. The scan, the datasets, the decoded-
image cache, evaluate.py and the app all go through here, so a file is good or bad the same way everywhere:
training and evaluation skip and count bad files, the app shows the message.

`decode_photo` is the stricter door for a photo someone sends (the app's upload or camera, a request to the
MLflow model of mlflow_model.py): at most `MAX_PHOTO_MB` and `MAX_PHOTO_PIXELS` (checked on the header, before
any pixel is decoded), shrunk to `MAX_SIDE` right after decoding; each refusal says what to send instead.
"""
from __future__ import annotations

import io
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
MAX_PHOTO_MB = 20
# Refused before decoding: a 50-megapixel phone photo still passes, while a small file that claims gigapixels
# (a "decompression bomb") never gets to allocate its pixels.
MAX_PHOTO_PIXELS = 50_000_000
# Accepted photos are shrunk to this longest side right after decoding: the model looks at 224-256 px anyway, and
# nothing downstream (the app's page, a server's memory) holds a full-size photo.
MAX_SIDE = 1024


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


class ImageTooLarge(ImageError):
    """Over a size limit: more pixels than PIL's limit (a decompression bomb, or a giant scan), or a photo over
    `decode_photo`'s limits."""


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


def decode_photo(data: bytes, name: str = "the photo") -> Image.Image:
    """Upright RGB from a sent photo's bytes, at most MAX_SIDE px on its longest side; an ImageError (ImageTooLarge
    over a limit) whose message names the photo, the problem and what to send instead."""
    if not data:
        raise ImageError(f"'{name}' is empty. Send a photo of a hand sign (JPG, PNG, WEBP or BMP).")
    if len(data) > MAX_PHOTO_MB * 2**20:
        raise ImageTooLarge(f"'{name}' is {len(data) / 2**20:.0f} MB; the limit is {MAX_PHOTO_MB} MB. Send a smaller "
                            "or more compressed image.")
    try:
        width, height = read_size(io.BytesIO(data))
    except ImageTooLarge:
        raise ImageTooLarge(_too_large(name, "more pixels than PIL's safety limit")) from None
    except ImageError:
        raise ImageError(f"'{name}' is not a readable image. Send a photo of a hand sign as "
                         f"{', '.join(ext.lstrip('.') for ext in IMG_EXTENSIONS)}.") from None
    if width * height > MAX_PHOTO_PIXELS:
        raise ImageTooLarge(_too_large(name, f"{width}x{height} pixels"))
    try:
        image = load_rgb(io.BytesIO(data))
    except ImageError:
        raise ImageError(f"'{name}' could not be decoded: the file is truncated or damaged. Save or export it again "
                         "and send the new file.") from None
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def _too_large(name: str, size: str) -> str:
    return (f"'{name}' is too large ({size}); the limit is {MAX_PHOTO_PIXELS / 1e6:.0f} megapixels. "
            f"Downscale it ({MAX_SIDE} px on the longest side is plenty) and send it again.")
