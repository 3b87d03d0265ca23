"""Evaluate a trained model and write a report a person can read on one page.

    python evaluate.py --model_dir runs/latest                                # the validation split training held out
    python evaluate.py --model_dir runs/latest --test_dir ../shared/asl/test  # flat A_test.jpg files
    python evaluate.py --model_dir runs/latest --test_data test --data_dir ../shared/asl   # the same, by name
    python evaluate.py --checkpoint runs/latest/best.pt --test_dir DIR --out_dir reports/external

Without --test_dir the validation split is recomputed exactly as training made it (data folder, val_split, seed
and split method from config.json) and checked against the file list training saved in split.json. A test
folder holds one sub-folder per class, or flat files named <CLASS>_<anything>.jpg (the Kaggle test layout);
it may hold a subset of the model's classes. Predictions always take the argmax over all the model's classes.

Writes into --out_dir: report.md (everything on one page), metrics.json, classification_report.txt/.json,
predictions.csv and the figures confusion_matrix.png, confusion_matrix_normalized.png, pr_curves.png,
roc_curves.png, training_curves.png, trust_by_threshold.png (what the app's confidence threshold buys: the
share it answers and how often it is right), misclassified.png and samples.png. A training folder's model (the
folder, or its best.pt) also gets the headline figures in its MODEL_CARD.md, a section per data set (model_card.py).
Exit code 2 means a problem with the input, explained in one line.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import random
import shlex
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image, ImageOps
from sklearn.metrics import (ConfusionMatrixDisplay, accuracy_score, average_precision_score,
                             classification_report, confusion_matrix, precision_recall_curve, roc_auc_score,
                             roc_curve, top_k_accuracy_score)
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T
from tqdm import tqdm

import calibration
import data_loader
import data_sources
import hands
import image_io
import model_card
import predict
import run_artifacts
import terminal
from data_loader import DatasetError, Sample
from errors import UsageError

log = logging.getLogger("evaluate")

EXIT_USAGE = 2
TOP_K = 3
N_CONFUSED_PAIRS = 10
N_WORST = 16
# the letters the report names as still read wrong: recall below this, each with what it is read as instead
WEAK_RECALL = 0.7
DPI = 110


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_dir", help="training output folder (--save_dir of pt_train.py)")
    source.add_argument("--checkpoint", help="a .pt checkpoint written by pt_train.py")
    test = p.add_mutually_exclusive_group()
    test.add_argument("--test_dir", help="class sub-folders or flat <CLASS>_*.jpg files; default: the validation "
                                         "split that training held out")
    test.add_argument("--test_data", metavar="NAME",
                      help="a data folder by name instead (data_sources.py list: test, omega, ...), downloaded where "
                           "--data_dir lacks it")
    p.add_argument("--data_dir", metavar="DIR", help="where --test_data's folder is, or goes (see data_sources.py)")
    p.add_argument("--out_dir", default="reports/latest", help="where the report goes")
    p.add_argument("--max_per_class", type=int, help="score at most N images per class (a seeded sample)")
    p.add_argument("--known_classes_only", action="store_true",
                   help="score only the test folder's classes the model knows, and name the others in the notes "
                        "(e.g. a letters-only model on a folder that also holds del, nothing and space)")
    p.add_argument("--samples", type=int, default=12, help="random images shown with predictions in samples.png")
    p.add_argument("--seed", type=int, default=0, help="seed of --max_per_class and --samples")
    p.add_argument("--threshold", type=float, default=None,
                   help="the app's confidence threshold, for the share of images it would answer and how often "
                        "rightly (the 'trust' figures); default: the model's own (see pt_train.py "
                        "--calibration_path), else the app's default")
    p.add_argument("--mirror", action="store_true",
                   help="mirror every image left-right before scoring: how the model reads signers of the other "
                        "hand (or a mirrored camera)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--gpu", action="store_true", help="predict on the CUDA GPU")
    p.add_argument("--mlflow_run", metavar="RUN_ID", help="log the report and metrics to this MLflow run")
    terminal.add_verbose_arg(p)
    args = p.parse_args(argv)
    if args.data_dir and not args.test_data:
        p.error("--data_dir says where --test_data's folder is: name it with --test_data (e.g. --test_data test).")
    return args


# ------------------------------------------------------------------------------------------- what to score

@dataclass
class EvalSet:
    """The images to score, labelled with indices into the model's classes."""
    description: str
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _model_labels(pairs: list[tuple[str, str]], classes: list[str], where: str) -> list[Sample]:
    """(path, class name) -> (path, model class index); a class the model does not know is an error."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for _, name in pairs} - index.keys())
    if unknown:
        raise DatasetError(f"{where} has class(es) the model does not know: {', '.join(unknown)}. The model knows "
                           f"{', '.join(classes)}; remove or rename the others.")
    return [(path, index[name]) for path, name in pairs]


def _named(images: data_loader.ImageList) -> list[tuple[str, str]]:
    return [(path, images.classes[label]) for path, label in images.samples]


def load_test_folder(test_dir: str | os.PathLike, classes: list[str], known_only: bool = False) -> EvalSet:
    """The images of a test folder: one sub-folder per class, or flat files labelled by name (`A_test.jpg`); with
    `known_only`, those of the classes the model knows (the others named in a note)."""
    root = Path(test_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"--test_dir '{root}' does not exist or is not a folder.")
    has_class_folders = any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir())
    images = (data_loader.scan_image_folder(root, min_classes=1) if has_class_folders
              else data_loader.scan_flat_folder(root))
    layout = "class sub-folders" if has_class_folders else "flat files, label from the name"
    named, notes = _named(images), []
    unknown = sorted({name for _, name in named} - set(classes))
    if known_only and unknown:
        named = [(path, name) for path, name in named if name in classes]
        notes.append(f"Classes the model does not know were left out (--known_classes_only): {', '.join(unknown)}.")
    return EvalSet(f"test folder `{root}` ({layout})", _model_labels(named, classes, f"'{root}'"),
                   list(images.skipped), notes)


def _run_file(run_dir: Path | None, name: str):
    """A JSON file that pt_train.py wrote next to the checkpoint, or None."""
    if run_dir is None or not (run_dir / name).is_file():
        return None
    try:
        return run_artifacts.load_json(run_dir / name)
    except ValueError:
        raise DatasetError(f"{run_dir / name} is not valid JSON; restore it from the training run.") from None


def load_validation_split(predictor: predict.Predictor, run_dir: Path | None) -> EvalSet:
    """The validation split recomputed as training made it (each training folder by its own rule), checked
    against training's own list (split.json).

    If the two differ, a data folder changed since training, and the recomputed split may hold images that
    training saw: then the files of split.json that still exist are scored instead.
    """
    config = _run_file(run_dir, "config.json") or predictor.metadata
    try:
        folders = data_loader.recorded_folders(config)
    except KeyError as err:
        raise DatasetError(f"The model's config.json has no {err}, so its validation split cannot be recomputed; "
                           "pass --test_dir.") from None
    roots = [Path(root) for root, _ in folders]
    for root in roots:
        if not root.is_dir():
            raise DatasetError(f"The training data folder '{root}' (from the model's config.json) is not on this "
                               "machine, so its validation split cannot be recomputed; pass --test_dir.")
    images = data_loader.scan_folders(roots, predictor.classes)
    _, val_idx, _ = data_loader.split_folders(images, [rule for _, rule in folders])
    recomputed = [(images.samples[i][0], images.classes[images.samples[i][1]]) for i in val_idx]
    relative = [(images.folders[i], str(Path(images.samples[i][0]).relative_to(roots[images.folders[i]])))
                for i in val_idx]
    description = "validation split of " + ", ".join(
        f"`{root}` ({rule.split_by} split, val_split {rule.val_split}, seed {rule.seed}"
        f"{f', at most {rule.per_class} per class trained on' if rule.per_class is not None else ''}"
        f"{f', {rule.val_per_class} per class held out' if rule.val_per_class is not None else ''})"
        for root, rule in folders)
    saved_split = _run_file(run_dir, "split.json")
    where = "The training data folder(s)"
    # by folder number and relative path: the folders may have moved since training, as long as config.json says where
    saved = ([(k, r) for k, (_, val) in enumerate(data_loader.recorded_val(saved_split, config)[:len(roots)])
              for r in val] if saved_split is not None else None)
    if saved is None or saved == relative:
        note = ("No split.json next to the model: the recomputed validation split could not be checked against "
                "the one training used." if saved is None else
                f"The recomputed validation split equals the {len(relative)} files training held out (split.json).")
        return EvalSet(description, _model_labels(recomputed, predictor.classes, where), list(images.skipped), [note])
    gone = [str(roots[k] / r) for k, r in saved if not (roots[k] / r).is_file()]
    new = set(relative) - set(saved)
    by_key = {data_loader.class_key(name): name for name in predictor.classes}
    kept = [(str(roots[k] / r), by_key.get(data_loader.class_key(Path(r).parts[0]), Path(r).parts[0]))
            for k, r in saved if (roots[k] / r).is_file()]
    note = (f"The validation split recomputed from the training folders differs from the one training used "
            f"(split.json): {len(gone)} of its files are gone and {len(new)} files are new to it, so a folder "
            f"changed since training. Scoring the {len(kept)} files of split.json that still exist, none of which "
            "training saw.")
    return EvalSet(description + ", files from split.json", _model_labels(kept, predictor.classes, where), gone,
                   [note])


def subsample(samples: list[Sample], per_class: int, seed: int) -> list[Sample]:
    """At most `per_class` images of each class, drawn with a seeded generator (repeatable)."""
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample[1]].append(sample)
    return [s for label in sorted(by_class)
            for s in sorted(rng.sample(by_class[label], min(per_class, len(by_class[label]))))]


# ------------------------------------------------------------------------------------------- predicting

class _ImageFiles(Dataset):
    """Preprocessed images, opened with `load`; one that fails to decode comes back as None, to be skipped
    (never replaced)."""

    def __init__(self, paths: list[str], transform, load: Callable[[str], Image.Image] = image_io.load_rgb):
        self.paths, self.transform, self.load = paths, transform, load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        try:
            return self.transform(self.load(self.paths[i])), i
        except image_io.ImageError as err:
            log.warning("Skipping unreadable image: %s", err)
            return None, i


def _collate(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor | None, list[int], list[int]]:
    decoded = [(x, i) for x, i in batch if x is not None]
    images = torch.stack([x for x, _ in decoded]) if decoded else None
    return images, [i for _, i in decoded], [i for x, i in batch if x is None]


def predict_samples(predictor: predict.Predictor, samples: list[Sample], batch_size: int = 64,
                    num_workers: int = 0, mirror: bool = False, found: list[hands.Hand | None] | None = None
                    ) -> tuple[np.ndarray, list[Sample], list[str]]:
    """The image network's class probabilities for every decodable image (mirrored left-right first with
    `mirror`; a crop model reads the square around each image's hand, `found` as stored, searched here when not
    given), the samples they belong to, and the paths that failed."""
    paths = [p for p, _ in samples]
    transform = T.Compose([ImageOps.mirror, predictor.transform]) if mirror else predictor.transform
    if found is None and predictor.crop_margin:
        found = find_hands(predictor, samples)
    load = predictor.file_loader(paths, found or [None] * len(paths))
    loader = DataLoader(_ImageFiles(paths, transform, load), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    probs, kept, failed = [], [], []
    for images, ok, bad in tqdm(loader, desc="predicting", leave=False, dynamic_ncols=True):
        if images is not None:
            probs.append(predictor.predict_batch(images).numpy())
        kept += [samples[i] for i in ok]
        failed += [samples[i][0] for i in bad]
    if not kept:
        raise DatasetError(f"None of the {len(samples)} images could be decoded.")
    return np.concatenate(probs), kept, failed


def find_hands(predictor: predict.Predictor, samples: list[Sample], workers: int = 1
               ) -> list[hands.Hand | None] | None:
    """The hand in each image (cached per file; None where none is found or the file cannot be read), or None
    for a model that does not look for hands; a long search runs in `workers` processes."""
    if not predictor.uses_hands:
        return None
    return hands.find_hands([path for path, _ in samples], predictor.finder, image_io.load_rgb, workers=workers)


def hand_and_trust_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                           found: list[hands.Hand | None] | None, threshold: float,
                           agreed: list[bool | None] | None = None) -> dict:
    """How often a hand was found and accuracy with and without one, and where the model's two networks agree
    (`agreed`, from Predictor.combine); and trust: the share of images the app would answer at `threshold`
    (coverage), how often those answers are right, and the calibration error."""
    correct = probs.argmax(axis=1) == y_true

    def share(mask: np.ndarray) -> float | None:
        return float(correct[mask].mean()) if mask.any() else None

    metrics = {}
    if found is not None:
        has = np.array([hand is not None for hand in found])
        metrics["hands"] = {"found_share": float(has.mean()), "n_with_hand": int(has.sum()),
                            "n_without_hand": int((~has).sum()), "accuracy_with_hand": share(has),
                            "accuracy_without_hand": share(~has)}
        if agreed is not None:
            same = np.array([a is True for a in agreed])
            metrics["hands"].update(agreed_share=float(same.sum() / max(1, has.sum())),
                                    accuracy_agreed=share(same), accuracy_disagreed=share(has & ~same))
    rows = torch.from_numpy(probs)
    hand_found = None if found is None else [hand is not None for hand in found]

    def trust(at: float) -> dict:
        return predict.trust(classes, rows, y_true.tolist(), hand_found, agreed, at)

    logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, None)))
    metrics["trust"] = {**trust(threshold),
                        "ece": calibration.expected_calibration_error(logits, torch.from_numpy(y_true)),
                        "by_threshold": [trust(at) for at in predict.THRESHOLD_STEPS]}
    return metrics


# ------------------------------------------------------------------------------------------- metrics

@dataclass
class Scores:
    """What `compute_metrics` found."""
    metrics: dict  # JSON-ready: headline figures, per-class figures, most confused pairs
    report: dict  # scikit-learn's classification_report(output_dict=True)
    report_text: str
    confusion: np.ndarray  # counts; rows: true class, columns: predicted class, over all the model's classes


def _finite(x: float) -> float | None:
    """JSON has no NaN: undefined scores become null."""
    return None if math.isnan(x) else float(x)


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> Scores:
    """Scores over the classes present in `y_true`; the prediction is the argmax over all the model's classes,
    so predicting a class that is absent from the data counts as an error."""
    n_classes = len(classes)
    y_pred = probs.argmax(axis=1)
    present = np.unique(y_true)
    names = [classes[c] for c in present]
    kwargs = dict(labels=present, target_names=names, zero_division=0)
    report = classification_report(y_true, y_pred, output_dict=True, **kwargs)
    accuracy = accuracy_score(y_true, y_pred)
    text = classification_report(y_true, y_pred, digits=4, **kwargs)
    if "accuracy" not in report:
        # predictions fell outside the classes present: sklearn then writes a "micro avg" row instead
        report["accuracy"] = accuracy
        text += f"\naccuracy (argmax over all {n_classes} model classes): {accuracy:.4f} on {len(y_true)} images\n"
    # with k >= the number of classes every image is in the top k; sklearn would warn (or fail for 2 classes)
    top_k = 1.0 if n_classes <= TOP_K else top_k_accuracy_score(y_true, probs, k=TOP_K, labels=np.arange(n_classes))
    per_class = {}
    for c, name in zip(present, names):
        positive = y_true == c
        # ROC needs negatives: undefined when the data hold a single class
        auc = roc_auc_score(positive, probs[:, c]) if not positive.all() else math.nan
        ap = average_precision_score(positive, probs[:, c])
        row = report[name]
        per_class[name] = {"precision": row["precision"], "recall": row["recall"], "f1": row["f1-score"],
                           "support": int(row["support"]), "average_precision": float(ap), "roc_auc": _finite(auc)}
    confusion = confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))
    metrics = {
        "accuracy": float(accuracy), "macro_f1": report["macro avg"]["f1-score"],
        "weighted_f1": report["weighted avg"]["f1-score"], f"top{TOP_K}_accuracy": float(top_k),
        "macro_average_precision": _finite(np.mean([v["average_precision"] for v in per_class.values()])),
        "macro_roc_auc": _finite(np.mean([np.nan if v["roc_auc"] is None else v["roc_auc"]
                                          for v in per_class.values()])),
        "n_images": int(len(y_true)), "classes_present": names,
        "classes_absent": [c for c in classes if c not in names], "per_class": per_class,
        "most_confused": most_confused(confusion, classes),
        "weak_classes": weak_classes(confusion, classes, names),
    }
    return Scores(metrics, report, text, confusion)


def weak_classes(confusion: np.ndarray, classes: list[str], present: list[str], below: float = WEAK_RECALL,
                 n_read_as: int = 2) -> list[dict]:
    """The classes present whose recall is below `below`, worst first, each with the (at most `n_read_as`)
    classes its images are most often read as and their shares of its images."""
    weak = []
    for name in present:
        row = confusion[classes.index(name)]
        recall = row[classes.index(name)] / row.sum()
        if recall < below:
            others = sorted(((int(count), c) for c, count in enumerate(row) if count and classes[c] != name),
                            key=lambda cell: (-cell[0], cell[1]))[:n_read_as]
            weak.append({"class": name, "recall": float(recall),
                         "read_as": [{"class": classes[c], "share": count / int(row.sum())} for count, c in others]})
    return sorted(weak, key=lambda w: (w["recall"], w["class"]))


def most_confused(confusion: np.ndarray, classes: list[str], n: int = N_CONFUSED_PAIRS) -> list[dict]:
    """The largest off-diagonal cells: (true, predicted, count, share of the true class's images)."""
    cells = [(int(confusion[t, p]), t, p) for t, p in zip(*np.nonzero(confusion)) if t != p]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [{"true": classes[t], "predicted": classes[p], "count": count,
             "share_of_true": count / int(confusion[t].sum())} for count, t, p in cells[:n]]


# ------------------------------------------------------------------------------------------- figures

def save_figure(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    run_artifacts.save_bytes(buffer.getvalue(), path)


def plot_confusion(confusion: np.ndarray, classes: list[str], normalize: bool) -> Figure:
    """Counts or row-normalised rates for the classes that occur as truth or prediction; zeros left blank."""
    shown = [i for i in range(len(classes)) if confusion[i].any() or confusion[:, i].any()]
    counts = confusion[np.ix_(shown, shown)]
    values = counts / counts.sum(axis=1, keepdims=True).clip(min=1) if normalize else counts
    n = len(shown)
    fig = Figure(figsize=(max(5.0, 0.33 * n + 2.5), max(4.0, 0.27 * n + 2.2)), layout="constrained")
    ax = fig.subplots()
    display = ConfusionMatrixDisplay(values, display_labels=[classes[i] for i in shown])
    display.plot(ax=ax, cmap="Blues", xticks_rotation="vertical", values_format=".2f" if normalize else "d",
                 text_kw={"fontsize": 7 if n > 15 else 10})
    for text, count in zip(display.text_.ravel(), counts.ravel()):
        if count == 0:
            text.set_text("")
    ax.set_title("Confusion matrix, " + ("share of each true class" if normalize else "image counts"))
    return fig


_CURVES = {  # kind: (title, x label, y label, score name, metric key)
    "pr": ("Precision-recall", "recall", "precision", "AP", "average_precision"),
    "roc": ("ROC", "false positive rate", "true positive rate", "AUC", "roc_auc"),
}


def plot_per_class_curves(kind: str, y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                          metrics: dict) -> Figure:
    """One small panel per class present (one vs rest, from the softmax probabilities), its score on top."""
    title, xlabel, ylabel, score_name, key = _CURVES[kind]
    names = metrics["classes_present"]
    cols = min(6, len(names))
    rows = math.ceil(len(names) / cols)
    # fixed margins and unshared axes: constrained layout and sharing each take seconds with 29 panels
    width, height = 2.3 * cols + 0.7, 2.1 * rows + 0.9
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.1 / width, bottom=0.55 / height, top=1 - 0.6 / height,
                        wspace=0.08, hspace=0.35)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        c = classes.index(name)
        positive, score = y_true == c, metrics["per_class"][name][key]
        if kind == "pr":
            precision, recall, _ = precision_recall_curve(positive, probs[:, c])
            ax.step(recall, precision, where="post")
            ax.axhline(positive.mean(), color="grey", linestyle=":", linewidth=1)  # a random guesser's precision
        elif score is not None:
            fpr, tpr, _ = roc_curve(positive, probs[:, c])
            ax.plot(fpr, tpr)
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        shown = "undefined" if score is None else f"{score:.3f}"
        ax.set_title(f"{name}   {score_name} {shown}", fontsize=9)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.05), xticks=(0, 0.5, 1), yticks=(0, 0.5, 1))
        ax.tick_params(labelsize=7)
        ax.label_outer()
    for ax in axes.flat[len(names) - cols:len(names)]:
        ax.tick_params(labelbottom=True)  # the lowest panel of each column, also above an empty slot
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    macro = metrics[f"macro_{key}"]
    fig.suptitle(f"{title} curves, each class vs the rest (macro {score_name} "
                 f"{'undefined' if macro is None else f'{macro:.3f}'})")
    fig.supxlabel(xlabel)
    fig.supylabel(ylabel)
    return fig


