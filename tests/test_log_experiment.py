"""log_experiment: MLflow tracking of training runs, against MLflow's local store and a real `mlflow server`.

Every test points MLflow at a store in a temporary folder (never the project's), and works in a temporary
folder, since MLflow puts relative defaults (`mlflow.db`, `mlruns/`) in the working folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow  # conftest has switched MLflow's telemetry off before this import
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.types.schema import DataType
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

import calibration
import log_experiment
import mlflow_model
import predict
import pt_train
import run_artifacts
from conftest import ROOT
from image_io import load_rgb

TINY = ["--arch", "efficientnet_lite0", "--weights", "imagenet", "--img_size", "64", "--total_epochs", "2",
        "--batch_size", "8", "--num_workers", "0", "--val_split", "0.25", "--seed", "0"]
REGISTERED = "asl-test"
EPOCH_METRICS = ("train_loss", "val_loss", "train_acc", "val_acc", "train_f1", "val_f1", "lr")
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID",
              log_experiment.DAGSHUB_TOKEN_ENV, *log_experiment.FAIL_FAST_HTTP)


@contextlib.contextmanager
def isolated_mlflow():
    """MLflow's process-wide state (tracking URI, environment, active run) starts clean and is restored."""
    environ = dict(os.environ)
    for name in MLFLOW_ENV:
        os.environ.pop(name, None)
    mlflow.set_tracking_uri(None)
    try:
        yield
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with isolated_mlflow():
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A local SQLite tracking store shared by the tests that need no training (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


# ------------------------------------------------------------------------------------------ a real server

@dataclass
class Server:
    url: str
    db_uri: str  # its backend store, readable directly once the server is gone
    process: subprocess.Popen

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and its workers (its own process group) and wait until it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(folder: Path, startup_s: float = 180):
    """`mlflow server` on a free loopback port with its store in `folder`; always stopped on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    port = pt_train.find_free_port()
    server_log = folder / "server.log"
    with open(server_log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder}/server.db", "--artifacts-destination", str(folder / "art")],
            cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", f"sqlite:///{folder}/server.db", process)
    try:
        deadline = time.monotonic() + startup_s
        while not _healthy(server.url):
            assert process.poll() is None, f"mlflow server exited:\n{server_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server not up in {startup_s}s:\n{server_log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield server
    finally:
        server.stop()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# ------------------------------------------------------------------------------- a short tracked training

@dataclass
class Tracked:
    """A 2-epoch training logged with --mlflow --register, and where it went."""
    uri: str  # as recorded in the training folder
    expected_uri: str
    store_files: list[Path]
    save_dir: Path
    run_id: str
    client: MlflowClient


@pytest.fixture(scope="module", params=["local", pytest.param("server", marks=pytest.mark.slow)])
def tracked(request, synthetic_dir, tmp_path_factory) -> Tracked:
    folder = tmp_path_factory.mktemp(f"tracked_{request.param}")
    with isolated_mlflow(), contextlib.ExitStack() as stack:
        if request.param == "server":
            server = stack.enter_context(mlflow_server(folder / "server"))
            where, expected_uri = ["--tracking_uri", server.url], server.url
            store_files = [folder / "server" / "server.db", folder / "server" / "art"]
        else:  # MLflow's default store: ./mlflow.db and ./mlruns in the working folder
            stack.enter_context(contextlib.chdir(folder))
            where, expected_uri = [], f"sqlite:///{folder}/mlflow.db"
            store_files = [folder / "mlflow.db", folder / "mlruns"]
        # nine validation images rarely earn a temperature; force one, so the tests see it reach the logged model
        real_calibrate = calibration.calibrate
        stack.enter_context(pytest.MonkeyPatch.context()).setattr(
            calibration, "calibrate", lambda *a, **kw: dict(real_calibrate(*a, **kw), temperature=0.5, applied=True))
        save_dir = folder / "run"
        assert pt_train.main(["--xtrain_path", str(synthetic_dir), "--save_dir", str(save_dir), *TINY, "--mlflow",
                              "--register", REGISTERED, *where]) == 0
        recorded = json.loads((save_dir / log_experiment.RUN_FILE).read_text())
        uri = recorded["tracking_uri"]
        yield Tracked(uri, expected_uri, store_files, save_dir, recorded["run_id"], MlflowClient(uri))


def test_the_run_lands_in_the_chosen_store(tracked):
    assert tracked.uri == tracked.expected_uri
    assert all(path.exists() for path in tracked.store_files)
    assert tracked.client.get_run(tracked.run_id).info.status == "FINISHED"


def test_the_run_holds_params_tags_epoch_metrics_and_files(tracked, synthetic_dir):
    run = tracked.client.get_run(tracked.run_id)
    config = json.loads((tracked.save_dir / "config.json").read_text())
    assert run.data.params == {name: str(value) for name, value in config["args"].items()}
    assert run.data.tags["dataset_path"] == str(synthetic_dir.resolve())
    assert (run.data.tags["dataset_images"], run.data.tags["dataset_classes"]) == ("36", "3")
    assert run.data.tags.get(MLFLOW_GIT_COMMIT) == _git_head()

    history = json.loads((tracked.save_dir / "history.json").read_text())
    for name in EPOCH_METRICS:
        logged = [(m.step, m.value) for m in tracked.client.get_metric_history(tracked.run_id, name)]
        assert logged == [(h["epoch"], pytest.approx(h[name])) for h in history], name
    best = min(history, key=lambda h: h["val_loss"])
    assert run.data.metrics["best_epoch"] == best["epoch"]
    assert run.data.metrics["best_val_acc"] == pytest.approx(best["val_acc"])

    files = {a.path for a in tracked.client.list_artifacts(tracked.run_id)}
    assert files >= {"classes.json", "transform.json", "config.json", "split.json", "history.json",
                     "calibration.json", "MODEL_CARD.md"}
    local = tracked.client.download_artifacts(tracked.run_id, "history.json", str(tracked.save_dir.parent))
    assert json.loads(Path(local).read_text()) == history


@pytest.mark.parametrize("uri", ["runs:/{run_id}/model", f"models:/{REGISTERED}/1"])
def test_the_logged_model_predicts_like_the_checkpoint(tracked, synthetic_dir, tmp_path, uri):
    mlflow.set_tracking_uri(tracked.uri)
    uri = uri.format(run_id=tracked.run_id)
    logged = predict.load_predictor(uri)
    checkpoint = predict.load_predictor(tracked.save_dir)
    assert (logged.classes, logged.transform_cfg) == (checkpoint.classes, checkpoint.transform_cfg)
    assert logged.metadata["temperature"] == checkpoint.metadata["temperature"] != 1.0
    assert logged.history == checkpoint.history
    images = [load_rgb(path) for path in sorted(synthetic_dir.rglob("*.jpg"))[::6]]  # 6 images, all classes
    expected = checkpoint.predict(images)
    torch.testing.assert_close(logged.predict(images), expected, rtol=1e-5, atol=1e-6)
    assert logged.top_k(images[0], 1) == checkpoint.top_k(images[0], 1)
    # the ONNX backend serves the export the model carries: nothing is exported when it loads
    fast = predict.load_predictor(uri, backend="onnx")
    assert isinstance(fast.model, predict.OnnxModule)
    torch.testing.assert_close(fast.predict(images), expected, rtol=1e-4, atol=1e-5)
    # the model takes photos (mlflow_model.py); its checkpoint is what serving needs, no training state
    signature = mlflow.models.get_model_info(uri).signature
    assert signature.inputs.input_names() == ["image"] and signature.inputs.input_types() == [DataType.binary]
    saved, _ = predict.download_logged_model(uri, tmp_path)
    assert set(run_artifacts.load_checkpoint(saved)) == {"model", "metadata", "history"}


def _git_head() -> str | None:
    """The project's commit, or None where it is no git checkout or git is missing (then no tag is expected)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


# ----------------------------------------------------------------------------------- failures and resume

def _tracker(save_dir: Path, *options: str) -> log_experiment.TrainingTracker:
    args = pt_train.parse_args(["--save_dir", str(save_dir), "--experiment_name", "unit", *options])
    return log_experiment.TrainingTracker(args, ["data"], 10, 2)


def _record(epoch: int) -> dict:
    return {"epoch": epoch, "lr": 1e-3, "train_loss": 1.0 / epoch, "val_loss": 1.5 / epoch}


def _recorded_run_id(save_dir: Path) -> str:
    return json.loads((save_dir / log_experiment.RUN_FILE).read_text())["run_id"]


@pytest.mark.parametrize("error, status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_training_that_raises_leaves_its_run_marked(tmp_path, store, error, status):
    tracker = _tracker(tmp_path, "--tracking_uri", store)
    with pytest.raises(error), tracker:
        tracker.log_epoch(_record(1))
        raise error
    client = MlflowClient(store)
    run_id = _recorded_run_id(tmp_path)
    assert client.get_run(run_id).info.status == status
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1]
    assert mlflow.active_run() is None


def test_resume_continues_the_same_run(tmp_path, store):
    first = _tracker(tmp_path, "--tracking_uri", store)
    with pytest.raises(KeyboardInterrupt), first:
        first.log_epoch(_record(1))
        raise KeyboardInterrupt
    second = _tracker(tmp_path, "--tracking_uri", store, "--resume")
    with pytest.raises(RuntimeError), second:
        second.log_epoch(_record(2))
        raise RuntimeError("stop before the model: this test is about the run")
    client = MlflowClient(store)
    run_id = _recorded_run_id(tmp_path)
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]
    assert client.get_run(run_id).data.params["resume"] == "False"  # params stay those the run started with
    assert len(client.search_runs([client.get_experiment_by_name("unit").experiment_id],
                                  f"attributes.run_id = '{run_id}'")) == 1


