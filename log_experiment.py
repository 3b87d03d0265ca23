"""Experiment tracking with MLflow: where runs go and what a training run records.

Where runs go (`configure_tracking`): `--dagshub OWNER/REPO` (DagsHub's hosted MLflow; the token comes from
DAGSHUB_USER_TOKEN), else `--tracking_uri URI` (any MLflow tracking server), else MLFLOW_TRACKING_URI, else
MLflow's own default: `mlflow.db` (SQLite) and `mlruns/` (artifacts) in the working folder, which `mlflow ui`
started in that folder shows.

What a training run holds (`TrainingTracker`, driven by `pt_train.py --mlflow` on rank 0 only): every CLI
argument as a param; the git commit and the dataset's path, image and class counts as tags; train/val loss,
accuracy and macro F1, learning rate and epoch time at every epoch, logged as the run goes; the best epoch's
figures; every JSON file of the training folder (classes, transform, config, split, history, calibration) and
its model card (MODEL_CARD.md); and the best checkpoint as the MLflow model `model` (optionally registered).
`evaluate.py --mlflow_run RUN_ID` adds its report through `log_evaluation`, and the card as evaluate left it.

The model is logged as the MLflow model of mlflow_model.py (`log_model`): a photo in, the app's answer out, so
`mlflow models serve -m runs:/RUN_ID/model` serves what the app serves (see mlflow_model.py for the input and the
output). It carries the checkpoint (what serving needs of it), its image network's ONNX export, MediaPipe's hand
model for a hand-aware model, and the project modules it runs on, with their pinned requirements; it loads
without unpickling anything. `predict.load_predictor("models:/NAME/VERSION")` loads its checkpoint (loading is
the serving side's: predict.py and mlflow_model.py, which never import this module).

Tracking never costs the training: the first MLflow call that fails for a tracking reason (the server
unreachable or refusing: connection errors, MlflowException) logs one warning and ends tracking for that run;
history.json keeps every epoch, and `python log_experiment.py SAVE_DIR` logs the folder afterwards. Any other
exception is a bug in our own code (exporting or loading the model) and is raised, not hidden in a warning.

MLflow is imported inside the functions that use it: it takes seconds to import, and training without --mlflow
never needs it.
"""
from __future__ import annotations

import argparse
import logging
import numbers
import os
import tempfile
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import data_loader
import hands
import model_card
import predict
import run_artifacts
from errors import UsageError

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

log = logging.getLogger("log_experiment")

PROJECT_DIR = Path(__file__).resolve().parent
DEFAULT_EXPERIMENT = "asl-classifier"
MODEL_NAME = "model"  # the logged model's name: runs:/RUN_ID/model
RUN_FILE = "mlflow_run.json"  # in the training folder: the run's id and store, so --resume continues that run
DAGSHUB_TOKEN_ENV = "DAGSHUB_USER_TOKEN"
DAGSHUB_TOKEN_PAGE = "https://dagshub.com/user/settings/tokens"
# MLflow's REST client retries for minutes by default (7 retries with backoff, 120 s timeout per request);
# a dead server must cost a training seconds. Set these variables yourself to override.
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
EXIT_USAGE = 2


class TrackingError(UsageError):
    """A tracking setting or MLflow problem the user fixes; the message says how."""


# ------------------------------------------------------------------------------------------------ settings

