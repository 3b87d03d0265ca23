"""model_card.py: the card training writes (data, recipe, validation, calibration, use and limitations) from the
run's own files, and the evaluation sections evaluate.py adds, one per data set, replaced when it is scored again."""
from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path


import evaluate
import model_card


def _part(card: str, heading: str) -> str:
    """The text under a `## heading` of the card, up to the next one."""
    return card.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _json(run: Path, name: str):
    return json.loads((run / name).read_text())


# ------------------------------------------------------------------------------------------- what training writes

def test_training_writes_a_card_from_its_run_files(trained_run):
    card = (trained_run / model_card.CARD_NAME).read_text()
    config, history, split = _json(trained_run, "config.json"), _json(trained_run, "history.json"), \
        _json(trained_run, "split.json")
    assert f"{config['arch']} at {config['transform']['crop_size']} px" in _part(card, "Model")
    # the images per class on each side of the split: the held-out ones are the files split.json lists
    (folder,) = split["folders"]
    rows = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^\| (\w+) \| (\d+) / (\d+) \|$",
                                                              _part(card, "Training data"), re.MULTILINE)}
    assert list(rows) == config["classes"]
    assert {name: val for name, (_, val) in rows.items()} == Counter(Path(p).parts[0] for p in folder["val"])
    assert sum(train for train, _ in rows.values()) == folder["num_train"]
    assert f"| {Path(folder['root']).name} | `{folder['root']}` | {folder['split_by']} |" in card
    best = min(history, key=lambda record: record["val_loss"])
    validation = _part(card, "Validation")
    assert (f"best epoch ({best['epoch']} of {len(history)}): accuracy {best['val_acc']:.4f}, macro F1 "
            f"{best['val_f1']:.4f}") in validation
    assert f"| epochs trained | {len(history)} |" in card and f"| seed | {config['args']['seed']} |" in card
    calibration = _json(trained_run, "calibration.json")
    assert f"{calibration['ece_before']:.4f} before" in _part(card, "Calibration")
    # MediaPipe finds no hand in the synthetic squares: the card says the model reads the image alone
    has_landmarks = (trained_run / "hand_net" / "history.json").is_file()
    assert ("No landmark network" in card) != has_landmarks
    assert ("Landmark network" in _part(card, "Calibration")) == has_landmarks
    assert "fingerspelled letters" in _part(card, "Intended use")
    assert "MediaPipe may find no hand" in _part(card, "Limitations")


def _config(classes: list[str], hands: str = "crop", **args) -> dict:
    return {"arch": "efficientnet_b0", "classes": classes, "transform": {"crop_size": 128}, "init_from": None,
            "args": {"hands": hands, "weights": "imagenet", "total_epochs": 3, "seed": 1, "whole_share": 0.0,
                     "hand_epochs": 40, **args}}


def _history(*val_losses: float, **extra: float) -> list[dict]:
    return [{"epoch": k + 1, "val_loss": loss, "val_acc": 0.5 + k / 10, "val_f1": 0.4 + k / 10, **extra}
            for k, loss in enumerate(val_losses)]


def test_the_card_names_each_folder_s_figures_and_the_motion_letters():
    folders = [model_card.FolderCounts("kaggle", "/data/kaggle", "block", {"A": 9, "J": 9}, {"A": 1, "J": 1}),
               model_card.FolderCounts("mine", "/data/mine", "random", {"A": 4}, {"A": 1})]
    history = _history(0.9, 0.7, 0.8, **{"val_acc/kaggle": 0.97, "val_acc/mine": 0.61})
    card = model_card.training_card("run", _config(["A", "J"], "none"), history, folders)
    assert "| A | 9 / 1 | 4 / 1 |" in card and "| J | 9 / 1 | 0 / 0 |" in card
    assert "best epoch (2 of 3): accuracy 0.6000" in card  # the lowest validation loss, not the last epoch
    assert "| kaggle | 0.9700 |" in card and "| mine | 0.6100 |" in card
    assert "J is a motion letter" in card
    # an image-only model: nothing about MediaPipe or a landmark network's settings
    assert "MediaPipe may find no hand" not in card and "landmark network epochs" not in card
    assert "not calibrated" in _part(card, "Calibration")


def test_a_hand_aware_card_has_the_landmark_network_s_figures():
    folders = [model_card.FolderCounts("train", "/data/train", "block", {"A": 9, "Z": 9}, {"A": 1, "Z": 1})]
    calibration = {"temperature": 1.7, "applied": True, "n_images": 20, "ece_before": 0.12,
                   "ece_after_cross_fitted": 0.03}
    card = model_card.training_card("run", _config(["A", "Z"]), _history(0.5), folders, calibration,
                                    _history(0.6, 0.4), {**calibration, "temperature": 1.0, "applied": False})
    assert "Landmark network alone, on the validation images with a hand found (its best epoch, 2 of 2): " \
           "accuracy 0.6000" in card
    calibrated = _part(card, "Calibration")
    assert "temperature 1.7, applied" in calibrated and "0.1200 before, 0.0300 with a fitted" in calibrated
    assert "**Landmark network:** temperature 1 (a fitted one did not lower" in calibrated
    assert "| landmark network epochs | 40 |" in card and "Z is a motion letter" in card


