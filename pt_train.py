"""Train the ASL sign classifier: `python pt_train.py --xtrain_path DIR` (CPU), `--gpu` (one GPU),
`--world_size N` (N processes on this machine via mp.spawn), or `torchrun ... pt_train.py` (many machines).

Writes into --save_dir: last.pt and best.pt (model, optimizer, scheduler, epoch, metadata), history.json,
classes.json, transform.json, config.json, split.json and MODEL_CARD.md (model_card.py). With --mlflow, rank 0
also logs the run to MLflow as it goes (see log_experiment.py). `--verbose` also shows the libraries' own logs
(terminal.py). Exit code 2 means a problem with the input, explained in one line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import random
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

import calibration
import data_loader
import data_sources
import hands
import gpu_pipeline
import image_cache
import image_io
import log_experiment
import model as models
import model_card
import predict
import pt_engine
import run_artifacts
import terminal
from errors import UsageError

log = logging.getLogger("pt_train")

EXIT_USAGE = 2
# Training resolutions that did best within 30 minutes on 2 CPU cores (docs/results.md, "Model quality"): pretrained
# Lite0 reached 99.9% held-out accuracy at 128 px; from scratch 96 px beat 64 px in the same time.
DEFAULT_IMG_SIZE_PRETRAINED = 128
DEFAULT_IMG_SIZE_SCRATCH = 96
# The landmark network (docs/results.md, "Other people's hands"): under half a second an epoch on 2 CPU cores for 7,000 hands
HAND_EPOCHS, HAND_BATCH_SIZE, HAND_LEARNING_RATE, HAND_HIDDEN = 40, 128, 3e-3, 256
# Fine-tuning a trained model on a user's photos (--init_from; docs/results.md, "Teach it your hand"): a few epochs at a
# lower rate adapt it without undoing what it learned, and a replay of 20 images per class of its own data kept
# the held-out accuracy of the data it was trained on within half a point (set a priori, measured once)
FINE_TUNE_EPOCHS, FINE_TUNE_LEARNING_RATE, REPLAY_PER_CLASS = 3, 3e-4, 20
# Stem and stages 1-3 of the pretrained backbone stay as ImageNet left them (docs/results.md, "Other people's hands"): the
# quick start's epochs got quicker and the image network read another person's photos at 0.58 instead of 0.51
PRETRAINED_FROZEN_STAGES = 3
HAND_MODES = ("crop", "fused", "none")  # --hands; the first is the default (docs/results.md, "Other people's hands")
# --whole_share; 0.3 read the shifted set better in two draws but another person's photos a little worse, and the app
# was right less often when it answered (docs/results.md, "Other people's hands")
WHOLE_SHARE = 0.0
MAX_PER_CLASS = 0  # --max_per_class
# Named recipes (--recipe), side by side as torchvision's references name theirs: presets of the options below that
# an option given on the command line still overrides. quick: the README's quick start, minutes on a laptop's CPU
# (docs/results.md)
RECIPES = {
    # threshold: the one leave_one_out.py --groups 5 fitted on the 21 people it left out (docs/results.md, "Leave one
    # signer out"); the validation split's people are read too well to fit it on
    "quick": {"max_per_class": 20, "arch": "efficientnet_lite0", "weights": "imagenet", "img_size": 128,
              "total_epochs": 3, "threshold": 0.95},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="NAME",
                      help="data by name (data_sources.py list): a set (everyone: the Kaggle signer and 20 other "
                           "people; signers) or a folder (omega, train), downloaded where --data_dir lacks it")
    data.add_argument("--data_dir", metavar="DIR",
                      help=f"where --data's folders are, or go (default: ${data_sources.DATA_DIR_ENV}, else "
                           f"{data_sources.DEFAULT_DATA_DIR}); ../shared/asl holds them all")
    data.add_argument("--xtrain_path", nargs="+",
                      help="folder(s) of class sub-folders, trained on together (after --data's): classes merged by "
                           "name (a/ is A/), each folder split on its own; default: download the Kaggle dataset")
    data.add_argument("--max_per_class", type=int, default=MAX_PER_CLASS, metavar="N",
                      help="at most N training images per class from each folder, spread evenly over its frames, so "
                           "that a folder of many near-duplicate video frames (the Kaggle signer's 270 a letter) does "
                           "not drown the photos of other people (docs/results.md, 'Other people's hands'), and at most "
                           f"{data_loader.VAL_PER_CLASS} validation images; 0: all")
    data.add_argument("--val_split", type=float, default=0.1, help="fraction held out for validation")
    data.add_argument("--split_by", choices=("auto", "block", "random"), default="auto",
                      help="block: hold out runs of consecutive frames (auto picks it when names carry frame numbers)")
    data.add_argument("--img_size", type=int, default=None,
                      help="training resolution (default: 128 with pretrained weights, 96 with --weights none: the "
                           "best measured within a 30-minute CPU budget, docs/results.md; the weights' own "
                           "preset is 224)")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                      help="random crops, rotation, colour jitter, blur and erasing")
    data.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                      help="also mirror images at random (default: on with --augment), so the model reads signers "
                           "of either hand: a mirrored letter is the same letter signed with the other hand "
                           "(measured +25 points on another person's photos for -0.2 on held-out frames; docs/results.md)")
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    data.add_argument("--cache", choices=("auto", "disk", "none"), default="auto",
                      help="disk: decode every image once into a memory-mapped uint8 cache that later epochs and "
                           "runs reuse (see image_cache.py); auto: disk with --gpu, where decoding limits speed, "
                           "none on the CPU, where the network does")
    data.add_argument("--gpu_augment", action=argparse.BooleanOptionalAction, default=None,
                      help="hold the decoded training images on the GPU (or pinned host memory) and augment and "
                           "normalise them there in batches, per image (gpu_pipeline.py); default: on with --gpu "
                           "unless --cache none. Without --gpu the same code runs on the CPU")
    data.add_argument("--cache_dir", default=str(image_cache.default_cache_dir()),
                      help="where --cache disk keeps its files (a tmpfs such as /dev/shm keeps them in memory)")
    model = p.add_argument_group("model")
    model.add_argument("--arch", choices=models.ARCHS, default=None, help="default: efficientnet_b0")
    model.add_argument("--weights", default=None, help="imagenet (default), none, or PATH to a state-dict file")
    model.add_argument("--init_from", metavar="RUN_OR_CHECKPOINT",
                       help="fine-tune a trained model (a --save_dir of this script, or its best.pt): its weights, "
                            "architecture and preprocessing, its classes first; a new output row for each class "
                            "it did not know (docs/results.md, 'Teach it your hand')")
    model.add_argument("--replay", type=int, default=REPLAY_PER_CLASS,
                       help="with --init_from: mix in this many training images per class of the data the model "
                            "was trained on (its folders not named in --xtrain_path), so fine-tuning does not "
                            "make it forget them; validated on up to "
                            f"{data_loader.VAL_PER_CLASS} of their held-out images per class; 0: none")
    model.add_argument("--freeze_backbone", action="store_true", help="train the new head only")
    model.add_argument("--frozen_stages", type=int, default=None, choices=range(models.N_STAGES + 1),
                       metavar=f"0..{models.N_STAGES}",
                       help="keep the stem and the first N of the backbone's stages at their pretrained weights "
                            f"(default: {PRETRAINED_FROZEN_STAGES} with --weights imagenet, 0 from scratch or with "
                            "--init_from): quicker epochs, and the image network read another person's photos "
                            "better (docs/results.md, 'Other people's hands')")
    model.add_argument("--hands", choices=HAND_MODES, default=None,
                       help="crop (default): also find the hand (MediaPipe, hands.py) and read its 21 landmarks with "
                            "a small network, pooled with the image network where a hand is found, the image network "
                            "reading the square around the hand (the whole frame where none is found): it reads "
                            "other people's hands best (docs/results.md, 'Other people's hands'); fused: the same, the image "
                            "network reading the whole frame; none: the image network alone, on the whole frame. "
                            "With --init_from: the model's own")
    model.add_argument("--whole_share", type=float, default=WHOLE_SHARE, metavar="P",
                       help="crop models: the share of training images the image network reads whole instead of "
                            "their square, drawn once by the seed. Measured at 0.3: photos whose hand MediaPipe misses "
                            "(dark, blurred, noisy) are read better, another person's photos a little worse (docs/results.md, "
                            "'Other people's hands')")
    model.add_argument("--hand_model", default=None,
                       help="a MediaPipe hand_landmarker.task to use instead of the cached one (see hands.py)")
    model.add_argument("--hand_epochs", type=int, default=HAND_EPOCHS, help="epochs of the landmark network")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--total_epochs", type=int, default=None,
                       help=f"default: 10, or {FINE_TUNE_EPOCHS} with --init_from")
    optim.add_argument("--batch_size", type=int, default=32, help="per process")
    optim.add_argument("--learning_rate", type=float, default=None,
                       help=f"default: 1e-3, or {FINE_TUNE_LEARNING_RATE} with --init_from")
    optim.add_argument("--weight_decay", type=float, default=1e-4)
    optim.add_argument("--label_smoothing", type=float, default=0.1)
    optim.add_argument("--scheduler", choices=("none", "step", "cosine", "plateau"), default="cosine")
    optim.add_argument("--patience", type=int, default=3, help="epochs without val-loss improvement before stopping")
    optim.add_argument("--seed", type=int, default=42)
    optim.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                       help="fit each network's softmax temperature after training (stored in best.pt): on "
                            "--calibration_path where given, else on the validation split")
    optim.add_argument("--calibration_path", nargs="+", metavar="FOLDER",
                       help="folder(s) of class sub-folders of people the model does not train on: both networks' "
                            "temperatures and the app's default threshold (the lowest at which its answers are "
                            f"right {predict.ANSWER_PRECISION * 100:.0f}%% of the time) are fitted on them instead "
                            "of the validation split. A stricter threshold, but left one signer out, training on "
                            "those people too read new people better and was better calibrated on them "
                            "(docs/results.md, 'Leave one signer out')")
    optim.add_argument("--threshold", type=float, metavar="T",
                       help="the app's default confidence threshold, recorded in the model (else "
                            f"{predict.DEFAULT_THRESHOLD}); leave_one_out.py fits one on people left out of training "
                            "(OUT_DIR/threshold.json). --calibration_path fits its own")
    run = p.add_argument_group("run")
    run.add_argument("--recipe", choices=RECIPES,
                     help="a named preset: " + "; ".join(f"{name}: " + " ".join(f"--{k} {v}" for k, v in preset.items())
                                                         for name, preset in RECIPES.items())
                          + " (an option given as well wins)")
    run.add_argument("--save_dir", default="runs/latest")
    run.add_argument("--resume", action="store_true", help="continue from SAVE_DIR/last.pt")
    run.add_argument("--overwrite", action="store_true", help="start afresh even if SAVE_DIR has checkpoints")
    run.add_argument("--gpu", action="store_true", help="train on CUDA GPU(s)")
    run.add_argument("--world_size", type=int, default=1, help="processes to spawn on this machine (DDP)")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="mixed precision (default: on with --gpu)")
    run.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                     help="NHWC model and batches: the layout these convolutions run fastest in, on GPUs and on the "
                          "CPU alike (training 1.38x for Lite0 at 128 px, 1.19x for B0 at 64 px on 2 CPU cores)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the training step: minutes of compiling first; measured no faster on a "
                          "2-core CPU, meant for long GPU runs")
    run.add_argument("--num_threads", type=int, default=None,
                     help="CPU threads per process (default: torch's, one per core; with --world_size on the CPU "
                          "each process gets its share of the cores)")
    terminal.add_verbose_arg(run)
    track = p.add_argument_group("experiment tracking (MLflow; see log_experiment.py)")
    track.add_argument("--mlflow", action="store_true", help="log the run to MLflow (implied by the options below)")
    log_experiment.add_tracking_args(track)
    args = p.parse_args(argv)
    if args.threshold is not None and args.calibration_path:
        p.error("--calibration_path fits the app's threshold on its people: leave out --threshold, or "
                "--calibration_path.")
    if args.recipe:
        if args.init_from:
            p.error(f"--recipe {args.recipe} trains a new model: leave out --init_from, or --recipe to fine-tune.")
        # a second parse with the recipe as defaults: what the command line gives still wins
        p.set_defaults(**RECIPES[args.recipe])
        args = p.parse_args(argv)
    if args.data_dir and not args.data:
        p.error("--data_dir says where --data's folders are: name them with --data (e.g. --data everyone).")
    if args.init_from:
        given = [f"--{name}" for name in ("arch", "weights", "img_size", "hands") if getattr(args, name) is not None]
        if given:
            p.error(f"{' and '.join(given)} {'come' if len(given) > 1 else 'comes'} from the --init_from model: leave "
                    f"{'them' if len(given) > 1 else 'it'} out to fine-tune it, or leave out --init_from to train a "
                    "new model.")
    else:
        args.arch = args.arch or "efficientnet_b0"
        args.weights = args.weights or "imagenet"
        args.hands = args.hands or HAND_MODES[0]
    if not 0.0 <= args.whole_share <= 1.0:
        p.error(f"--whole_share {args.whole_share} is a share of the training images: give one from 0 to 1.")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        p.error(f"--threshold {args.threshold} is a probability: give one from 0 to 1.")
    if args.frozen_stages is None:
        args.frozen_stages = PRETRAINED_FROZEN_STAGES if args.weights == "imagenet" else 0
    if args.total_epochs is None:
        args.total_epochs = FINE_TUNE_EPOCHS if args.init_from else 10
    if args.learning_rate is None:
        args.learning_rate = FINE_TUNE_LEARNING_RATE if args.init_from else 1e-3
    # naming a store or a registry entry means: track this run
    args.mlflow = args.mlflow or bool(args.tracking_uri or args.dagshub or args.register)
    if args.img_size is None and not args.init_from:
        args.img_size = DEFAULT_IMG_SIZE_SCRATCH if args.weights == "none" else DEFAULT_IMG_SIZE_PRETRAINED
    if args.amp is None:
        args.amp = args.gpu
    if args.hflip is None:
        args.hflip = args.augment
    if args.gpu_augment is None:
        args.gpu_augment = args.gpu and args.cache != "none"
    if args.cache == "auto":
        args.cache = "disk" if args.gpu or args.gpu_augment else "none"
    return args


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch. cuDNN kernels stay nondeterministic (fast); results match closely, not bitwise."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_free_port() -> int:
    """A free TCP port on this machine, so concurrent runs never clash on a hard-coded one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_environment(args: argparse.Namespace) -> None:
    if args.hflip and not args.augment:
        raise UsageError("--hflip is an augmentation; it cannot be combined with --no-augment.")
    if args.gpu_augment and args.cache == "none":
        raise UsageError("--gpu_augment reads the decoded-image cache; drop --cache none (or add --no-gpu_augment).")
    if args.max_per_class < 0:
        raise UsageError(f"--max_per_class is a number of images (got {args.max_per_class}); 0 takes them all.")
    if args.replay < 0:
        raise UsageError(f"--replay is a number of images per class (got {args.replay}); 0 replays none.")
    if args.total_epochs < 1 or args.batch_size < 1 or args.world_size < 1 or args.learning_rate <= 0:
        raise UsageError("--total_epochs, --batch_size and --world_size must be at least 1, --learning_rate > 0.")
    if args.gpu and not torch.cuda.is_available():
        raise UsageError("--gpu was given but no CUDA device is available; leave out --gpu to train on the CPU.")
    if args.gpu and args.world_size > torch.cuda.device_count():
        raise UsageError(f"--world_size {args.world_size} needs {args.world_size} GPUs but "
                         f"{torch.cuda.device_count()} are visible; use --world_size {torch.cuda.device_count()}.")
    save_dir = Path(args.save_dir)
    if (save_dir / "last.pt").exists() and not (args.resume or args.overwrite):
        raise UsageError(f"{save_dir} already holds a training run. Pass --resume to continue it, --overwrite to "
                         "start afresh, or another --save_dir.")
    if args.mlflow:
        log_experiment.check_settings(args.tracking_uri, args.dagshub)