def add_tracking_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The options that say where runs go and how they are named (shared by pt_train.py and this CLI)."""
    parser.add_argument("--tracking_uri", help="MLflow tracking server or store (default: MLFLOW_TRACKING_URI, "
                                               "else ./mlflow.db)")
    parser.add_argument("--dagshub", metavar="OWNER/REPO",
                        help=f"log to the DagsHub repository's MLflow; needs {DAGSHUB_TOKEN_ENV}")
    parser.add_argument("--experiment_name", default=DEFAULT_EXPERIMENT)
    parser.add_argument("--run_name", help="default: MLflow picks one")
    parser.add_argument("--register", metavar="NAME", help="also register the model under NAME in the registry")


def check_settings(tracking_uri: str | None, dagshub_repo: str | None) -> None:
    """Fail early, before any training, on settings that cannot work; touches no network."""
    if tracking_uri and dagshub_repo:
        raise TrackingError("Pass either --tracking_uri or --dagshub, not both: --dagshub sets the tracking URI.")
    if dagshub_repo is None:
        return
    owner, _, name = dagshub_repo.partition("/")
    if not owner or not name or "/" in name:
        raise TrackingError(f"--dagshub wants OWNER/REPO (e.g. --dagshub alice/asl-signs), got '{dagshub_repo}'.")
    # without a token dagshub.init starts an interactive browser login, which would hang a training job
    if not os.environ.get(DAGSHUB_TOKEN_ENV):
        raise TrackingError(f"--dagshub needs a DagsHub access token: create one at {DAGSHUB_TOKEN_PAGE} and "
                            f"export {DAGSHUB_TOKEN_ENV}=<token> before training.")


def configure_tracking(tracking_uri: str | None = None, dagshub_repo: str | None = None) -> str:
    """Point MLflow at the store runs go to, and return its URI (see the module docstring for the order)."""
    import mlflow

    check_settings(tracking_uri, dagshub_repo)
    for name, value in FAIL_FAST_HTTP.items():
        os.environ.setdefault(name, value)
    if dagshub_repo:
        tracking_uri = _init_dagshub(dagshub_repo)
    # pin the resolved URI: MLflow's default is relative to the working folder, and messages and the run file
    # should name the store absolutely
    mlflow.set_tracking_uri(tracking_uri or mlflow.get_tracking_uri())
    return mlflow.get_tracking_uri()


def _init_dagshub(repo: str) -> str:
    """DagsHub's own set-up: it checks the token and the repository (creating it if missing) and sets
    MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."""
    import dagshub

    owner, name = repo.split("/")
    try:
        dagshub.init(repo_owner=owner, repo_name=name, mlflow=True)
    except Exception as err:  # RuntimeError for a bad token, httpx errors offline, dagshub's own API errors
        raise TrackingError(f"DagsHub set-up for {repo} failed ({type(err).__name__}: {str(err)[:300]}). Check "
                            f"{DAGSHUB_TOKEN_ENV} (a token from {DAGSHUB_TOKEN_PAGE}), the repository name and "
                            "the connection to dagshub.com.") from None
    return os.environ["MLFLOW_TRACKING_URI"]


def tracking_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the tracking service failed, not our code: MLflow's own (the server refused,
    the store is broken), connection errors and timeouts (requests' are OSErrors), and our TrackingError
    (DagsHub set-up)."""
    from mlflow.exceptions import MlflowException

    return MlflowException, OSError, TrackingError


# ------------------------------------------------------------------------------------------ what is logged

def git_tags(path: Path = PROJECT_DIR) -> dict[str, str]:
    """The code's git commit as MLflow's own source tag (shown in the UI); nothing outside a git checkout."""
    from mlflow.utils.git_utils import get_git_commit
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    commit = get_git_commit(str(path))
    return {MLFLOW_GIT_COMMIT: commit} if commit else {}


def dataset_tags(roots: list[str], num_images: int, num_classes: int) -> dict[str, str]:
    """The training folders (one per line), the number of images and classes."""
    return {"dataset_path": "\n".join(str(Path(root).resolve()) for root in roots),
            "dataset_images": str(num_images), "dataset_classes": str(num_classes)}


def log_epoch(record: Mapping[str, float]) -> None:
    """One history.json record as metrics of the active run, at step = epoch (the x axis of MLflow's charts)."""
    import mlflow

    mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))


def best_epoch_metrics(history: list[Mapping[str, float]]) -> dict[str, float]:
    """The figures of the epoch whose weights are best.pt (model_card.best_record)."""
    best = model_card.best_record(history)
    return {"best_epoch": best["epoch"], **{f"best_{k}": best[k] for k in ("val_loss", "val_acc", "val_f1")}}