def plot_history(history: list[dict]) -> Figure:
    """Loss, accuracy and macro F1 per epoch, training and validation; the best validation loss marked."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    if not history:
        for ax in axes:
            ax.set_axis_off()
        axes[1].text(0.5, 0.5, "No training history found", ha="center", va="center", fontsize=12)
        return fig
    epochs = [h["epoch"] for h in history]
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    for ax, (key, label) in zip(axes, (("loss", "loss"), ("acc", "accuracy"), ("f1", "macro F1"))):
        for split, style in (("train", "-o"), ("val", "-s")):
            ax.plot(epochs, [h[f"{split}_{key}"] for h in history], style, markersize=4, label=split)
        ax.axvline(best, color="grey", linestyle=":", linewidth=1, label=f"best val loss (epoch {best})")
        ax.set(xlabel="epoch", title=label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def plot_trust_by_threshold(trust: dict) -> Figure:
    """The share of images the app would answer and the accuracy of those answers, against its threshold; the
    threshold the report's figures use marked."""
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    steps = trust["by_threshold"]
    at = [row["threshold"] for row in steps]
    ax.plot(at, [row["coverage"] for row in steps], "-o", markersize=3, label="answered (share of the images)")
    # no answers, no accuracy: those settings are left out of that line instead of drawn at 0
    right = [(row["threshold"], row["accuracy_when_answered"]) for row in steps
             if row["accuracy_when_answered"] is not None]
    if right:
        ax.plot(*zip(*right), "-s", markersize=3, label="right (share of the answers)")
    ax.axvline(trust["threshold"], color="grey", linestyle=":", linewidth=1,
               label=f"this report's threshold ({trust['threshold']:.0%})")
    ax.set(xlabel="confidence threshold", ylim=(0, 1.02), xlim=(0, 1),
           title="What the app would answer, by threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def pred_and_plot_image(model: nn.Module | predict.Predictor, image_path: str | os.PathLike,
                        class_names: list[str] | None = None, transform: dict | None = None, *,
                        true_label: str | None = None, ax: Axes | None = None) -> tuple[str, float, Axes]:
    """Predict one image and plot it titled with the ground truth (when given), the prediction and its probability.

    `model` is a `predict.Predictor` (classes and transform built in), or a network with its `class_names` and
    `transform` settings (the contents of transform.json; the network is put in eval mode). Returns the predicted
    class, its probability and the axes drawn on (a new figure's when `ax` is None).
    """
    if isinstance(model, predict.Predictor):
        predictor = model
    elif class_names is None or transform is None:
        raise TypeError("pred_and_plot_image needs class_names and transform with a bare network")
    else:
        predictor = predict.Predictor(model, list(class_names), transform, next(model.parameters()).device)
    image = image_io.load_rgb(image_path)
    label, probability = predictor.top_k(image, k=1)[0]
    if ax is None:
        ax = Figure(figsize=(4, 4.4), layout="constrained").subplots()
    plot_prediction(ax, image_path, true_label, label, probability)
    return label, probability, ax


