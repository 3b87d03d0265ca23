"""pt_train: the CLI end to end on the real EfficientNet, its error messages, DDP launchers and crash-resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

import data_loader
import data_sources
import hands
import image_io
import model
import predict
import pt_train
import run_artifacts
from conftest import (HAND_CLASSES, ROOT, SHARED_ASL, make_image_folder, requires_cuda, requires_shared,
                      write_catalog)

FAST = ["--weights", "none", "--img_size", "32", "--batch_size", "8", "--num_workers", "0", "--no-augment"]


def cli(*args: str, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "pt_train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


def test_training_run_writes_a_complete_model_folder(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    assert pt_train.main(["--xtrain_path", str(synthetic_dir), "--save_dir", str(out), "--total_epochs", "2",
                          *FAST]) == 0
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "history.json", "classes.json",
                                               "transform.json", "config.json", "split.json"}
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert json.loads((out / "classes.json").read_text()) == ["A", "B", "C"]
    transform = json.loads((out / "transform.json").read_text())
    assert transform["crop_size"] == 32 and transform["arch"] == "efficientnet_b0"
    split = json.loads((out / "split.json").read_text())
    assert split["split_by"] == "block" and split["num_train"] + len(split["folders"][0]["val"]) == 36
    meta = run_artifacts.load_checkpoint(out / "last.pt")["metadata"]
    assert meta["arch"] == "efficientnet_b0" and meta["args"]["total_epochs"] == 2
    head = predict.load_predictor(out).model.classifier
    assert isinstance(head[0], torch.nn.Dropout) and head[0].p == 0.2 and head[1].out_features == 3


def test_pretrained_lite0_learns_the_synthetic_classes(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    assert pt_train.main(["--xtrain_path", str(synthetic_dir), "--save_dir", str(out), "--arch",
                          "efficientnet_lite0", "--weights", "imagenet", "--img_size", "64", "--total_epochs", "4",
                          "--batch_size", "4", "--num_workers", "0", "--val_split", "0.25"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["val_acc"] >= 0.8  # chance is 1/3
    # by default the stem and the first stages keep ImageNet's weights; the later ones learnt
    trained = model.backbone_stages(predict.load_predictor(out).model)
    imagenet = model.backbone_stages(model.build_model("efficientnet_lite0", 3, "imagenet"))
    same = [all(torch.equal(a, b) for a, b in zip(t.parameters(), i.parameters()))
            for t, i in zip(trained, imagenet)]
    assert same == [True] * (pt_train.PRETRAINED_FROZEN_STAGES + 1) + [False] * (
        model.N_STAGES - pt_train.PRETRAINED_FROZEN_STAGES)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        pt_train.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--calibration_path" in out and f"right {predict.ANSWER_PRECISION:.0%} of the time" in out


@pytest.mark.parametrize("make_args, message", [
    (lambda d, t: ["--xtrain_path", str(t / "nope")], "does not exist"),
    (lambda d, t: ["--xtrain_path", str(make_image_folder(t / "one", classes=("A",), per_class=2))], "at least 2"),
    (lambda d, t: ["--xtrain_path", str(d), "--weights", str(t / "missing.pth")], "missing.pth"),
    (lambda d, t: ["--xtrain_path", str(d), "--total_epochs", "0"], "--total_epochs"),
    (lambda d, t: ["--xtrain_path", str(d), "--hflip", "--no-augment"], "--hflip"),
])
def test_bad_input_exits_2_with_one_clear_line(synthetic_dir, tmp_path, capsys, make_args, message):
    assert pt_train.main([*make_args(synthetic_dir, tmp_path), "--save_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_decompression_bomb_in_the_data_is_skipped_and_counted(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=6)
    Image.new("1", (14000, 14000)).save(data / "A" / "A99.png")  # 196 megapixels, tens of KB on disk
    assert pt_train.main(["--xtrain_path", str(data), "--save_dir", str(tmp_path / "run"), "--total_epochs", "1",
                          *FAST]) == 0
    err = capsys.readouterr().err
    assert "1 file(s) skipped" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_flag_without_cuda_is_explained(synthetic_dir, tmp_path, capsys):
    assert pt_train.main(["--xtrain_path", str(synthetic_dir), "--gpu", "--save_dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_existing_run_is_not_overwritten_by_accident(synthetic_dir, tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"precious")
    assert pt_train.main(["--xtrain_path", str(synthetic_dir), "--save_dir", str(tmp_path), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err and (tmp_path / "last.pt").read_bytes() == b"precious"


def test_the_default_resolution_follows_the_weights_unless_given():
    # which resolutions are best is measured (docs/results.md, "Model quality"); here: that the choice is applied
    assert pt_train.parse_args([]).img_size == pt_train.DEFAULT_IMG_SIZE_PRETRAINED
    assert pt_train.parse_args(["--weights", "none"]).img_size == pt_train.DEFAULT_IMG_SIZE_SCRATCH
    assert pt_train.DEFAULT_IMG_SIZE_PRETRAINED != pt_train.DEFAULT_IMG_SIZE_SCRATCH  # else this cannot tell
    assert pt_train.parse_args(["--weights", "none", "--img_size", "64"]).img_size == 64


def test_the_quick_recipe_presets_options_that_the_command_line_overrides(capsys):
    quick = pt_train.parse_args(["--recipe", "quick"])
    assert {k: getattr(quick, k) for k in pt_train.RECIPES["quick"]} == pt_train.RECIPES["quick"]
    assert pt_train.parse_args([]).total_epochs != quick.total_epochs  # else this cannot tell
    mine = pt_train.parse_args(["--recipe", "quick", "--total_epochs", "5", "--arch", "efficientnet_b0"])
    assert (mine.total_epochs, mine.arch, mine.max_per_class, mine.img_size) == (5, "efficientnet_b0", 20, 128)
    with pytest.raises(SystemExit):
        pt_train.parse_args(["--recipe", "quick", "--init_from", "runs/x"])
    assert "--recipe quick trains a new model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pt_train.parse_args(["--help"])
    assert "--recipe {quick}" in capsys.readouterr().out


def test_data_names_are_the_catalog_s_folders_before_xtrain_path(tmp_path, monkeypatch, capsys):
    for name in ("ann", "bo"):
        make_image_folder(tmp_path / "copy" / name, per_class=2)
    monkeypatch.setattr(data_sources, "CATALOG", write_catalog(tmp_path / "catalog.json", tmp_path / "copy", ["ann", "bo"]))
    extra = make_image_folder(tmp_path / "extra", per_class=2)
    args = pt_train.parse_args(["--data", "people", "--data_dir", str(tmp_path / "copy"), "--xtrain_path", str(extra)])
    assert pt_train.training_roots(args) == [tmp_path / "copy" / "ann", tmp_path / "copy" / "bo", extra]
    with pytest.raises(SystemExit):
        pt_train.parse_args(["--data_dir", str(tmp_path)])
    assert "name them with --data" in capsys.readouterr().err
    assert pt_train.main(["--data", "nobody", "--save_dir", str(tmp_path / "run")]) == 2
    assert "No data named 'nobody'" in capsys.readouterr().err


@requires_shared
def test_the_quick_start_by_name_trains_on_the_folders_the_shell_glob_gave():
    by_name = pt_train.parse_args(["--data", "everyone", "--data_dir", str(SHARED_ASL), "--recipe", "quick"])
    by_path = pt_train.parse_args(["--xtrain_path", str(SHARED_ASL / "train"),
                                   *sorted(str(p) for p in (SHARED_ASL / "signers").glob("*")),
                                   "--max_per_class", "20", "--arch", "efficientnet_lite0", "--weights", "imagenet",
                                   "--img_size", "128", "--total_epochs", "3", "--threshold", "0.95"])
    assert pt_train.training_roots(by_name) == pt_train.training_roots(by_path)
    same = ("data", "data_dir", "recipe", "xtrain_path")
    assert {k: v for k, v in vars(by_name).items() if k not in same} == \
        {k: v for k, v in vars(by_path).items() if k not in same}


def test_pretrained_weights_keep_their_first_stages_frozen_by_default(capsys):
    assert pt_train.parse_args([]).frozen_stages == pt_train.PRETRAINED_FROZEN_STAGES > 0
    assert pt_train.parse_args(["--weights", "none"]).frozen_stages == 0  # nothing learnt to keep
    assert pt_train.parse_args(["--init_from", "runs/x"]).frozen_stages == 0  # fine-tuning: measured as is
    assert pt_train.parse_args(["--frozen_stages", "5"]).frozen_stages == 5
    with pytest.raises(SystemExit):
        pt_train.parse_args(["--frozen_stages", "8"])
    assert "--frozen_stages" in capsys.readouterr().err


def test_gpu_augment_is_on_with_gpu_and_reads_the_cache():
    on = pt_train.parse_args(["--gpu"])
    assert on.gpu_augment and on.cache == "disk"
    off = pt_train.parse_args([])
    assert not off.gpu_augment and off.cache == "none"
    assert not pt_train.parse_args(["--gpu", "--cache", "none"]).gpu_augment
    assert pt_train.parse_args(["--gpu_augment"]).cache == "disk"


def test_gpu_augment_with_cache_none_is_explained(synthetic_dir, tmp_path, capsys):
    assert pt_train.main(["--xtrain_path", str(synthetic_dir), "--save_dir", str(tmp_path), "--gpu_augment",
                          "--cache", "none"]) == 2
    assert "--cache none" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_augment_training_resumes_exactly(synthetic_dir, tmp_path):
    # the device path on CPU tensors: an interrupted run continues as if it had never stopped
    common = ["--xtrain_path", str(synthetic_dir), "--gpu_augment", "--cache_dir", str(tmp_path / "cache"),
              "--scheduler", "none", "--no-calibrate", "--weights", "none", "--img_size", "32", "--batch_size", "8",
              "--num_workers", "0"]
    assert pt_train.main([*common, "--save_dir", str(tmp_path / "whole"), "--total_epochs", "2"]) == 0
    assert pt_train.main([*common, "--save_dir", str(tmp_path / "cut"), "--total_epochs", "1"]) == 0
    assert pt_train.main([*common, "--save_dir", str(tmp_path / "cut"), "--total_epochs", "2", "--resume"]) == 0
    whole, cut = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("whole", "cut"))
    assert [h["epoch"] for h in cut] == [1, 2]
    assert [h["train_loss"] for h in cut] == [h["train_loss"] for h in whole]
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["args"]["gpu_augment"] is True


def test_find_free_port_gives_distinct_usable_ports():
    ports = {pt_train.find_free_port() for _ in range(5)}
    assert len(ports) >= 4 and all(1024 < p < 65536 for p in ports)


def test_set_seed_makes_runs_repeatable():
    pt_train.set_seed(7)
    a = torch.rand(3)
    pt_train.set_seed(7)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.slow
def test_world_size_2_on_cpu_trains_with_one_history(synthetic_dir, tmp_path):
    out = tmp_path / "ddp"
    result = cli("--xtrain_path", str(synthetic_dir), "--save_dir", str(out), "--total_epochs", "2",
                 "--world_size", "2", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert result.stderr.count("INFO epoch 2/2") == 1  # one log, from rank 0


@pytest.mark.slow
def test_torchrun_launch_joins_its_process_group(synthetic_dir, tmp_path):
    out = tmp_path / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "pt_train.py", "--xtrain_path", str(synthetic_dir), "--save_dir", str(out),
                             "--total_epochs", "1", *FAST], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((out / "history.json").read_text())) == 1


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_a_complete_history(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=40)
    out = tmp_path / "run"
    args = ["--xtrain_path", str(data), "--save_dir", str(out), "--total_epochs", "4", "--batch_size", "4",
            "--weights", "none", "--img_size", "32", "--num_workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "pt_train.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history_file, deadline = out / "history.json", time.time() + 300
    while time.time() < deadline and not (history_file.exists() and len(json.loads(history_file.read_text())) >= 2):
        time.sleep(0.05)
    time.sleep(0.3)  # well into epoch 3
    assert proc.poll() is None, "training finished before it could be killed; give it more work"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(json.loads(history_file.read_text()))
    assert killed_at < 4
    result = cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"after epoch {killed_at}" in result.stderr
    history = json.loads(history_file.read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert run_artifacts.load_checkpoint(out / "last.pt")["epoch"] == 4


@pytest.mark.slow
def test_torchrun_restarts_the_group_after_a_worker_is_killed(tmp_path):
    # torchrun restarts both workers after one dies; the new group must not read the dead one's store keys
    data = make_image_folder(tmp_path / "data", per_class=40)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--max-restarts", "2", "pt_train.py", "--resume", "--xtrain_path", str(data),
                             "--save_dir", str(out), "--total_epochs", "3", *FAST], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    history_file, deadline = out / "history.json", time.time() + 300
    while time.time() < deadline and not history_file.exists():
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    workers = [p for p in psutil.Process(proc.pid).children() if "pt_train.py" in " ".join(p.cmdline())]
    assert proc.poll() is None and len(workers) == 2, "training finished before a worker could be killed"
    workers[-1].send_signal(signal.SIGKILL)
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()  # a group that hangs after the restart must not outlive the test
    assert proc.returncode == 0, stderr[-3000:]
    assert "Resumed from" in stderr
    assert [h["epoch"] for h in json.loads(history_file.read_text())] == [1, 2, 3]
    assert run_artifacts.load_checkpoint(out / "last.pt")["epoch"] == 3


@requires_shared
@pytest.mark.slow
def test_short_run_on_real_asl_images(tmp_path):
    # 4 real classes, 60 frames each: a few fine-tuning steps of the offline-pretrained backbone
    subset = tmp_path / "asl"
    for name in ("A", "B", "L", "nothing"):
        (subset / name).mkdir(parents=True)
        for n in range(5, 1505, 25):
            src = SHARED_ASL / "train" / name / f"{name}{n}.jpg"
            if src.exists():
                (subset / name / src.name).symlink_to(src)
    out = tmp_path / "run"
    assert pt_train.main(["--xtrain_path", str(subset), "--save_dir", str(out), "--arch", "efficientnet_lite0",
                          "--weights", "imagenet", "--img_size", "96", "--total_epochs", "2", "--batch_size", "16",
                          "--num_workers", "0", "--val_split", "0.2"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["val_acc"] > 0.5  # chance is 0.25


def _weights_and_history(run: Path) -> tuple[dict, list[dict]]:
    ckpt = run_artifacts.load_checkpoint(run / "last.pt")
    return ckpt["model"], [{k: v for k, v in h.items() if k != "time_s"} for h in ckpt["history"]]


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_one_under_the_defaults(tmp_path):
    # the CLI defaults that matter: loader workers (persistent across epochs) and augmentation on
    data = make_image_folder(tmp_path / "data", per_class=30, size=24)
    args = ["--xtrain_path", str(data), "--total_epochs", "3", "--batch_size", "4", "--weights", "none",
            "--img_size", "24", "--num_workers", "2", "--augment", "--no-calibrate"]
    assert cli(*args, "--save_dir", str(tmp_path / "whole")).returncode == 0
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "pt_train.py", *args, "--save_dir", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history_file, deadline = out / "history.json", time.time() + 600
    while time.time() < deadline and not history_file.exists():
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2
    assert proc.poll() is None, "training finished before it could be killed; give it more work"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(json.loads(history_file.read_text())) == 1, "not killed during epoch 2; give it more work"
    result = cli(*args, "--save_dir", str(out), "--resume")
    assert result.returncode == 0 and "after epoch 1" in result.stderr, result.stderr[-3000:]
    (whole, whole_history), (resumed, resumed_history) = _weights_and_history(tmp_path / "whole"), _weights_and_history(out)
    assert resumed_history == whole_history and len(whole_history) == 3
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_without_hands_in_the_data_the_model_reads_the_image_alone(trained_run):
    # synthetic squares hold no hand: the default --hands crop says so and trains the image network only, on
    # the whole images
    ckpt = run_artifacts.load_checkpoint(trained_run / "best.pt")
    assert "hand_net" not in ckpt and "hands" not in ckpt["metadata"]
    assert ckpt["metadata"]["args"]["hands"] == "crop" and ckpt["metadata"]["args"]["hflip"] is True
    assert pt_train.hand_mode(ckpt["metadata"]) == "none"
    assert not predict.load_predictor(trained_run).uses_hands


@pytest.mark.slow
def test_the_default_model_is_hand_aware_end_to_end(hand_run):
    ckpt = run_artifacts.check_checkpoint(run_artifacts.load_checkpoint(hand_run / "best.pt"))
    settings = ckpt["metadata"]["hands"]
    assert set(ckpt["hand_net"]) and settings["hidden"] == pt_train.HAND_HIDDEN
    assert settings["features"] == hands.N_FEATURES
    assert 0.5 < settings["found_share_train"] <= 1  # MediaPipe finds most of these hands
    assert settings["crop"] == hands.CROP_MARGIN and pt_train.hand_mode(ckpt["metadata"]) == "crop"
    assert ckpt["metadata"]["args"]["whole_share"] == pt_train.WHOLE_SHARE
    history = json.loads((hand_run / "hand_net" / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert (hand_run / "hand_net" / "calibration.json").is_file()
    predictor = predict.load_predictor(hand_run)
    assert predictor.uses_hands and predictor.metadata["hands"]["temperature"] == settings["temperature"]
    assert predictor.crop_margin == hands.CROP_MARGIN


@pytest.mark.slow
def test_fine_tuning_a_crop_model_keeps_reading_the_hand_s_square(hand_run, tmp_path):
    data = tmp_path / "mine"
    for name in HAND_CLASSES:
        (data / name).mkdir(parents=True)
        for n in range(1, 7):
            shutil.copy(SHARED_ASL / "external" / name / f"{n}.jpg", data / name)
    out = tmp_path / "taught"
    assert pt_train.main(["--init_from", str(hand_run), "--xtrain_path", str(data), "--save_dir", str(out),
                          "--total_epochs", "1", "--hand_epochs", "2", "--batch_size", "8", "--num_workers", "0",
                          "--cache", "disk", "--cache_dir", str(tmp_path / "cache"), "--val_split", "0.34"]) == 0
    meta = run_artifacts.load_checkpoint(out / "best.pt")["metadata"]
    assert meta["args"]["hands"] == "crop" and meta["hands"]["crop"] == hands.CROP_MARGIN
    assert predict.load_predictor(out).crop_margin == hands.CROP_MARGIN


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> tuple[Path, Path]:
    """Kaggle frames to train on and another person's photos to calibrate on, letters A, B and L."""
    if not SHARED_ASL.is_dir():
        pytest.skip("real ASL images (../shared/asl) not present")
    root = tmp_path_factory.mktemp("people")
    for folder, source, step in (("kaggle", "train", 30), ("other", "external", 15)):
        for name in HAND_CLASSES:
            (root / folder / name).mkdir(parents=True)
            for path in sorted(SHARED_ASL.joinpath(source, name).iterdir(), key=data_loader.frame_number)[:200:step]:
                shutil.copy(path, root / folder / name)
    return root / "kaggle", root / "other"


