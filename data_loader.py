"""Data for training and evaluation: find or download the images, split them, build transforms and loaders.

The dataset is a folder of class sub-folders (the Kaggle `asl_alphabet_train` layout; any class set works).
Everything that decides *which* images land in training or validation lives here, so that `evaluate.py`
recomputes exactly the split that training used.
"""
from __future__ import annotations

import logging
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

import hands
import image_io
from errors import UsageError

log = logging.getLogger(__name__)

KAGGLE_DATASET = "grassknoted/asl-alphabet"
_KAGGLE_HANDLE = re.compile(r"[A-Za-z0-9][\w-]*/[A-Za-z0-9][\w.-]*")
# Consecutive video frames are near-duplicates: a block split holds out runs of frames, not single frames.
SPLIT_BLOCKS_PER_CLASS = 20
_FRAME_NUMBER = re.compile(r"(\d+)$")

Sample = tuple[str, int]


class DatasetError(UsageError):
    """A dataset problem the user can fix; the message says how."""


def is_kaggle_handle(source: str | os.PathLike) -> bool:
    """Whether an --xtrain_path entry names a Kaggle dataset (`owner/dataset`, as in its kaggle.com/datasets/
    address) rather than a folder: it has that form and no such folder exists here."""
    return bool(_KAGGLE_HANDLE.fullmatch(str(source))) and not Path(source).expanduser().exists()


def download_dataset(handle: str = KAGGLE_DATASET) -> Path:
    """Download a Kaggle dataset with kagglehub (cached: a second call does not download again) and return its
    folder of class sub-folders (`find_class_folder`)."""
    try:
        import kagglehub

        root = Path(kagglehub.dataset_download(handle))
    except Exception as err:  # kagglehub raises many types (network, auth, HTTP); all mean the same here
        raise DatasetError(
            f"Could not download the Kaggle dataset '{handle}' ({type(err).__name__}: {err}). "
            "Check your internet connection, the dataset's name (kaggle.com/datasets/OWNER/DATASET) and your Kaggle "
            "credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY), or pass a local folder of class "
            "sub-folders with --xtrain_path."
        ) from None
    return find_class_folder(root)


def find_class_folder(root: Path) -> Path:
    """The folder of class sub-folders inside a downloaded dataset: the shallowest one with at least two
    sub-folders that hold images themselves (`asl_alphabet_train/asl_alphabet_train` in the Kaggle ASL alphabet,
    whose test images lie flat beside it); `root` itself when there is none."""
    level = [root]
    while level:
        for folder in level:
            with_images = [d for d in _subfolders(folder)
                           if any(f.suffix.lower() in image_io.IMG_EXTENSIONS for f in d.iterdir() if f.is_file())]
            if len(with_images) >= 2:
                return folder
        level = [d for folder in level for d in _subfolders(folder)]
    return root


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def training_folder(source: str | os.PathLike) -> Path:
    """One --xtrain_path entry as a folder of class sub-folders: a Kaggle dataset handle is downloaded
    (`download_dataset`), a folder is taken as it is (`resolve_train_dir`)."""
    return download_dataset(str(source)) if is_kaggle_handle(source) else resolve_train_dir(source)