def new_rule(args: argparse.Namespace) -> data_loader.SplitRule:
    """How a folder first trained on is split: --val_split, --seed, --split_by, and with --max_per_class its
    validation images capped too (data_loader.VAL_PER_CLASS)."""
    capped = args.max_per_class > 0
    return data_loader.SplitRule(args.val_split, args.seed, args.split_by, args.max_per_class if capped else None,
                                 data_loader.VAL_PER_CLASS if capped else None)


def prepare(args: argparse.Namespace) -> dict:
    """Checks and work done once before any worker starts: the data scan, the model to start from, the weights'
    download and the hands."""
    _check_environment(args)
    init = _load_init(args) if args.init_from else None
    roots = training_roots(args)
    rules = [new_rule(args)] * len(roots)
    if init:
        roots, rules = _fine_tuning_folders(args, init["metadata"], roots)
    images = data_loader.scan_folders(roots, init["metadata"]["classes"] if init else ())
    if init:
        args.arch, args.img_size = init["metadata"]["arch"], init["metadata"]["transform"]["crop_size"]
        args.hands = hand_mode(init["metadata"])
        transform = init["metadata"]["transform"]
    else:
        transform = models.preprocessing(args.arch, args.weights, args.img_size)
        models.build_model(args.arch, len(images.classes), args.weights)  # fails early; caches downloads
    prepared = {"images": images, "rules": rules, "transform": transform, "init": init}
    train_idx, val_idx, _ = data_loader.split_folders(images, rules)
    used = [images.samples[i] for i in sorted(train_idx + val_idx)]
    found = _find_hands(args, used, len(images.classes)) if args.hands != "none" else None
    prepared["hands"] = found
    prepared["calibration"] = _calibration_set(args, images) if args.calibrate else None
    # a crop model's image network reads the square around each hand, in training as in serving
    prepared["load"] = (_crop_loader(args, images, train_idx, found) if found and args.hands == "crop"
                        else image_io.load_rgb)
    if args.cache == "disk":
        make_splits(args, prepared)  # decode once here, before any worker starts; every rank then opens the same files
    return prepared