def plot_prediction(ax: Axes, image_path: str | os.PathLike, true_label: str | None, label: str,
                    probability: float) -> None:
    """An image as stored, titled with its ground truth (when given) and a prediction made elsewhere."""
    ax.imshow(image_io.load_rgb(image_path))
    ax.set_axis_off()
    colour = "black" if true_label is None else ("tab:green" if label == true_label else "tab:red")
    truth = "" if true_label is None else f"true {true_label}\n"
    ax.set_title(f"{truth}pred {label} ({probability:.2f})", color=colour, fontsize=9)


def plot_predictions(items: list[Prediction], title: str) -> Figure:
    """A grid of scored images, each titled with its truth and the prediction it got in the report (never a
    new one); a note when there is nothing to show."""
    cols = max(1, min(4, len(items)))
    rows = max(1, math.ceil(len(items) / cols))
    width, height = 2.6 * cols + 0.4, 3.0 * rows + 0.5
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.2 / width, right=1 - 0.2 / width, bottom=0.1 / height, top=1 - 0.9 / height,
                        wspace=0.1, hspace=0.25)  # fixed margins: constrained layout is slow with many images
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (path, truth, label, probability) in zip(axes.flat, items):
        plot_prediction(ax, path, truth, label, probability)
    for ax in axes.flat[len(items):]:
        ax.set_axis_off()
    if not items:
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center", fontsize=14)
    fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------- the report

