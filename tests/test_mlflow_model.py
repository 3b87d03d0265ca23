"""mlflow_model: the logged MLflow model answers a photo as predict.py does, in Python and served for real by
`mlflow models serve` on loopback (also to 16 clients at once), refuses bad photos with a clear HTTP 400, and loads
offline.

Every test logs into an MLflow store of its own in a temporary folder, never the project's.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow  # conftest has switched MLflow's telemetry off before this import
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

import bench
import hands
import image_io
import log_experiment
import mlflow_model
import model as models
import predict
import run_artifacts
from conftest import ROOT, SHARED_ASL, encode, requires_shared

HAND_PHOTO = SHARED_ASL / "train" / "B" / "B1300.jpg"  # MediaPipe finds its hand (tests/test_predict.py)


@contextlib.contextmanager
def own_store(folder: Path) -> Iterator[str]:
    """MLflow pointed at a SQLite store in `folder`, its artifacts there too (MLflow puts them in the working
    folder), with an experiment of its own (the one active before belongs to another store); the tracking URI
    and the working folder are restored afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                     "ASL_HAND_MODEL"):
            patch.delenv(name, raising=False)
        uri = f"sqlite:///{folder}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("serving")
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


def blank_jpeg() -> bytes:
    """A photo with no hand in it."""
    return encode(Image.new("RGB", (160, 120), (90, 120, 160)), "JPEG", quality=90)


def expected_answers(source, photos: list[bytes]) -> list[dict]:
    """What predict.py makes of these photos, as the app decides (`Predictor.read` and `decide` at the default
    threshold), in the served model's output columns."""
    predictor = predict.load_predictor(source)
    rows = []
    for reading in predictor.read([image_io.load_rgb(io.BytesIO(photo)) for photo in photos]):
        found = reading.hand is not None if predictor.uses_hands else None
        verdict = predict.decide(predictor.classes, reading.probs, found, predict.DEFAULT_THRESHOLD, reading.agreed)
        values, indices = reading.probs.topk(min(mlflow_model.TOP_K, len(predictor.classes)))
        rows.append({"answer": "no hand" if verdict.no_hand else verdict.label if verdict.sure else "unsure",
                     "label": verdict.label, "probability": verdict.probability,
                     "top_labels": [predictor.classes[i] for i in indices], "top_probabilities": values.tolist(),
                     "hand_found": found, "hand_box": list(reading.hand.box) if reading.hand else None})
    return rows


def assert_same_answers(got: list[dict], expected: list[dict]) -> None:
    """Labels and answers exactly; probabilities and boxes to the precision ONNX Runtime keeps of PyTorch's."""
    assert len(got) == len(expected)
    for row, want in zip(got, expected):
        assert set(row) == set(mlflow_model.OUTPUT_COLUMNS)
        for key in ("answer", "label", "top_labels", "hand_found"):
            assert row[key] == want[key], key
        assert row["probability"] == pytest.approx(want["probability"], abs=1e-5)
        assert row["top_probabilities"] == pytest.approx(want["top_probabilities"], abs=1e-5)
        assert (row["hand_box"] is None) == (want["hand_box"] is None)
        if want["hand_box"] is not None:
            assert row["hand_box"] == pytest.approx(want["hand_box"], abs=1e-6)


def hand_aware_checkpoint(trained_run: Path, path: Path) -> Path:
    """The tiny trained image network with a landmark network beside it (untrained: its answers still depend on
    the hand), as a crop model: a hand-aware model without training MediaPipe's way."""
    ckpt = run_artifacts.load_checkpoint(predict.checkpoint_path(trained_run))
    meta = ckpt["metadata"]
    torch.manual_seed(0)
    ckpt["hand_net"] = models.LandmarkNet(meta["num_classes"], hands.N_FEATURES, 16).state_dict()
    meta["hands"] = {"hidden": 16, "features": hands.N_FEATURES, "temperature": 0.8, "crop": hands.CROP_MARGIN}
    run_artifacts.save_checkpoint(ckpt, path)
    return path


# ------------------------------------------------------------------------------------------------ in Python

@requires_shared
def test_the_logged_model_answers_as_predict_does_and_fetches_nothing(trained_run, tmp_path, monkeypatch):
    source = hand_aware_checkpoint(trained_run, tmp_path / "hands.pt")
    photos = [HAND_PHOTO.read_bytes(), blank_jpeg()]
    expected = expected_answers(source, photos)
    assert [row["hand_found"] for row in expected] == [True, False]  # both paths of the model are read
    with own_store(tmp_path):
        with mlflow.start_run() as run:
            log_experiment.log_model(source)
        uri = f"runs:/{run.info.run_id}/model"
        # the hand model comes with the model: an empty cache, and no way to fetch one
        empty_cache = tmp_path / "empty_cache"
        empty_cache.mkdir()
        monkeypatch.setenv("XDG_CACHE_HOME", str(empty_cache))

        def no_fetch():
            raise AssertionError("the hand model was fetched")
        monkeypatch.setattr(hands, "_fetch_bundle", no_fetch)
        served = mlflow.pyfunc.load_model(uri)
        got = served.predict(pd.DataFrame({mlflow_model.IMAGE_COLUMN: photos})).to_dict("records")
        assert not (empty_cache / "asl-toolkit").exists()
        assert_same_answers(got, expected)

        with pytest.raises(MlflowException, match=r"'image\[1\]' is not a readable image") as err:
            served.predict(pd.DataFrame({mlflow_model.IMAGE_COLUMN: [photos[0], b"%PDF-1.7 not a photo"]}))
        assert err.value.error_code == "INVALID_PARAMETER_VALUE"