def training_roots(args: argparse.Namespace) -> list[Path]:
    """The folders to train on: --data's (data_sources.resolve, downloaded where missing), then --xtrain_path's; the
    Kaggle dataset where neither is given."""
    roots = data_sources.resolve(args.data, args.data_dir) if args.data else []
    roots += [data_loader.training_folder(path) for path in args.xtrain_path or ()]
    return roots or [data_loader.download_dataset()]


def _calibration_set(args: argparse.Namespace, images: data_loader.ImageList) -> dict | None:
    """The --calibration_path images, labelled with the training classes, and the hand found in each (None
    without --calibration_path)."""
    if not args.calibration_path:
        return None
    roots = [data_loader.training_folder(path) for path in args.calibration_path]
    shared = sorted(str(root) for root in roots if root.resolve() in {Path(r).resolve() for r in images.roots})
    if shared:
        raise UsageError(f"--calibration_path {', '.join(shared)} is also a training folder: calibrate on people the "
                         "model does not train on, so name each folder in one of the two options.")
    calibration_images = data_loader.scan_folders(roots, images.classes)
    unknown = calibration_images.classes[len(images.classes):]
    if unknown:
        raise UsageError(f"--calibration_path holds class(es) the training folders lack: {', '.join(unknown)}. "
                         "Remove those folders, or add training images of them.")
    found = None
    if args.hands != "none":
        with hands.HandFinder(args.hand_model) as finder:
            found = hands.find_hands([path for path, _ in calibration_images.samples], finder, image_io.load_rgb,
                                     workers=max(1, args.num_workers))
    log.info("Calibrating on %d images of %s (not trained on)", len(calibration_images.samples),
             ", ".join(folder_names(calibration_images.roots)))
    return {"images": calibration_images, "found": found}