def resolve_train_dir(path: str | os.PathLike) -> Path:
    """Accept the class folder itself or the Kaggle download root (`asl_alphabet_train/asl_alphabet_train`)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Dataset folder '{root}' does not exist. Pass a folder of class sub-folders or a "
                           "Kaggle dataset (OWNER/DATASET) with --xtrain_path (or leave it out to download "
                           f"{KAGGLE_DATASET}).")
    for nested in ("asl_alphabet_train/asl_alphabet_train", "asl_alphabet_train"):
        if (root / nested).is_dir():
            return root / nested
    return root


def is_image_file(path: Path) -> bool:
    """Cheap check that a file is a usable image by image_io's policy: an image extension and a header that
    reads (size within the pixel limit); the pixels are decoded later, by the dataset."""
    if path.suffix.lower() not in image_io.IMG_EXTENSIONS:
        return False
    try:
        image_io.read_size(path)
    except image_io.ImageError:
        return False
    return True


@dataclass
class ImageList:
    """The images found in one or more dataset folders and what was skipped."""
    samples: list[Sample]
    classes: list[str]
    skipped: list[str]
    roots: list[str] = field(default_factory=list)
    folders: list[int] = field(default_factory=list)  # the index in `roots` of each sample's folder


def scan_image_folder(root: str | os.PathLike, min_classes: int = 2) -> ImageList:
    """List (path, class index) for every readable image in `root/<class>/`, skipping and counting the rest."""
    root = resolve_train_dir(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < min_classes:
        raise DatasetError(f"'{root}' has {len(classes)} class sub-folder(s) ({', '.join(classes) or 'none'}); "
                           f"a classifier needs at least {min_classes}. Point --xtrain_path at the folder that "
                           "holds one sub-folder per class (e.g. asl_alphabet_train/A, .../B, ...).")
    samples, skipped = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            (samples.append((str(path), index)) if is_image_file(path) else skipped.append(str(path)))
    if not samples:
        raise DatasetError(f"No readable images under '{root}' (looked for {', '.join(image_io.IMG_EXTENSIONS)}).")
    empty = [c for i, c in enumerate(classes) if not any(label == i for _, label in samples)]
    if empty:
        raise DatasetError(f"Class folder(s) with no readable image in '{root}': {', '.join(empty)}. "
                           "Remove them or add images.")
    if skipped:
        log.warning("Skipped %d unreadable or non-image file(s) in %s, e.g. %s", len(skipped), root, skipped[0])
    return ImageList(samples, classes, skipped, [str(root)], [0] * len(samples))


def class_key(name: str) -> str:
    """Class names match across folders and models case-insensitively: `a/` holds the letter of `A/`."""
    return name.casefold()


def scan_folders(roots: Sequence[str | os.PathLike], known_classes: Sequence[str] = ()) -> ImageList:
    """Scan several folders of class sub-folders as one dataset; a folder may hold only some of the classes.

    Classes are merged by name (`class_key`): `known_classes` (a model being fine-tuned) keep their order and
    spelling and the others follow, sorted; without known classes the order is sorted, as for one folder.
    """
    resolved = [resolve_train_dir(root) for root in roots]
    repeated = sorted({str(r) for r in resolved if sum(r.resolve() == o.resolve() for o in resolved) > 1})
    if repeated:
        raise DatasetError(f"--xtrain_path names the same folder twice: {', '.join(repeated)}. Name each once.")
    lists = [scan_image_folder(root, min_classes=1) for root in resolved]
    names: dict[str, str] = {class_key(name): name for name in known_classes}
    for images in lists:
        for name in images.classes:
            names.setdefault(class_key(name), name)
    new = sorted(name for key, name in names.items() if key not in {class_key(c) for c in known_classes})
    classes = list(known_classes) + new if known_classes else sorted(names.values())
    if len(classes) < 2:
        raise DatasetError(f"The folders {', '.join(map(str, resolved))} hold {len(classes)} class(es) in all; a "
                           "classifier needs at least 2. Point --xtrain_path at folders of class sub-folders.")
    index = {class_key(name): i for i, name in enumerate(classes)}
    merged = ImageList([], classes, [], [str(root) for root in resolved], [])
    for folder, images in enumerate(lists):
        merged.samples += [(path, index[class_key(images.classes[label])]) for path, label in images.samples]
        merged.folders += [folder] * len(images.samples)
        merged.skipped += images.skipped
    return merged


def label_from_filename(path: str | os.PathLike) -> str | None:
    """The label in a flat test file's name: everything before the last underscore (`A_test.jpg` -> `A`,
    `nothing_test.jpg` -> `nothing`), or None when the name has no underscore."""
    label, sep, _ = Path(path).stem.rpartition("_")
    return label if sep and label else None


def scan_flat_folder(root: str | os.PathLike) -> ImageList:
    """List the readable images of a flat folder labelled by file name (the Kaggle test layout, `A_test.jpg`).

    Files that are not readable images, or whose name carries no label, are skipped and counted.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Test folder '{root}' does not exist.")
    labelled, skipped = [], []
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        label = label_from_filename(path)
        if label and is_image_file(path):
            labelled.append((str(path), label))
        else:
            skipped.append(str(path))
    if not labelled:
        raise DatasetError(f"No labelled images in '{root}': use one sub-folder per class (A/, B/, ...) or flat "
                           f"files named <CLASS>_<anything> (A_test.jpg, ...) with an image extension.")
    classes = sorted({label for _, label in labelled})
    index = {name: i for i, name in enumerate(classes)}
    if skipped:
        log.warning("Skipped %d unreadable or unlabelled file(s) in %s, e.g. %s", len(skipped), root, skipped[0])
    return ImageList([(path, index[label]) for path, label in labelled], classes, skipped, [str(root)],
                     [0] * len(labelled))


