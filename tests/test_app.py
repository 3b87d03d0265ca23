"""app.py: its helpers on exact pixels and on real folders, and the real page under `streamlit.testing` with a
tiny trained model.

The page tests drive the script the way a user does (upload, camera, example, slider, toggle, Teach mode, the
model picker) and read what it shows and what lands on disk; every bad input must end in its message and never
in an exception on the page, and Teach mode writes nothing outside its folder.
"""
from __future__ import annotations

import io
import json
import re
import shlex
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps
from streamlit.testing.v1 import AppTest
from torch import nn

import app
import data_loader
import hands
import image_io
import live
import model as models
import predict
import spelling
from conftest import (ROOT, bomb_png, encode, exif_rotated_jpeg, make_image_folder, noise, rgba_png,
                      sixteen_bit_png, truncated_jpeg)

APP = str(ROOT / "app.py")
PREDICTION = re.compile(r"Prediction: \*\*(.+)\*\*, probability \*\*([\d.]+)%\*\*")


# ---------------------------------------------------------------------------------------------- other helpers

def tiny_predictor(net: nn.Module, classes: list[str], size: int, mean=0.0, std=1.0) -> predict.Predictor:
    cfg = {"resize_size": size, "crop_size": size, "mean": [mean] * 3, "std": [std] * 3}
    return predict.Predictor(net, classes, cfg)


def test_model_view_undoes_normalisation_and_shows_the_crop():
    predictor = tiny_predictor(nn.Identity(), ["x"], 32, mean=0.5, std=0.25)
    pixels = noise(64, 32)  # resize keeps 64x32 (short side 32); the centre crop takes the middle 32 columns
    assert np.array_equal(app.model_view(predictor, Image.fromarray(pixels)), pixels[:, 16:48])


def test_config_command_line_beats_environment_beats_default():
    env = {"ASL_MODEL_DIR": "from_env", "ASL_EXAMPLES_DIR": "ex", "ASL_RUNS_DIR": "r", "ASL_COLLECT_DIR": "c"}
    assert app.parse_config([], {}) == app.AppConfig("runs/latest", None, "cpu", "runs", "data/my_hand")
    assert app.parse_config(["-q", "--other", "1"], env) == app.AppConfig("from_env", "ex", "cpu", "r", "c")
    assert app.parse_config(["--model_dir", "models:/asl/3"], env).model == "models:/asl/3"
    cfg = app.parse_config(["--collect_dir", "mine", "--runs_dir", "out"], env)
    assert (cfg.collect_dir, cfg.runs_dir) == ("mine", "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_a_missing_gpu_is_explained():
    with pytest.raises(app.ConfigError, match="no CUDA GPU"):
        app.parse_config(["--device", "cuda"], {})


def test_model_info_reports_the_loaded_weights():
    predictor = tiny_predictor(nn.Identity(), ["A", "B"], 64)
    predictor.metadata = {"arch": "efficientnet_lite0", "temperature": 1.5}
    predictor.history = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.875}]
    assert app.model_info(predictor) == {"Architecture": "efficientnet_lite0", "Reads": "the image alone",
                                         "Classes": "2",
                                         "Image size": "64 px (resized to 64, centre crop)",
                                         "Validation accuracy": "87.5% (epoch 2)", "Calibration": "temperature 1.50"}


def test_grad_cam_finds_the_region_that_raised_the_score():
    # one feature channel = pixel brightness; class 0 rises with it, class 1 falls
    conv = nn.Conv2d(3, 1, 1)
    linear = nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1 / 3), conv.bias.zero_(), linear.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:8, :8] = 255
    predictor = tiny_predictor(net, ["bright", "dark"], 32)
    heat = app.grad_cam(predictor, Image.fromarray(pixels), 0)
    assert heat.shape == (32, 32) and heat[:8, :8].min() == pytest.approx(1) and heat[8:, 8:].max() == 0
    assert app.grad_cam(predictor, Image.fromarray(pixels), 1).max() == 0  # nothing raised class 1
    assert all(not m._forward_hooks for m in net.modules())  # the hooks are gone


@pytest.mark.parametrize("arch", models.ARCHS)
def test_grad_cam_works_on_both_architectures(arch):
    torch.manual_seed(0)  # random weights: some classes' maps are all zero, the top class's is not
    predictor = tiny_predictor(models.build_model(arch, 3, weights="none"), ["A", "B", "C"], 64)
    image = Image.fromarray(noise(64, 64))
    top_class = predictor.classes.index(predictor.top_k(image, 1)[0][0])
    heat = app.grad_cam(predictor, image, top_class)
    assert heat.shape == (64, 64) and heat.min() >= 0 and heat.max() == pytest.approx(1)
    assert app.overlay(np.zeros((64, 64, 3), np.uint8), heat).dtype == np.uint8