def test_an_image_only_model_answers_without_looking_for_a_hand(trained_run, synthetic_dir, tmp_path):
    photos = [(synthetic_dir / name / f"{name}1.jpg").read_bytes() for name in ("A", "C")]
    with own_store(tmp_path):
        with mlflow.start_run() as run:
            log_experiment.log_model(trained_run)
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        got = model.predict(pd.DataFrame({mlflow_model.IMAGE_COLUMN: photos})).to_dict("records")
    assert [row["hand_found"] for row in got] == [None, None]
    assert_same_answers(got, expected_answers(trained_run, photos))


def test_the_model_ships_exactly_the_modules_it_imports():
    # in a fresh interpreter: this one has imported everything
    code = ("import os, sys\n"
            "import mlflow_model\n"
            "here = os.getcwd()\n"
            "print(sorted(name for name, m in list(sys.modules.items()) if '.' not in name\n"  # torch.ops: no file
            "             and os.path.dirname(os.path.abspath(getattr(m, '__file__', None) or '/')) == here))\n"
            "print([m for m in ('pt_engine', 'pt_train', 'log_experiment', 'calibration', 'torchmetrics')\n"
            "       if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    modules, training = result.stdout.splitlines()[-2:]
    assert modules == str(sorted([*mlflow_model.SERVING_MODULES, "mlflow_model"]))
    assert training == "[]"


# ------------------------------------------------------------------------------------------------ served

@pytest.fixture(scope="module")
def server(hand_run, tmp_path_factory) -> Iterator[str]:
    """`mlflow models serve` of the tiny hand-aware model, logged as pt_train.py --mlflow logs it, run outside the
    repository (only the model's own code) and with an empty hand-model cache."""
    folder = tmp_path_factory.mktemp("served")
    with own_store(folder) as store:
        run_id = log_experiment.log_training_folder(hand_run)
    (folder / "empty_cache").mkdir()
    environ = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ASL_HAND_MODEL")},
               "MLFLOW_TRACKING_URI": store, "XDG_CACHE_HOME": str(folder / "empty_cache")}
    with bench.served(f"runs:/{run_id}/model", folder, environ) as url:
        yield url
    assert not (folder / "empty_cache" / "asl-toolkit").exists()  # where hands.py would have fetched one to


def ask(url: str, *photos: bytes) -> tuple[int, dict]:
    return bench.invoke(url, bench.request_body(list(photos)))


@requires_shared
@pytest.mark.slow
def test_the_served_model_answers_a_photo_as_predict_does(server, hand_run):
    photos = [HAND_PHOTO.read_bytes(), (SHARED_ASL / "test" / "L_test.jpg").read_bytes(), blank_jpeg()]
    status, answer = ask(server, *photos)
    assert status == 200, answer
    expected = expected_answers(hand_run, photos)
    assert expected[0]["hand_found"] and not expected[2]["hand_found"]
    assert_same_answers(answer["predictions"], expected)


@requires_shared
@pytest.mark.slow
def test_the_served_model_refuses_bad_photos_by_name_and_keeps_serving(server, hand_run):
    huge = encode(Image.new("1", (8000, 6500)), "PNG")  # 52 megapixels; a small file: the header says it
    refusals = [(ask(server, b"%PDF-1.7 this is a document"), "'image[0]' is not a readable image"),
                (ask(server, HAND_PHOTO.read_bytes(), b""), "'image[1]' is empty"),
                (ask(server, huge), "'image[0]' is too large (8000x6500 pixels); the limit is 50 megapixels")]
    for (status, error), message in refusals:
        assert status == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE", error
        assert message in error["message"]
    status, error = bench.invoke(server, b"")  # no JSON at all: MLflow's own refusal
    assert status == 400 and error["error_code"] == "BAD_REQUEST" and "valid JSON" in error["message"]
    status, answer = ask(server, HAND_PHOTO.read_bytes())
    assert status == 200
    assert_same_answers(answer["predictions"], expected_answers(hand_run, [HAND_PHOTO.read_bytes()]))


SERVE_CLIENTS, SERVE_S = 16, 30  # clients at once, and for how long


@requires_shared
@pytest.mark.slow
def test_sixteen_clients_at_once_get_the_answer_each_photo_gets_alone(server):
    # a photo of every letter by the external person (hand found or not), the hand photo and one without a hand
    photos = [(SHARED_ASL / "external" / letter / "0.jpg").read_bytes() for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    photos += [HAND_PHOTO.read_bytes(), blank_jpeg()]
    alone = []
    for photo in photos:
        status, answer = ask(server, photo)
        assert status == 200, answer
        alone.append(answer)
    # every fifth body a bad one: what it is, and MLflow's error code for it
    bad = [(b"{not json", "BAD_REQUEST"), (bench.request_body([b"%PDF-1.7 a document"]), "INVALID_PARAMETER_VALUE"),
           (bench.request_body([HAND_PHOTO.read_bytes(), b""]), "INVALID_PARAMETER_VALUE")]
    bodies, expected = [], []
    for i, photo in enumerate(photos):
        bodies.append(bench.request_body([photo]))
        expected.append(alone[i])
        if i % 4 == 3:
            body, code = bad[i // 4 % len(bad)]
            bodies.append(body)
            expected.append(code)
    logs = bench.serve_load(server, [bodies] * SERVE_CLIENTS, SERVE_S)
    for client, log in enumerate(logs):
        assert {int(s.sent // 10) for s in log if s.status == 200} == {0, 1, 2}, client  # none starved
        for sent in log:
            want = expected[sent.index]
            if isinstance(want, str):  # a bad body: refused, the server unharmed
                assert sent.status == 400 and sent.answer["error_code"] == want, (client, sent)
            else:
                assert sent.status == 200 and sent.answer == want, (client, sent)
    assert sum(s.status == 400 for log in logs for s in log) >= SERVE_CLIENTS