def frame_number(path: str) -> int | None:
    """The frame number at the end of a file name (`A123.jpg` -> 123), or None."""
    match = _FRAME_NUMBER.search(Path(path).stem)
    return int(match.group(1)) if match else None


def resolve_split_by(samples: list[Sample], split_by: str) -> str:
    """`auto` means `block` when every file name carries a frame number (the Kaggle layout), else `random`."""
    if split_by != "auto":
        return split_by
    return "block" if all(frame_number(p) is not None for p, _ in samples) else "random"


def _class_blocks(samples: list[Sample], idx: list[int], split_by: str) -> list[list[int]]:
    """One class's samples (`idx`) cut into the units a split holds out: SPLIT_BLOCKS_PER_CLASS runs of
    consecutive frames (`block`), or single images (`random`)."""
    if split_by == "random":
        return [[i] for i in idx]
    idx = sorted(idx, key=lambda i: (frame_number(samples[i][0]) or 0, samples[i][0]))
    n_blocks = min(SPLIT_BLOCKS_PER_CLASS, len(idx))
    return [idx[len(idx) * b // n_blocks: len(idx) * (b + 1) // n_blocks] for b in range(n_blocks)]


def _by_class(samples: list[Sample]) -> dict[int, list[int]]:
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, (_, label) in enumerate(samples):
        by_class[label].append(i)
    return by_class


def block_ids(samples: list[Sample], split_by: str = "auto") -> list[int]:
    """The block of every sample (see `split_samples`): images of one block are near-duplicates, so anything
    fitted on some images and measured on others (calibration's cross-fitting) keeps blocks together."""
    split_by = resolve_split_by(samples, split_by)
    ids = [0] * len(samples)
    blocks = (block for _, idx in sorted(_by_class(samples).items()) for block in _class_blocks(samples, idx, split_by))
    for n, block in enumerate(blocks):
        for i in block:
            ids[i] = n
    return ids


def split_samples(samples: list[Sample], val_split: float, seed: int, split_by: str = "auto") -> tuple[list[int], list[int]]:
    """Stratified, seeded train/validation split; returns sorted index lists into `samples`.

    `random` draws single images per class. `block` sorts each class by frame number, cuts it into
    SPLIT_BLOCKS_PER_CLASS runs of consecutive frames and holds out whole runs, so near-identical neighbouring
    frames never sit on both sides of the split.
    """
    if not 0.0 < val_split < 1.0:
        raise DatasetError(f"--val_split must be between 0 and 1 (got {val_split}); 0.1 holds out 10%.")
    split_by = resolve_split_by(samples, split_by)
    if split_by not in ("block", "random"):
        raise DatasetError(f"Unknown split '{split_by}': use auto, block or random.")
    rng = random.Random(seed)
    by_class = _by_class(samples)
    val: list[int] = []
    for label in sorted(by_class):
        blocks = _class_blocks(samples, by_class[label], split_by)
        if split_by == "random":
            rng.shuffle(blocks)
        n_val = round(val_split * len(blocks))
        n_val = min(max(n_val, 1), len(blocks) - 1) if len(blocks) > 1 else 0
        for block in rng.sample(blocks, n_val):
            val.extend(block)
    val_set = set(val)
    train = [i for i in range(len(samples)) if i not in val_set]
    return train, sorted(val)


# ---------------------------------------------------------------------------------------------- transforms

def _interpolation(cfg: dict) -> InterpolationMode:
    return InterpolationMode(cfg.get("interpolation", "bilinear"))


def eval_geometry(cfg: dict) -> T.Compose:
    """The eval preset's resize and centre crop, on the PIL image as the preset does (so tensors match it exactly).

    Its output is uint8 pixels, which is why image_cache.py can store it once and skip it in later epochs.
    """
    return T.Compose([T.Resize(cfg["resize_size"], interpolation=_interpolation(cfg), antialias=True),
                      T.CenterCrop(cfg["crop_size"])])


def normalize(cfg: dict) -> T.Compose:
    """uint8 image tensors, one (CHW) or a batch (NCHW), as the float32 normalised input the model takes."""
    return T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(cfg["mean"], cfg["std"])])


def to_model_input(cfg: dict) -> T.Compose:
    """An RGB image (PIL, or a uint8 array or tensor) as the float32, normalised CHW tensor the model takes."""
    return T.Compose([T.ToImage(), normalize(cfg)])


