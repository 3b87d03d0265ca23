"""evaluate: metrics against scikit-learn, every report file, test-folder layouts, the recomputed validation split,
the Lite0 round trip through a checkpoint, and clear errors for bad input."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.metrics import (accuracy_score, average_precision_score, classification_report, f1_score,
                             roc_auc_score, top_k_accuracy_score)

import data_loader
import data_sources
import evaluate
import image_io
import model as models
import predict
import run_artifacts
from conftest import SHARED_ASL, make_image_folder, requires_shared, write_catalog
from errors import UsageError

FIGURES = ("confusion_matrix.png", "confusion_matrix_normalized.png", "pr_curves.png", "roc_curves.png",
           "training_curves.png", "trust_by_threshold.png", "misclassified.png", "samples.png")
QUICK = ["--num_workers", "0", "--batch_size", "16"]


def run_cli(*args: str) -> tuple[int, str, str]:
    """evaluate.main in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate.main([*QUICK, *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory) -> tuple[Path, str]:
    """The full report on the validation split of the tiny trained Lite0 model, and what the command printed."""
    out = tmp_path_factory.mktemp("report")
    code, stdout, stderr = run_cli("--model_dir", str(trained_run), "--out_dir", str(out), "--samples", "4")
    assert code == 0, stderr
    return out, stdout


def read_predictions(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- metrics

def test_metrics_match_scikit_learn_on_known_predictions():
    classes = ["a", "b", "c", "d", "e"]  # "e" never occurs in the data but is predicted twice
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    y_pred = np.array([0, 0, 4, 1, 1, 1, 4, 2, 0, 3])
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=len(y_true))
    probs[np.arange(len(y_true)), y_pred] += 1.0  # make y_pred the argmax
    probs /= probs.sum(axis=1, keepdims=True)

    scores = evaluate.compute_metrics(y_true, probs, classes)
    m, present = scores.metrics, [0, 1, 2, 3]
    assert m["accuracy"] == pytest.approx(0.6) == accuracy_score(y_true, y_pred)  # 6 of 10 by hand
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="weighted"))
    assert m["top3_accuracy"] == pytest.approx(top_k_accuracy_score(y_true, probs, k=3, labels=range(5)))
    assert m["classes_present"] == ["a", "b", "c", "d"] and m["classes_absent"] == ["e"]
    assert set(m["per_class"]) == {"a", "b", "c", "d"}  # per class only for the classes present
    for c, name in zip(present, "abcd"):
        assert m["per_class"][name]["average_precision"] == pytest.approx(average_precision_score(y_true == c,
                                                                                                  probs[:, c]))
        assert m["per_class"][name]["roc_auc"] == pytest.approx(roc_auc_score(y_true == c, probs[:, c]))
    assert m["per_class"]["a"]["recall"] == pytest.approx(0.5) and m["per_class"]["a"]["support"] == 4
    assert m["macro_average_precision"] == pytest.approx(np.mean([m["per_class"][n]["average_precision"]
                                                                  for n in "abcd"]))
    # "e" was predicted for an "a" and a "b": the argmax runs over every model class, absent ones included
    assert [(p["true"], p["predicted"], p["count"], p["share_of_true"]) for p in m["most_confused"]] == [
        ("a", "b", 1, 0.25), ("a", "e", 1, 0.25), ("b", "e", 1, pytest.approx(1 / 3)), ("c", "a", 1, 0.5)]
    assert scores.confusion.shape == (5, 5) and scores.confusion[:, 4].sum() == 2
    assert scores.report["accuracy"] == pytest.approx(0.6) and "accuracy" in scores.report_text
    # below 0.7 recall, worst first: a (2 of 4: one read as b, one as e) and b (2 of 3) and c (1 of 2)
    assert m["weak_classes"] == [
        {"class": "a", "recall": 0.5, "read_as": [{"class": "b", "share": 0.25}, {"class": "e", "share": 0.25}]},
        {"class": "c", "recall": 0.5, "read_as": [{"class": "a", "share": 0.5}]},
        {"class": "b", "recall": pytest.approx(2 / 3), "read_as": [{"class": "e", "share": pytest.approx(1 / 3)}]}]
    assert evaluate.read_as_text(m["weak_classes"][0]) == "a 0.50 (read as b 25%, e 25%)"
    json.dumps(m, allow_nan=False)