def _crop_loader(args: argparse.Namespace, images: data_loader.ImageList, train_idx: list[int],
                 found: dict[str, hands.Hand]) -> hands.CropLoader:
    """A crop model's image loader: the square around each hand, but a share (--whole_share) of the training
    images, drawn once by the seed, whole. Served, the image network reads the whole frame wherever no hand is
    found; trained on squares alone it saw whole frames only of `nothing` and of the few signs MediaPipe misses."""
    rng = random.Random(args.seed)
    whole = {images.samples[i][0] for i in sorted(train_idx) if rng.random() < args.whole_share}
    return hands.CropLoader.of(found, [None if path in whole else hand for path, hand in found.items()])


def hand_mode(meta: dict) -> str:
    """How a trained model uses the hand (--hands), from its metadata."""
    settings = meta.get("hands")
    return "none" if not settings else "crop" if settings.get("crop") else "fused"


def _load_init(args: argparse.Namespace) -> dict:
    """The model to fine-tune (--init_from): its checkpoint, checked by the loader the app uses."""
    if str(args.init_from).startswith(predict.MLFLOW_URI_SCHEMES):
        raise UsageError(f"--init_from {args.init_from}: a logged MLflow model cannot be trained further here; "
                         "fine-tune its training folder (--save_dir of pt_train.py) or its best.pt instead.")
    path = predict.checkpoint_path(args.init_from)
    ckpt = predict.read_checkpoint(path)
    try:
        predict.model_from_checkpoint(ckpt), predict.hand_net_from_checkpoint(ckpt)
    except predict.ModelLoadError as err:
        raise UsageError(f"--init_from '{path}' cannot be loaded: {err}.") from None
    log.info("Fine-tuning %s (%s, %d classes)", path, ckpt["metadata"]["arch"], ckpt["metadata"]["num_classes"])
    return {"path": str(path), "model": ckpt["model"], "hand_net": ckpt.get("hand_net"),
            "metadata": ckpt["metadata"]}