@pytest.mark.slow
def test_calibration_on_people_not_trained_on_fits_the_temperatures_and_the_app_s_threshold(people, tmp_path):
    kaggle, other = people
    out = tmp_path / "run"
    assert pt_train.main(["--xtrain_path", str(kaggle), "--calibration_path", str(other), "--save_dir", str(out),
                          "--arch", "efficientnet_lite0", "--img_size", "64", "--total_epochs", "1",
                          "--hand_epochs", "8", "--batch_size", "16", "--num_workers", "0"]) == 0
    n_other = sum(1 for _ in other.rglob("*.jpg"))
    assert json.loads((out / "calibration.json").read_text())["n_images"] == n_other  # all of them, none trained on
    assert "other" not in json.dumps(json.loads((out / "split.json").read_text()))
    fitted = json.loads((out / "threshold.json").read_text())
    predictor = predict.load_predictor(out)
    assert predictor.metadata["calibrated_on"] == [str(other)]
    assert predictor.threshold == fitted["threshold"] in predict.THRESHOLD_STEPS
    card = (out / "MODEL_CARD.md").read_text()
    assert "images of people it did not train on (other)" in card and "**The app's threshold:**" in card
    assert fitted["reached"] == (predict.fit_threshold(fitted["by_threshold"]) == fitted["threshold"])
    # the threshold was fitted on the answers the model gives as served: read the photos again, as the app does
    samples = data_loader.scan_folders([other], predictor.classes).samples
    readings = predictor.read([image_io.load_rgb(path) for path, _ in samples])
    served = predict.trust(predictor.classes, torch.stack([r.probs for r in readings]), [label for _, label in samples],
                           [r.hand is not None for r in readings], [r.agreed for r in readings], predictor.threshold)
    recorded = next(row for row in fitted["by_threshold"] if row["threshold"] == predictor.threshold)
    assert served["coverage"] == pytest.approx(recorded["coverage"])
    assert served["accuracy_when_answered"] == pytest.approx(recorded["accuracy_when_answered"])


