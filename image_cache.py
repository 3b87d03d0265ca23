"""Decode each image once: a cache of uint8 pixels on disk that later epochs, and later runs, read instead of JPEGs.

Each epoch the plain pipeline decodes every JPEG again and, for the eval preset, upsamples the 200 px Kaggle
frames bicubically to 256 before cropping 224. Both give the same uint8 pixels every time, so they are done
once here and stored. What is stored depends on what the split's transform needs:

* ``crop``: the eval preset's resize and centre crop (`data_loader.eval_geometry`), for splits that are not
  augmented (validation, ``--no-augment``). Each epoch then only batches the uint8 pixels and normalises whole
  images in the loader's process (`data_loader.FinishingLoader`), and the tensors equal the plain path's exactly.
* ``source``: the decoded image, for the random crops of augmented training. An image whose shorter side
  exceeds ``resize_size`` is shrunk to it first, which bounds the cache (a 12-megapixel photo would take
  36 MB); up to that size the training tensors equal the plain path's for the same random state.

The pixels of all images lie back to back in one flat file, ``<key>.pixels``, read through a memory map: the
dataset never needs to fit in memory, and DataLoader workers and DDP ranks share one copy in the OS page
cache. ``<key>.index.npy`` holds (offset, height, width) per image; a height of 0 marks an image that failed
to decode, which is skipped and counted. The key hashes the geometry and every file's path, size and
modification time, so a changed dataset or transform gets a new cache; delete the folder to reclaim space.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

import data_loader
import image_io
import run_artifacts
from data_loader import Sample

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the file layout or what a geometry stores changes


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/asl-toolkit/decoded`, by default `~/.cache/asl-toolkit/decoded`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asl-toolkit" / "decoded"


@dataclasses.dataclass(frozen=True)
class CacheGeometry:
    """What is stored for each image (see the module docstring); called on a decoded RGB image."""
    kind: str  # "crop" or "source"
    resize_size: int
    crop_size: int
    interpolation: str

    @classmethod
    def for_split(cls, cfg: dict, augment: bool) -> CacheGeometry:
        return cls("source" if augment else "crop", cfg["resize_size"], cfg["crop_size"],
                   cfg.get("interpolation", "bilinear"))

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.kind == "crop":
            return data_loader.eval_geometry(dataclasses.asdict(self))(image)
        if min(image.size) <= self.resize_size:
            return image
        return T.Resize(self.resize_size, interpolation=InterpolationMode(self.interpolation), antialias=True)(image)


def cache_key(samples: list[Sample], geometry: CacheGeometry, load: Callable[[str], Image.Image] = image_io.load_rgb
              ) -> str:
    """A hash of the geometry, of how files are opened (a `hands.CropLoader`'s boxes) and of each file's path,
    size and mtime: any change gives a new cache."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, dataclasses.asdict(geometry),
                                        getattr(load, "fingerprint", None)]).encode())
    for path, _ in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _decode(path: str, geometry: CacheGeometry, load: Callable[[str], Image.Image]) -> np.ndarray | None:
    """The stored pixels of one image (HxWx3 uint8), or None when it does not decode."""
    try:
        return np.asarray(geometry(load(path)))
    except image_io.ImageError:
        return None


@contextlib.contextmanager
def _parallel_map(num_workers: int) -> Iterator[Callable]:
    """An ordered, lazy map over `num_workers` processes (in this process for 0 or 1)."""
    if num_workers <= 1:
        yield map
        return
    with multiprocessing.get_context().Pool(num_workers) as pool:
        yield partial(pool.imap, chunksize=32)