class Prediction(NamedTuple):
    """One scored image: its path, true class, predicted class and the predicted class's probability."""
    path: str
    true: str
    predicted: str
    probability: float


@dataclass
class Evaluation:
    """Everything the report is made of."""
    source: str
    predictor: predict.Predictor
    data: EvalSet
    samples: list[Sample]  # the images scored, in the order of `probs`
    probs: np.ndarray
    scores: Scores
    history: list[dict]

    @property
    def y_true(self) -> np.ndarray:
        return np.array([label for _, label in self.samples])

    def predictions(self) -> list[Prediction]:
        """Every scored image with its prediction: the one source of predictions.csv and the figures."""
        classes, pred = self.predictor.classes, self.probs.argmax(axis=1)
        return [Prediction(path, classes[label], classes[p], float(row[p]))
                for (path, label), p, row in zip(self.samples, pred, self.probs)]

    def worst(self, n: int = N_WORST) -> list[Prediction]:
        """The misclassified images the model was surest of."""
        wrong = [p for p in self.predictions() if p.predicted != p.true]
        return sorted(wrong, key=lambda p: -p.probability)[:n]


def _predictions_csv(ev: Evaluation) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "true", "predicted", "probability", "correct"])
    for p in ev.predictions():
        writer.writerow([p.path, p.true, p.predicted, f"{p.probability:.6f}", int(p.predicted == p.true)])
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report_markdown(ev: Evaluation, argv: list[str]) -> str:
    """report.md: the headline figures, notes, every figure embedded and the tables behind them, on one page."""
    m = ev.scores.metrics
    meta = ev.predictor.metadata
    lines = [
        "# Evaluation report", "",
        f"- **Model:** `{ev.source}` ({meta.get('arch', 'unknown arch')}, {len(ev.predictor.classes)} classes)",
        f"- **Data:** {ev.data.description}",
        f"- **Images scored:** {m['n_images']} ({len(m['skipped'])} skipped)", "",
        "| accuracy | macro F1 | weighted F1 | top-3 accuracy | macro AP | macro ROC AUC |",
        "|---|---|---|---|---|---|",
        f"| {_fmt(m['accuracy'])} | {_fmt(m['macro_f1'])} | {_fmt(m['weighted_f1'])} | "
        f"{_fmt(m[f'top{TOP_K}_accuracy'])} | {_fmt(m['macro_average_precision'])} | {_fmt(m['macro_roc_auc'])} |",
        "",
    ]
    if m["notes"]:
        lines += ["**Notes**", "", *[f"- {note}" for note in m["notes"]], ""]
    lines += _weak_lines(m["weak_classes"])
    lines += _hands_and_trust_lines(m)
    lines += ["## Per-class results", "", "```text", ev.scores.report_text.rstrip(), "```", "",
              "## Confusion matrix", "", "![confusion matrix, counts](confusion_matrix.png)", "",
              "![confusion matrix, row-normalised](confusion_matrix_normalized.png)", "",
              "### Most confused pairs", ""]
    if m["most_confused"]:
        lines += ["| true | predicted as | images | share of the true class |", "|---|---|---|---|"]
        lines += [f"| {p['true']} | {p['predicted']} | {p['count']} | {p['share_of_true']:.1%} |"
                  for p in m["most_confused"]]
    else:
        lines.append("No image was misclassified.")
    lines += ["", "## Precision-recall and ROC curves (one class vs the rest)", "",
              "![precision-recall curves](pr_curves.png)", "", "![ROC curves](roc_curves.png)", "",
              "## Training curves", "",
              "![training curves](training_curves.png)" if ev.history else "No training history was found.", "",
              f"## Misclassified images (the {N_WORST} the model was surest of)", "",
              "![misclassified images](misclassified.png)", ""]
    worst = ev.worst()
    if worst:
        lines += ["| file | true | predicted | probability |", "|---|---|---|---|"]
        lines += [f"| `{path}` | {t} | {p} | {prob:.3f} |" for path, t, p, prob in worst]
        lines.append("")
    lines += ["## Random examples", "", "![random examples](samples.png)", ""]
    if m["skipped"]:
        lines += ["## Skipped files (unreadable, unlabelled or gone)", "", *[f"- `{s}`" for s in m["skipped"]], ""]
    lines += ["## Reproduce", "", "```bash", "python evaluate.py " + shlex.join(argv), "```", ""]
    return "\n".join(lines)