def test_an_unreachable_server_costs_seconds_and_a_warning(tmp_path, caplog):
    url = f"http://127.0.0.1:{pt_train.find_free_port()}"  # nothing listens there
    tracker = _tracker(tmp_path, "--tracking_uri", url)
    start = time.monotonic()
    with tracker:
        tracker.log_epoch(_record(1))
    assert time.monotonic() - start < 60  # MLflow's own retry settings would take minutes
    assert tracker.stopped
    warnings = [r.getMessage() for r in caplog.records if r.name == "log_experiment" and r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings  # what failed, then at the end how to log the run later
    assert url in warnings[0] and "could not start the run" in warnings[0] and "history.json" in warnings[0]
    assert f"python log_experiment.py {tmp_path} --tracking_uri {url}" in warnings[1]


@pytest.mark.parametrize("failure, is_tracking", [
    (mlflow.exceptions.MlflowException("RESOURCE_DOES_NOT_EXIST: the server refused"), True),
    (ConnectionError("connection refused"), True),
    (TypeError("a bug in our export code"), False),
    (KeyError("metadata"), False),
])
def test_tracking_failures_warn_while_bugs_in_our_code_surface(tmp_path, store, monkeypatch, caplog, failure,
                                                               is_tracking):
    def log_model(*args, **kwargs):
        raise failure

    monkeypatch.setattr(log_experiment, "log_model", log_model)
    save_dir = tmp_path
    run_artifacts.save_json([{**_record(1), "val_acc": 0.5, "val_f1": 0.5}], save_dir / "history.json")
    tracker = _tracker(save_dir, "--tracking_uri", store)
    if is_tracking:
        with tracker:
            tracker.log_epoch(_record(1))
        assert tracker.stopped and "could not log the results and the model" in caplog.text
    else:
        with pytest.raises(type(failure)), tracker:
            tracker.log_epoch(_record(1))
        assert not tracker.stopped and "MLflow tracking stopped" not in caplog.text


@pytest.mark.slow
def test_a_server_dying_mid_run_loses_nothing(synthetic_dir, tmp_path, monkeypatch, capsys):
    save_dir = tmp_path / "run"
    durations: list[float] = []
    with mlflow_server(tmp_path / "server") as server:
        log_epoch = log_experiment.TrainingTracker.log_epoch

        def log_then_kill(tracker, record):
            start = time.monotonic()
            log_epoch(tracker, record)
            durations.append(time.monotonic() - start)
            if record["epoch"] == 1:
                server.stop(signal.SIGKILL)

        monkeypatch.setattr(log_experiment.TrainingTracker, "log_epoch", log_then_kill)
        # --tracking_uri alone turns tracking on
        code = pt_train.main(["--xtrain_path", str(synthetic_dir), "--save_dir", str(save_dir), *TINY,
                              "--tracking_uri", server.url])
    assert code == 0
    assert [h["epoch"] for h in json.loads((save_dir / "history.json").read_text())] == [1, 2]
    assert (save_dir / "best.pt").is_file()
    err = capsys.readouterr().err
    assert "MLflow tracking stopped: could not log epoch 2" in err and "Traceback" not in err
    assert durations[1] < 60  # the failing call, with its retries and the attempt to mark the run

    # epoch 1 reached the server before it died: metrics are logged as the run goes
    dead = MlflowClient(server.db_uri)
    run_id = _recorded_run_id(save_dir)
    assert [m.step for m in dead.get_metric_history(run_id, "val_loss")] == [1]

    # and the folder logs afterwards, as the warning says
    later = f"sqlite:///{tmp_path}/later.db"
    assert log_experiment.main([str(save_dir), "--tracking_uri", later, "--run_name", "relogged"]) == 0
    client = MlflowClient(later)
    [run] = client.search_runs([client.get_experiment_by_name(log_experiment.DEFAULT_EXPERIMENT).experiment_id])
    assert run.info.run_name == "relogged" and run.data.params["tracking_uri"] == server.url
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    mlflow.set_tracking_uri(later)
    images = [load_rgb(path) for path in sorted(synthetic_dir.rglob("*.jpg"))[:3]]
    torch.testing.assert_close(predict.load_predictor(f"runs:/{run.info.run_id}/model").predict(images),
                               predict.load_predictor(save_dir).predict(images), rtol=1e-5, atol=1e-6)


def test_logging_a_folder_that_is_not_a_training_run_is_explained(tmp_path, store, capsys):
    assert log_experiment.main([str(tmp_path / "nowhere"), "--tracking_uri", store]) == 2
    assert "not a complete training folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ evaluation, loading

def test_an_evaluation_report_joins_an_existing_run(tmp_path, store):
    mlflow.set_tracking_uri(store)
    run_id = log_experiment.create_experiment("reports", "trained", {"best_val_loss": 0.5}, run_params={"seed": 1},
                                              tags={"dataset_images": "10"})
    out = tmp_path / "external"
    out.mkdir()
    (out / "report.md").write_text("# Report\n")
    (out / "confusion_matrix.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    metrics = {"accuracy": 0.9, "macro_f1": np.float32(0.75), "n_images": 10, "classes_present": ["A"],
               "per_class": {"A": {"f1": 0.5, "roc_auc": None}}, "most_confused": [], "notes": ["x"]}
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# Model card\n\n## Evaluations\n")
    log_experiment.log_evaluation(run_id, out, metrics, card=card)
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.metrics == {"best_val_loss": 0.5, "eval/external/accuracy": 0.9, "eval/external/macro_f1": 0.75,
                                "eval/external/n_images": 10.0, "eval/external/per_class/A/f1": 0.5}
    assert run.data.params == {"seed": "1"} and run.data.tags["dataset_images"] == "10"
    assert {a.path for a in client.list_artifacts(run_id, "eval/external")} == {
        "eval/external/report.md", "eval/external/confusion_matrix.png"}
    assert Path(client.download_artifacts(run_id, "MODEL_CARD.md", str(tmp_path / "got"))).read_text() == \
        card.read_text()
    with pytest.raises(log_experiment.TrackingError, match="mlflow_run.json"):
        log_experiment.log_evaluation("0" * 32, out, metrics)


@pytest.mark.parametrize("uri", ["runs:/00000000000000000000000000000000/model", "models:/no-such-model/1"])
def test_an_unknown_mlflow_model_is_a_clear_error(store, uri):
    mlflow.set_tracking_uri(store)
    with pytest.raises(predict.ModelLoadError, match="models:/NAME/VERSION") as err:
        predict.load_predictor(uri)
    assert uri in str(err.value) and store in str(err.value)


def echo(model_input: list[str]) -> list[str]:
    return model_input


def test_a_model_logged_otherwise_is_refused_with_what_to_do(store):
    mlflow.set_tracking_uri(store)
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(name="model", python_model=echo, pip_requirements=[])
    with pytest.raises(predict.ModelLoadError, match="carries no checkpoint.*python log_experiment.py SAVE_DIR"):
        predict.load_predictor(f"runs:/{run.info.run_id}/model")


def test_the_logged_model_requires_the_pinned_packages_it_imports():
    pins = log_experiment.serving_requirements(mlflow_model.SERVING_PACKAGES)
    assert len(pins) == len(mlflow_model.SERVING_PACKAGES) and all("==" in pin for pin in pins)
    assert "mediapipe==1.2.3" in pins and not any(pin.startswith(("streamlit", "torchmetrics")) for pin in pins)


# ----------------------------------------------------------------------------------------------- DagsHub

@pytest.mark.parametrize("tracking_uri, repo, message", [
    (None, "alice/asl-signs", log_experiment.DAGSHUB_TOKEN_PAGE),
    (None, "alice", "OWNER/REPO"),
    (None, "alice/asl/signs", "OWNER/REPO"),
    ("http://127.0.0.1:5000", "alice/asl-signs", "not both"),
])
def test_dagshub_settings_are_checked_before_training(synthetic_dir, tmp_path, capsys, tracking_uri, repo, message):
    where = ["--tracking_uri", tracking_uri] if tracking_uri else []
    assert pt_train.main(["--xtrain_path", str(synthetic_dir), "--save_dir", str(tmp_path / "run"), "--dagshub", repo,
                          *where]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


DAGSHUB_USER = {"id": 7, "login": "alice", "full_name": "Alice", "avatar_url": None, "public_email": None,
                "website": None, "company": None, "description": None, "username": "alice"}
DAGSHUB_REPO = {"id": 3, "owner": DAGSHUB_USER, "name": "asl-signs", "full_name": "alice/asl-signs",
                "description": "", "private": False, "fork": False, "parent": None, "empty": False, "mirror": False,
                "size": 0, "html_url": "https://dagshub.com/alice/asl-signs", "ssh_url": None,
                "clone_url": "https://dagshub.com/alice/asl-signs.git", "website": None, "stars_count": 0,
                "forks_count": 0, "watchers_count": 0, "open_issues_count": 0, "default_branch": "main",
                "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "permissions": None}


@pytest.fixture
def dagshub_requests(monkeypatch) -> list[httpx.Request]:
    """DagsHub's client as it is, with its HTTP requests answered here instead of by dagshub.com (which this
    machine cannot reach): the API accepts the token 'good-token' only. Returns the requests made."""
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.headers.get("Authorization") != "Bearer good-token":
            return httpx.Response(401, json={"message": "bad token"})
        routes = {"/api/v1/user": DAGSHUB_USER, "/api/v1/repos/alice/asl-signs": DAGSHUB_REPO}
        return httpx.Response(200, json=routes[request.url.path]) if request.url.path in routes else httpx.Response(404)

    monkeypatch.setattr(httpx, "request", httpx.Client(transport=httpx.MockTransport(answer)).request)
    return requests


def _set_dagshub_token(monkeypatch, token: str) -> None:
    import dagshub.common.config

    monkeypatch.setenv(log_experiment.DAGSHUB_TOKEN_ENV, token)
    monkeypatch.setattr(dagshub.common.config, "token", token)  # dagshub reads the variable once, at import


def test_dagshub_points_mlflow_at_the_repository_with_the_token(dagshub_requests, monkeypatch):
    _set_dagshub_token(monkeypatch, "good-token")
    uri = log_experiment.configure_tracking(dagshub_repo="alice/asl-signs")
    assert uri == mlflow.get_tracking_uri() == "https://dagshub.com/alice/asl-signs.mlflow"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "good-token"
    assert {(r.url.host, r.url.path) for r in dagshub_requests} == {("dagshub.com", "/api/v1/user"),
                                                                    ("dagshub.com", "/api/v1/repos/alice/asl-signs")}


def test_dagshub_rejecting_the_token_is_explained(dagshub_requests, monkeypatch):
    _set_dagshub_token(monkeypatch, "expired-token")
    with pytest.raises(log_experiment.TrackingError, match=log_experiment.DAGSHUB_TOKEN_PAGE):
        log_experiment.configure_tracking(dagshub_repo="alice/asl-signs")
    assert dagshub_requests and "MLFLOW_TRACKING_PASSWORD" not in os.environ


@pytest.mark.slow
def test_a_hand_aware_model_is_logged_with_its_landmark_network(hand_run, store, monkeypatch):
    mlflow.set_tracking_uri(store)
    run_id = log_experiment.log_training_folder(hand_run, run_name="hands")
    logged = predict.load_predictor(f"runs:/{run_id}/model")
    checkpoint = predict.load_predictor(hand_run)
    assert logged.uses_hands and logged.metadata["hands"] == checkpoint.metadata["hands"]
    for a, b in zip(logged.hand_net.state_dict().values(), checkpoint.hand_net.state_dict().values()):
        assert torch.equal(a, b)
    image = load_rgb(ROOT.parent / "shared" / "asl" / "train" / "B" / "B1300.jpg")
    torch.testing.assert_close(logged.predict([image]), checkpoint.predict([image]), rtol=1e-5, atol=1e-6)
    # a landmark network that does not fit its metadata: named with the URI it came from
    load = run_artifacts.load_checkpoint
    monkeypatch.setattr(predict.run_artifacts, "load_checkpoint",
                        lambda path: {**load(path), "hand_net": {"0.weight": torch.zeros(1)}})
    with pytest.raises(predict.ModelLoadError, match=f"runs:/{run_id}/model.*hand network does not fit"):
        predict.load_predictor(f"runs:/{run_id}/model")


def test_every_training_folder_is_in_the_dataset_tag(tmp_path):
    folders = [str(tmp_path / "kaggle"), "data/../data/my_hand"]
    tags = log_experiment.dataset_tags(folders, 120, 29)
    assert tags["dataset_path"].splitlines() == [str(Path(f).resolve()) for f in folders]
    assert (tags["dataset_images"], tags["dataset_classes"]) == ("120", "29")
