"""Load a trained model and predict on images: the one place that `evaluate.py` and `app.py` share.

A training output folder (or a single checkpoint) holds everything needed: the weights, the architecture,
the class names and the transform settings, so nothing here depends on how the model was trained. A model
logged to MLflow (`runs:/RUN_ID/model`, `models:/NAME/VERSION`: the MLflow model of mlflow_model.py, which
log_experiment.py logs) carries its checkpoint as an artifact, and loads the same way: the checkpoint (and its
ONNX export, for that backend) is downloaded with MLflow (`download_logged_model`; MLflow is imported only then)
and loaded as any checkpoint. The MLflow model itself serves through this module too (`load_predictor` on its
artifacts), so a photo gets the same answer from the app, evaluate.py and `mlflow models serve`.

Serving stays apart from training: this module (and so evaluate.py, the app and mlflow_model.py) imports neither
the training engine nor the tracker (tests/test_predict.py checks it); log_experiment.py imports this one, never
the reverse.

A hand-aware model (`pt_train.py --hands crop`, the default, or `--hands fused`) also finds the hand with
MediaPipe (hands.py) and reads its landmarks with a small network; a crop model's image network reads the square
around the hand (`Predictor.model_input`), a fused model's the whole frame. Where a hand is found, the answer
pools the landmark network's and the image network's probabilities (`pool`: their geometric mean), elsewhere
it is the image network's alone. Where the two networks name different letters, the app says it is unsure
whatever the probability (`decide`): on another person's photos that disagreement marks most of the wrong
answers (docs/results.md, "Other people's hands").
`Predictor.read` returns the hand with the probabilities, for the app to draw and to say when there is none.

`load_predictor(..., backend="onnx")` serves the image network with ONNX Runtime instead of eager PyTorch: the
same predictions (tests/test_fast_paths.py) at a fraction of the single-image latency on the CPU (bench.py).
The network is exported once to `<checkpoint>.onnx` beside the checkpoint (`export_onnx`); a logged MLflow model
carries its own export. export.py writes both networks for any other ONNX runtime.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

import data_loader
import hands
import image_io
import model as models
import run_artifacts
import terminal
from errors import UsageError

MLFLOW_URI_SCHEMES = ("runs:/", "models:/")
BACKENDS = ("torch", "onnx")
# Below this calibrated probability the app says it is unsure instead of naming a sign (its slider's default);
# evaluate.py reports how often the app would answer at it, and how often rightly, and so at every step of the slider.
DEFAULT_THRESHOLD = 0.5
THRESHOLD_STEP = 0.05
THRESHOLD_STEPS = tuple(round(i * THRESHOLD_STEP, 2) for i in range(round(1 / THRESHOLD_STEP) + 1))
# The share of its answers the app should get right. A model calibrated on people it did not train on
# (pt_train.py --calibration_path) records the lowest threshold that reached it on them as its own default.
ANSWER_PRECISION = 0.97
NO_SIGN = "nothing"  # the class of the Kaggle dataset for "no hand in view"
# The artifacts of a logged MLflow model (mlflow_model.py) that load it here: its checkpoint (what serving needs of
# it: run_artifacts.for_serving) and its image network's ONNX export
LOGGED_CHECKPOINT = "checkpoint"
LOGGED_ONNX = "image_net_onnx"


class ModelLoadError(UsageError):
    """The model could not be loaded; the message says what to train or where to point."""


def checkpoint_path(source: str | os.PathLike) -> Path:
    """`best.pt` (else `last.pt`) of a training folder, or the checkpoint file itself."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise ModelLoadError(f"No best.pt or last.pt in '{path}'. Train one first: "
                             f"python pt_train.py --xtrain_path DATA --save_dir {path}")
    if not path.is_file():
        raise ModelLoadError(f"Model '{path}' does not exist. Point to a training output folder (--save_dir of "
                             "pt_train.py) or a .pt checkpoint.")
    return path


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Rebuild the network a checkpoint was trained with (its architecture is recorded in the metadata); a
    ModelLoadError naming the tensors when the weights do not fit what the metadata describes."""
    meta = ckpt["metadata"]
    if meta["arch"] not in models.ARCHS:
        raise ModelLoadError(f"its metadata names the architecture {meta['arch']!r}; this code builds "
                             f"{', '.join(models.ARCHS)}")
    net = models.build_model(meta["arch"], meta["num_classes"], weights="none")
    own, saved = net.state_dict(), ckpt["model"]
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    wrong = [f"{k} is {tuple(saved[k].shape)}, not {tuple(v.shape)}" for k, v in own.items()
             if k in saved and saved[k].shape != v.shape]
    if missing or unexpected or wrong:
        head = saved.get(models.HEAD_WEIGHT)
        cause = (f"the checkpoint has {head.shape[0]} classes but its metadata says {meta['num_classes']}; "
                 if head is not None and head.shape[0] != meta["num_classes"] else "")
        problems = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                    (("wrong shape", wrong), ("missing", missing), ("unexpected", unexpected)) if keys]
        raise ModelLoadError(f"its weights do not fit a {meta['arch']} with {meta['num_classes']} classes "
                             f"({cause}{'; '.join(problems)})")
    net.load_state_dict(saved)
    return net


def hand_features(meta: dict) -> int:
    """How many of `hands.features` the model's landmark network reads: all, or, for a model trained before the
    viewpoint features were added (no "features" recorded), the landmarks alone (`hands.N_POINT_FEATURES`)."""
    return meta["hands"].get("features", hands.N_POINT_FEATURES)


def hand_net_from_checkpoint(ckpt: dict) -> nn.Module | None:
    """The landmark network of a hand-aware checkpoint (None for a model that reads the image alone)."""
    if "hand_net" not in ckpt:
        return None
    meta = ckpt["metadata"]
    net = models.LandmarkNet(meta["num_classes"], hand_features(meta), meta["hands"]["hidden"])
    try:
        net.load_state_dict(ckpt["hand_net"])
    except RuntimeError as err:
        raise ModelLoadError(f"its hand network does not fit the recorded settings ({str(err)[:300]})") from None
    return net


@dataclass(frozen=True)
class Reading:
    """What the model made of one image: class probabilities, the hand it found (None: no hand found, or a
    model that does not look for one), and where one was found whether the image network and the hand network
    name the same class."""
    probs: torch.Tensor
    hand: hands.Hand | None
    agreed: bool | None = None


@dataclass(frozen=True)
class Verdict:
    """What the app answers for one image: the most likely class and its probability; `sure` when that
    reaches the threshold and the two networks of a hand-aware model agree (`disagreed` when they do not);
    `no_hand` when no hand was found or the most likely class is the empty scene (the two mean the same to a
    user, so they get the same answer)."""
    label: str
    probability: float
    sure: bool
    no_hand: bool = False
    disagreed: bool = False

    @property
    def answered(self) -> bool:
        """True when the app names a sign."""
        return self.sure and not self.no_hand


def decide(classes: Sequence[str], probs: torch.Tensor, hand_found: bool | None,
           threshold: float = DEFAULT_THRESHOLD, agreed: bool | None = None) -> Verdict:
    """The app's answer for one image's probabilities; `hand_found` None for a model that does not look for
    hands; `agreed` False where its two networks name different classes (`Reading.agreed`)."""
    probability, index = probs.max(dim=0)
    label = classes[int(index)]
    return Verdict(label, float(probability), float(probability) >= threshold and agreed is not False,
                   hand_found is False or label == NO_SIGN, agreed is False)


def trust(classes: Sequence[str], probs: torch.Tensor, targets: Sequence[int],
          hand_found: Sequence[bool | None] | None, agreed: Sequence[bool | None] | None, threshold: float) -> dict:
    """What the app would do at `threshold` on labelled images: the share it answers (`decide`) and how often those
    answers are right (None when it answers none). `hand_found` None for a model that does not look for hands."""
    answered = [decide(classes, row, None if hand_found is None else hand_found[i], threshold,
                       None if agreed is None else agreed[i]).answered for i, row in enumerate(probs)]
    right = [int(row.argmax()) == int(target) for row, target, a in zip(probs, targets, answered) if a]
    return {"threshold": threshold, "coverage": sum(answered) / max(1, len(answered)),
            "accuracy_when_answered": sum(right) / len(right) if right else None}


def fit_threshold(by_threshold: Sequence[dict], precision: float = ANSWER_PRECISION) -> float | None:
    """The lowest threshold (of `trust` rows, one per step) whose answers are right at least `precision` of the
    time, or None where no step reaches it."""
    reached = [row["threshold"] for row in by_threshold
               if row["accuracy_when_answered"] is not None and row["accuracy_when_answered"] >= precision]
    return min(reached, default=None)


def pool(*probs: torch.Tensor) -> torch.Tensor:
    """Several models' class probabilities as one: their geometric mean, renormalised (a product of experts). A
    class must be likely to every model to stay likely, so one model's confident mistake is outvoted where another
    rules that class out, which the plain average lets through. Measured on the hand-aware model's two networks:
    fewer errors on the signer's held-out frames and on another person's photos (docs/results.md, "Other people's hands")."""
    tiny = torch.finfo(torch.float32).tiny  # a probability that underflowed to 0 rules its class out, no NaN
    return torch.softmax(torch.stack([p.float().clamp_min(tiny).log() for p in probs]).mean(0), dim=-1)


@dataclass
class Predictor:
    """A model ready for inference, with its classes and preprocessing; with `hand_net`, hand-aware."""
    model: nn.Module
    classes: list[str]
    transform_cfg: dict
    device: torch.device = torch.device("cpu")
    metadata: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    hand_net: nn.Module | None = None
    hand_model: str | None = None  # a MediaPipe bundle instead of the cached one (hands.hand_model_path)

    def __post_init__(self) -> None:
        self.model.eval().to(self.device)
        if self.hand_net is not None:
            self.hand_net.eval().to(self.device)
        self.transform = data_loader.eval_transform(self.transform_cfg)

    @property
    def uses_hands(self) -> bool:
        return self.hand_net is not None

    @property
    def threshold(self) -> float:
        """The app's default confidence threshold for this model: fitted on people it did not train on where it
        was calibrated on them, else DEFAULT_THRESHOLD."""
        return self.metadata.get("threshold", DEFAULT_THRESHOLD)

    @cached_property
    def finder(self) -> hands.HandFinder:
        """MediaPipe's hand finder, loaded on first use (a HandModelError when it cannot be)."""
        return hands.HandFinder(self.hand_model)

    @property
    def crop_margin(self) -> float | None:
        """For a crop model (`pt_train.py --hands crop`), how much around the hand its image network reads
        (`hands.crop_box`); None for a model that reads the whole image."""
        return (self.metadata.get("hands") or {}).get("crop") if self.uses_hands else None

    def model_input(self, image: Image.Image, hand: hands.Hand | None) -> Image.Image:
        """What the image network reads of `image`: a crop model's square around `hand` (the whole image where
        none was found), else the whole image."""
        return hands.crop(image, hand.box if hand else None, self.crop_margin) if self.crop_margin else image

    def file_loader(self, paths: Sequence[str], found: Sequence[hands.Hand | None]) -> Callable[[str], Image.Image]:
        """How to open these image files (whose hands are `found`) for the image network: `model_input` for
        files, picklable for loader workers."""
        return hands.CropLoader.of(paths, found, self.crop_margin) if self.crop_margin else image_io.load_rgb

    def find_hands(self, images: Sequence[Image.Image]) -> list[hands.Hand | None]:
        """The hand in each image; all None for a model that does not use hands."""
        return [self.finder.find(im) if self.uses_hands else None for im in images]

    @torch.no_grad()
    def combine(self, frame_probs: torch.Tensor, found: Sequence[hands.Hand | None]
                ) -> tuple[torch.Tensor, list[bool | None]]:
        """The image network's probabilities pooled with the hand network's where a hand was found, and there
        whether the two networks' most likely classes agree (None where no hand was found)."""
        agreed: list[bool | None] = [None] * len(found)
        rows = [i for i, hand in enumerate(found) if hand is not None]
        if not self.uses_hands or not rows:
            return frame_probs, agreed
        width = hand_features(self.metadata)
        features = torch.stack([torch.from_numpy(hands.features(found[i])[:width]) for i in rows]).to(self.device)
        logits = self.hand_net(features).float() / self.metadata["hands"].get("temperature", 1.0)
        hand_probs = torch.softmax(logits, dim=1).cpu()
        probs = frame_probs.clone()
        probs[rows] = pool(frame_probs[rows], hand_probs)
        for i, same in zip(rows, (frame_probs[rows].argmax(1) == hand_probs.argmax(1)).tolist()):
            agreed[i] = same
        return probs, agreed

    def read(self, images: Sequence[Image.Image]) -> list[Reading]:
        """Probabilities and the hand found, one Reading per image."""
        found = self.find_hands(images)
        batch = torch.stack([self.preprocess(self.model_input(im, hand)) for im, hand in zip(images, found)])
        probs, agreed = self.combine(self.predict_batch(batch), found)
        return [Reading(p, hand, same) for p, hand, same in zip(probs, found, agreed)]

    def verdict(self, reading: Reading, threshold: float | None = None) -> Verdict:
        """The app's answer for one Reading (`decide`) at `threshold` (default: the model's own, `threshold`): for a
        hand-aware model, no hand found means no sign."""
        return decide(self.classes, reading.probs, reading.hand is not None if self.uses_hands else None,
                      self.threshold if threshold is None else threshold, reading.agreed)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The model's input for one RGB image (resized, cropped, normalised)."""
        return self.transform(image)

    @torch.no_grad()
    def predict_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities for a batch of preprocessed images."""
        logits = self.model(batch.to(self.device)).float()
        return torch.softmax(logits / self.metadata.get("temperature", 1.0), dim=1).cpu()

    def predict(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Class probabilities, one row per image."""
        return torch.stack([reading.probs for reading in self.read(images)])

    def top_k(self, image: Image.Image | None, k: int = 5, probs: torch.Tensor | None = None
              ) -> list[tuple[str, float]]:
        """The k most likely classes for one image (or for its `probs`, already read), most likely first."""
        probs = self.predict([image])[0] if probs is None else probs
        values, indices = probs.topk(min(k, len(self.classes)))
        return [(self.classes[i], float(v)) for v, i in zip(values, indices)]