def _fine_tuning_folders(args: argparse.Namespace, meta: dict, roots: list[Path]
                         ) -> tuple[list[Path], list[data_loader.SplitRule]]:
    """The folders to fine-tune on and the rule that splits each. A folder the model trained on keeps the
    model's own split, so the images it held out stay unseen and still measure it; with --replay, the model's
    folders missing from --xtrain_path are added as a sample of their training side (data_loader.SplitRule)."""
    recorded = data_loader.recorded_folders(meta)
    own = {Path(root).resolve(): rule for root, rule in recorded}
    rules = [own.get(root.resolve(), new_rule(args)) for root in roots]
    named = {root.resolve() for root in roots}
    roots = list(roots)
    for root, rule in recorded:
        if not args.replay or Path(root).resolve() in named:
            continue
        if not Path(root).is_dir():
            raise UsageError(f"--replay {args.replay} mixes in images of the data the model was trained on, but its "
                             f"folder '{root}' is not on this machine. Add a copy of it to --xtrain_path, or pass "
                             "--replay 0 to fine-tune without it (the model may then forget the classes your "
                             "folders lack).")
        roots.append(Path(root))
        rules.append(dataclasses.replace(rule, per_class=args.replay, val_per_class=data_loader.VAL_PER_CLASS))
        log.info("Replaying %d training images per class of %s", args.replay, root)
    return roots, rules


def _find_hands(args: argparse.Namespace, samples: list[data_loader.Sample], num_classes: int
                ) -> dict[str, hands.Hand] | None:
    """The hand in every image of `samples` (cached per file), keyed by path; None when too few are found to
    train the landmark network, after a warning saying the model will read the image alone."""
    paths = [path for path, _ in samples]
    with hands.HandFinder(args.hand_model) as finder:
        found = hands.find_hands(paths, finder, image_io.load_rgb, workers=max(1, args.num_workers))
    labels_with_hands = {label for (_, label), hand in zip(samples, found) if hand is not None}
    log.info("MediaPipe found a hand in %d of %d images (%d of %d classes)", sum(h is not None for h in found),
             len(found), len(labels_with_hands), num_classes)
    if len(labels_with_hands) < 2:
        log.warning("Too few hands to learn from: the model will read the image alone (as with --hands none).")
        return None
    return {path: hand for path, hand in zip(paths, found) if hand is not None}


def make_splits(args: argparse.Namespace, prepared: dict) -> data_loader.Splits:
    """The train/validation split, read from the decoded-image cache with --cache disk."""
    transform = prepared["transform"]
    splits = data_loader.build_splits(prepared["images"], transform, augment=args.augment, hflip=args.hflip,
                                      rules=prepared["rules"], load=prepared["load"])
    if args.cache == "disk":
        splits = image_cache.cached_splits(splits, transform, augment=args.augment, cache_dir=args.cache_dir,
                                           num_workers=args.num_workers, hflip=args.hflip, load=prepared["load"])
    return splits


def _num_threads(args: argparse.Namespace, world_size: int) -> int | None:
    """--num_threads, else for CPU processes spawned here an equal share of the cores: N processes with a thread
    per core each oversubscribe the CPU. None keeps torch's default (torchrun sets OMP_NUM_THREADS itself)."""
    if args.num_threads or args.gpu or world_size == 1 or launched_by_torchrun():
        return args.num_threads
    return max(1, (os.cpu_count() or 1) // world_size)


def _metadata(args: argparse.Namespace, prepared: dict, splits: data_loader.Splits) -> dict:
    images = prepared["images"]
    folders = [{"root": root, "rule": dataclasses.asdict(dataclasses.replace(rule, split_by=split_by))}
               for root, rule, split_by in zip(images.roots, prepared["rules"], splits.folder_split_by)]
    return {"arch": args.arch, "num_classes": len(images.classes), "classes": images.classes,
            "transform": prepared["transform"], "folders": folders, "split_by": splits.split_by,
            "init_from": prepared["init"]["path"] if prepared["init"] else None, "args": vars(args)}


def _write_run_files(save_dir: Path, meta: dict, splits: data_loader.Splits) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    run_artifacts.save_json(meta["classes"], save_dir / "classes.json")
    run_artifacts.save_json(meta["transform"], save_dir / "transform.json")
    run_artifacts.save_json(meta, save_dir / "config.json")
    folders = [{"root": root, "split_by": split_by, "num_train": splits.train_folders.count(k),
                "val": [str(Path(path).relative_to(root))
                        for (path, _), folder in zip(splits.val_samples, splits.val_folders) if folder == k]}
               for k, (root, split_by) in enumerate(zip(splits.roots, splits.folder_split_by))]
    run_artifacts.save_json({"split_by": splits.split_by, "num_train": len(splits.train_samples),
                             "folders": folders}, save_dir / "split.json")


def folder_names(roots: list[str]) -> list[str]:
    """A short, distinct name for each training folder (its own name, numbered where two are alike), for the
    per-folder validation figures (`val_acc/NAME`)."""
    names = [Path(root).name for root in roots]
    return [f"{name}-{k + 1}" if names.count(name) > 1 else name for k, name in enumerate(names)]


def _scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer):
    if args.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.total_epochs // 3), gamma=0.1)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.total_epochs)
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=1)
    return None