def eval_transform(cfg: dict) -> T.Compose:
    """Resize, centre crop and normalise, exactly as the pretrained weights' own preset does."""
    return T.Compose([eval_geometry(cfg), to_model_input(cfg)])


def train_transform(cfg: dict, augment: bool, hflip: bool = False) -> T.Compose:
    """Training transform: the eval preset, or augmentations that survive a change of hand, light and room.

    Horizontal flips only with `hflip`: a mirrored hand is the same letter signed with the other hand, which is
    what a model must read when its users include signers of the other handedness (or mirrored webcams), but it
    also erases what a one-handed dataset says about handedness, so it is a choice, not a default.
    """
    if not augment:
        return eval_transform(cfg)
    crop = T.RandomResizedCrop(cfg["crop_size"], scale=(0.5, 1.0), ratio=(0.8, 1.25),
                               interpolation=_interpolation(cfg), antialias=True)
    return T.Compose([
        T.Compose([crop, T.RandomHorizontalFlip()]) if hflip else crop,
        T.ToImage(),
        T.RandomApply([T.RandomRotation(15, interpolation=InterpolationMode.BILINEAR)], p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.05)], p=0.8),
        T.RandomGrayscale(p=0.1),
        T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.2),
        normalize(cfg),
        T.RandomErasing(p=0.25, value=0),
    ])


# ---------------------------------------------------------------------------------------------- datasets


class ImageDataset(Dataset):
    """(path, label) samples opened with `load` (the project's image policy, or a crop model's
    `hands.CropLoader`) and transformed; an image that fails to decode is replaced by the next one and logged,
    so one truncated file never stops a long training run."""

    def __init__(self, samples: list[Sample], transform, load: Callable[[str], Image.Image] = image_io.load_rgb):
        self.samples = samples
        self.transform = transform
        self.load = load

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return self.transform(self.load(path)), label
            except image_io.ImageError as err:
                log.warning("Skipping unreadable image: %s", err)
        raise DatasetError("No image in the dataset could be decoded.")


class HandDataset(Dataset):
    """The hands found in training or validation images as feature vectors (`hands.features`) and labels.

    With `augment` it is indexed as training loaders index (index, seed) pairs (`SeededSampler`), and the loader
    fetches a whole batch at once (`__getitems__`): varying thousands of hands one by one in Python took most of
    a landmark-network epoch. Each batch draws from one generator seeded by its first image's seed, so a resumed
    run varies the hands as an uninterrupted one did.
    """

    def __init__(self, found: list[hands.Hand], labels: list[int], augment: bool):
        self.features = torch.from_numpy(np.stack([hands.features(hand) for hand in found])
                                         if found else np.empty((0, hands.N_FEATURES), np.float32))
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.augment = augment

    @property
    def takes_seeds(self) -> bool:
        """Whether make_loader hands it (index, seed) keys as they are, not through SeededDataset."""
        return self.augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.augment:
            index = torch.as_tensor(keys, dtype=torch.long)
            return list(zip(self.features[index], self.labels[index]))
        index = torch.as_tensor([i for i, _ in keys], dtype=torch.long)
        rng = np.random.default_rng(keys[0][1])
        return list(zip(torch.from_numpy(hands.augment(self.features[index].numpy(), rng)), self.labels[index]))


class ShardSampler(Sampler[int]):
    """Every rank gets a disjoint slice of the dataset and nothing is padded.

    DistributedSampler pads with duplicates so all ranks see the same count; for evaluation that double-counts
    some images. Evaluation needs no gradient sync, so uneven shards are fine there.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def augmentation_seed(seed: int, rank: int, epoch: int, index: int) -> int:
    """The seed of one image's random augmentation in one epoch: a function of these four numbers only."""
    return int(np.random.SeedSequence([seed, rank, epoch, index]).generate_state(1, np.uint64)[0])


