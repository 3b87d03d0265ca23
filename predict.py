"""Load a trained model and predict on images: the one place that `evaluate.py` and `app.py` share.

A training output folder (or a single checkpoint) holds everything needed: the weights, the architecture,
the class names and the transform settings, so nothing here depends on how the model was trained. A model
logged to MLflow (`runs:/RUN_ID/model`, `models:/NAME/VERSION`) loads the same way (see log_experiment.py).

`load_predictor(..., backend="onnx")` serves a checkpoint with ONNX Runtime instead of eager PyTorch: the
same predictions (tests/test_fast_paths.py) at a fraction of the single-image latency on the CPU (bench.py).
The network is exported once to `<checkpoint>.onnx` beside the checkpoint (`export_onnx`), which is also
the file to hand to any other ONNX runtime.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

import data_loader
import model as models
import pt_engine


MLFLOW_URI_SCHEMES = ("runs:/", "models:/")
BACKENDS = ("torch", "onnx")


class ModelLoadError(RuntimeError):
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
    """Rebuild the network a checkpoint was trained with (its architecture is recorded in the metadata)."""
    meta = ckpt["metadata"]
    net = models.build_model(meta["arch"], meta["num_classes"], weights="none")
    net.load_state_dict(ckpt["model"])
    return net


@dataclass
class Predictor:
    """A model ready for inference, with its classes and preprocessing."""
    model: nn.Module
    classes: list[str]
    transform_cfg: dict
    device: torch.device = torch.device("cpu")
    metadata: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model.eval().to(self.device)
        self.transform = data_loader.eval_transform(self.transform_cfg)

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
        return self.predict_batch(torch.stack([self.preprocess(im) for im in images]))

    def top_k(self, image: Image.Image, k: int = 5) -> list[tuple[str, float]]:
        """The k most likely classes for one image, most likely first."""
        probs = self.predict([image])[0]
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
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: images.float().contiguous().numpy()})
        return torch.from_numpy(logits)


def export_onnx(net: nn.Module, path: str | os.PathLike, crop_size: int) -> Path:
    """Write `net` as an ONNX model of float32 NCHW `images` to `logits`, any batch size; atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    # a batch of 2: torch.export specialises a size-1 dimension, which would fix the batch size at 1
    example = torch.randn(2, 3, crop_size, crop_size)
    torch.onnx.export(net.cpu().eval(), (example,), tmp, dynamo=True, external_data=False,
                      input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    os.replace(tmp, path)
    return path


def _onnx_beside(checkpoint: Path, net: nn.Module, crop_size: int) -> Path:
    """`<checkpoint>.onnx`, exported first when it is missing or older than the checkpoint."""
    path = checkpoint.with_suffix(".onnx")
    if not path.is_file() or path.stat().st_mtime < checkpoint.stat().st_mtime:
        export_onnx(net, path, crop_size)
    return path


def load_predictor(source: str | os.PathLike, device: str | torch.device = "cpu",
                   backend: str = "torch") -> Predictor:
    """A Predictor from a training output folder, a checkpoint file, or an MLflow model URI.

    `backend="onnx"` runs a checkpoint's network with ONNX Runtime on the CPU (see the module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "onnx" and (torch.device(device).type != "cpu" or str(source).startswith(MLFLOW_URI_SCHEMES)):
        raise ModelLoadError("The ONNX backend serves a checkpoint file on the CPU; use backend='torch' for "
                             "GPUs and MLflow URIs.")
    if str(source).startswith(MLFLOW_URI_SCHEMES):
        import log_experiment  # here, not at the top: it imports this module

        net, meta = log_experiment.load_logged_model(str(source))
        return Predictor(net, meta["classes"], meta["transform"], torch.device(device), meta)
    path = checkpoint_path(source)
    try:
        ckpt = pt_engine.load_checkpoint(path)
        meta = ckpt["metadata"]
        net = model_from_checkpoint(ckpt)
    except pickle.UnpicklingError:
        # not torch's message: it suggests weights_only=False, which would run whatever code the file holds
        raise ModelLoadError(f"'{path}' is not a checkpoint written by pt_train.py (not a PyTorch file, or one "
                             "holding objects other than tensors).") from None
    except (KeyError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise ModelLoadError(f"'{path}' is not a checkpoint written by pt_train.py ({type(err).__name__}: "
                             f"{str(err)[:200]}).") from None
    if backend == "onnx":
        net = OnnxModule(_onnx_beside(path, net, meta["transform"]["crop_size"]))
    return Predictor(net, meta["classes"], meta["transform"], torch.device(device), meta, ckpt.get("history", []))