# ---------------------------------------------------------------------------------------------- Teach's folder

CLASSES = ["A", "B", "del"]


def files_under(folder) -> list[str]:
    """Every file and folder under `folder`, hidden ones (temporary files) included, as relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_photo_is_saved_as_an_upright_jpeg_named_by_time(tmp_path):
    data, upright = exif_rotated_jpeg()
    path = app.save_photo(tmp_path / "mine", "B", data, CLASSES, "../../evil.png")
    assert path.parent == (tmp_path / "mine" / "B").resolve()
    assert re.fullmatch(r"\d{20}\.jpg", path.name)  # not the upload's name
    assert files_under(tmp_path) == ["mine", "mine/B", f"mine/B/{path.name}"]  # no temporary file is left
    with Image.open(path) as saved:
        assert saved.format == "JPEG" and saved.mode == "RGB" and saved.size == (30, 60)
        pixels = np.asarray(saved).astype(int)
    # EXIF rotation applied: close to the upright pixels (two JPEG passes of small colour blocks), far from upside down
    assert np.abs(pixels - upright).mean() < 12 < np.abs(pixels - upright[::-1, ::-1]).mean()


def test_photo_names_never_collide_and_sort_as_frames(tmp_path):
    when = datetime(2026, 11, 30, 1, 15, 2, 123456)
    names = []
    for _ in range(3):
        path = app.photo_path(tmp_path, when)
        path.touch()
        names.append(path.name)
    assert names == ["20261130011502123456.jpg", "20261130011502123457.jpg", "20261130011502123458.jpg"]
    later = app.photo_path(tmp_path, datetime(2026, 11, 30, 1, 16))
    # training's block split orders photos by the number in their name: the time they were taken
    assert [data_loader.frame_number(n) for n in [*names, later.name]] == sorted(
        data_loader.frame_number(n) for n in [*names, later.name])


def test_no_finetune_command_is_offered_for_a_logged_mlflow_model():
    with pytest.raises(app.ConfigError, match="cannot be fine-tuned: pick its training folder"):
        app.finetune_command("models:/asl/1", "data/my_hand", "runs/my_hand")


def test_a_new_finetuning_never_lands_on_an_earlier_model(tmp_path):
    assert app.free_run_dir(tmp_path, "my_hand") == tmp_path / "my_hand"
    (tmp_path / "my_hand").mkdir()
    (tmp_path / "my_hand-2").mkdir()
    assert app.free_run_dir(tmp_path, "my_hand") == tmp_path / "my_hand-3"


@pytest.mark.parametrize("data, message", [(b"", "is empty"), (b"GIF89a not really", "not a readable image"),
                                           (truncated_jpeg(), "truncated or damaged"), (bomb_png(), "too large")],
                         ids=["empty", "not an image", "truncated", "bomb"])
def test_a_bad_upload_is_refused_and_nothing_is_written(tmp_path, data, message):
    with pytest.raises(image_io.ImageError, match=message):
        app.save_photo(tmp_path / "mine", "A", data, CLASSES, "upload.jpg")
    assert files_under(tmp_path) == []


def test_a_class_the_model_does_not_have_is_refused(tmp_path):
    with pytest.raises(app.CollectError, match="'Z' is not one of the model's classes"):
        app.save_photo(tmp_path, "Z", encode(Image.fromarray(noise(32, 32)), "PNG"), CLASSES)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("class_name", ["..", "../A", "", ".", "A/../..", "A/B", "/tmp"])
def test_a_class_name_that_leads_elsewhere_is_refused(tmp_path, class_name):
    # the model's own class list, from a foreign checkpoint: the name is still not trusted as a path
    with pytest.raises(app.CollectError, match="would lead outside"):
        app.save_photo(tmp_path / "mine", class_name, encode(Image.fromarray(noise(32, 32)), "PNG"),
                       [*CLASSES, class_name])
    assert files_under(tmp_path) == []


def test_a_failed_write_leaves_neither_photo_nor_temporary_file(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app.run_artifacts.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        app.save_photo(tmp_path, "A", encode(Image.fromarray(noise(32, 32)), "PNG"), CLASSES)
    assert files_under(tmp_path) == ["A"]


def test_counts_are_what_training_would_read(tmp_path):
    for n in range(3):
        app.save_photo(tmp_path, "A", encode(Image.fromarray(noise(32, 32, seed=n)), "PNG"), CLASSES)
    app.save_photo(tmp_path, "del", encode(Image.fromarray(noise(32, 32)), "PNG"), CLASSES)
    (tmp_path / "A" / "notes.txt").write_text("not a photo")
    (tmp_path / "A" / "broken.jpg").write_bytes(b"not a photo either")
    (tmp_path / "A" / ".x.jpg.123.tmp").write_bytes(b"an interrupted write")
    (tmp_path / "Z").mkdir()  # not one of the model's classes
    (tmp_path / "Z" / "z.jpg").write_bytes(encode(Image.fromarray(noise(8, 8)), "JPEG"))
    assert app.collected_counts(tmp_path, CLASSES) == {"A": 3, "B": 0, "del": 1}
    assert app.collected_counts(tmp_path / "nowhere", CLASSES) == {"A": 0, "B": 0, "del": 0}
    photos = app.collected_photos(tmp_path, "A")
    assert [p.name for p in photos] == sorted(p.name for p in photos) and len(photos) == 3


def test_a_photo_is_deleted_and_an_emptied_folder_goes_too(tmp_path):
    png = encode(Image.fromarray(noise(32, 32)), "PNG")
    first, second = (app.save_photo(tmp_path, "B", png, CLASSES) for _ in range(2))
    app.delete_photo(tmp_path, first, CLASSES)
    assert files_under(tmp_path) == ["B", f"B/{second.name}"]
    app.delete_photo(tmp_path, second, CLASSES)
    app.delete_photo(tmp_path, second, CLASSES)  # already gone (another tab): nothing to do
    assert files_under(tmp_path) == []  # training refuses an empty class folder


def test_deleting_anything_else_is_refused(tmp_path):
    collect, outside = tmp_path / "mine", tmp_path / "outside"
    outside.mkdir()
    victim = outside / "x.jpg"
    victim.write_bytes(encode(Image.fromarray(noise(8, 8)), "JPEG"))
    app.save_photo(collect, "A", encode(Image.fromarray(noise(32, 32)), "PNG"), CLASSES)
    (collect / "A" / "link.jpg").symlink_to(victim)
    (collect / "B").symlink_to(outside, target_is_directory=True)
    (collect / "Z").mkdir()
    (collect / "Z" / "z.jpg").write_bytes(victim.read_bytes())
    (collect / "A" / "notes.txt").write_text("keep me")
    (collect / "top.jpg").write_bytes(victim.read_bytes())
    before = files_under(tmp_path)
    for path in [victim, collect / "A" / ".." / ".." / "outside" / "x.jpg", collect / "A" / "../x.jpg",
                 collect / "A" / "link.jpg", collect / "B" / "x.jpg", collect / "Z" / "z.jpg",
                 collect / "A" / "notes.txt", collect / "top.jpg", collect / "A", collect]:
        with pytest.raises(app.CollectError, match="nothing was deleted"):
            app.delete_photo(collect, path, CLASSES)
    assert files_under(tmp_path) == before and victim.read_bytes()


def test_the_finetune_command_quotes_every_path():
    command = app.finetune_command("runs/my model", "data/it's $(mine)", "runs/my_hand")
    assert command == ("python pt_train.py --init_from 'runs/my model' --xtrain_path 'data/it'\"'\"'s $(mine)' "
                       "--save_dir runs/my_hand")
    assert shlex.split(command) == ["python", "pt_train.py", "--init_from", "runs/my model",
                                    "--xtrain_path", "data/it's $(mine)", "--save_dir", "runs/my_hand"]


def test_runs_with_a_best_checkpoint_are_listed(tmp_path):
    for name, files in {"b": ["best.pt"], "a": ["best.pt", "last.pt"], "only_last": ["last.pt"], "empty": []}.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_bytes(b"")
    (tmp_path / "best.pt").write_bytes(b"")  # a checkpoint at the top is no run folder
    assert app.list_runs(tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert app.list_runs(tmp_path / "nowhere") == []


def test_the_model_picker_starts_at_model_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [Path("runs/a"), Path("runs/latest")]
    for run in runs:
        run.mkdir(parents=True)
    assert app.model_choices("runs/latest", runs) == (["runs/a", "runs/latest"], 1)
    assert app.model_choices(str(tmp_path / "runs" / "a"), runs) == (["runs/a", "runs/latest"], 0)
    assert app.model_choices("elsewhere/best.pt", runs) == (["elsewhere/best.pt", "runs/a", "runs/latest"], 0)
    assert app.model_choices("models:/asl/1", runs) == (["models:/asl/1", "runs/a", "runs/latest"], 0)


# ---------------------------------------------------------------------------------------------- the page

@pytest.fixture
def page(monkeypatch, trained_run, tmp_path):
    """Start the page against the tiny trained model; returns a function that starts it with given settings.
    Teach mode saves into tmp_path/my_hand; the model picker lists tmp_path/runs (none unless a test makes it)."""
    def start(model_dir=trained_run, examples_dir=None) -> AppTest:
        monkeypatch.setenv("ASL_MODEL_DIR", str(model_dir))
        monkeypatch.setenv("ASL_RUNS_DIR", str(tmp_path / "runs"))
        monkeypatch.setenv("ASL_COLLECT_DIR", str(tmp_path / "my_hand"))
        if examples_dir is None:
            monkeypatch.delenv("ASL_EXAMPLES_DIR", raising=False)
        else:
            monkeypatch.setenv("ASL_EXAMPLES_DIR", str(examples_dir))
        return AppTest.from_file(APP, default_timeout=120).run()
    return start


@pytest.fixture(scope="module")
def predictor(trained_run) -> predict.Predictor:
    return predict.load_predictor(trained_run)


def upload(at: AppTest, name: str, data: bytes, threshold: float = 0.0) -> AppTest:
    at.slider[0].set_value(threshold)
    at.file_uploader[0].set_value((name, data, "application/octet-stream"))
    return at.run()


def shown_prediction(at: AppTest) -> tuple[str, str]:
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    found = [m.groups() for m in (PREDICTION.search(md.value) for md in at.markdown) if m]
    assert len(found) == 1
    return found[0]


def expected(predictor: predict.Predictor, image: Image.Image) -> tuple[str, str]:
    label, probability = predictor.top_k(image, 1)[0]
    return label, f"{probability:.1%}"[:-1]


def chart_data(at: AppTest) -> pd.DataFrame:
    (chart,) = at.get("vega_lite_chart")
    (dataset,) = chart.proto.datasets
    return pa.ipc.open_stream(dataset.data.data).read_pandas()


def captions(at: AppTest) -> list[str]:
    return [image.proto.imgs[0].caption for image in at.get("image")]


def test_an_upload_shows_the_prediction_top_classes_and_the_model_view(page, predictor, synthetic_dir):
    source = Image.open(synthetic_dir / "B" / "B1.jpg")
    at = upload(page(), "B1.png", encode(source, "PNG"))
    assert shown_prediction(at) == expected(predictor, source.convert("RGB"))
    chart = chart_data(at)
    top = predictor.top_k(source.convert("RGB"), 5)
    assert list(chart["class"]) == [c for c, _ in top] and len(chart) == 3  # 3 classes, fewer than 5
    assert np.allclose(chart["probability"], [p for _, p in top], atol=1e-5)  # ONNX Runtime serves
    crop = predictor.transform_cfg["crop_size"]
    assert captions(at) == ["Your image (40x40)", f"As the model saw it ({crop}x{crop})"]


def test_below_the_threshold_it_says_it_is_unsure(page, predictor, synthetic_dir):
    at = upload(page(), "A1.jpg", (synthetic_dir / "A" / "A1.jpg").read_bytes(), threshold=1.0)
    assert not at.exception and not at.error
    label, _ = predictor.top_k(Image.open(synthetic_dir / "A" / "A1.jpg").convert("RGB"), 1)[0]
    assert at.warning[0].value.startswith(f"Not sure: the best guess, **{label}**")
    assert not any(PREDICTION.search(md.value) for md in at.markdown)


def _verdict_page(verdict) -> None:  # AppTest runs the source alone: no annotations from this module
    import app
    app.show_verdict(verdict, 0.5)


def test_when_the_image_and_the_hand_disagree_it_says_so_instead_of_answering():
    disagreed = predict.decide(["A", "B"], torch.tensor([0.1, 0.9]), True, 0.5, agreed=False)
    assert disagreed.disagreed and not disagreed.answered  # 90%, yet no answer
    at = AppTest.from_function(_verdict_page, args=(disagreed,)).run()
    assert not at.exception
    assert at.warning[0].value.startswith("Not sure: the image and the hand's shape point to different letters")
    assert "**B** (90.0%)" in at.warning[0].value and not any(PREDICTION.search(md.value) for md in at.markdown)


def test_the_mirror_toggle_predicts_the_mirrored_image(page, predictor, synthetic_dir):
    source = Image.open(synthetic_dir / "C" / "C2.jpg").convert("RGB")
    at = page()
    at.toggle[1].set_value(True)
    at = upload(at, "C2.png", encode(source, "PNG"))
    mirrored = ImageOps.mirror(source)
    assert shown_prediction(at) == expected(predictor, mirrored)
    assert np.allclose(chart_data(at)["probability"], [p for _, p in predictor.top_k(mirrored, 5)], atol=1e-5)  # ONNX Runtime serves
    assert not np.allclose([p for _, p in predictor.top_k(source, 5)], [p for _, p in predictor.top_k(mirrored, 5)],
                           atol=1e-4)  # so the test tells the two apart


def test_the_sidebar_describes_the_model(page, predictor):
    at = page()
    facts = at.sidebar.markdown[0].value
    last = predictor.history[-1]
    assert f"**Validation accuracy**: {last['val_acc']:.1%} (epoch {last['epoch']})" in facts
    assert "**Classes**: 3" in facts and "**Architecture**: efficientnet_lite0" in facts
    assert at.sidebar.markdown[1].value == "A, B, C"


def odd_images() -> dict[str, tuple[str, bytes]]:
    rgb = noise(48, 48, seed=3)
    return {"grayscale": ("gray.png", encode(Image.fromarray(rgb[..., 1]), "PNG")),
            "rgba": ("transparent.png", rgba_png()[0]),
            "cmyk": ("print.jpg", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)),
            "16-bit": ("scan.png", sixteen_bit_png(rgb[..., 2])),
            "bmp": ("old.bmp", encode(Image.fromarray(rgb), "BMP")),
            "webp": ("web.webp", encode(Image.fromarray(rgb), "WEBP"))}


@pytest.mark.parametrize("kind", odd_images())
def test_odd_but_valid_images_are_predicted(page, predictor, kind):
    name, data = odd_images()[kind]
    assert shown_prediction(upload(page(), name, data)) == expected(predictor, image_io.decode_photo(data, name))


def test_an_exif_rotated_photo_is_predicted_upright(page, predictor):
    data, upright = exif_rotated_jpeg()
    at = upload(page(), "phone.jpg", data)
    upright_result = expected(predictor, Image.fromarray(upright))
    sideways_result = expected(predictor, Image.open(io.BytesIO(data)).convert("RGB"))
    assert upright_result != sideways_result  # else this test could not tell the two apart
    assert shown_prediction(at) == upright_result and captions(at)[0] == "Your image (30x60)"


def test_a_huge_photo_is_downscaled_and_predicted(page):
    at = upload(page(), "big.jpg", encode(Image.fromarray(noise(3000, 1500)), "JPEG", quality=70))
    shown_prediction(at)
    assert captions(at)[0] == f"Your image ({image_io.MAX_SIDE}x{image_io.MAX_SIDE // 2})"


@pytest.mark.parametrize("name, make, message", [
    ("notes.jpg", lambda: b"just some text, no picture", "is not a readable image"),
    ("cut.jpg", truncated_jpeg, "could not be decoded: the file is truncated or damaged"),
    ("bomb.png", bomb_png, "is too large"),
    ("empty.png", lambda: b"", "is empty"),
], ids=["not an image", "truncated", "huge", "empty"])
def test_bad_uploads_show_their_message(page, name, make, message):
    at = upload(page(), name, make())
    assert not at.exception
    assert len(at.error) == 1 and message in at.error[0].value and name in at.error[0].value


def broken(*args, **kwargs):
    raise RuntimeError("simulated bug")


def test_an_unexpected_failure_shows_a_message_not_a_traceback(page, synthetic_dir, monkeypatch):
    monkeypatch.setattr(predict.Predictor, "top_k", broken)
    at = upload(page(), "A1.jpg", (synthetic_dir / "A" / "A1.jpg").read_bytes())
    assert not at.exception
    assert at.error[0].value.startswith("Something went wrong (RuntimeError)")


def test_an_unexpected_failure_while_loading_the_model_shows_a_message(page, tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "load_predictor", broken)
    at = page(model_dir=tmp_path)  # a source not loaded before, so the page's model cache cannot answer
    assert not at.exception and not at.file_uploader
    assert at.error[0].value.startswith("Something went wrong (RuntimeError)")


def damaged_checkpoint(folder):
    (folder / "best.pt").write_bytes(b"not a checkpoint")
    return folder


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: tmp, "No best.pt or last.pt"),
    (damaged_checkpoint, "not a checkpoint written by"),
], ids=["missing folder", "empty folder", "damaged checkpoint"])
def test_a_missing_model_explains_how_to_train_or_where_to_point(page, tmp_path, make, message):
    at = page(model_dir=make(tmp_path))
    assert not at.exception and not at.file_uploader  # no input offered without a model
    assert at.error[0].value.startswith("**No model to run.**") and message in at.error[0].value
    assert "pt_train.py" in at.info[0].value and "--model_dir" in at.info[0].value


def test_examples_from_the_test_folder(page, predictor, tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    source = make_image_folder(tmp_path / "src", per_class=1, seed=5)
    for name in ("A", "C"):
        (folder / f"{name}_test.jpg").write_bytes((source / name / f"{name}1.jpg").read_bytes())
    at = page(examples_dir=folder)
    at.slider[0].set_value(0.0)
    at.radio[0].set_value("Example").run()
    assert at.selectbox[0].options == ["A_test.jpg", "C_test.jpg"]
    at.selectbox[0].set_value(folder / "C_test.jpg").run()
    shown = shown_prediction(at)
    assert shown == expected(predictor, Image.open(folder / "C_test.jpg").convert("RGB"))
    verdict = "correct" if shown[0] == "C" else "wrong"
    assert f"True sign, from the file name: **C** ({verdict})" in [c.value for c in at.caption]


def test_a_missing_examples_folder_is_reported(page, tmp_path):
    at = page(examples_dir=tmp_path / "nope")
    assert "does not exist" in at.sidebar.warning[0].value and at.radio[0].options == ["Upload", "Camera"]


def test_a_camera_photo_is_predicted(page, predictor, synthetic_dir):
    at = page()
    at.slider[0].set_value(0.0)
    at.radio[0].set_value("Camera").run()
    photo = (synthetic_dir / "C" / "C2.jpg").read_bytes()
    at.camera_input[0].set_value(("photo.jpg", photo, "image/jpeg")).run()
    assert shown_prediction(at) == expected(predictor, Image.open(io.BytesIO(photo)).convert("RGB"))


def test_an_empty_grad_cam_is_explained_not_drawn(page, trained_run, synthetic_dir, tmp_path):
    # non-positive head weights on non-negative (ReLU6) features: no region can raise any class's score
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    ckpt["model"]["classifier.1.weight"] = -ckpt["model"]["classifier.1.weight"].abs()
    torch.save(ckpt, tmp_path / "best.pt")
    at = page(model_dir=tmp_path)
    at.toggle[0].set_value(True)
    at = upload(at, "A3.jpg", (synthetic_dir / "A" / "A3.jpg").read_bytes())
    shown_prediction(at)
    assert len(captions(at)) == 2 and at.info[0].value.startswith("Grad-CAM is empty")


def test_grad_cam_overlay_on_request(page, predictor, synthetic_dir):
    at = page()
    at.toggle[0].set_value(True)
    at = upload(at, "A3.jpg", (synthetic_dir / "A" / "A3.jpg").read_bytes())
    label, _ = shown_prediction(at)
    assert len(captions(at)) == 3 and captions(at)[2] == f"Where it looked for '{label}'"


# ---------------------------------------------------------------------------------------------- Teach mode

def teach(at: AppTest) -> AppTest:
    at.sidebar.segmented_control[0].set_value("Teach")
    return at.run()


def shown_counts(at: AppTest) -> dict[str, int]:
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    (table,) = at.table
    return {name: int(count) for name, count in table.value.loc["photos"].items()}


def jpeg(synthetic_dir, name: str) -> bytes:
    return (synthetic_dir / name[0] / name).read_bytes()


def test_teach_mode_shows_the_counts_and_the_finetune_command(page, trained_run, tmp_path):
    at = page()
    assert at.sidebar.segmented_control[0].options == ["Read", "Live", "Teach"] and at.slider  # Read by default
    at = teach(at)
    assert shown_counts(at) == {"A": 0, "B": 0, "C": 0}
    assert not at.slider and not at.toggle and not at.sidebar.selectbox  # no Read settings; no runs to pick from
    assert at.selectbox(key="teach_letter").options == ["A", "B", "C"]
    assert at.code[0].value == (f"python pt_train.py --init_from {trained_run} --xtrain_path {tmp_path / 'my_hand'} "
                                f"--save_dir {tmp_path / 'runs' / 'my_hand'}")
    assert f"pick `{tmp_path / 'runs' / 'my_hand'}` in the sidebar's model picker" in at.main.markdown[-1].value
    assert not (tmp_path / "my_hand").exists()  # looking writes nothing


def test_teach_mode_saves_each_upload_once_and_deletes_a_photo(page, tmp_path, synthetic_dir):
    collect = tmp_path / "my_hand"
    at = teach(page())
    at.selectbox(key="teach_letter").set_value("B").run()
    at.file_uploader[0].set_value([("B1.jpg", jpeg(synthetic_dir, "B1.jpg"), "image/jpeg"),
                                   ("notes.jpg", b"just text", "image/jpeg"),
                                   ("B2.jpg", jpeg(synthetic_dir, "B2.jpg"), "image/jpeg")]).run()
    (error,) = at.error
    assert "'notes.jpg' is not a readable image" in error.value and "It was not saved." in error.value
    assert at.success[0].value == "Saved 2 photos of 'B'."
    photos = sorted((collect / "B").iterdir())
    assert len(photos) == 2 and files_under(collect) == ["B", *(f"B/{p.name}" for p in photos)]
    at.run()  # any click reruns the script with the files still in the widget: nothing is saved again
    assert shown_counts(at) == {"A": 0, "B": 2, "C": 0} and not at.success
    assert sorted((collect / "B").iterdir()) == photos and captions(at) == [p.name for p in photos]
    assert "**B**: 2 photos" in [md.value for md in at.markdown]

    at.button(key=f"delete_B_{photos[0].stem}").click().run()
    assert shown_counts(at) == {"A": 0, "B": 1, "C": 0}
    assert sorted((collect / "B").iterdir()) == photos[1:] and captions(at) == [photos[1].name]

    at.selectbox(key="teach_letter").set_value("A").run()  # another letter: a fresh, empty uploader
    assert not at.file_uploader[0].value and captions(at) == []
    at.file_uploader[0].set_value(("A1.jpg", jpeg(synthetic_dir, "A1.jpg"), "image/jpeg")).run()
    assert shown_counts(at) == {"A": 1, "B": 1, "C": 0} and at.success[0].value == "Saved 1 photo of 'A'."


def test_teach_mode_saves_a_camera_snapshot_once(page, tmp_path, synthetic_dir):
    at = teach(page())
    at.radio(key="teach_source").set_value("Camera").run()
    at.camera_input[0].set_value(("photo.jpg", jpeg(synthetic_dir, "A2.jpg"), "image/jpeg")).run()
    assert shown_counts(at) == {"A": 1, "B": 0, "C": 0}
    at.run()
    assert shown_counts(at) == {"A": 1, "B": 0, "C": 0} and len(list((tmp_path / "my_hand" / "A").iterdir())) == 1


def test_teach_mode_needs_no_hand_finder(page, monkeypatch):
    def no_mediapipe(self):
        raise hands.HandModelError("MediaPipe is not installed: pip install mediapipe")

    monkeypatch.setattr(predict.Predictor, "uses_hands", property(lambda self: True))
    monkeypatch.setattr(predict.Predictor, "finder", property(no_mediapipe))
    at = page()
    assert at.error[0].value == "MediaPipe is not installed: pip install mediapipe"  # Read says so at once
    assert shown_counts(teach(at)) == {"A": 0, "B": 0, "C": 0} and at.file_uploader


def test_an_unwritable_collect_folder_is_explained(page, tmp_path, synthetic_dir):
    (tmp_path / "my_hand").write_text("a file where the folder should be")
    at = teach(page())
    at.file_uploader[0].set_value(("A1.jpg", jpeg(synthetic_dir, "A1.jpg"), "image/jpeg")).run()
    assert not at.exception
    assert at.error[0].value.startswith(f"Could not save 'A1.jpg' in '{tmp_path / 'my_hand'}'")
    assert "--collect_dir" in at.error[0].value


def renamed_run(trained_run, folder: Path, classes: list[str]) -> Path:
    """A copy of the trained model whose classes are renamed: it tells which model the page has loaded."""
    ckpt = torch.load(trained_run / "best.pt", weights_only=True)
    ckpt["metadata"]["classes"] = classes
    folder.mkdir(parents=True)
    torch.save(ckpt, folder / "best.pt")
    return folder


def test_the_model_picker_loads_a_run_and_teach_uses_it(page, trained_run, tmp_path):
    mine = renamed_run(trained_run, tmp_path / "runs" / "mine", ["X", "Y", "Z"])
    (tmp_path / "runs" / "unfinished").mkdir()  # no best.pt: not offered
    at = teach(page())
    picker = at.sidebar.selectbox(key="model")
    assert picker.options == [str(trained_run), str(mine)] and picker.value == str(trained_run)
    assert shown_counts(at) == {"A": 0, "B": 0, "C": 0}
    picker.set_value(str(mine)).run()
    assert shown_counts(at) == {"X": 0, "Y": 0, "Z": 0} and at.sidebar.markdown[1].value == "X, Y, Z"
    assert f"--init_from {mine} " in at.code[0].value


def test_the_model_picker_starts_at_a_model_dir_under_runs(page, trained_run, tmp_path):
    first = renamed_run(trained_run, tmp_path / "runs" / "first", ["X", "Y", "Z"])
    second = renamed_run(trained_run, tmp_path / "runs" / "second", ["P", "Q", "R"])
    at = page(model_dir=second)
    picker = at.sidebar.selectbox(key="model")
    assert picker.options == [str(first), str(second)] and picker.value == str(second)
    assert at.sidebar.markdown[1].value == "P, Q, R" and not at.error


def test_a_missing_model_dir_can_be_replaced_in_the_picker(page, trained_run, tmp_path):
    mine = renamed_run(trained_run, tmp_path / "runs" / "mine", ["X", "Y", "Z"])
    at = page(model_dir=tmp_path / "nowhere")
    assert at.error[0].value.startswith("**No model to run.**")
    at.sidebar.selectbox(key="model").set_value(str(mine)).run()
    assert not at.error and at.sidebar.markdown[1].value == "X, Y, Z" and at.file_uploader


# ---------------------------------------------------------------------------------------------- hands

def test_draw_hand_marks_the_box_and_the_skeleton():
    points = np.zeros((21, 3), np.float32)
    points[:, 0], points[:, 1] = np.linspace(0.3, 0.7, 21), np.linspace(0.2, 0.8, 21)
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    drawn = np.asarray(app.draw_hand(image, hands.Hand(points, points, "Right", 0.9, 2.0)))
    assert np.asarray(image).max() == 0  # the original is left alone
    assert drawn[:, :55].max() == 0 and drawn[:, 145:].max() == 0  # nothing outside the hand's box
    assert drawn[50, 100].any()  # the skeleton crosses the middle
    # a crop model's view: also the square its image network reads, in blue
    left, top, right, bottom = hands.crop_box((0.3, 0.2, 0.7, 0.8), (200, 100))
    with_square = np.asarray(app.draw_hand(image, hands.Hand(points, points, "Right", 0.9, 2.0), 1.5))
    assert with_square[top + 1, (left + right) // 2].tolist() == [80, 160, 255] and right - left == bottom - top
    assert with_square[:, :left].max() == 0 and with_square[:, right:].max() == 0


@pytest.mark.slow
def test_the_hand_aware_app_draws_the_hand_or_says_there_is_none(page, hand_run):
    from conftest import SHARED_ASL

    at = upload(page(hand_run), "B.jpg", (SHARED_ASL / "train" / "B" / "B1300.jpg").read_bytes())
    assert not at.exception and not at.error
    assert "the hand MediaPipe found" in captions(at)[0] and "the square the model read" in captions(at)[0]
    assert any("**B**" in md.value or "Prediction:" in md.value for md in at.markdown)
    blank = encode(Image.new("RGB", (120, 90), (90, 120, 160)), "PNG")
    at = upload(page(hand_run), "wall.png", blank)
    assert not at.exception and not at.error
    assert captions(at)[0].endswith("no hand found")
    assert any("No hand found" in w.value for w in at.warning)
    assert not any(m.value.startswith("Prediction:") for m in at.markdown)  # no letter is named


def test_streamlit_watches_the_app_s_sources_only():
    # Streamlit's default watcher follows everything below app.py's folder (.venv, runs/, the data), which
    # floods inotify; the repository's .streamlit/config.toml, read beside the script, has it poll the sources
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "streamlit", "config", "show"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"# The value below was set in {ROOT / '.streamlit' / 'config.toml'}\nfileWatcherType = \"poll\"" \
        in result.stdout


# ---------------------------------------------------------------------------------------------- Live mode

def test_live_mode_opens_this_page_s_session_with_its_model_and_settings(page, trained_run):
    at = page()
    at.sidebar.segmented_control[0].set_value("Live").run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert at.subheader[0].value == "Fingerspell to the camera" and "0.6 seconds" in at.main.caption[-1].value
    token = at.session_state["live_token"]
    session = live.SESSIONS.get(token)
    assert session.settings == live.Settings(predict.DEFAULT_THRESHOLD, spelling.DEFAULT_HOLD_S, True, False)
    assert session.predictor.classes == ["A", "B", "C"] and not session.predictor.uses_hands
    (page_element,) = at.get("bidi_component")
    assert json.loads(page_element.proto.json) == live.page_data(token)  # the page posts to its own session

    session.speller.text = "AB"
    at.slider[0].set_value(0.3)
    at.sidebar.segmented_control[1].set_value("frames").run()
    at.slider(key="hold_frames").set_value(5)
    at.toggle[0].set_value(True).run()
    assert at.session_state["live_token"] == token and "5 frames" in at.main.caption[-1].value
    assert live.SESSIONS.get(token) is session and session.settings == live.Settings(0.3, 5, False, True)
    assert session.speller.hold == 5 and not session.speller.seconds and session.speller.text == "AB"
    assert not at.exception and not at.error


def test_each_page_has_its_own_live_session(page):
    tokens = set()
    for _ in range(2):
        at = page()
        at.sidebar.segmented_control[0].set_value("Live").run()
        tokens.add(at.session_state["live_token"])
    assert len(tokens) == 2 and all(live.SESSIONS.get(t) is not None for t in tokens)