def train_worker(rank: int, world_size: int, args: argparse.Namespace, prepared: dict,
                 callbacks: list | None = None) -> list[dict]:
    """Train on this process. Under DDP the process group is already initialised (see `run_ddp_worker`)."""
    set_seed(args.seed)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    gpu_id = local_rank if args.gpu else None
    if gpu_id is not None:
        torch.cuda.set_device(gpu_id)
        torch.backends.cudnn.benchmark = True  # fixed input shapes (full batches): pick the fastest kernels once
    if threads := _num_threads(args, world_size):
        torch.set_num_threads(threads)
    images: data_loader.ImageList = prepared["images"]
    splits = make_splits(args, prepared)
    meta = _metadata(args, prepared, splits)
    save_dir = Path(args.save_dir)
    if rank == 0:
        _write_run_files(save_dir, meta, splits)
        log.info("%d classes; %d training and %d validation images (%s split) from %d folder(s); %d file(s) "
                 "skipped", len(images.classes), len(splits.train_samples), len(splits.val_samples),
                 splits.split_by, len(splits.roots), len(images.skipped))
    loader_args = dict(rank=rank, world_size=world_size, num_workers=args.num_workers, seed=args.seed,
                       pin_memory=args.gpu)
    if args.gpu_augment:
        train_loader = gpu_pipeline.DeviceLoader.from_cache(
            splits.train, prepared["transform"], args.batch_size, augment=args.augment, hflip=args.hflip,
            device=torch.device("cuda", gpu_id) if args.gpu else torch.device("cpu"), rank=rank,
            world_size=world_size, seed=args.seed)
    else:
        train_loader = data_loader.make_loader(splits.train, args.batch_size, train=True, **loader_args)
    val_loader = _val_loaders(splits, splits.val, splits.val_folders, args.batch_size, loader_args)
    init = prepared["init"]
    net = models.build_model(args.arch, len(images.classes), "none" if init else args.weights)
    if init:
        models.carry_over(net, init["model"], init["metadata"]["classes"], images.classes)
    models.freeze_stages(net, args.frozen_stages)
    if args.freeze_backbone:
        models.set_backbone_trainable(net, False)
    params = [p for p in net.parameters() if p.requires_grad]
    # the fused kernel updates all parameters in one launch instead of several per tensor
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, fused=args.gpu)
    # one MLflow run per training, rank 0's; made here in the worker, as mp.spawn passes only picklable args
    tracker = (log_experiment.TrainingTracker(args, images.roots, len(images.samples), len(images.classes))
               if args.mlflow and rank == 0 else None)
    callbacks = [*(callbacks or []), *([tracker.log_epoch] if tracker else [])]
    trainer = pt_engine.CustomTrainer(
        net, train_loader, val_loader, nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), optimizer,
        gpu_id, save_dir, args.patience, args.total_epochs, world_size, _scheduler(args, optimizer),
        num_classes=len(images.classes), metadata=meta, amp=args.amp, callbacks=callbacks,
        channels_last=args.channels_last, compile_model=args.compile)
    if args.resume and (save_dir / "last.pt").exists():
        trainer.resume(save_dir / "last.pt")
    elif args.resume and rank == 0:
        log.info("No checkpoint in %s yet: starting from epoch 1", save_dir)
    with tracker or contextlib.nullcontext():  # leaving it logs the results and the (calibrated) best model
        history = trainer.train()
        hand_net = (train_hand_net(args, rank, world_size, gpu_id, prepared, splits)
                    if prepared["hands"] else None)
        if rank == 0 and (save_dir / "best.pt").exists():
            _finish_best(save_dir, trainer.raw_model, hand_net, splits, prepared, args)
            model_card.save_card(save_dir, model_card.count_folders(splits, folder_names(splits.roots)))
    return history


def _val_loaders(splits: data_loader.Splits, val: Dataset, folders: list[int], batch_size: int, loader_args: dict
                 ) -> DataLoader | dict[str, DataLoader]:
    """The validation loader; with several training folders one per folder, named, so that each folder gets its
    own figures (pt_engine.CustomTrainer)."""
    if len(splits.roots) == 1:
        return data_loader.make_loader(val, batch_size, train=False, **loader_args)
    return {name: data_loader.make_loader(data_loader.subset(val, [i for i, f in enumerate(folders) if f == k]),
                                          batch_size, train=False, **loader_args)
            for k, name in enumerate(folder_names(splits.roots)) if k in folders}


def hand_set(samples: list[data_loader.Sample], found: dict[str, hands.Hand], augment: bool
              ) -> tuple[data_loader.HandDataset, list[str]]:
    """The hands of these samples (those where one was found) and their files, in order."""
    kept = [(path, label) for path, label in samples if path in found]
    return data_loader.HandDataset([found[p] for p, _ in kept], [label for _, label in kept], augment), \
        [p for p, _ in kept]