def test_a_single_class_gives_undefined_auc_not_a_crash():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    m = evaluate.compute_metrics(np.array([0, 0]), probs, ["a", "b", "c"]).metrics
    assert m["per_class"]["a"]["roc_auc"] is None and m["macro_roc_auc"] is None
    assert m["accuracy"] == 0.5
    json.dumps(m, allow_nan=False)


def test_subsample_is_seeded_and_capped():
    samples = [(f"{c}{i}.jpg", label) for label, c in enumerate("ab") for i in range(10)] + [("c0.jpg", 2)]
    picked = evaluate.subsample(samples, 3, seed=1)
    assert [label for _, label in picked] == [0, 0, 0, 1, 1, 1, 2]
    assert picked == evaluate.subsample(samples, 3, seed=1) != evaluate.subsample(samples, 3, seed=2)


# ------------------------------------------------------------------------------------------- data

def test_flat_test_layout_is_parsed(tmp_path):
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    for name in ("A_test.jpg", "B_test.jpg", "nothing_test.jpg", "my_class_7.png", "nolabel.jpg"):
        image.save(tmp_path / name)
    (tmp_path / "broken_test.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes_x.txt").write_text("hello")
    images = data_loader.scan_flat_folder(tmp_path)
    assert images.classes == ["A", "B", "my_class", "nothing"]
    labels = {Path(p).name: images.classes[label] for p, label in images.samples}
    assert labels == {"A_test.jpg": "A", "B_test.jpg": "B", "my_class_7.png": "my_class",
                      "nothing_test.jpg": "nothing"}
    assert sorted(Path(p).name for p in images.skipped) == ["broken_test.jpg", "nolabel.jpg", "notes_x.txt"]


