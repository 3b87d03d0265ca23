"""leave_one_out: each folder scored by a model trained on the others; the table; continuing a killed run."""
from __future__ import annotations

import json
import shutil

import pytest

import data_sources
import leave_one_out
import predict
import pt_train
from conftest import SHARED_ASL, make_image_folder, write_catalog

FAST = ["--weights", "none", "--img_size", "32", "--batch_size", "8", "--num_workers", "0", "--no-augment",
        "--total_epochs", "1"]


@pytest.fixture(scope="module")
def signers(tmp_path_factory):
    """Three tiny 'signers', each folder drawn with its own noise: three classes, and a fourth in the last one
    (as the Kaggle signer's folder holds del, nothing and space, which other people's folders lack)."""
    root = tmp_path_factory.mktemp("signers")
    return [make_image_folder(root / name, classes=("A", "B", "C", "D")[:3 + (name == "cy")], per_class=6, seed=seed)
            for seed, name in enumerate(("ann", "bo", "cy"))]


@pytest.fixture(scope="module")
def table(signers, tmp_path_factory):
    out = tmp_path_factory.mktemp("loso") / "out"
    assert leave_one_out.main(["--xtrain_path", *map(str, signers), "--out_dir", str(out), *FAST]) == 0
    return out


def test_each_folder_is_scored_by_a_model_that_never_saw_it(table, signers):
    rows = json.loads((table / "table.json").read_text())
    assert list(rows) == ["ann", "bo", "cy"]
    for name, folder in zip(rows, signers):
        config = json.loads((table / name / "run" / "config.json").read_text())
        assert [f["root"] for f in config["folders"]] == [str(s) for s in signers if s != folder]
        metrics = json.loads((table / name / "report" / "metrics.json").read_text())
        assert metrics["n_images"] == rows[name]["images"] == 18  # the whole folder left out, not a split of it
        assert rows[name]["accuracy"] == metrics["accuracy"] and rows[name]["ece"] == metrics["trust"]["ece"]
        assert str(folder) in metrics["dataset"]["description"]
    # left out, "cy" is read by a model that never learnt its D: the rest of it is scored, D is named
    assert any("does not know were left out" in note and ": D." in note
               for note in json.loads((table / "cy" / "report" / "metrics.json").read_text())["notes"])


def test_the_table_has_a_row_per_folder_and_their_mean(table):
    rows = json.loads((table / "table.json").read_text())
    md = (table / "table.md").read_text().splitlines()
    body = [line for line in md if line.startswith("| ")][1:]  # below the header
    assert [line.split(" | ")[0] for line in body] == ["| ann", "| bo", "| cy", "| **mean**"]
    mean_accuracy = sum(row["accuracy"] for row in rows.values()) / 3
    assert f"{mean_accuracy:.4f}" in body[-1]


def test_a_second_call_keeps_the_folds_already_scored(table, signers, monkeypatch):
    def no_training(argv):
        raise AssertionError("a scored fold was trained again")

    monkeypatch.setattr(pt_train, "main", no_training)
    before = (table / "table.json").read_text()
    assert leave_one_out.main(["--xtrain_path", *map(str, signers), "--out_dir", str(table), "--folds", "bo",
                               *FAST]) == 0
    assert (table / "table.json").read_text() == before


