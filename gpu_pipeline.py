"""The GPU input path: training batches from images decoded once, augmented and normalised where the model runs.

On a GPU the plain DataLoader path decodes, crops, rotates and colour-jitters every image on the CPU every epoch,
and that, not the model, caps the speed. Here the images come from image_cache.py's decoded uint8 cache, held
whole on the GPU when they fit in half its free memory (else they stay memory-mapped on the host and each batch
is gathered into pinned memory and copied asynchronously). Each batch is then augmented on the device with
kornia: the recipe of `data_loader.train_transform`, drawn per image, not once per batch, with one difference:
the random resized crop resamples bilinearly without antialiasing. Without augmentation the images are the
eval preset's stored crops and only normalised, giving the plain path's tensors.

The batch order is `DistributedSampler`'s (each rank its shard, a new shuffle per `set_epoch`, the same as the
plain path), and the augmentation of each batch is seeded from (seed, epoch, rank, step) without touching the
global random state, so a resumed run draws exactly what an uninterrupted one would. The same code runs on CPU
tensors, which is how the tests check it.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

import kornia.augmentation as K
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DistributedSampler

import image_cache

log = logging.getLogger(__name__)

# keep at least half of the GPU's free memory for the model, its activations and the optimizer
DEVICE_MEMORY_SHARE = 0.5


def augmentation(cfg: dict, augment: bool, hflip: bool = False) -> nn.Sequential:
    """`data_loader.train_transform`'s steps for float batches in [0, 1] (NCHW), each image drawing its own."""
    normalize = K.Normalize(torch.tensor(cfg["mean"]), torch.tensor(cfg["std"]))
    if not augment:
        return nn.Sequential(normalize)
    size = (cfg["crop_size"], cfg["crop_size"])
    return nn.Sequential(
        K.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.8, 1.25)),
        *([K.RandomHorizontalFlip()] if hflip else []),
        K.RandomRotation(15.0, p=0.5),
        # kornia's ColorJitter, not ColorJiggle: its four steps are torchvision's formulas
        K.ColorJitter(0.4, 0.4, 0.4, 0.05, p=0.8),
        K.RandomGrayscale(p=0.1),
        K.RandomGaussianBlur((5, 5), (0.1, 2.0), p=0.2),
        normalize,
        K.RandomErasing(p=0.25, value=0.0),
    )


def cached_pixels(dataset: image_cache.CachedImageDataset) -> torch.Tensor:
    """The cache's images as one uint8 NHWC tensor on the host.

    Images of one size (video frames, the Kaggle set) are a zero-copy view of the memory-mapped file. Images of
    other sizes are resized to the most common one (aspect not kept; the random crop changes it by up to 25%
    anyway), which needs a copy in memory.
    """
    sizes = [(int(h), int(w)) for _, h, w in dataset.index]
    (height, width), _ = Counter(sizes).most_common(1)[0]
    nbytes = height * width * 3
    offsets = dataset.index[:, 0]
    if all(s == (height, width) for s in sizes) and np.array_equal(offsets, offsets[0] + nbytes * np.arange(len(sizes))):
        # copy-on-write: a writable view (torch wants one) that never writes the file
        flat = np.memmap(dataset.pixels_path, dtype=np.uint8, mode="c", offset=int(offsets[0]),
                         shape=(len(sizes) * nbytes,))
        return torch.from_numpy(flat).view(len(sizes), height, width, 3)
    odd = sum(s != (height, width) for s in sizes)
    log.info("Resizing %d of %d images to the common %dx%d for the GPU input path", odd, len(sizes), width, height)
    out = np.empty((len(sizes), height, width, 3), dtype=np.uint8)
    for i in range(len(sizes)):
        image = dataset.image(i)
        out[i] = np.asarray(image if image.size == (width, height) else
                            image.resize((width, height), Image.Resampling.BILINEAR))
    return torch.from_numpy(out)


def fits_on_device(pixels: torch.Tensor, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # the host's memory holds them already
    free, _ = torch.cuda.mem_get_info(device)
    return pixels.numel() < DEVICE_MEMORY_SHARE * free


def batch_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, step]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on random streams seeded with `seed`; the global ones are restored afterwards."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class DeviceLoader:
    """Augmented, normalised training batches (float32 NCHW on `device`, labels too) from `pixels` (uint8 NHWC).

    Iterates like `data_loader.make_loader(..., train=True)`: DistributedSampler order (call `sampler.set_epoch`),
    full batches only (the remainder of an epoch is dropped, unless that would leave no batch at all).
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int, augment: nn.Module, *,
                 device: torch.device, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.device, self.batch_size, self.rank, self.seed = torch.device(device), batch_size, rank, seed
        self.on_device = fits_on_device(pixels, self.device)
        self.pixels = pixels.to(self.device) if self.on_device else pixels
        self.labels = labels.to(self.device)
        self.augment = augment.to(self.device)
        self.sampler = DistributedSampler(range(len(pixels)), num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=seed)
        self.drop_last = len(self.sampler) > batch_size
        if self.device.type == "cuda":
            log.info("GPU input path: %d images (%.1f GB) held %s", len(pixels), pixels.numel() / 1e9,
                     "on the GPU" if self.on_device else "on the host, batches through pinned memory")

    @classmethod
    def from_cache(cls, dataset: image_cache.CachedImageDataset, cfg: dict, batch_size: int, *, augment: bool,
                   hflip: bool = False, **kw) -> DeviceLoader:
        """A loader over a cached split: its `source` images with `augment`, its stored crops without."""
        labels = torch.tensor([label for _, label in dataset.samples])
        return cls(cached_pixels(dataset), labels, batch_size, augmentation(cfg, augment, hflip), **kw)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        if self.on_device:  # not `pixels.device == device`: torch.device("cuda") != torch.device("cuda:0")
            return self.pixels[index.to(self.device)]
        # the caching host allocator keeps a pinned block busy until its copy is done, so reuse is safe
        batch = torch.empty((len(index), *self.pixels.shape[1:]), dtype=torch.uint8, pin_memory=True)
        torch.index_select(self.pixels, 0, index, out=batch)
        return batch.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler))
        for step in range(len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            # NHWC uint8 -> NCHW float view in [0, 1]; its strides are channels-last already
            images = self._gather(index).permute(0, 3, 1, 2).float().div_(255)
            with seeded(batch_seed(self.seed, self.sampler.epoch, self.rank, step), self.device):
                images = self.augment(images)
            yield images, self.labels[index.to(self.device)]