def read_as_text(weak: dict) -> str:
    """`A 0.31 (read as S 45%, E 12%)`: a weak class in one phrase."""
    others = ", ".join(f"{r['class']} {r['share']:.0%}" for r in weak["read_as"])
    return f"{weak['class']} {weak['recall']:.2f}" + (f" (read as {others})" if others else "")


def _weak_lines(weak: list[dict]) -> list[str]:
    lines = [f"## Letters it still gets wrong (recall below {WEAK_RECALL:.0%})", ""]
    if not weak:
        return lines + [f"None: every class present has a recall of at least {WEAK_RECALL:.0%}.", ""]
    lines += ["| class | recall | most often read as |", "|---|---|---|"]
    for w in weak:
        read_as = ", ".join(f"{r['class']} ({r['share']:.0%})" for r in w["read_as"]) or "-"
        lines.append(f"| {w['class']} | {w['recall']:.2f} | {read_as} |")
    return lines + [""]


def _hands_and_trust_lines(m: dict) -> list[str]:
    lines = ["## Hands and trust", ""]
    if "hands" in m:
        h = m["hands"]
        lines += [f"- **Hand found** in {h['found_share']:.1%} of the images ({h['n_with_hand']} of "
                  f"{h['n_with_hand'] + h['n_without_hand']}); accuracy with a hand {_fmt(h['accuracy_with_hand'])}, "
                  f"without {_fmt(h['accuracy_without_hand'])}."]
        if "agreed_share" in h:
            lines += [f"- **The image and the hand agree** on {h['agreed_share']:.1%} of the images with a hand: "
                      f"accuracy {_fmt(h['accuracy_agreed'])} there, {_fmt(h['accuracy_disagreed'])} where they "
                      "differ (the app says it is unsure there)."]
    t = m["trust"]
    lines += [f"- **At the app's threshold ({t['threshold']:.0%})** it would answer {t['coverage']:.1%} of the images "
              f"(otherwise: unsure, the two networks differ, or no hand) and be right on "
              f"{_fmt(t['accuracy_when_answered'])} of those; expected calibration error {t['ece']:.4f}.", "",
              "**What the threshold buys** (the app's confidence slider): the share of the images it would answer "
              "and how often those answers are right, at each setting.", "",
              "![answers and their accuracy by threshold](trust_by_threshold.png)", "",
              "| threshold | answered | right when answered |", "|---|---|---|"]
    lines += [f"| {row['threshold']:.0%} | {row['coverage']:.1%} | {_fmt(row['accuracy_when_answered'])} |"
              for row in t["by_threshold"] if round(row["threshold"] * 100) % 10 == 0]
    return lines + [""]