def test_a_fold_that_was_killed_resumes_from_its_checkpoint(signers, tmp_path):
    run = tmp_path / "out" / "ann" / "run"
    assert pt_train.main([*FAST, "--xtrain_path", *map(str, signers[1:]), "--save_dir", str(run)]) == 0
    argv = leave_one_out.fold_argv(FAST, signers[1:], run)
    assert argv[-1] == "--resume"
    assert leave_one_out.main(["--xtrain_path", *map(str, signers), "--out_dir", str(tmp_path / "out"),
                               "--folds", "ann", *FAST]) == 0
    history = json.loads((run / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1]  # the finished epoch was not trained again


def test_each_fold_calibrates_on_another_person_than_the_one_left_out(signers):
    cal_on = [signers[2], signers[0]]  # the recipe: hold out "cy" to calibrate on, "ann" where "cy" is left out
    for left_out, calibrated in ((signers[0], signers[2]), (signers[2], signers[0])):
        others = [s for s in signers if s != left_out]
        argv = leave_one_out.fold_argv(FAST, others, left_out / "run", next(c for c in cal_on if c != left_out))
        args = pt_train.parse_args(argv)
        assert args.calibration_path == [str(calibrated)]
        assert args.xtrain_path == [str(s) for s in others if s != calibrated]


@pytest.mark.parametrize("extra, message", [
    (["--folds", "dee"], "--folds dee: not among the training folders (ann, bo, cy)"),
    (["--calibrate_on", "dee"], "--calibrate_on dee: not among the training folders"),
    (["--calibrate_on", "ann", "--folds", "ann"], "--calibrate_on names only 'ann', left out here"),
    (["--calibration_path", "x"], "Name the folders to calibrate on with --calibrate_on"),
    (["--hands_only", "--hands", "none"], "--hands_only trains the landmark network"),
])
def test_bad_input_exits_2_with_one_clear_line(signers, tmp_path, capsys, extra, message):
    assert leave_one_out.main(["--xtrain_path", *map(str, signers), "--out_dir", str(tmp_path), *extra, *FAST]) == 2
    assert message in capsys.readouterr().err


def test_the_folders_may_be_named_as_data(signers, tmp_path, monkeypatch, capsys):
    root = signers[0].parent
    monkeypatch.setattr(data_sources, "CATALOG", write_catalog(tmp_path / "catalog.json", root, ["ann", "bo", "cy"]))
    # the folders resolved are the ones dealt: an unknown fold is named among them, before any training
    assert leave_one_out.main(["--data", "people", "--data_dir", str(root), "--out_dir", str(tmp_path / "out"),
                               "--folds", "dee", *FAST]) == 2
    assert "--folds dee: not among the training folders (ann, bo, cy)" in capsys.readouterr().err
    assert leave_one_out.main(["--out_dir", str(tmp_path / "out"), *FAST]) == 2
    assert "at least two training folders (--data or --xtrain_path)" in capsys.readouterr().err


def test_one_folder_cannot_be_left_out_of_itself(signers, tmp_path, capsys):
    assert leave_one_out.main(["--xtrain_path", str(signers[0]), "--out_dir", str(tmp_path), *FAST]) == 2
    assert "at least two training folders" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_ASL.is_dir(), reason="real ASL images (../shared/asl) not present")
def test_hands_only_scores_the_landmark_network_on_the_hands_of_the_folder_left_out(tmp_path):
    folders = []
    for k, source in enumerate((SHARED_ASL / "train", SHARED_ASL / "external")):
        folder = tmp_path / f"signer{k}"
        for name in ("A", "B", "L"):
            (folder / name).mkdir(parents=True)
            for path in sorted(source.joinpath(name).iterdir())[:12]:
                shutil.copy(path, folder / name)
        folders.append(folder)
    out = tmp_path / "out"
    assert leave_one_out.main(["--xtrain_path", *map(str, folders), "--out_dir", str(out), "--hands_only",
                               "--hand_epochs", "5", *FAST]) == 0
    rows = json.loads((out / "table.json").read_text())
    for name in ("signer0", "signer1"):
        row = rows[name]
        assert row["images"] == 36 and 0.5 < row["hand_found"] <= 1 and 0 <= row["accuracy"] <= 1
        assert not (out / name / "run" / "best.pt").exists()  # no image network was trained
        assert (out / name / "run" / "hand_net" / "best.pt").is_file()


def test_the_deal_puts_each_folder_in_one_group_the_same_way_for_a_seed():
    names = [f"p{k}" for k in range(21)]
    groups = leave_one_out.deal(names, 5, seed=42)
    assert sorted(name for group in groups for name in group) == sorted(names)
    assert sorted(len(group) for group in groups) == [4, 4, 4, 4, 5]
    assert leave_one_out.deal(names, 5, seed=42) == groups
    assert any(leave_one_out.deal(names, 5, seed=seed) != groups for seed in range(5))


@pytest.fixture(scope="module")
def grouped(signers, tmp_path_factory):
    out = tmp_path_factory.mktemp("grouped") / "out"
    assert leave_one_out.main(["--xtrain_path", *map(str, signers), "--out_dir", str(out), "--groups", "2",
                               *FAST]) == 0
    return out