def run_files(save_dir: str | os.PathLike) -> list[Path]:
    """The training folder's JSON files (classes, transform, config, split, history, calibration...) and its model
    card."""
    card = Path(save_dir) / model_card.CARD_NAME
    return sorted(Path(save_dir).glob("*.json")) + ([card] if card.is_file() else [])


def log_model(model_source: str | os.PathLike, register: str | None = None,
              hand_model: str | os.PathLike | None = None) -> ModelInfo:
    """Log a trained model (training folder or checkpoint) to the active run as `model`, the MLflow model of
    mlflow_model.py; returns MLflow's ModelInfo. With `register`, also creates a new version of that registered
    model. A hand-aware model carries `hand_model` (default: the cached bundle, hands.hand_model_path)."""
    import mlflow

    import mlflow_model

    path = predict.checkpoint_path(model_source)
    ckpt = predict.read_checkpoint(path)
    try:
        net = predict.model_from_checkpoint(ckpt)
    except predict.ModelLoadError as err:
        raise predict.ModelLoadError(f"'{path}' cannot be logged: {err}.") from None
    crop = ckpt["metadata"]["transform"]["crop_size"]
    with tempfile.TemporaryDirectory(prefix="asl-model-") as tmp:
        checkpoint = Path(tmp) / "checkpoint.pt"
        run_artifacts.save_checkpoint(run_artifacts.for_serving(ckpt), checkpoint)
        artifacts = {predict.LOGGED_CHECKPOINT: str(checkpoint),
                     predict.LOGGED_ONNX: str(predict.export_onnx(net, Path(tmp) / "image_net.onnx", (3, crop, crop)))}
        if "hand_net" in ckpt:
            artifacts[mlflow_model.HAND_MODEL] = str(hands.hand_model_path(hand_model))
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=mlflow_model.__file__, artifacts=artifacts,
            code_paths=[str(PROJECT_DIR / f"{module}.py") for module in mlflow_model.SERVING_MODULES],
            signature=mlflow_model.SIGNATURE, input_example=mlflow_model.input_example(),
            registered_model_name=register,
            # pinned as here; MLflow's own inference would load the model in a subprocess to find them (~20 s)
            pip_requirements=serving_requirements(mlflow_model.SERVING_PACKAGES))


def serving_requirements(packages: Iterable[str], requirements: Path = PROJECT_DIR / "requirements.txt"
                         ) -> list[str]:
    """The lines of requirements.txt that pin `packages` (named as pip names them, in any case)."""
    wanted = {name.lower().replace("_", "-") for name in packages}
    return [line.strip() for line in requirements.read_text().splitlines()
            if line.split("==")[0].strip().lower().replace("_", "-") in wanted]


def _log_results(metrics: Mapping[str, float], files: Iterable[str | os.PathLike],
                 model_source: str | os.PathLike | None, register: str | None,
                 hand_model: str | os.PathLike | None = None) -> None:
    """The end of a run, into the active run: final metrics, files, and the model."""
    import mlflow

    mlflow.log_metrics(dict(metrics))
    for path in files:
        mlflow.log_artifact(str(path))
    if model_source is not None:
        log_model(model_source, register, hand_model)


def create_experiment(experiment_name: str, run_name: str | None, run_metrics: Mapping[str, float],
                      model: str | os.PathLike | None = None, artifacts: Iterable[str | os.PathLike] = (),
                      run_params: Mapping | None = None, tags: Mapping[str, str] | None = None, *,
                      history: Iterable[Mapping[str, float]] = (), register: str | None = None) -> str:
    """Log one complete run in one call and return its id: params, per-epoch `history` (history.json records),
    final `run_metrics`, `artifacts` (files), and `model` (a training folder or checkpoint)."""
    import mlflow

    mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {})) as run:
        mlflow.log_params(dict(run_params or {}))
        for record in history:
            log_epoch(record)
        _log_results(run_metrics, artifacts, model, register)
    return run.info.run_id