def build_cache(samples: list[Sample], geometry: CacheGeometry, stem: Path, num_workers: int,
                load: Callable[[str], Image.Image] = image_io.load_rgb) -> None:
    """Decode `samples` in parallel and write `stem.pixels` and `stem.index.npy`.

    Both are written atomically (run_artifacts), the index last: an index on disk means a complete cache, and
    processes that build the same cache at once (torchrun ranks) cannot corrupt it.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    index = np.zeros((len(samples), 3), dtype=np.int64)
    offset = 0
    with (run_artifacts.atomic_path(f"{stem}.pixels") as tmp, open(tmp, "wb") as out,
          _parallel_map(num_workers) as parallel_map):
        # the pixels stream to disk as they come: memory stays flat however many images there are
        decoded = parallel_map(partial(_decode, geometry=geometry, load=load), [p for p, _ in samples])
        for i, pixels in enumerate(decoded):
            if pixels is not None:
                out.write(pixels.tobytes())
                index[i] = (offset, *pixels.shape[:2])
                offset += pixels.nbytes
    buffer = io.BytesIO()
    np.save(buffer, index, allow_pickle=False)
    run_artifacts.save_bytes(buffer.getvalue(), f"{stem}.index.npy")


class CachedImageDataset(Dataset):
    """The images of a cache, each through `transform` (the plain path's own) as a PIL image; `finish_transform`,
    when set, is done on them in the loader's process (see `data_loader.make_loader`).

    The memory map is opened lazily in each process and never pickled, so spawned workers do not receive
    a copy of the whole dataset.
    """

    def __init__(self, pixels_path: Path, index: np.ndarray, samples: list[Sample], transform,
                 finish_transform=None):
        self.pixels_path, self.index, self.samples = pixels_path, index, samples
        self.transform, self.finish_transform = transform, finish_transform
        self._pixels: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def image(self, index: int) -> Image.Image:
        """The stored pixels of one image."""
        if self._pixels is None:
            self._pixels = np.memmap(self.pixels_path, dtype=np.uint8, mode="r")
        offset, height, width = (int(v) for v in self.index[index])
        return Image.fromarray(self._pixels[offset:offset + height * width * 3].reshape(height, width, 3))

    def __getitem__(self, index: int):
        return self.transform(self.image(index)), self.samples[index][1]


def cached_dataset(samples: list[Sample], cfg: dict, *, augment: bool, cache_dir: str | os.PathLike,
                   num_workers: int = 0, hflip: bool = False, load: Callable[[str], Image.Image] = image_io.load_rgb
                   ) -> CachedImageDataset:
    """The fast twin of `data_loader.ImageDataset(samples, data_loader.train_transform(cfg, augment, hflip),
    load)`: through `data_loader.make_loader` it gives the same batches (for the same random state).

    Builds the cache on first use (decoding with `num_workers` processes); images that do not decode are
    left out and counted.
    """
    geometry = CacheGeometry.for_split(cfg, augment)
    # augmenting needs the whole image and per-image random steps after normalising (erasing); otherwise the
    # stored crop leaves only the normalisation, done on uint8 images as they arrive from the workers
    transform, finish = ((data_loader.train_transform(cfg, augment=True, hflip=hflip), None) if augment
                         else (T.ToImage(), data_loader.normalize(cfg)))
    stem = Path(cache_dir).expanduser() / cache_key(samples, geometry, load)
    if not Path(f"{stem}.index.npy").is_file():
        log.info("Decoding %d images once into %s.pixels (%s geometry)", len(samples), stem, geometry.kind)
        build_cache(samples, geometry, stem, num_workers, load)
    index = np.load(f"{stem}.index.npy", allow_pickle=False)
    keep = np.flatnonzero(index[:, 1] > 0)
    if len(keep) < len(samples):
        failed = [samples[i][0] for i in np.flatnonzero(index[:, 1] == 0)]
        log.warning("Skipped %d image(s) that failed to decode, e.g. %s", len(failed), failed[0])
    if not len(keep):
        raise data_loader.DatasetError("No image in the dataset could be decoded.")
    return CachedImageDataset(Path(f"{stem}.pixels"), index[keep], [samples[i] for i in keep], transform,
                              finish)


def cached_splits(splits: data_loader.Splits, cfg: dict, *, augment: bool, cache_dir: str | os.PathLike,
                  num_workers: int = 0, hflip: bool = False, load: Callable[[str], Image.Image] = image_io.load_rgb
                  ) -> data_loader.Splits:
    """`splits` with both sides served from the cache (validation is never augmented), files opened with `load`."""
    kw = dict(cache_dir=cache_dir, num_workers=num_workers, load=load)
    return dataclasses.replace(splits, train=cached_dataset(splits.train_samples, cfg, augment=augment, hflip=hflip,
                                                            **kw),
                               val=cached_dataset(splits.val_samples, cfg, augment=False, **kw))