def test_grouped_folds_score_each_folder_by_the_model_of_the_fold_that_left_it_out(grouped, signers):
    rows = json.loads((grouped / "table.json").read_text())
    folds = json.loads((grouped / leave_one_out.DEAL_FILE).read_text())
    assert folds == leave_one_out.folds_of(["ann", "bo", "cy"], 2, 42)
    assert list(rows) == ["ann", "bo", "cy"] and sorted(map(len, folds.values())) == [1, 2]
    root = dict(zip(("ann", "bo", "cy"), map(str, signers)))
    for fold, members in folds.items():
        config = json.loads((grouped / fold / "run" / "config.json").read_text())
        assert [f["root"] for f in config["folders"]] == [root[n] for n in root if n not in members]
        for name in members:
            assert rows[name]["fold"] == fold
            metrics = json.loads((grouped / name / "report" / "metrics.json").read_text())
            assert metrics["n_images"] == rows[name]["images"] == 18  # cy's D: unknown
            assert str(signers[list(root).index(name)]) in metrics["dataset"]["description"]
    assert len(list(grouped.glob("group-*/run/best.pt"))) == 2  # two trainings for three folders
    body = [line for line in (grouped / "table.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[:2] for line in body[:3]] == [[f"| {n}", rows[n]["fold"]] for n in rows]
    assert f"{sum(row['accuracy'] for row in rows.values()) / 3:.4f}" in body[-1]


def test_an_out_dir_keeps_the_deal_it_was_started_with(grouped, signers, capsys):
    assert leave_one_out.main(["--xtrain_path", *map(str, signers), "--out_dir", str(grouped), *FAST]) == 2
    assert "holds folds dealt otherwise" in capsys.readouterr().err


def person(fold: str, accuracy_from: dict[float, float]) -> dict:
    """A left-out folder's row: 10 photos, half of them answered at every threshold, right as often as
    `accuracy_from` says from each threshold on."""
    def right(t: float) -> float:
        return accuracy_from[max(k for k in accuracy_from if k <= t)]
    return {"fold": fold, "images": 10, "by_threshold": [{"threshold": t, "coverage": 0.5,
                                                           "accuracy_when_answered": right(t)}
                                                          for t in predict.THRESHOLD_STEPS]}


def test_the_app_s_threshold_is_fitted_on_the_people_left_out_and_checked_on_people_outside_the_fit():
    rows = {"ann": person("group-1", {0: 0.9, 0.6: 1.0}), "bo": person("group-2", {0: 0.9, 0.8: 0.98}),
            "cy": person("group-3", {0: 0.95})}
    fitted = leave_one_out.fitted_threshold(rows)
    # pooled: 0.9167 below 0.6, 0.95 from 0.6, 0.9767 from 0.8
    assert fitted["threshold"] == 0.8 and fitted["reached"] and fitted["people"] == 3
    cross = fitted["cross_fitted"]
    # without ann no threshold reaches 97% (ann keeps 0.5); without bo 0.6 does; without cy 0.8
    assert cross["per_fold"] == {"group-1": None, "group-2": 0.6, "group-3": 0.8}
    assert cross["right_when_answered"] == pytest.approx((0.9 + 0.9 + 0.95) / 3) and cross["answered"] == 0.5
    assert cross["people_below_precision"] == 3
    assert "right 97%" in leave_one_out.threshold_markdown({**fitted, "reached": False})
    assert "**0.80**" in leave_one_out.threshold_markdown(fitted) and "--threshold 0.80" in \
        leave_one_out.threshold_markdown(fitted)


def test_a_grouped_table_names_the_threshold_fitted_on_its_people(grouped):
    fitted = json.loads((grouped / "threshold.json").read_text())
    rows = json.loads((grouped / "table.json").read_text())
    assert fitted == leave_one_out.fitted_threshold(rows)
    for name, row in rows.items():  # each person's row holds what the app does at each threshold on them
        assert row["by_threshold"] == json.loads((grouped / name / "report" / "metrics.json").read_text()
                                                 )["trust"]["by_threshold"]
    assert (grouped / "table.md").read_text().endswith(leave_one_out.threshold_markdown(fitted))