def test_a_test_folder_may_be_named_as_data(tmp_path, monkeypatch, capsys):
    for name in ("ann", "bo"):
        make_image_folder(tmp_path / "copy" / name, per_class=2)
    monkeypatch.setattr(data_sources, "CATALOG", write_catalog(tmp_path / "catalog.json", tmp_path / "copy", ["ann", "bo"]))
    assert evaluate.named_test_dir("bo", str(tmp_path / "copy")) == str(tmp_path / "copy" / "bo")
    # a set is several folders, and a report scores one: refused before any model is loaded
    assert evaluate.main(["--model_dir", str(tmp_path / "no-run"), "--test_data", "people", "--data_dir",
                          str(tmp_path / "copy"), "--out_dir", str(tmp_path / "out")]) == 2
    assert "--test_data people is a set of 2 folders: name one of them" in capsys.readouterr().err
    for argv in (["--test_dir", "x", "--test_data", "bo"], ["--data_dir", "x"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--model_dir", "m", *argv])


def test_recomputed_validation_split_equals_the_training_split(trained_run):
    predictor = predict.load_predictor(trained_run)
    data = evaluate.load_validation_split(predictor, trained_run)
    root = Path(json.loads((trained_run / "config.json").read_text())["folders"][0]["root"])
    relative = [str(Path(p).relative_to(root)) for p, _ in data.samples]
    assert relative == json.loads((trained_run / "split.json").read_text())["folders"][0]["val"]
    assert len(relative) == 9 and all(predictor.classes[label] == Path(p).parent.name for p, label in data.samples)
    assert "equals the 9 files" in data.notes[0]


def test_the_validation_split_of_a_fine_tuning_on_several_folders_is_recomputed(trained_run, tmp_path):
    import pt_train

    mine = make_image_folder(tmp_path / "mine", classes=("b", "E"), per_class=6, seed=2)
    run = tmp_path / "tuned"
    assert pt_train.main(["--init_from", str(trained_run), "--xtrain_path", str(mine), "--save_dir", str(run),
                          "--total_epochs", "1", "--replay", "3", "--batch_size", "8", "--num_workers", "0",
                          "--no-augment"]) == 0
    data = evaluate.load_validation_split(predict.load_predictor(run), run)
    folders = json.loads((run / "split.json").read_text())["folders"]
    assert "equals the" in data.notes[0] and "at most 3 per class trained on, 10 per class held out" in data.description
    assert sorted(str(Path(p).relative_to(f["root"])) for f in folders for p, _ in data.samples
                  if Path(p).is_relative_to(f["root"])) == sorted(v for f in folders for v in f["val"])
    classes = predict.load_predictor(run).classes
    assert classes[-1] == "E" and {classes[label] for p, label in data.samples if Path(p).is_relative_to(mine)} \
        == {"B", "E"}  # the folder's b/ is the model's B


def test_a_changed_data_folder_is_reported_and_only_held_out_files_are_scored(trained_run, tmp_path):
    config = json.loads((trained_run / "config.json").read_text())
    val = json.loads((trained_run / "split.json").read_text())["folders"][0]["val"]
    data = tmp_path / "data"
    shutil.copytree(config["folders"][0]["root"], data)
    make_image_folder(data, per_class=16, seed=1)  # 4 new frames per class shift the block split
    (data / val[0]).unlink()
    run = tmp_path / "run"
    run.mkdir()
    run_artifacts.save_json({**config, "folders": [{**config["folders"][0], "root": str(data)}]}, run / "config.json")
    shutil.copy(trained_run / "split.json", run)

    result = evaluate.load_validation_split(predict.load_predictor(trained_run), run)
    assert "differs from the one training used" in result.notes[0] and "1 of its files are gone" in result.notes[0]
    assert [str(Path(p).relative_to(data)) for p, _ in result.samples] == val[1:]
    assert result.skipped == [str(data / val[0])]


def test_a_missing_training_data_folder_is_explained(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    run_artifacts.save_json({**config, "folders": [{**config["folders"][0], "root": str(tmp_path / "gone")}]},
                            run / "config.json")
    code, _, err = run_cli("--model_dir", str(run), "--out_dir", str(tmp_path / "out"))
    assert code == 2 and "is not on this machine" in err and "--test_dir" in err


# ------------------------------------------------------------------------------------------- the report

def test_report_holds_every_file_and_figure(report):
    out, stdout = report
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 300 and im.height >= 200, name
    for name in ("metrics.json", "classification_report.json", "classification_report.txt", "predictions.csv"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert all(f"]({name})" in md for name in FIGURES)
    assert "equals the 9 files training held out" in md and "/run --out_dir" in md
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 9 and m["skipped"] == [] and m["model"]["arch"] == "efficientnet_lite0"
    assert m["dataset"]["description"].startswith("validation split of")
    assert f"accuracy {m['accuracy']:.4f} | macro F1 {m['macro_f1']:.4f} | top-3 accuracy 1.0000" in stdout
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporaries


def test_report_figures_agree_with_scikit_learn_on_the_written_predictions(report):
    out, _ = report
    rows = read_predictions(out)
    truth, pred = [r["true"] for r in rows], [r["predicted"] for r in rows]
    written = json.loads((out / "classification_report.json").read_text())
    expected = classification_report(truth, pred, output_dict=True, zero_division=0)
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        assert written[key] == pytest.approx(value)
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == pytest.approx(accuracy_score(truth, pred))


def test_lite0_checkpoint_round_trips_through_evaluate(report, trained_run):
    out, _ = report
    rows = read_predictions(out)
    predictor = predict.load_predictor(trained_run)
    # 1. evaluate's batched path equals the shared predictor image by image
    images = [image_io.load_rgb(r["path"]) for r in rows]
    direct = predictor.predict(images)
    assert [predictor.classes[i] for i in direct.argmax(1)] == [r["predicted"] for r in rows]
    np.testing.assert_allclose(direct.max(1).values.numpy(), [float(r["probability"]) for r in rows], atol=1e-5)
    # 2. ... and a network rebuilt by hand from the checkpoint, without predict.py
    ckpt = run_artifacts.load_checkpoint(trained_run / "best.pt")
    assert ckpt["metadata"]["arch"] == "efficientnet_lite0"
    net = models.build_model("efficientnet_lite0", len(predictor.classes), weights="none")
    net.load_state_dict(ckpt["model"])
    transform = data_loader.eval_transform(json.loads((trained_run / "transform.json").read_text()))
    with torch.no_grad():
        logits = net.eval()(torch.stack([transform(im) for im in images]))
    assert torch.equal(logits.argmax(1), direct.argmax(1))
    temperature = ckpt["metadata"].get("temperature", 1.0)
    torch.testing.assert_close(torch.softmax(logits / temperature, 1), direct, atol=1e-5, rtol=1e-4)


def test_pred_and_plot_image_titles_truth_prediction_and_probability(trained_run, synthetic_dir):
    predictor = predict.load_predictor(trained_run)
    path = synthetic_dir / "B" / "B3.jpg"
    with torch.no_grad():  # a bare network has no calibrated temperature: its plain softmax
        probs = torch.softmax(predictor.model(predictor.preprocess(image_io.load_rgb(path))[None]), 1)[0]
    expected, p = predictor.classes[int(probs.argmax())], float(probs.max())
    # a bare network with its classes and transform settings, as after training in a notebook
    label, prob, ax = evaluate.pred_and_plot_image(predictor.model, path, predictor.classes,
                                                   predictor.transform_cfg, true_label="B")
    assert label == expected and prob == pytest.approx(p, abs=1e-5)
    assert ax.get_title() == f"true B\npred {expected} ({p:.2f})"
    assert ax.title.get_color() == ("tab:green" if expected == "B" else "tab:red")
    assert len(ax.get_images()) == 1


# ------------------------------------------------------------------------------------------- test folders

def test_a_test_folder_with_a_subset_of_classes_and_unreadable_images(trained_run, tmp_path):
    data = make_image_folder(tmp_path / "test", classes=("A", "B"), per_class=4, seed=5)
    good = Path(data / "A" / "A1.jpg").read_bytes()
    (data / "A" / "A_truncated.jpg").write_bytes(good[: len(good) // 3])  # valid header, fails to decode
    (data / "B" / "garbage.jpg").write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    code, stdout, err = run_cli("--model_dir", str(trained_run), "--test_dir", str(data), "--out_dir", str(out),
                                "--samples", "2")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 8 and m["classes_absent"] == ["C"] and set(m["per_class"]) == {"A", "B"}
    assert sorted(Path(p).name for p in m["skipped"]) == ["A_truncated.jpg", "garbage.jpg"]
    assert "Note: Model classes absent from the data: C" in stdout
    md = (out / "report.md").read_text()
    assert "A_truncated.jpg" in md and "garbage.jpg" in md and "class sub-folders" in md
    rows = read_predictions(out)
    assert m["accuracy"] == pytest.approx(np.mean([r["true"] == r["predicted"] for r in rows]))


def test_mirror_scores_the_mirrored_images(trained_run, synthetic_dir, tmp_path):
    predictor = predict.load_predictor(trained_run)
    samples = [(str(next((synthetic_dir / c).iterdir())), k) for k, c in enumerate("ABC")]
    plain, _, _ = evaluate.predict_samples(predictor, samples)
    mirrored, _, _ = evaluate.predict_samples(predictor, samples, mirror=True)
    images = [ImageOps.mirror(image_io.load_rgb(path)) for path, _ in samples]
    np.testing.assert_allclose(mirrored, predictor.predict(images).numpy(), atol=1e-6)
    assert not np.allclose(mirrored, plain, atol=1e-4)  # the synthetic shapes are not symmetric
    out = tmp_path / "out"
    code, _, err = run_cli("--model_dir", str(trained_run), "--test_dir", str(synthetic_dir), "--out_dir", str(out),
                           "--samples", "0", "--mirror")
    assert code == 0, err
    assert any("mirrored" in note for note in json.loads((out / "metrics.json").read_text())["notes"])


def test_mirror_figures_show_the_predictions_of_the_csv_from_one_pass(trained_run, synthetic_dir, tmp_path,
                                                                       monkeypatch):
    figures, predicted = {}, []
    monkeypatch.setattr(evaluate, "save_figure", lambda fig, path: figures.__setitem__(path.name, fig))
    batch = predict.Predictor.predict_batch
    monkeypatch.setattr(predict.Predictor, "predict_batch",
                        lambda self, images: (predicted.append(len(images)), batch(self, images))[1])
    out = tmp_path / "out"
    code, _, err = run_cli("--model_dir", str(trained_run), "--test_dir", str(synthetic_dir), "--out_dir", str(out),
                           "--samples", "36", "--mirror")
    assert code == 0, err
    rows = {r["path"]: r for r in read_predictions(out)}
    assert sum(predicted) == len(rows) == 36  # every image through the model once, figures included
    shown = [ax for name in ("samples.png", "misclassified.png") for ax in figures[name].axes if ax.get_images()]
    assert len(shown) >= 36
    titles = {ax.get_title() for ax in shown}
    expected = {f"true {r['true']}\npred {r['predicted']} ({float(r['probability']):.2f})" for r in rows.values()}
    assert titles <= expected and len(titles & expected) >= 2


def test_max_per_class_and_mlflow_run_hand_the_report_on(trained_run, synthetic_dir, tmp_path, monkeypatch):
    # a stand-in for log_experiment: what reaches MLflow is that module's business, the hand-over is ours
    calls = []

    def log_evaluation(run_id, out_dir, metrics, card=None):
        calls.append((run_id, Path(out_dir), metrics, card))
        if run_id == "no-such-run":
            raise fake.TrackingError("Could not add the evaluation to MLflow run no-such-run.")

    fake = types.ModuleType("log_experiment")
    fake.TrackingError = type("TrackingError", (UsageError,), {})  # as the real one: a UsageError
    fake.log_evaluation = log_evaluation
    monkeypatch.setitem(sys.modules, "log_experiment", fake)
    out = tmp_path / "out"
    args = ["--checkpoint", str(trained_run / "best.pt"), "--test_dir", str(synthetic_dir), "--max_per_class", "2",
            "--out_dir", str(out), "--samples", "0"]
    code, _, err = run_cli(*args, "--mlflow_run", "abc123")
    assert code == 0, err
    (run_id, logged_dir, metrics, card), = calls
    assert run_id == "abc123" and logged_dir == out and metrics == json.loads((out / "metrics.json").read_text())
    assert card == trained_run / "MODEL_CARD.md"  # the card of the checkpoint's training folder, this evaluation in
    assert metrics["n_images"] == 6 and metrics["dataset"]["max_per_class"] == 2
    code, _, err = run_cli(*args, "--mlflow_run", "no-such-run")
    assert code == 2 and "no-such-run" in err and f"The report itself is in {out}" in err


@pytest.mark.parametrize("make_args, message", [
    (lambda run, t: ["--model_dir", str(t / "nope")], "does not exist"),
    (lambda run, t: ["--checkpoint", str(t / "junk.pt")], "is not a checkpoint"),
    (lambda run, t: ["--model_dir", str(run), "--test_dir", str(t / "nope")], "does not exist"),
    (lambda run, t: ["--model_dir", str(run), "--test_dir", str(t / "empty")], "No labelled images"),
    (lambda run, t: ["--model_dir", str(run), "--test_dir",
                     str(make_image_folder(t / "unknown", classes=("A", "Q", "zz"), per_class=1))],
     "does not know: Q, zz"),
    (lambda run, t: ["--model_dir", str(run), "--batch_size", "0"], "--batch_size"),
])
def test_bad_input_exits_2_with_one_clear_line(trained_run, tmp_path, make_args, message):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(*make_args(trained_run, tmp_path), "--out_dir", str(tmp_path / "out"))
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_flag_without_cuda_is_explained(trained_run, tmp_path):
    code, _, err = run_cli("--model_dir", str(trained_run), "--gpu", "--out_dir", str(tmp_path))
    assert code == 2 and "no CUDA device" in err


# ------------------------------------------------------------------------------------------- real images

@requires_shared
def test_classes_the_model_does_not_know_are_refused_or_left_out_when_asked(tmp_path):
    make_image_folder(tmp_path / "t", classes=("A", "Q"), per_class=2)
    with pytest.raises(evaluate.DatasetError, match="class\\(es\\) the model does not know: Q"):
        evaluate.load_test_folder(tmp_path / "t", ["A", "B"])
    data = evaluate.load_test_folder(tmp_path / "t", ["A", "B"], known_only=True)
    assert [label for _, label in data.samples] == [0, 0] and "left out (--known_classes_only): Q." in data.notes[0]


def test_kaggle_test_folder_is_parsed_with_labels_from_names():
    images = data_loader.scan_flat_folder(SHARED_ASL / "test")
    assert len(images.samples) == 28 and images.skipped == []
    assert "del" not in images.classes and len(images.classes) == 28
    assert all(Path(p).name == f"{images.classes[label]}_test.jpg" for p, label in images.samples)


@requires_shared
def test_29_class_model_on_the_kaggle_test_folder(tmp_path, trained_run):
    # an untrained 29-class Lite0 checkpoint: the pipeline, not the accuracy, is under test
    classes = sorted(d.name for d in (SHARED_ASL / "train").iterdir() if d.is_dir())
    net = models.build_model("efficientnet_lite0", len(classes), weights="none")
    meta = {"arch": "efficientnet_lite0", "num_classes": len(classes), "classes": classes,
            "transform": models.preprocessing("efficientnet_lite0", "none", img_size=64)}
    torch.save({"model": net.state_dict(), "metadata": meta}, tmp_path / "model.pt")
    out = tmp_path / "out"
    code, stdout, err = run_cli("--checkpoint", str(tmp_path / "model.pt"), "--test_dir", str(SHARED_ASL / "test"),
                                "--out_dir", str(out), "--samples", "0")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 28 and m["classes_absent"] == ["del"] and len(m["per_class"]) == 28
    assert "flat files" in m["dataset"]["description"]
    # the 3-class synthetic model does not know most Kaggle classes: one clear line names them
    code, _, err = run_cli("--model_dir", str(trained_run), "--test_dir", str(SHARED_ASL / "test"),
                           "--out_dir", str(out))
    assert code == 2 and "does not know: D, E, F" in err and "nothing, space" in err


def test_hand_and_trust_metrics_count_what_the_app_would_answer():
    import hands

    classes = ["A", "B", "nothing"]
    probs = np.array([[0.9, 0.05, 0.05],   # A, sure, right
                      [0.2, 0.7, 0.1],     # B, sure, wrong (truth A)
                      [0.45, 0.4, 0.15],   # A, unsure
                      [0.8, 0.1, 0.1]])    # A, sure, but no hand found
    y_true = np.array([0, 0, 0, 0])
    hand = hands.Hand(np.zeros((21, 3), np.float32), np.zeros((21, 3), np.float32), "Right", 1.0)
    m = evaluate.hand_and_trust_metrics(y_true, probs, classes, [hand, hand, hand, None], 0.5)
    assert m["hands"] == {"found_share": 0.75, "n_with_hand": 3, "n_without_hand": 1,
                          "accuracy_with_hand": pytest.approx(2 / 3), "accuracy_without_hand": 1.0}
    assert m["trust"]["coverage"] == 0.5 and m["trust"]["accuracy_when_answered"] == 0.5
    assert m["trust"]["ece"] > 0
    # a model that does not look for hands answers whenever it is sure
    assert evaluate.hand_and_trust_metrics(y_true, probs, classes, None, 0.5)["trust"]["coverage"] == 0.75
    # where its two networks name different classes the app does not answer, however sure
    m = evaluate.hand_and_trust_metrics(y_true, probs, classes, [hand, hand, hand, None], 0.5,
                                        [True, False, True, None])
    assert m["hands"]["agreed_share"] == pytest.approx(2 / 3)
    assert m["hands"]["accuracy_agreed"] == 1.0 and m["hands"]["accuracy_disagreed"] == 0.0
    assert m["trust"]["coverage"] == 0.25 and m["trust"]["accuracy_when_answered"] == 1.0


def test_trust_by_threshold_is_what_the_app_would_answer_at_each_setting():
    classes = ["A", "B", "nothing"]
    probs = np.array([[0.9, 0.05, 0.05],   # A, right
                      [0.2, 0.7, 0.1],     # B, wrong (truth A)
                      [0.45, 0.4, 0.15],   # A, right
                      [0.1, 0.1, 0.8]])    # the empty scene: never an answer
    m = evaluate.hand_and_trust_metrics(np.array([0, 0, 0, 0]), probs, classes, None, 0.5)
    steps = {row["threshold"]: row for row in m["trust"]["by_threshold"]}
    assert list(steps) == [round(0.05 * i, 2) for i in range(21)]
    # the report's own threshold is one of the steps, with the same figures
    assert {k: steps[0.5][k] for k in ("coverage", "accuracy_when_answered")} == {
        k: m["trust"][k] for k in ("coverage", "accuracy_when_answered")}
    assert steps[0.0] == {"threshold": 0.0, "coverage": 0.75, "accuracy_when_answered": pytest.approx(2 / 3)}
    assert steps[0.75] == {"threshold": 0.75, "coverage": 0.25, "accuracy_when_answered": 1.0}
    assert steps[0.95] == {"threshold": 0.95, "coverage": 0.0, "accuracy_when_answered": None}
    coverage = [row["coverage"] for row in m["trust"]["by_threshold"]]
    assert coverage == sorted(coverage, reverse=True)
    # no answer at the top settings: that line stops, and the figure still draws
    fig = evaluate.plot_trust_by_threshold(m["trust"])
    right = fig.axes[0].get_lines()[1]
    assert list(right.get_xdata()) == [row["threshold"] for row in m["trust"]["by_threshold"]
                                       if row["coverage"] > 0]


@pytest.mark.slow
def test_a_hand_aware_model_is_evaluated_with_its_hands(hand_run, tmp_path):
    data = tmp_path / "external"
    for name in ("A", "B", "L"):
        (data / name).mkdir(parents=True)
        for n in range(1, 6):
            shutil.copy(SHARED_ASL / "external" / name / f"{n}.jpg", data / name)
    out = tmp_path / "report"
    code, stdout, _ = run_cli("--model_dir", str(hand_run), "--test_dir", str(data), "--out_dir", str(out))
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    found = evaluate.find_hands(predict.load_predictor(hand_run), [(str(p), 0) for p in sorted(data.rglob("*.jpg"))])
    assert metrics["hands"]["found_share"] == pytest.approx(np.mean([h is not None for h in found]))
    assert 0 < metrics["hands"]["n_with_hand"] <= 15 and 0 <= metrics["trust"]["coverage"] <= 1
    md = (out / "report.md").read_text()
    assert "## Hands and trust" in md and "hand found in" in stdout
    # the letters it gets wrong on this person are named, with what they are read as, in the report and the summary
    weak = {w["class"]: w for w in metrics["weak_classes"]}
    assert set(weak) == {c for c, row in metrics["per_class"].items() if row["recall"] < evaluate.WEAK_RECALL}
    for w in weak.values():
        assert f"| {w['class']} | {w['recall']:.2f} |" in md and evaluate.read_as_text(w) in stdout
    # evaluation reads each image as the app does: for this crop model, the square around the hand it found
    predictor = predict.load_predictor(hand_run)
    assert predictor.crop_margin
    samples = [(str(p), 0) for p in sorted(data.rglob("*.jpg"))]
    probs, scored, _ = evaluate.predict_samples(predictor, samples, found=found)
    np.testing.assert_array_equal(evaluate.predict_samples(predictor, samples)[0], probs)  # searched if not given
    pooled, _ = predictor.combine(torch.from_numpy(probs), found)
    served = predictor.predict([image_io.load_rgb(path) for path, _ in scored])
    torch.testing.assert_close(pooled, served, atol=1e-5, rtol=1e-4)