def log_training_folder(save_dir: str | os.PathLike, experiment_name: str = DEFAULT_EXPERIMENT,
                        run_name: str | None = None, register: str | None = None) -> str:
    """Log a finished training folder as a new run (trained without --mlflow, or while the server was down).
    Its git commit is not known afterwards, so this run has no git tag."""
    save_dir = Path(save_dir)
    try:
        config = run_artifacts.load_json(save_dir / "config.json")
        history = run_artifacts.load_json(save_dir / "history.json")
        split = run_artifacts.load_json(save_dir / "split.json")
    except (OSError, ValueError) as err:
        raise TrackingError(f"'{save_dir}' is not a complete training folder of pt_train.py ({err}).") from None
    try:
        roots = [root for root, _ in data_loader.recorded_folders(config)]
        held_out = sum(len(val) for _, val in data_loader.recorded_val(split, config))
    except KeyError as err:
        raise TrackingError(f"'{save_dir}' is not a complete training folder of pt_train.py (no {err} in its "
                            "config.json or split.json).") from None
    tags = dataset_tags(roots, split["num_train"] + held_out, config["num_classes"])
    return create_experiment(experiment_name, run_name, best_epoch_metrics(history), save_dir,
                             run_files(save_dir), config["args"], tags, history=history, register=register)


# ------------------------------------------------------------------------------------------- live tracking

class TrainingTracker:
    """The MLflow run of one training, for rank 0 of pt_train.py.

    Use it as a context manager around training and pass `log_epoch` as the trainer's epoch callback: entering
    starts the run (or, with --resume, continues the one recorded in the training folder) and logs the params;
    each epoch's metrics are logged as it ends; leaving logs the results and the model from the training
    folder, or marks the run FAILED (KILLED on Ctrl-C) when training raised.
    """

    def __init__(self, args: argparse.Namespace, roots: list[str], num_images: int, num_classes: int):
        self.args = args
        self.save_dir = Path(args.save_dir)
        self.tags = dataset_tags(roots, num_images, num_classes)
        self.tracking_uri: str | None = None
        self.stopped = False  # set by the first failing MLflow call: nothing more is attempted

    def __enter__(self) -> TrainingTracker:
        self._guard("start the run", self._start)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self._guard("log the results and the model", self._finish)
        else:
            self._end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        if self.stopped:
            log.warning("This training is not (fully) in MLflow. Log it with: %s", self._relog_command())

    def log_epoch(self, record: Mapping[str, float]) -> None:
        self._guard(f"log epoch {record['epoch']}", lambda: log_epoch(record))

    def _start(self) -> None:
        import mlflow

        self.tracking_uri = configure_tracking(self.args.tracking_uri, self.args.dagshub)
        mlflow.set_experiment(self.args.experiment_name)
        continued = self._recorded_run()
        run = mlflow.start_run(run_id=continued, run_name=self.args.run_name)
        mlflow.set_tags({**self.tags, **git_tags()})
        if continued is None:  # MLflow params are immutable: a continued run keeps those it started with
            mlflow.log_params(vars(self.args))
        run_artifacts.save_json({"tracking_uri": self.tracking_uri, "run_id": run.info.run_id},
                              self.save_dir / RUN_FILE)
        log.info("MLflow run %s%s in %s", run.info.run_id, " (continued)" if continued else "", self.tracking_uri)

    def _recorded_run(self) -> str | None:
        """With --resume: the run this training folder logged to before, if it is in the current store."""
        path = self.save_dir / RUN_FILE
        if not (self.args.resume and path.is_file()):
            return None
        recorded = run_artifacts.load_json(path)
        return recorded["run_id"] if recorded.get("tracking_uri") == self.tracking_uri else None

    def _finish(self) -> None:
        import mlflow

        history = run_artifacts.load_json(self.save_dir / "history.json")
        _log_results(best_epoch_metrics(history), run_files(self.save_dir), self.save_dir, self.args.register,
                     self.args.hand_model)
        mlflow.end_run()

    def _guard(self, what: str, action: Callable[[], None]) -> None:
        """Run one tracking step; if tracking fails, warn once and stop tracking. The training itself goes on."""
        if self.stopped:
            return
        try:
            action()
        except tracking_errors() as err:
            self.stopped = True
            log.warning("MLflow tracking stopped: could not %s in %s (%s: %s). Training goes on; every epoch "
                        "stays in %s.", what, self.tracking_uri or "MLflow", type(err).__name__, str(err)[:300],
                        self.save_dir / "history.json")
            self._end("FAILED")

    def _end(self, status: str) -> None:
        """End the active run, if any. A failure here was already reported: the run just stays RUNNING."""
        import mlflow

        if mlflow.active_run() is None:
            return
        try:
            mlflow.end_run(status)
        except tracking_errors() as err:  # end_run has left the active run either way
            log.debug("Could not mark the MLflow run %s: %s", status, err)

    def _relog_command(self) -> str:
        where = (f" --dagshub {self.args.dagshub}" if self.args.dagshub
                 else f" --tracking_uri {self.tracking_uri}" if self.tracking_uri else "")
        return f"python log_experiment.py {self.save_dir}{where} --experiment_name {self.args.experiment_name}"