class OnnxModule(nn.Module):
    """An ONNX model run by ONNX Runtime on the CPU, behind the nn.Module interface that Predictor uses."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import onnxruntime  # here, not at the top: only this backend needs it

        options = onnxruntime.SessionOptions()
        # as many threads as torch uses, so torch.set_num_threads / OMP_NUM_THREADS govern both backends alike
        options.intra_op_num_threads = torch.get_num_threads()
        # by default its threads spin between runs, which pays in a tight loop, but the app reads one photo now and
        # then, just after MediaPipe's search: there it cost 4-6 ms of ~40 per read in an A/B on a 2-core CPU
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: images.float().contiguous().numpy()})
        return torch.from_numpy(logits)


def export_onnx(net: nn.Module, path: str | os.PathLike, input_shape: Sequence[int], input_name: str = "images"
                ) -> Path:
    """Write `net` as an ONNX model of a float32 batch `input_name` (any batch size of `input_shape`) to `logits`,
    in one file; atomically. An image network takes (3, crop, crop) `images`, the landmark network (features,)."""
    # a batch of 2: torch.export specialises a size-1 dimension, which would fix the batch size at 1
    example = torch.randn(2, *input_shape)
    with run_artifacts.atomic_path(path) as tmp:
        torch.onnx.export(net.cpu().eval(), (example,), tmp, dynamo=True, external_data=False,
                          input_names=[input_name], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},),
                          verbose=None if terminal.verbose() else False)  # None: its progress lines
    return Path(path)


def _onnx_beside(checkpoint: Path, net: nn.Module, crop_size: int) -> Path:
    """`<checkpoint>.onnx`, exported first when it is missing or older than the checkpoint."""
    path = checkpoint.with_suffix(".onnx")
    if not path.is_file() or path.stat().st_mtime < checkpoint.stat().st_mtime:
        export_onnx(net, path, (3, crop_size, crop_size))
    return path


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file read safely and checked against the schema (run_artifacts), or a ModelLoadError that
    names the real cause."""
    try:
        ckpt = run_artifacts.load_checkpoint(path)
    except pickle.UnpicklingError:
        # not torch's message: it suggests weights_only=False, which would run whatever code the file holds
        raise ModelLoadError(f"'{path}' is not a checkpoint written by pt_train.py (not a PyTorch file, or one "
                             "holding objects other than tensors).") from None
    except (RuntimeError, OSError, EOFError) as err:  # torch's "not a zip archive", a truncated file
        raise ModelLoadError(f"'{path}' is not a checkpoint written by pt_train.py (not a readable PyTorch file: "
                             f"{type(err).__name__}: {str(err)[:200]}).") from None
    try:
        return run_artifacts.check_checkpoint(ckpt)
    except run_artifacts.CheckpointError as err:
        raise ModelLoadError(f"'{path}' is not a model checkpoint written by pt_train.py: {err}.") from None


