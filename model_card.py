"""The model card of a trained model: `MODEL_CARD.md` in its training folder, in the spirit of Hugging Face's
model cards, for a person deciding whether to use the model.

pt_train.py writes it when training ends (`save_card`), from the folder's JSON files (config.json,
history.json, calibration.json, hand_net/*.json) and the images each training folder gave to training and
validation: the data, the recipe, the validation figures, the calibration, the intended use and the
limitations. `evaluate.py` adds a section per data set it scores the model on (`save_evaluation`); scoring the
same set again replaces its section. MLflow gets the card with the run's other files (log_experiment.run_files).

Everything but the two `save_` functions is pure: markdown from plain data.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import run_artifacts

if TYPE_CHECKING:
    import data_loader

CARD_NAME = "MODEL_CARD.md"
CARD_MODEL = "best.pt"  # the checkpoint the card describes
EVALUATIONS_HEADING = "## Evaluations"
_START, _END = "<!-- evaluation: {} -->", "<!-- end of evaluation -->"
MOTION_LETTERS = ("J", "Z")

HAND_MODES = {
    "crop": "MediaPipe finds the hand; the image network reads the square around it (the whole frame where no "
            "hand is found) and a landmark network reads its 21 landmarks; their calibrated probabilities are "
            "pooled where a hand is found",
    "fused": "MediaPipe finds the hand; the image network reads the whole frame and a landmark network reads the "
             "hand's 21 landmarks; their calibrated probabilities are pooled where a hand is found",
    "none": "the image network alone reads the whole frame",
}
# (config.json's args key, how the card names it)
RECIPE = (("total_epochs", "epochs (at most)"), ("patience", "early stopping patience (epochs)"),
          ("batch_size", "batch size (per process)"), ("learning_rate", "learning rate"),
          ("scheduler", "learning-rate schedule"), ("weight_decay", "weight decay"),
          ("label_smoothing", "label smoothing"), ("augment", "augmentation"), ("hflip", "random mirroring"),
          ("whole_share", "share of training images read whole"), ("frozen_stages", "frozen backbone stages"),
          ("freeze_backbone", "head only"), ("hand_epochs", "landmark network epochs"),
          ("val_split", "validation share"), ("seed", "seed"), ("world_size", "processes"), ("gpu", "GPU"),
          ("amp", "mixed precision"))


@dataclasses.dataclass(frozen=True)
class FolderCounts:
    """One training folder: its name in the figures (`val_acc/NAME`), where it is, how it was split, and its
    images per class on each side of the split."""
    name: str
    root: str
    split_by: str
    train: dict[str, int]
    val: dict[str, int]


def count_folders(splits: data_loader.Splits, names: Sequence[str]) -> list[FolderCounts]:
    """The images per class each training folder gave to training and validation; `names` one per folder."""
    def per_folder(samples, folders, k: int) -> dict[str, int]:
        counts = Counter(splits.classes[label] for (_, label), folder in zip(samples, folders) if folder == k)
        return {name: counts[name] for name in splits.classes if counts[name]}

    return [FolderCounts(names[k], str(root), split_by,
                         per_folder(splits.train_samples, splits.train_folders, k),
                         per_folder(splits.val_samples, splits.val_folders, k))
            for k, (root, split_by) in enumerate(zip(splits.roots, splits.folder_split_by))]


def best_record(history: Sequence[Mapping[str, float]]) -> Mapping[str, float]:
    """The epoch whose weights are best.pt: the lowest validation loss, the first one if tied."""
    return min(history, key=lambda record: record["val_loss"])


# ------------------------------------------------------------------------------------------- the training part

def _value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "none" if value is None else str(value)


def _calibration_line(what: str, result: Mapping | None) -> str:
    if result is None:
        return f"- **{what}:** not calibrated (trained with --no-calibrate): temperature 1."
    fitted = (f"temperature {result['temperature']:.3g}, applied" if result["applied"] else
              "temperature 1 (a fitted one did not lower the error on the images it was not fitted on)")
    return (f"- **{what}:** {fitted}. Expected calibration error on {result['n_images']} "
            f"{result.get('on', 'validation images')} "
            f"{result['ece_before']:.4f} before, {result['ece_after_cross_fitted']:.4f} with a fitted temperature "
            "(cross-fitted: fitted on one half, measured on the other).")


def training_card(run_name: str, config: Mapping, history: Sequence[Mapping[str, float]],
                  folders: Sequence[FolderCounts], calibration: Mapping | None = None,
                  hand_history: Sequence[Mapping[str, float]] | None = None,
                  hand_calibration: Mapping | None = None, threshold: Mapping | None = None) -> str:
    """The card as training leaves it, from the run's config.json, history.json and calibration.json (the
    landmark network's history and calibration for a hand-aware model; threshold.json where it was calibrated on
    people it did not train on), and the folders' image counts."""
    args, classes = config["args"], list(config["classes"])
    hands = args.get("hands") or "none"
    landmarks = hand_history is not None
    lines = [f"# Model card: `{run_name}`", "",
             "An ASL fingerspelling classifier made by `pt_train.py` of this toolkit. The model is `best.pt` in this "
             "folder (the epoch with the lowest validation loss); `python evaluate.py --model_dir FOLDER "
             "--test_dir DIR` scores it on other photos and adds the figures to this card.", "",
             "## Model", "",
             f"- **Reads:** a photo of one hand; answers one of {len(classes)} classes: {', '.join(classes)}.",
             f"- **Image network:** {config['arch']} at {config['transform']['crop_size']} px, "
             f"{_weights(args, config)}.",
             f"- **Hands (--hands {hands}):** {HAND_MODES.get(hands, hands)}."]
    if hands != "none" and not landmarks:
        lines.append("- **No landmark network:** too few hands were found in the training images; the model "
                     "reads the image alone.")
    lines += ["", "## Training data", "",
              "Each folder was split on its own into training and validation images"
              + (" (in runs of consecutive frames: near-duplicates stay on one side)" if
                 any(f.split_by == "block" for f in folders) else "") + ".", "",
              "| folder | path | split | classes | training images | validation images |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {f.name} | `{f.root}` | {f.split_by} | {len(set(f.train) | set(f.val))} | "
              f"{sum(f.train.values()):,} | {sum(f.val.values()):,} |" for f in folders]
    lines += ["", "Images per class (training / validation):", "",
              "| class | " + " | ".join(f.name for f in folders) + " |", "|---" * (len(folders) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{f.train.get(name, 0)} / {f.val.get(name, 0)}" for f in folders) + " |"
              for name in classes]
    lines += ["", "## Training recipe", "", "| setting | value |", "|---|---|",
              f"| epochs trained | {len(history)} |"]
    shown = {"hand_epochs": landmarks, "whole_share": hands == "crop"}  # settings only some models have
    lines += [f"| {label} | {_value(args[key])} |" for key, label in RECIPE if key in args and shown.get(key, True)]
    lines += ["", "The rest of the settings are in config.json (`args`).", "", "## Validation", ""]
    lines += _validation_lines(history, hand_history)
    lines += ["## Calibration", "",
              "A softmax temperature fitted on images the network did not train on makes the confidences honest (the app's "
              "\"unsure\" threshold relies on it); it never changes which class wins.", "",
              _calibration_line("Image network", calibration)]
    if landmarks:
        lines.append(_calibration_line("Landmark network", hand_calibration))
    if threshold is not None and threshold.get("given"):
        lines.append(f"- **The app's threshold:** {threshold['threshold']:.2f}, given with --threshold (leave_one_out.py "
                     "fits one on people left out of training).")
    elif threshold is not None:
        at = next(row for row in threshold["by_threshold"] if row["threshold"] == threshold["threshold"])
        right = "n/a" if at["accuracy_when_answered"] is None else f"{at['accuracy_when_answered']:.1%}"
        why = ("the lowest at which its answers on those people were right" if threshold["reached"] else
               "the default: no threshold made its answers on those people right")
        lines.append(f"- **The app's threshold:** {threshold['threshold']:.2f}, {why} "
                     f"{threshold['precision_wanted']:.0%} of the time (there it answers {at['coverage']:.1%} of the "
                     f"images, right on {right} of them).")
    lines += ["", *_use_and_limitations(classes, hands), "", EVALUATIONS_HEADING, "",
              "The latest evaluation of each data set by evaluate.py (photos not trained on show how the model "
              "reads other people).", ""]
    return "\n".join(lines)


def _weights(args: Mapping, config: Mapping) -> str:
    if config.get("init_from"):
        return f"fine-tuned from `{config['init_from']}`"
    weights = args.get("weights")
    return {"imagenet": "started from ImageNet weights", "none": "trained from scratch"}.get(
        weights, f"started from `{weights}`")


def _validation_lines(history: Sequence[Mapping[str, float]], hand_history: Sequence[Mapping[str, float]] | None
                      ) -> list[str]:
    best = best_record(history)
    lines = [f"On the held-out validation images, at the best epoch ({best['epoch']} of {len(history)}): "
             f"accuracy {best['val_acc']:.4f}, macro F1 {best['val_f1']:.4f}, loss {best['val_loss']:.4f}. "
             "They come from the training folders (the same people, places and sessions), so they say little "
             "about other people's photos.", ""]
    folders = {key[len("val_acc/"):]: value for key, value in best.items() if key.startswith("val_acc/")}
    if folders:
        lines += ["| folder | validation accuracy |", "|---|---|",
                  *[f"| {name} | {value:.4f} |" for name, value in folders.items()], ""]
    if hand_history:
        hand = best_record(hand_history)
        lines += [f"Landmark network alone, on the validation images with a hand found (its best epoch, "
                  f"{hand['epoch']} of {len(hand_history)}): accuracy {hand['val_acc']:.4f}, macro F1 "
                  f"{hand['val_f1']:.4f}.", ""]
    return lines


def _use_and_limitations(classes: Sequence[str], hands: str) -> list[str]:
    lines = ["## Intended use", "",
             "Reading the static fingerspelled letters of the American Sign Language alphabet from a photo of one "
             "hand facing the camera, one letter per photo: a learning aid and a demonstration. It does not read "
             "signed language (words, movement, facial expression) and is not meant for decisions about people.",
             "", "## Limitations", ""]
    motion = [letter for letter in MOTION_LETTERS if letter in classes]
    if motion:
        lines.append(f"- {' and '.join(motion)} {'are motion letters' if len(motion) > 1 else 'is a motion letter'}"
                     ": a still photo shows one moment of the movement, read as a pose.")
    lines.append("- People, hands, backgrounds, lighting and viewpoints unlike the training data's read worse; the "
                 "evaluations below on photos not trained on show how much.")
    if hands != "none":
        lines.append("- MediaPipe may find no hand in dark, blurred or noisy photos; the image network then reads "
                     "the whole frame alone.")
    lines.append("- One hand per photo; a second hand or a busy scene can take the model's attention.")
    return lines


def save_card(run_dir: str | os.PathLike, folders: Sequence[FolderCounts]) -> Path:
    """Write the card into a training folder (atomically) from its JSON files; returns its path. Any evaluation
    sections of an earlier card go: they scored other weights."""
    run_dir = Path(run_dir)

    def read(name: str):
        path = run_dir / name
        return run_artifacts.load_json(path) if path.is_file() else None

    text = training_card(run_dir.name, read("config.json"), read("history.json"), folders, read("calibration.json"),
                         read("hand_net/history.json"), read("hand_net/calibration.json"), read("threshold.json"))
    path = run_dir / CARD_NAME
    run_artifacts.save_bytes(text.encode(), path)
    return path


# ------------------------------------------------------------------------------------------- evaluations

def evaluation_title(test_dir: str | os.PathLike | None, mirror: bool = False) -> str:
    """The name of an evaluated data set: its section's heading, and the key that finds it again."""
    title = (f"Test folder `{Path(test_dir).expanduser().resolve()}`" if test_dir
             else "The validation images training held out")
    return title + (", mirrored" if mirror else "")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def evaluation_section(title: str, metrics: Mapping, command: str, weak_below: float,
                       day: datetime.date | None = None) -> str:
    """One data set's figures for the card, from evaluate.py's metrics.json dict: accuracy, top-3 accuracy, macro
    F1, the classes it found read right less than `weak_below` of the time (`weak_classes`) and what they are read
    as, the app's coverage and accuracy at its threshold, and the calibration error."""
    trust = metrics["trust"]
    top, k = next((key, match[1]) for key in metrics if (match := re.fullmatch(r"top(\d+)_accuracy", key)))
    lines = [_START.format(title), f"### {title}", "",
             f"{metrics['n_images']:,} images ({len(metrics.get('skipped', []))} skipped), "
             f"{(day or datetime.date.today()).isoformat()}: `{command}`", "",
             f"| accuracy | top-{k} accuracy | macro F1 | app answers (threshold {trust['threshold']:.0%}) "
             "| right when it answers | calibration error (ECE) |", "|---|---|---|---|---|---|",
             f"| {_fmt(metrics['accuracy'])} | {_fmt(metrics[top])} | {_fmt(metrics['macro_f1'])} | "
             f"{trust['coverage']:.1%} | {_fmt(trust['accuracy_when_answered'])} | {trust['ece']:.4f} |", ""]
    if "hands" in metrics:
        h = metrics["hands"]
        lines += [f"A hand was found in {h['found_share']:.1%} of the images.", ""]
    if metrics["weak_classes"]:
        lines += [f"Classes read right less than {weak_below:.0%} of the time, and what they are read as instead:", ""]
        for weak in metrics["weak_classes"]:
            row = metrics["per_class"][weak["class"]]
            instead = ", ".join(f"{r['class']} {r['share']:.0%}" for r in weak["read_as"]) or "-"
            lines.append(f"- **{weak['class']}**: {round(row['recall'] * row['support'])} of {row['support']} images "
                         f"read right; read as {instead}")
    else:
        lines.append(f"Every class is read right at least {weak_below:.0%} of the time.")
    lines += ["", _END]
    return "\n".join(lines)


def with_evaluation(card: str, title: str, section: str) -> str:
    """The card with `section` in place of the earlier section of the same title, or added at the end."""
    pattern = re.compile(re.escape(_START.format(title)) + r".*?" + re.escape(_END), re.DOTALL)
    if pattern.search(card):
        return pattern.sub(lambda _: section, card, count=1)
    return card.rstrip("\n") + "\n\n" + section + "\n"


def card_for(source: str | os.PathLike) -> Path | None:
    """The card of a model named as evaluate.py names it (a training folder, or its best.pt), if it has one."""
    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent if path.name == CARD_MODEL else None
    card = folder / CARD_NAME if folder is not None else None
    return card if card is not None and card.is_file() else None


def save_evaluation(card: str | os.PathLike, title: str, metrics: Mapping, command: str, weak_below: float) -> None:
    """Add (or replace) one data set's section in a card file, atomically."""
    card = Path(card)
    text = with_evaluation(card.read_text(), title, evaluation_section(title, metrics, command, weak_below))
    run_artifacts.save_bytes(text.encode(), card)