# ------------------------------------------------------------------------------------------- evaluation sections

METRICS = {"accuracy": 23 / 30, "top3_accuracy": 1.0, "macro_f1": 0.75, "n_images": 30, "skipped": ["x.jpg"],
           "per_class": {"A": {"recall": 0.9, "support": 10}, "B": {"recall": 1.0, "support": 10},
                         "J": {"recall": 0.4, "support": 10}},
           "weak_classes": [{"class": "J", "recall": 0.4, "read_as": [{"class": "B", "share": 0.6}]}],
           "trust": {"threshold": 0.5, "coverage": 0.8, "accuracy_when_answered": 0.875, "ece": 0.05},
           "hands": {"found_share": 0.9}}


def test_an_evaluation_section_has_the_headline_figures_and_the_weak_letters():
    section = model_card.evaluation_section("Test folder `/data/external`", METRICS,
                                            "python evaluate.py --model_dir run", 0.7)
    assert "30 images (1 skipped)" in section and "`python evaluate.py --model_dir run`" in section
    assert "| 0.7667 | 1.0000 | 0.7500 | 80.0% | 0.8750 | 0.0500 |" in section
    assert "app answers (threshold 50%)" in section and "hand was found in 90.0%" in section
    assert "less than 70% of the time" in section and "- **J**: 4 of 10 images read right; read as B 60%" in section
    assert "**A**" not in section and "**B**" not in section  # read right often enough
    every = model_card.evaluation_section("t", {**METRICS, "weak_classes": []}, "c", 0.7)
    assert "Every class is read right at least 70% of the time." in every


def test_a_data_set_scored_again_replaces_its_section_and_others_stay():
    card = "# Model card\n\n## Evaluations\n\nThe latest evaluation of each data set.\n"
    first = model_card.evaluation_section("Set one", METRICS, "cmd 1", 0.7)
    second = model_card.evaluation_section("Set two", METRICS, "cmd 2", 0.7)
    card = model_card.with_evaluation(model_card.with_evaluation(card, "Set one", first), "Set two", second)
    assert card.index("### Set one") < card.index("### Set two")
    again = model_card.evaluation_section("Set one", {**METRICS, "n_images": 12}, "cmd 3", 0.7)
    updated = model_card.with_evaluation(card, "Set one", again)
    assert updated.count("### Set one") == 1 and "cmd 1" not in updated and "cmd 3" in updated
    assert updated.index("### Set one") < updated.index("### Set two") and "cmd 2" in updated
    assert updated.startswith("# Model card\n\n## Evaluations\n\nThe latest evaluation of each data set.\n")


def test_evaluate_adds_a_section_per_data_set_and_replaces_it_when_scored_again(trained_run, synthetic_dir,
                                                                                tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    card = run / model_card.CARD_NAME
    # the shared run's card may hold other tests' evaluations: start from the card as training left it
    card.write_text(card.read_text().split("<!-- evaluation:")[0])
    training_part = card.read_text().split(model_card.EVALUATIONS_HEADING)[0]
    common = ["--num_workers", "0", "--samples", "0", "--out_dir", str(tmp_path / "out")]
    test_set = model_card.evaluation_title(synthetic_dir)

    def sections() -> list[str]:
        return re.findall(r"^### (.+)$", card.read_text(), re.MULTILINE)

    assert evaluate.main(["--model_dir", str(run), "--test_dir", str(synthetic_dir), "--max_per_class", "2",
                          *common]) == 0
    assert sections() == [test_set] and "6 images" in card.read_text()
    assert evaluate.main(["--checkpoint", str(run / "best.pt"), "--test_dir", str(synthetic_dir),
                          "--max_per_class", "3", *common]) == 0
    assert sections() == [test_set] and "9 images" in card.read_text() and "6 images" not in card.read_text()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert f"| {metrics['accuracy']:.4f} | {metrics['top3_accuracy']:.4f} |" in card.read_text()
    assert evaluate.main(["--model_dir", str(run), *common]) == 0  # the validation split: a second data set
    assert sections() == [test_set, model_card.evaluation_title(None)]
    assert card.read_text().startswith(training_part)
    # the card describes best.pt: last.pt's figures do not go in
    before = card.read_text()
    assert evaluate.main(["--checkpoint", str(run / "last.pt"), "--test_dir", str(synthetic_dir),
                          "--max_per_class", "1", *common]) == 0
    assert card.read_text() == before


def test_only_a_training_folder_s_best_model_has_a_card(trained_run, tmp_path):
    card = trained_run / model_card.CARD_NAME
    assert model_card.card_for(trained_run) == card == model_card.card_for(trained_run / "best.pt")
    assert model_card.card_for(trained_run / "last.pt") is None
    shutil.copy(trained_run / "best.pt", tmp_path / "best.pt")
    assert model_card.card_for(tmp_path / "best.pt") is None and model_card.card_for(tmp_path) is None