# -------------------------------------------------------------------------------------- reports and loading

def _numeric_leaves(metrics: Mapping, prefix: str) -> dict[str, float]:
    """Numbers of a nested mapping as `prefix/key/subkey`; lists, text, flags and None are left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            flat.update(_numeric_leaves(value, name))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def log_evaluation(run_id: str, out_dir: str | os.PathLike, metrics: Mapping, tracking_uri: str | None = None,
                   card: str | os.PathLike | None = None) -> None:
    """Add an evaluation report to an existing run, named after its folder so that several evaluations (the
    validation split, a test set) sit side by side: the numbers of `metrics` as metrics `eval/<folder>/...`
    (e.g. eval/external/accuracy, eval/external/per_class/A/f1) and the folder's files as artifacts there; and
    the model's `card` (MODEL_CARD.md, with this evaluation added) in place of the one the run holds."""
    import mlflow
    from mlflow.exceptions import MlflowException

    out_dir = Path(out_dir)
    prefix = f"eval/{out_dir.resolve().name}"
    uri = configure_tracking(tracking_uri)
    try:
        mlflow.get_run(run_id)
        mlflow.log_metrics(_numeric_leaves(metrics, prefix), run_id=run_id)
        mlflow.log_artifacts(str(out_dir), artifact_path=prefix, run_id=run_id)
        if card is not None:
            mlflow.log_artifact(str(card), run_id=run_id)
    except MlflowException as err:
        raise TrackingError(f"Could not add the evaluation to MLflow run {run_id} in {uri} ({str(err)[:300]}). "
                            "Pass the run id that pt_train.py printed (also in SAVE_DIR/mlflow_run.json) and the "
                            "tracking URI it logged to (MLFLOW_TRACKING_URI).") from None


# --------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    """`python log_experiment.py SAVE_DIR [--tracking_uri URI | --dagshub OWNER/REPO] [--register NAME]`"""
    p = argparse.ArgumentParser(description="Log a finished training folder (pt_train.py --save_dir) to MLflow "
                                            "as one run: params, per-epoch metrics, files and the model.")
    p.add_argument("save_dir")
    add_tracking_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    from mlflow.exceptions import MlflowException

    try:
        uri = configure_tracking(args.tracking_uri, args.dagshub)
        run_id = log_training_folder(args.save_dir, args.experiment_name, args.run_name, args.register)
    except UsageError as err:
        log.error("%s", err)
        return EXIT_USAGE
    except MlflowException as err:
        log.error("MLflow failed: %s. Check that the tracking server is up and --tracking_uri names it.", err)
        return 1
    log.info("Logged %s as MLflow run %s in %s", args.save_dir, run_id, uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