@pytest.mark.parametrize("where, message", [
    ("training", "is also a training folder"),
    ("unknown", "holds class(es) the training folders lack: Q"),
])
def test_calibration_folders_that_cannot_be_used_are_explained(two_folders, tmp_path, capsys, where, message):
    folder = two_folders[0] if where == "training" else make_image_folder(tmp_path / "q", classes=("A", "Q"),
                                                                          per_class=2)
    assert pt_train.main(["--xtrain_path", str(two_folders[0]), "--calibration_path", str(folder),
                          "--save_dir", str(tmp_path / "run"), *FAST]) == 2
    assert message in capsys.readouterr().err


def test_a_threshold_given_is_the_model_s_and_calibration_people_fit_their_own(two_folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert pt_train.main(["--xtrain_path", str(two_folders[0]), "--save_dir", str(out), "--threshold", "0.8",
                          "--total_epochs", "1", *FAST]) == 0
    predictor = predict.load_predictor(out)
    assert predictor.threshold == 0.8 and json.loads((out / "threshold.json").read_text())["given"]
    assert "**The app's threshold:** 0.80, given with --threshold" in (out / "MODEL_CARD.md").read_text()
    assert pt_train.parse_args(["--recipe", "quick", "--threshold", "0.6"]).threshold == 0.6
    for argv, message in ((["--threshold", "1.5"], "is a probability"),
                          (["--threshold", "0.8", "--calibration_path", "people/"], "fits the app's threshold")):
        with pytest.raises(SystemExit):
            pt_train.parse_args(argv)
        assert message in capsys.readouterr().err


def test_without_calibration_people_the_model_keeps_the_app_s_default_threshold(trained_run):
    predictor = predict.load_predictor(trained_run)
    assert "threshold" not in predictor.metadata and predictor.threshold == predict.DEFAULT_THRESHOLD
    assert predictor.metadata["calibrated_on"] == "validation split"


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_a_crop_model_reads_a_seeded_share_of_its_training_images_whole(share):
    samples = [(f"/data/A/{n}.jpg", 0) for n in range(400)]
    images = data_loader.ImageList(samples, ["A"], [])
    hand = hands.Hand(np.full((21, 3), 0.5, np.float32), np.zeros((21, 3), np.float32), "Right", 0.9)
    found = {path: hand for path, _ in samples}
    train_idx, val_paths = list(range(300)), [path for path, _ in samples[300:]]

    def whole(seed: int) -> set[str]:
        args = pt_train.parse_args(["--whole_share", str(share), "--seed", str(seed)])
        boxes = pt_train._crop_loader(args, images, train_idx, found).boxes
        assert all(path in boxes for path in val_paths)  # validation reads as serving does
        return {path for path, _ in samples[:300] if path not in boxes}

    assert abs(len(whole(0)) / 300 - share) < 0.06
    assert whole(0) == whole(0)
    if 0 < share < 1:
        assert whole(1) != whole(0)


def test_whole_share_outside_0_to_1_is_refused(capsys):
    with pytest.raises(SystemExit):
        pt_train.parse_args(["--whole_share", "1.5"])
    assert "--whole_share 1.5 is a share of the training images" in capsys.readouterr().err


def test_hflip_follows_augment_unless_given():
    assert pt_train.parse_args([]).hflip is True
    assert pt_train.parse_args(["--no-augment"]).hflip is False
    assert pt_train.parse_args(["--no-hflip"]).hflip is False
@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_nccl_ddp_on_every_gpu_present_with_the_device_input_path(synthetic_dir, tmp_path):
    out = tmp_path / "gpu"
    gpus = torch.cuda.device_count()
    result = cli("--xtrain_path", str(synthetic_dir), "--save_dir", str(out), "--total_epochs", "2", "--gpu",
                 "--world_size", str(gpus), "--cache_dir", str(tmp_path / "cache"), "--weights", "none",
                 "--img_size", "64", "--batch_size", "4", "--num_workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GPU input path" in result.stderr and [h["epoch"] for h in
                                                   json.loads((out / "history.json").read_text())] == [1, 2]
    args = json.loads((out / "config.json").read_text())["args"]
    assert args["gpu_augment"] and args["amp"] and args["cache"] == "disk"
    images = [image_io.load_rgb(p) for p in sorted((synthetic_dir / "A").iterdir())[:4]]
    on_gpu = predict.load_predictor(out, device="cuda").predict(images)  # the GPU predictor
    assert on_gpu.shape == (4, 3) and torch.allclose(on_gpu, predict.load_predictor(out).predict(images), atol=1e-3)


# ------------------------------------------------------------------------------------- several folders, fine-tuning

@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> tuple[Path, Path]:
    """A dataset (A, B, C) and a user's folder with one of its classes under another case and a new one."""
    root = tmp_path_factory.mktemp("folders")
    return make_image_folder(root / "kaggle", per_class=12), \
        make_image_folder(root / "mine", classes=("a", "D"), per_class=10, seed=3)


@pytest.fixture(scope="module")
def base_run(two_folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    assert pt_train.main(["--xtrain_path", str(two_folders[0]), "--save_dir", str(out), "--total_epochs", "1",
                          *FAST]) == 0
    return out


def test_several_folders_train_as_one_dataset_with_figures_per_folder(two_folders, tmp_path):
    out = tmp_path / "run"
    assert pt_train.main(["--xtrain_path", *map(str, two_folders), "--save_dir", str(out), "--total_epochs", "2",
                          *FAST]) == 0
    assert json.loads((out / "classes.json").read_text()) == ["A", "B", "C", "D"]
    folders = json.loads((out / "config.json").read_text())["folders"]
    assert [f["root"] for f in folders] == list(map(str, two_folders))
    split = json.loads((out / "split.json").read_text())["folders"]
    assert [sorted({Path(p).parts[0] for p in f["val"]}) for f in split] == [["A", "B", "C"], ["D", "a"]]
    assert sum(f["num_train"] + len(f["val"]) for f in split) == 36 + 20
    last = json.loads((out / "history.json").read_text())[-1]
    # the overall accuracy is the per-folder accuracies weighted by each folder's held-out images
    sizes = [len(f["val"]) for f in split]
    assert last["val_acc"] == pytest.approx((sizes[0] * last["val_acc/kaggle"] + sizes[1] * last["val_acc/mine"])
                                            / sum(sizes))


def test_max_per_class_caps_each_folder_s_training_and_validation_images(two_folders, tmp_path, monkeypatch):
    monkeypatch.setattr(pt_train.data_loader, "VAL_PER_CLASS", 2)
    out = tmp_path / "run"
    assert pt_train.main(["--xtrain_path", *map(str, two_folders), "--save_dir", str(out), "--total_epochs", "1",
                          "--max_per_class", "4", "--val_split", "0.5", *FAST]) == 0
    split = json.loads((out / "split.json").read_text())["folders"]
    # 12 and 10 images per class, half held out: at most 4 of the rest trained on and 2 held out per class
    assert [f["num_train"] for f in split] == [3 * 4, 2 * 4]
    assert [len(f["val"]) for f in split] == [3 * 2, 2 * 2]
    rules = [f["rule"] for f in json.loads((out / "config.json").read_text())["folders"]]
    assert [(r["per_class"], r["val_per_class"]) for r in rules] == [(4, 2), (4, 2)]


def test_fine_tuning_starts_from_the_model_and_replays_its_data(two_folders, base_run, tmp_path):
    out = tmp_path / "tuned"
    # a learning rate too small to move the weights: what is saved is what fine-tuning started from
    assert pt_train.main(["--init_from", str(base_run), "--xtrain_path", str(two_folders[1]), "--save_dir",
                          str(out), "--total_epochs", "1", "--replay", "4", "--learning_rate", "1e-12",
                          "--batch_size", "8", "--num_workers", "0", "--no-augment"]) == 0
    base, tuned = predict.load_predictor(base_run), predict.load_predictor(out)
    assert tuned.classes == ["A", "B", "C", "D"] and tuned.metadata["transform"] == base.metadata["transform"]
    head = "classifier.1.weight"
    old, new = base.model.state_dict()[head], tuned.model.state_dict()[head]
    assert torch.allclose(new[:3], old, atol=1e-6) and not torch.allclose(new[3], old.mean(0), atol=1e-3)
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"] == str(base_run / "best.pt") and config["arch"] == "efficientnet_b0"
    # the replayed folder keeps the base model's split: its held-out images are still unseen
    base_split = json.loads((base_run / "split.json").read_text())["folders"][0]
    mine, replayed = json.loads((out / "split.json").read_text())["folders"]
    assert replayed["root"] == str(two_folders[0]) and replayed["num_train"] == 3 * 4
    assert set(replayed["val"]) == set(base_split["val"]) and mine["root"] == str(two_folders[1])
    assert {"val_acc/mine", "val_acc/kaggle"} <= json.loads((out / "history.json").read_text())[-1].keys()


def test_a_fine_tuning_run_resumes(two_folders, base_run, tmp_path):
    args = ["--init_from", str(base_run), "--xtrain_path", str(two_folders[1]), "--save_dir", str(tmp_path / "t"),
            "--replay", "2", "--batch_size", "8", "--num_workers", "0", "--no-augment"]
    assert pt_train.main([*args, "--total_epochs", "1"]) == 0
    assert pt_train.main([*args, "--total_epochs", "2", "--resume"]) == 0
    assert [h["epoch"] for h in json.loads((tmp_path / "t" / "history.json").read_text())] == [1, 2]


@pytest.mark.parametrize("extra, message", [
    (["--arch", "efficientnet_lite0"], "--arch comes from the --init_from model"),
    (["--img_size", "64", "--weights", "none"], "--weights and --img_size come from the --init_from model"),
    (["--hands", "none"], "--hands comes from the --init_from model"),
])
def test_fine_tuning_refuses_settings_that_belong_to_the_model(base_run, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pt_train.parse_args(["--init_from", str(base_run), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_replay_says_what_to_do_when_the_model_s_data_is_gone(two_folders, base_run, tmp_path, capsys):
    run = tmp_path / "moved"
    ckpt = run_artifacts.load_checkpoint(base_run / "best.pt")
    ckpt["metadata"]["folders"][0]["root"] = str(tmp_path / "gone")
    run.mkdir()
    run_artifacts.save_checkpoint(ckpt, run / "best.pt")
    code = pt_train.main(["--init_from", str(run), "--xtrain_path", str(two_folders[1]), "--save_dir",
                          str(tmp_path / "t"), *FAST[4:]])
    err = capsys.readouterr().err
    assert code == 2 and "is not on this machine" in err and "--replay 0" in err
    assert pt_train.main(["--init_from", str(run), "--xtrain_path", str(two_folders[1]), "--save_dir",
                          str(tmp_path / "t"), "--replay", "0", "--total_epochs", "1", *FAST[4:]]) == 0


@pytest.mark.parametrize("source, message", [("models:/asl/1", "cannot be trained further"),
                                             ("no/such/run", "does not exist")])
def test_fine_tuning_names_what_it_cannot_start_from(two_folders, source, message, tmp_path, capsys):
    code = pt_train.main(["--init_from", source, "--xtrain_path", str(two_folders[1]), "--save_dir",
                          str(tmp_path / "t")])
    assert code == 2 and message in capsys.readouterr().err


def test_fine_tuning_carries_a_landmark_network_over_only_if_it_reads_the_same_features():
    classes = ["A", "B", "C"]
    trained = model.LandmarkNet(2, hands.N_FEATURES, pt_train.HAND_HIDDEN)
    settings = {"hidden": pt_train.HAND_HIDDEN, "features": hands.N_FEATURES}
    init = {"hand_net": trained.state_dict(), "metadata": {"classes": ["B", "A"], "hands": settings}}
    net = pt_train._start_hand_net(init, classes)
    torch.testing.assert_close(net[1].weight, trained[1].weight)  # the first hidden layer, as trained
    torch.testing.assert_close(net[-1].weight[[1, 0]], trained[-1].weight)  # the head's rows follow the classes
    # a model trained before the viewpoint features read the landmarks alone: its network does not fit, start afresh
    old = model.LandmarkNet(2, hands.N_POINT_FEATURES, pt_train.HAND_HIDDEN)
    fresh = pt_train._start_hand_net({"hand_net": old.state_dict(), "metadata": {
        "classes": ["B", "A"], "hands": {"hidden": pt_train.HAND_HIDDEN}}}, classes)
    assert fresh[0].num_features == hands.N_FEATURES and fresh[-1].out_features == 3
    assert pt_train._start_hand_net(None, classes)[0].num_features == hands.N_FEATURES