class SeededSampler(Sampler[tuple[int, int]]):
    """A training sampler whose indices come paired with their `augmentation_seed` for the current epoch.

    Loader workers hold their own RNG, seeded once when they start, and persistent workers live across
    epochs: a run resumed after a kill would otherwise replay the first epoch's augmentations instead of
    continuing. Seeding each image from (seed, rank, epoch, index) makes its augmentation independent of
    which worker draws it and of how long that worker has lived.
    """

    def __init__(self, sampler: DistributedSampler, seed: int, rank: int):
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for index in self.sampler:
            yield index, augmentation_seed(self.seed, self.rank, self.epoch, index)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(Dataset):
    """`dataset` indexed by (index, seed): the item is made with torch's and python's RNGs seeded by `seed`
    (torchvision's random transforms draw from torch's), and the caller's RNG state is left as it was."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator alone: torch.manual_seed also queues a CUDA seeding, whose bookkeeping (a
                # stack trace per call) took three quarters of a landmark-network epoch
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(python_state)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, rank: int = 0, world_size: int = 1,
                num_workers: int = 2, seed: int = 0, pin_memory: bool = False) -> DataLoader | FinishingLoader:
    """A DataLoader for one split.

    Training always uses a DistributedSampler (also on one process): its shuffle depends only on seed and epoch,
    and every image's augmentation on (seed, rank, epoch, index) (`SeededSampler`), so a resumed run sees the
    same batches as an uninterrupted one, with or without workers. Evaluation takes an unpadded shard per rank.
    A dataset with a `finish_transform` gets it applied to the images of each batch (see `FinishingLoader`).
    """
    finish = getattr(dataset, "finish_transform", None)
    if train:
        sampler = SeededSampler(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                   seed=seed), seed, rank)
        dataset = dataset if getattr(dataset, "takes_seeds", False) else SeededDataset(dataset)
    else:
        sampler = ShardSampler(len(dataset), rank, world_size) if world_size > 1 else None
    # the loader draws its workers' base seeds from this generator: without one it would draw from the global
    # RNG, which a resumed run restores from its checkpoint, at a different point than an uninterrupted run
    generator = torch.Generator().manual_seed(seed + rank)
    # a last training batch of one image breaks BatchNorm; dropping the remainder costs < 1 batch per epoch
    drop_last = train and len(sampler) > batch_size
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, persistent_workers=num_workers > 0, drop_last=drop_last,
                        generator=generator)
    return FinishingLoader(loader, finish) if finish else loader


class FinishingLoader:
    """A DataLoader whose batches get `transform` applied to each image here, in the loader's process.

    Datasets that hand out uint8 images (image_cache.CachedImageDataset) set `finish_transform` to the
    normalisation: workers then pass a quarter of float32's bytes through shared memory, which on a small
    machine costs more than the work itself. Image by image, because one image's floats stay in the CPU
    cache while a whole float32 batch does not (measured 3x slower). Everything else is the wrapped loader's.
    """

    def __init__(self, loader: DataLoader, transform):
        self.loader, self.transform = loader, transform

    def __iter__(self):
        for images, targets in self.loader:
            yield self._finish(images), targets

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        first = self.transform(images[0])
        pin = self.loader.pin_memory and torch.cuda.is_available()  # as the loader would have pinned them
        out = torch.empty((len(images), *first.shape), dtype=first.dtype, pin_memory=pin)
        out[0] = first
        for i in range(1, len(images)):
            out[i] = self.transform(images[i])
        return out

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)


@dataclass(frozen=True)
class SplitRule:
    """How one training folder is split. `per_class` keeps at most that many training images per class, and
    `val_per_class` that many validation images, spread evenly over each class's frames: a cap on a folder of
    many near-duplicate frames (--max_per_class), or the replay of a model's own training data while it is
    fine-tuned on other folders."""
    val_split: float
    seed: int
    split_by: str = "auto"
    per_class: int | None = None
    val_per_class: int | None = None


# A capped or replayed folder is validated on a sample of its held-out images: enough to choose the epoch, see
# forgetting and fit the temperatures, and cheap per epoch (the Kaggle signer's held-out tenth, 30 frames a letter,
# was half of every validation pass and of the hand search of the 21-folder quick start, for one person of 25).
VAL_PER_CLASS = 10


def _evenly(indices: list[int], samples: list[Sample], n: int) -> list[int]:
    """`n` of each class's `indices`, evenly spaced in frame order (neighbouring frames are near-duplicates)."""
    kept = []
    for _, idx in sorted(_by_class([samples[i] for i in indices]).items()):
        ordered = sorted((indices[j] for j in idx), key=lambda i: (frame_number(samples[i][0]) or 0, samples[i][0]))
        kept += ordered if len(ordered) <= n else [ordered[len(ordered) * k // n] for k in range(n)]
    return sorted(kept)


def split_folders(images: ImageList, rules: Sequence[SplitRule]) -> tuple[list[int], list[int], list[int]]:
    """Train and validation indices into `images.samples`, each folder split on its own by its rule (so every
    folder has held-out images of its own), and the split block of every sample, numbered across folders."""
    train, val, blocks = [], [], [0] * len(images.samples)
    for folder, rule in enumerate(rules):
        members = [i for i, f in enumerate(images.folders) if f == folder]
        samples = [images.samples[i] for i in members]
        folder_train, folder_val = split_samples(samples, rule.val_split, rule.seed, rule.split_by)
        folder_train, folder_val = [members[i] for i in folder_train], [members[i] for i in folder_val]
        if rule.per_class is not None:
            folder_train = _evenly(folder_train, images.samples, rule.per_class)
        if rule.val_per_class is not None:
            folder_val = _evenly(folder_val, images.samples, rule.val_per_class)
        offset = max(blocks, default=-1) + 1
        for i, block in zip(members, block_ids(samples, rule.split_by)):
            blocks[i] = offset + block
        train += folder_train
        val += folder_val
    return sorted(train), sorted(val), blocks


def recorded_folders(meta: Mapping) -> list[tuple[str, SplitRule]]:
    """The folders a run trained on and the rule that split each, from its config.json (or a checkpoint's
    metadata). Runs from before multi-folder training recorded one folder, as `data_root`."""
    if "folders" in meta:
        # runs from before `val_per_class` capped a replayed folder's validation images at VAL_PER_CLASS
        return [(folder["root"], SplitRule(**{"val_per_class": VAL_PER_CLASS if folder["rule"].get("per_class")
                                              is not None else None, **folder["rule"]}))
                for folder in meta["folders"]]
    return [(meta["data_root"], SplitRule(meta["args"]["val_split"], meta["args"]["seed"], meta["split_by"]))]


def recorded_val(split: Mapping, meta: Mapping) -> list[tuple[str, list[str]]]:
    """Each training folder with its held-out files (relative to it), from a run's split.json; older runs
    listed one folder's files as `val`."""
    if "folders" in split:
        return [(folder["root"], folder["val"]) for folder in split["folders"]]
    return [(recorded_folders(meta)[0][0], split["val"])]


def subset(dataset: Dataset, indices: Sequence[int]) -> Subset:
    """The images of `dataset` at `indices`, keeping its `finish_transform` (see `make_loader`)."""
    part = Subset(dataset, list(indices))
    if hasattr(dataset, "finish_transform"):
        part.finish_transform = dataset.finish_transform
    return part


@dataclass
class Splits:
    """What training needs to know about its data."""
    train: Dataset
    val: Dataset
    classes: list[str]
    train_samples: list[Sample]
    val_samples: list[Sample]
    split_by: str
    skipped: list[str]
    val_blocks: list[int]  # the split block of each validation sample (`block_ids`)
    roots: list[str]
    train_folders: list[int]  # the folder (index in `roots`) of each training sample
    val_folders: list[int]  # and of each validation sample
    folder_split_by: list[str]  # the split each folder got (`resolve_split_by`)


def build_splits(images: ImageList, cfg: dict, *, val_split: float = 0.1, seed: int = 0, split_by: str = "auto",
                 augment: bool = True, hflip: bool = False, rules: Sequence[SplitRule] | None = None,
                 load: Callable[[str], Image.Image] = image_io.load_rgb) -> Splits:
    """Split scanned images, each folder by its own `rules` (default: the same rule, from val_split, seed and
    split_by, for every folder), and wrap both sides with their transforms (validation is never augmented); both
    open their files with `load`."""
    rules = rules or [SplitRule(val_split, seed, split_by)] * len(images.roots)
    train_idx, val_idx, blocks = split_folders(images, rules)
    train_samples = [images.samples[i] for i in train_idx]
    val_samples = [images.samples[i] for i in val_idx]
    folder_split_by = [resolve_split_by([s for s, f in zip(images.samples, images.folders) if f == folder],
                                        rule.split_by) for folder, rule in enumerate(rules)]
    return Splits(ImageDataset(train_samples, train_transform(cfg, augment, hflip), load),
                  ImageDataset(val_samples, eval_transform(cfg), load), images.classes, train_samples, val_samples,
                  "/".join(sorted(set(folder_split_by))), images.skipped, [blocks[i] for i in val_idx],
                  images.roots, [images.folders[i] for i in train_idx], [images.folders[i] for i in val_idx],
                  folder_split_by)