def load_predictor(source: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "torch",
                   hand_model: str | None = None, onnx_file: str | os.PathLike | None = None) -> Predictor:
    """A Predictor from a training output folder, a checkpoint file, or an MLflow model URI.

    `backend="onnx"` runs the image network with ONNX Runtime on the CPU (see the module docstring): `onnx_file`,
    an export of this checkpoint's network, or else the one beside the checkpoint (exported first where missing or
    older), or a logged model's own; `hand_model` a MediaPipe bundle of the user's instead of the cached one.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "onnx" and torch.device(device).type != "cpu":
        raise ModelLoadError("The ONNX backend runs on the CPU; use backend='torch' for GPUs.")
    if str(source).startswith(MLFLOW_URI_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="asl-logged-model-") as tmp:
            # everything is read into memory here (ONNX Runtime too), so the download goes with the folder
            checkpoint, onnx_export = download_logged_model(str(source), Path(tmp), onnx=backend == "onnx")
            try:
                return load_predictor(checkpoint, device, backend, hand_model, onnx_export)
            except ModelLoadError as err:  # named after the URI the user gave, not the temporary download
                raise ModelLoadError(f"The logged model '{source}' cannot be used: {err}") from None
    path = checkpoint_path(source)
    ckpt = read_checkpoint(path)
    meta = ckpt["metadata"]
    try:
        net, hand_net = model_from_checkpoint(ckpt), hand_net_from_checkpoint(ckpt)
    except ModelLoadError as err:
        raise ModelLoadError(f"'{path}' cannot be loaded: {err}. Retrain, or point to the checkpoint that goes "
                             "with this metadata.") from None
    if backend == "onnx":
        net = OnnxModule(onnx_file or _onnx_beside(path, net, meta["transform"]["crop_size"]))
    return Predictor(net, meta["classes"], meta["transform"], torch.device(device), meta, ckpt.get("history", []),
                     hand_net, hand_model)


def download_logged_model(uri: str, folder: Path, onnx: bool = False) -> tuple[Path, Path | None]:
    """The checkpoint of a model that log_experiment.py logged, and with `onnx` its image network's ONNX export,
    downloaded into `folder` from an MLflow URI (`runs:/RUN_ID/model` or `models:/NAME/VERSION`, in the store
    MLFLOW_TRACKING_URI names); a ModelLoadError saying what to check when that fails."""
    import mlflow  # here, not at the top: slow to import, and only this kind of source needs it
    from mlflow.exceptions import MlflowException

    try:
        # the model's MLmodel file alone first: it says where in the model its artifacts are
        logged = mlflow.models.Model.load(uri).flavors.get("python_function", {}).get("artifacts", {})
        if LOGGED_CHECKPOINT not in logged:
            raise ModelLoadError(f"'{uri}' carries no checkpoint: only models logged by pt_train.py --mlflow or "
                                 "log_experiment.py can be loaded here (log its training folder again with "
                                 "python log_experiment.py SAVE_DIR).")
        names = [LOGGED_CHECKPOINT, *([LOGGED_ONNX] if onnx else [])]
        files = [Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{logged[name]['path']}",
                                                          dst_path=str(folder / name))) for name in names]
    except (MlflowException, OSError) as err:  # OSError: connection errors and missing files alike
        raise ModelLoadError(
            f"Could not load '{uri}' from MLflow at {mlflow.get_tracking_uri()} ({type(err).__name__}: "
            f"{str(err)[:300]}). Check the run id (runs:/RUN_ID/model) or the registered name and version "
            "(models:/NAME/VERSION), and that MLFLOW_TRACKING_URI names the store that holds it.") from None
    return files[0], files[1] if onnx else None