def _start_hand_net(init: dict | None, classes: list[str]) -> nn.Module:
    """A new landmark network, started from the `--init_from` model's where it has one that reads the same
    features (one trained before the viewpoint features were added reads fewer: this one then starts afresh)."""
    net = models.LandmarkNet(len(classes), hands.N_FEATURES, HAND_HIDDEN)
    if not init or init["hand_net"] is None:
        return net
    width = predict.hand_features(init["metadata"])
    if width != hands.N_FEATURES:
        log.info("The landmark network starts afresh: the model fine-tuned from reads %d hand features, this "
                 "version %d", width, hands.N_FEATURES)
        return net
    models.carry_over(net, init["hand_net"], init["metadata"]["classes"], classes)
    return net


def train_hand_net(args: argparse.Namespace, rank: int, world_size: int, gpu_id: int | None, prepared: dict,
                    splits: data_loader.Splits) -> nn.Module | None:
    """Train the landmark network on the hands of the training split, validated on the held-out split's hands;
    checkpoints in SAVE_DIR/hand_net, so --resume continues this phase too."""
    found, classes, init = prepared["hands"], prepared["images"].classes, prepared["init"]
    (train_set, _), (val_set, val_paths) = (hand_set(splits.train_samples, found, True),
                                            hand_set(splits.val_samples, found, False))
    if not len(train_set) or not len(val_set):
        log.warning("No hand found in the %s images: the model reads the image alone.",
                    "training" if not len(train_set) else "validation")
        return None
    if rank == 0:
        log.info("Landmark network: %d training and %d validation hands", len(train_set), len(val_set))
    loader_args = dict(rank=rank, world_size=world_size, num_workers=0, seed=args.seed)
    net = _start_hand_net(init, classes)
    optimizer = torch.optim.AdamW(net.parameters(), lr=HAND_LEARNING_RATE, weight_decay=args.weight_decay)
    save_dir = Path(args.save_dir) / "hand_net"
    folder_of = dict(zip((path for path, _ in splits.val_samples), splits.val_folders))
    val_loader = _val_loaders(splits, val_set, [folder_of[path] for path in val_paths], 4 * HAND_BATCH_SIZE,
                              loader_args)
    trainer = pt_engine.CustomTrainer(
        net, data_loader.make_loader(train_set, HAND_BATCH_SIZE, train=True, **loader_args), val_loader,
        nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), optimizer, gpu_id, save_dir, args.hand_epochs,
        args.hand_epochs, world_size, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.hand_epochs),
        num_classes=len(classes), metadata={"hidden": HAND_HIDDEN}, progress=False)
    if args.resume and (save_dir / "last.pt").exists():
        trainer.resume(save_dir / "last.pt")
    trainer.train()
    best = run_artifacts.load_checkpoint(save_dir / "best.pt")
    trainer.raw_model.load_state_dict(best["model"])
    return trainer.raw_model


def _finish_best(save_dir: Path, net: nn.Module, hand_net: nn.Module | None, splits: data_loader.Splits,
                 prepared: dict, args: argparse.Namespace) -> None:
    """best.pt as served: the image network's best weights, with the landmark network beside them for a
    hand-aware model, each with its softmax temperature (with --calibrate) fitted on --calibration_path, people
    the model did not train on, where given (with the app's threshold), else on the validation split."""
    ckpt = run_artifacts.load_checkpoint(save_dir / "best.pt")
    net.load_state_dict(ckpt["model"])
    meta, found = ckpt["metadata"], prepared["hands"]
    if hand_net is not None:
        meta["hands"] = {"hidden": HAND_HIDDEN, "features": hands.N_FEATURES, "min_confidence": hands.MIN_CONFIDENCE,
                         "temperature": 1.0,
                         "found_share_train": len(found) / (len(splits.train_samples) + len(splits.val_samples)),
                         "crop": hands.CROP_MARGIN if args.hands == "crop" else None}
        ckpt["hand_net"] = {k: v.cpu() for k, v in hand_net.state_dict().items()}
    if args.calibrate:
        people = prepared["calibration"]
        samples, hands_found, blocks, where = (
            (people["images"].samples, people["found"], data_loader.block_ids(people["images"].samples),
             f"images of people it did not train on ({', '.join(folder_names(people['images'].roots))})") if people else
            (splits.val_samples, [found.get(path) for path, _ in splits.val_samples] if found else None,
             splits.val_blocks, "validation images"))
        # the images as served: a crop model reads the square around each hand found
        load = (hands.CropLoader.of([path for path, _ in samples], hands_found, hands.CROP_MARGIN)
                if args.hands == "crop" and hands_found else image_io.load_rgb)
        loader = data_loader.make_loader(data_loader.ImageDataset(samples, data_loader.eval_transform(meta["transform"]),
                                                                  load), args.batch_size, train=False,
                                         num_workers=args.num_workers)
        logits, targets = calibration.collect_logits(net, loader, next(net.parameters()).device)
        result = _calibrated(calibration.calibrate_logits(logits, targets, blocks), "image network", where)
        meta["temperature"] = result["temperature"]
        run_artifacts.save_json(result, save_dir / "calibration.json")
        if hand_net is not None:
            rows = [i for i, hand in enumerate(hands_found) if hand is not None]
            hand_logits, hand_targets = calibration.collect_logits(hand_net, data_loader.make_loader(
                data_loader.HandDataset([hands_found[i] for i in rows], [samples[i][1] for i in rows], False),
                4 * HAND_BATCH_SIZE, train=False))
            result = _calibrated(calibration.calibrate_logits(hand_logits, hand_targets, [blocks[i] for i in rows]),
                                 "landmark network", where)
            meta["hands"]["temperature"] = result["temperature"]
            run_artifacts.save_json(result, save_dir / "hand_net" / "calibration.json")
        meta["calibrated_on"] = people["images"].roots if people else "validation split"
        if people:
            meta["threshold"] = _fit_threshold(net, hand_net, meta, logits, targets, hands_found, save_dir)
    if args.threshold is not None and "threshold" not in meta:
        meta["threshold"] = args.threshold
        run_artifacts.save_json({"threshold": args.threshold, "given": True}, save_dir / "threshold.json")
    run_artifacts.save_checkpoint(ckpt, save_dir / "best.pt")