def write_report(ev: Evaluation, out_dir: Path, samples: int, seed: int, argv: list[str]) -> None:
    """Every file of the report, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, classes = ev.scores, ev.predictor.classes
    run_artifacts.save_json(scores.metrics, out_dir / "metrics.json")
    run_artifacts.save_json(scores.report, out_dir / "classification_report.json")
    run_artifacts.save_bytes(scores.report_text.encode(), out_dir / "classification_report.txt")
    run_artifacts.save_bytes(_predictions_csv(ev).encode(), out_dir / "predictions.csv")
    save_figure(plot_confusion(scores.confusion, classes, normalize=False), out_dir / "confusion_matrix.png")
    save_figure(plot_confusion(scores.confusion, classes, normalize=True), out_dir / "confusion_matrix_normalized.png")
    for kind in _CURVES:
        save_figure(plot_per_class_curves(kind, ev.y_true, ev.probs, classes, scores.metrics),
                    out_dir / f"{kind}_curves.png")
    save_figure(plot_history(ev.history), out_dir / "training_curves.png")
    save_figure(plot_trust_by_threshold(scores.metrics["trust"]), out_dir / "trust_by_threshold.png")
    save_figure(plot_predictions(ev.worst(), "Misclassified images, most confident first"),
                out_dir / "misclassified.png")
    predictions = ev.predictions()
    picked = random.Random(seed).sample(predictions, min(samples, len(predictions)))
    save_figure(plot_predictions(picked, f"{len(picked)} random images"), out_dir / "samples.png")
    run_artifacts.save_bytes(report_markdown(ev, argv).encode(), out_dir / "report.md")


# ------------------------------------------------------------------------------------------- the command

def _run_dir(source: str) -> Path | None:
    """The training folder that holds config.json, split.json and history.json (None for a non-path source)."""
    path = Path(source).expanduser()
    return path if path.is_dir() else path.parent if path.is_file() else None


def named_test_dir(name: str, data_dir: str | None) -> str:
    """The folder --test_data names (data_sources.resolve: downloaded where DATA_DIR lacks it); one folder, not a set."""
    folders = data_sources.folder_names(data_sources.load_catalog(), [name])
    if len(folders) != 1:
        raise UsageError(f"--test_data {name} is a set of {len(folders)} folders: name one of them (e.g. test or "
                         f"{data_sources.short_name(folders[-1])}).")
    return str(data_sources.resolve(folders, data_dir)[0])


def _check_args(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.samples < 0 or (args.max_per_class is not None and args.max_per_class < 1):
        raise UsageError("--batch_size and --max_per_class must be at least 1, --samples at least 0.")
    if args.gpu and not torch.cuda.is_available():
        raise UsageError("--gpu was given but no CUDA device is available; leave out --gpu to evaluate on the CPU.")


def evaluate(args: argparse.Namespace, argv: list[str]) -> Evaluation:
    """Load the model, score the chosen images and write the report into args.out_dir."""
    _check_args(args)
    if args.test_data:
        args.test_dir = named_test_dir(args.test_data, args.data_dir)
    source = args.model_dir or args.checkpoint
    predictor = predict.load_predictor(source, "cuda" if args.gpu else "cpu")
    run_dir = _run_dir(source)
    data = (load_test_folder(args.test_dir, predictor.classes, args.known_classes_only) if args.test_dir
            else load_validation_split(predictor, run_dir))
    chosen = data.samples
    if args.max_per_class:
        chosen = subsample(chosen, args.max_per_class, args.seed)
        data.notes.append(f"At most {args.max_per_class} images per class, a sample drawn with seed {args.seed}.")
    if args.mirror:
        data.notes.append("Every image was mirrored left-right before scoring (--mirror); the figures show them "
                          "as stored.")
    found = find_hands(predictor, chosen, max(1, args.num_workers))
    probs, scored, failed = predict_samples(predictor, chosen, args.batch_size, args.num_workers, args.mirror, found)
    agreed = None
    if found is not None:
        hand_of = dict(zip((path for path, _ in chosen), found))
        # the landmarks of the image as scored: mirrored with it
        found = [hand.mirrored() if hand is not None and args.mirror else hand
                 for hand in (hand_of[path] for path, _ in scored)]
        pooled, agreed = predictor.combine(torch.from_numpy(probs), found)
        probs = pooled.numpy()
    y_true = np.array([label for _, label in scored])
    scores = compute_metrics(y_true, probs, predictor.classes)
    threshold = predictor.threshold if args.threshold is None else args.threshold
    scores.metrics.update(hand_and_trust_metrics(y_true, probs, predictor.classes, found, threshold, agreed))
    if scores.metrics["classes_absent"]:
        data.notes.append(f"Model classes absent from the data: {', '.join(scores.metrics['classes_absent'])}. "
                          "Per-class and macro scores cover the classes present; predicting an absent class still "
                          "counts as an error.")
    scores.metrics.update(skipped=data.skipped + failed, notes=data.notes,
                          dataset={"description": data.description, "test_dir": args.test_dir,
                                   "max_per_class": args.max_per_class},
                          model={"source": str(source), "arch": predictor.metadata.get("arch"),
                                 "classes": predictor.classes})
    history = _run_file(run_dir, "history.json") or predictor.history
    ev = Evaluation(str(source), predictor, data, scored, probs, scores, history)
    write_report(ev, Path(args.out_dir), args.samples, args.seed, argv)
    card = model_card.card_for(source)
    if card is not None:
        model_card.save_evaluation(card, model_card.evaluation_title(args.test_dir, args.mirror), scores.metrics,
                                   "python evaluate.py " + shlex.join(argv), WEAK_RECALL)
        log.info("Figures added to the model card %s", card)
    return ev


def _print_summary(ev: Evaluation, out_dir: str) -> None:
    m = ev.scores.metrics
    print(ev.scores.report_text)
    for note in m["notes"]:
        print(f"Note: {note}")
    print(f"{m['n_images']} images ({len(m['skipped'])} skipped) from the {ev.data.description}")
    print(f"accuracy {m['accuracy']:.4f} | macro F1 {m['macro_f1']:.4f} | "
          f"top-{TOP_K} accuracy {m[f'top{TOP_K}_accuracy']:.4f}")
    if "hands" in m:
        h = m["hands"]
        print(f"hand found in {h['found_share']:.1%} | accuracy with a hand {_fmt(h['accuracy_with_hand'])}, "
              f"without {_fmt(h['accuracy_without_hand'])}"
              + (f" | the networks agree on {h['agreed_share']:.1%} of those: accuracy {_fmt(h['accuracy_agreed'])}"
                 f", else {_fmt(h['accuracy_disagreed'])}" if "agreed_share" in h else ""))
    if m["weak_classes"]:
        print(f"recall below {WEAK_RECALL:.0%}: " + "; ".join(read_as_text(w) for w in m["weak_classes"]))
    t = m["trust"]
    print(f"at threshold {t['threshold']:.2f} the app answers {t['coverage']:.1%}, right on "
          f"{_fmt(t['accuracy_when_answered'])} | ECE {t['ece']:.4f}")
    print(f"Report: {Path(out_dir) / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    terminal.configure(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    try:
        ev = evaluate(args, argv)
    except UsageError as err:
        log.error("%s", err)
        return EXIT_USAGE
    _print_summary(ev, args.out_dir)
    if args.mlflow_run:
        import log_experiment  # only this option needs MLflow, which is slow to import

        try:
            log_experiment.log_evaluation(args.mlflow_run, Path(args.out_dir), ev.scores.metrics,
                                          card=model_card.card_for(ev.source))
        except UsageError as err:
            log.error("%s The report itself is in %s.", err, args.out_dir)
            return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
