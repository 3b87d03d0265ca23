"""Load a trained model and predict on images: the one place that `evaluate.py` and `app.py` share.

A training output folder (or a single checkpoint) holds everything needed: the weights, the architecture,
the class names and the transform settings, so nothing here depends on how the model was trained.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

import data_loader
import model as models
import pt_engine


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


def load_predictor(source: str | os.PathLike, device: str | torch.device = "cpu") -> Predictor:
    """A Predictor from a training output folder or a checkpoint file."""
    path = checkpoint_path(source)
    try:
        ckpt = pt_engine.load_checkpoint(path)
        meta = ckpt["metadata"]
        net = model_from_checkpoint(ckpt)
    except (KeyError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise ModelLoadError(f"'{path}' is not a checkpoint written by pt_train.py ({type(err).__name__}: "
                             f"{str(err)[:200]}).") from None
    return Predictor(net, meta["classes"], meta["transform"], torch.device(device), meta, ckpt.get("history", []))