def _fit_threshold(net: nn.Module, hand_net: nn.Module | None, meta: dict, logits: torch.Tensor,
                   targets: torch.Tensor, found: list[hands.Hand | None] | None, save_dir: Path) -> float:
    """The app's default threshold for this model: the lowest step of its slider at which the answers the app
    would give the calibration people (`predict.decide`, the networks pooled as served) are right
    ANSWER_PRECISION of the time; DEFAULT_THRESHOLD, with a warning, where no step reaches that."""
    predictor = predict.Predictor(net, meta["classes"], meta["transform"], metadata=meta, hand_net=hand_net)
    probs, agreed = predictor.combine(torch.softmax(logits / meta["temperature"], dim=1),
                                      found or [None] * len(targets))
    hand_found = [hand is not None for hand in found] if found else None
    steps = [predict.trust(meta["classes"], probs, targets.tolist(), hand_found, agreed, at)
             for at in predict.THRESHOLD_STEPS]
    threshold = predict.fit_threshold(steps)
    chosen = predict.DEFAULT_THRESHOLD if threshold is None else threshold
    row = next(step for step in steps if step["threshold"] == chosen)
    if threshold is None:
        log.warning("No threshold makes the app's answers right %.0f%% of the time on the calibration people; the "
                    "app keeps its default, %.2f.", 100 * predict.ANSWER_PRECISION, chosen)
    log.info("The app's threshold: %.2f (on the calibration people it answers %.1f%% of the images, right on %s of "
             "its answers)", chosen, 100 * row["coverage"],
             "none" if row["accuracy_when_answered"] is None else f"{row['accuracy_when_answered']:.1%}")
    run_artifacts.save_json({"threshold": chosen, "precision_wanted": predict.ANSWER_PRECISION, "reached":
                             threshold is not None, "by_threshold": steps}, save_dir / "threshold.json")
    return chosen


def _calibrated(result: dict, what: str, where: str) -> dict:
    """`result` (calibration.calibrate's), logged, with the images it was fitted `on`. Cross-fitting keeps each
    run of near-duplicate frames in one fold."""
    log.info("Calibration of the %s on %d %s: ECE %.4f, %.4f with a fitted temperature (cross-fitted); "
             "temperature %.3f %s", what, result["n_images"], where, result["ece_before"],
             result["ece_after_cross_fitted"], result["temperature"],
             "applied" if result["applied"] else "not applied (no gain)")
    return {**result, "on": where}


def _configure_logging(rank: int) -> None:
    # only rank 0 talks; other ranks report errors only, so N processes print one log
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)


def run_ddp_worker(rank: int, world_size: int, args: argparse.Namespace, prepared: dict) -> None:
    """Entry point of each spawned process: join the group, train, always leave the group."""
    _configure_logging(rank)
    terminal.configure()  # a spawned process starts with Python's warning filters; ASL_VERBOSE it inherits
    backend = "nccl" if args.gpu else "gloo"
    if args.gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    store = _restart_store(rank, world_size) if launched_by_torchrun() else None
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=store)
    try:
        train_worker(rank, world_size, args, prepared)
    finally:
        dist.destroy_process_group()


def _restart_store(rank: int, world_size: int) -> dist.Store:
    """torchrun's store, seen through a prefix naming this restart.

    torchrun's agent hosts one TCPStore for the whole job and restarted workers join that same store, but
    torch's env:// rendezvous prefixes nothing per restart: the new group would read the dead workers' gloo and
    NCCL addresses and barrier counts left from the last attempt (connection refused in connectFullMesh, or a
    hang). Each restart gets keys of its own instead.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size))
    return dist.PrefixStore(f"restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    terminal.configure(args.verbose)
    torchrun = launched_by_torchrun()
    rank = int(os.environ["RANK"]) if torchrun else 0
    _configure_logging(rank)
    try:
        prepared = prepare(args)
        if torchrun:
            run_ddp_worker(rank, int(os.environ["WORLD_SIZE"]), args, prepared)
        elif args.world_size > 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(find_free_port())
            mp.spawn(run_ddp_worker, args=(args.world_size, args, prepared), nprocs=args.world_size, join=True)
        else:
            train_worker(0, 1, args, prepared)
    except UsageError as err:
        log.error("%s", err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("Interrupted. Continue later with the same command plus --resume.")
        return 130
    if rank == 0:
        log.info("Done. Model and history in %s", args.save_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
