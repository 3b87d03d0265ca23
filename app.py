"""The Streamlit app: show a hand sign, read the letter. `streamlit run app.py [-- --model_dir DIR]`.

Configuration (command line after `--`, else environment, else default):

* `--model_dir` / `ASL_MODEL_DIR`: a training output folder (`--save_dir` of pt_train.py), a `.pt` checkpoint,
  or an MLflow model URI (`runs:/...`, `models:/...`); default `runs/latest`.
* `--examples_dir` / `ASL_EXAMPLES_DIR`: a flat folder of example images (e.g. the test set's `A_test.jpg`).
* `--device` / `ASL_DEVICE`: `cpu` (default) or e.g. `cuda`.

The page code stays thin: decoding with limits, the "unsure" decision, the model's own view of the image, the
Grad-CAM map and the model facts are small functions here that the tests call directly. Prediction itself is
predict.py's (`load_predictor`, `Predictor`); what counts as a readable image, and decoding it to upright RGB,
is image_io.py's, as everywhere else.
"""
from __future__ import annotations

import argparse
import html
import io
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import streamlit as st
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageOps
from torch import nn

import data_loader
import hands
import image_io
import predict

log = logging.getLogger("app")

DEFAULT_MODEL = "runs/latest"
UPLOAD_TYPES = [ext.lstrip(".") for ext in image_io.IMG_EXTENSIONS]
MAX_UPLOAD_MB = 20
# Refused before decoding: a 50-megapixel phone photo still passes, while a small file that claims gigapixels
# (a "decompression bomb") never gets to allocate its pixels.
MAX_PIXELS = 50_000_000
# Accepted images are shrunk to this longest side right after decoding: the model looks at 224-256 px anyway,
# and the page then never holds or sends a full-size photo.
MAX_SIDE = 1024
TOP_K = 5
# The model is shared by every session (st.cache_resource), and Grad-CAM hooks into it: one map at a time.
_CAM_LOCK = threading.Lock()


class InputError(ValueError):
    """An image the app cannot use; the message names the problem and what to do instead."""


class ConfigError(RuntimeError):
    """A setting the app cannot run with; the message says which and how to change it."""


# ---------------------------------------------------------------------------------------------- testable logic

@dataclass(frozen=True)
class AppConfig:
    model: str
    examples_dir: str | None
    device: str


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> AppConfig:
    """Settings from the command line (after `streamlit run app.py --`), else the environment, else defaults."""
    # parse_known_args: under `streamlit.testing` sys.argv belongs to pytest; abbreviations could catch its flags
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    parser.add_argument("--model_dir", default=environ.get("ASL_MODEL_DIR") or DEFAULT_MODEL)
    parser.add_argument("--examples_dir", default=environ.get("ASL_EXAMPLES_DIR") or None)
    parser.add_argument("--device", default=environ.get("ASL_DEVICE") or "cpu")
    args, _ = parser.parse_known_args(list(argv))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"Device '{args.device}' was asked for but no CUDA GPU is available; use --device cpu "
                          "(the default) or unset ASL_DEVICE.")
    return AppConfig(args.model_dir, args.examples_dir, args.device)


def decode_image(data: bytes, name: str) -> Image.Image:
    """Upright RGB image from uploaded bytes, at most MAX_SIDE px on its longest side, or an InputError."""
    if not data:
        raise InputError(f"'{name}' is empty. Upload a photo of a hand sign (JPG, PNG, WEBP or BMP).")
    if len(data) > MAX_UPLOAD_MB * 2**20:
        raise InputError(f"'{name}' is {len(data) / 2**20:.0f} MB; the limit is {MAX_UPLOAD_MB} MB. "
                         "Upload a smaller or more compressed image.")
    width, height = _image_size(data, name)
    if width * height > MAX_PIXELS:
        raise InputError(_too_large(name, f"{width}x{height} pixels"))
    try:
        image = image_io.load_rgb(io.BytesIO(data))
    except image_io.ImageError:
        raise InputError(f"'{name}' could not be decoded: the file is truncated or damaged. "
                         "Save or export it again and upload the new file.") from None
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def _image_size(data: bytes, name: str) -> tuple[int, int]:
    """Width and height from the header alone: nothing is decoded yet."""
    try:
        return image_io.read_size(io.BytesIO(data))
    except image_io.ImageTooLarge:
        raise InputError(_too_large(name, "more pixels than PIL's safety limit")) from None
    except image_io.ImageError:
        raise InputError(f"'{name}' is not an image this app can read. Upload a photo of a hand sign as "
                         f"{', '.join(UPLOAD_TYPES)}.") from None


def _too_large(name: str, size: str) -> str:
    return (f"'{name}' is too large ({size}); the limit is {MAX_PIXELS / 1e6:.0f} megapixels. "
            f"Downscale it ({MAX_SIDE} px on the longest side is plenty) and upload it again.")


def model_view(predictor: predict.Predictor, image: Image.Image) -> np.ndarray:
    """The model's input for `image` (after resize and crop) turned back into displayable uint8 RGB."""
    tensor = predictor.preprocess(image)
    mean = torch.tensor(predictor.transform_cfg["mean"]).view(-1, 1, 1)
    std = torch.tensor(predictor.transform_cfg["std"]).view(-1, 1, 1)
    pixels = (tensor * std + mean).clamp(0, 1).mul(255).round().byte()
    return pixels.permute(1, 2, 0).numpy()


def draw_hand(image: Image.Image, hand: hands.Hand) -> Image.Image:
    """A copy of `image` with the hand's box and skeleton (MediaPipe's 21 landmarks) drawn over it."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(image.size) / 160))
    points = [(float(x * image.width), float(y * image.height)) for x, y, _ in hand.landmarks]
    x0, y0, x1, y1 = hand.box
    draw.rectangle((x0 * image.width, y0 * image.height, x1 * image.width, y1 * image.height),
                   outline=(255, 200, 0), width=width)
    for a, b in hands.CONNECTIONS:
        draw.line((points[a], points[b]), fill=(0, 255, 120), width=width)
    for x, y in points:
        draw.ellipse((x - 1.5 * width, y - 1.5 * width, x + 1.5 * width, y + 1.5 * width), fill=(255, 40, 80))
    return out


def model_info(predictor: predict.Predictor) -> dict[str, str]:
    """Facts about the loaded model for the sidebar, from its checkpoint's metadata and history."""
    meta, cfg = predictor.metadata, predictor.transform_cfg
    info = {"Architecture": str(meta.get("arch", "unknown")),
            "Reads": ("the image and the hand's landmarks (MediaPipe)" if predictor.uses_hands
                      else "the image alone"),
            "Classes": f"{len(predictor.classes)}",
            "Image size": f"{cfg['crop_size']} px (resized to {cfg['resize_size']}, centre crop)"}
    if predictor.history:
        # the checkpoint carries the history up to the epoch it was saved at: its last entry is these weights
        last = predictor.history[-1]
        info["Validation accuracy"] = f"{last['val_acc']:.1%} (epoch {last['epoch']})"
    if "temperature" in meta:
        info["Calibration"] = f"temperature {meta['temperature']:.2f}"
    return info


def example_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside `folder`, sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in image_io.IMG_EXTENSIONS)


def grad_cam(predictor: predict.Predictor, image: Image.Image, class_index: int) -> np.ndarray | None:
    """Grad-CAM map (crop x crop, 0..1): where the last convolutional features raised this class's score.

    The feature map is the last 4-D activation before global pooling, found with hooks on the leaf modules, so
    the same code serves torchvision's and timm's EfficientNets. None when the model has no such layers to hook
    (a `torch.export` graph loaded from MLflow is one flat graph of operations).
    """
    net = predictor.model
    activations: list[torch.Tensor] = []

    def keep(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        # requires_grad: other sessions' predictions, which run without gradients, pass these hooks too
        if (isinstance(output, torch.Tensor) and output.dim() == 4 and output.requires_grad
                and not isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))):
            activations.append(output)

    x = predictor.preprocess(image).unsqueeze(0).to(predictor.device)
    with _CAM_LOCK:
        handles = [m.register_forward_hook(keep) for m in net.modules() if next(m.children(), None) is None]
        try:
            with torch.enable_grad():
                score = net(x)[0, class_index]
                if not activations:
                    return None
                features = activations[-1]
                (grads,) = torch.autograd.grad(score, features)
        finally:
            for handle in handles:
                handle.remove()
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).detach().cpu().numpy()


def overlay(view: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a 0..1 heat map, coloured, over a uint8 RGB image."""
    coloured = colormaps["turbo"](heat)[..., :3] * 255
    return (view * (1 - alpha) + coloured * alpha).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- the page

@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def load_model(source: str, device: str, stamp: int, backend: str = "torch") -> predict.Predictor:
    """The predictor, loaded once per (source, device, backend); `stamp` changes when a local model is rewritten.
    A hand-aware model's hand finder is loaded here too, so that a missing MediaPipe shows up at once."""
    predictor = predict.load_predictor(source, device, backend)
    if predictor.uses_hands:
        _ = predictor.finder  # an assignment: a bare expression would be drawn on the page (Streamlit's "magic")
    return predictor


def fastest_backend(source: str, device: str) -> str:
    """ONNX Runtime for a checkpoint on the CPU (same answers, about a third of eager PyTorch's latency:
    bench.py), else PyTorch. Grad-CAM always uses the PyTorch model."""
    on_cpu = torch.device(device).type == "cpu"
    return "onnx" if on_cpu and not source.startswith(predict.MLFLOW_URI_SCHEMES) else "torch"


def _stamp(source: str) -> int:
    # a retrained folder gets a new mtime (checkpoints are renamed into it), so the cache reloads it
    return os.stat(source).st_mtime_ns if os.path.exists(source) else 0


def show_missing_model(err: predict.ModelLoadError) -> None:
    st.error(f"**No model to run.** {err}")
    st.info("Train one, e.g. `python pt_train.py --xtrain_path DATA --arch efficientnet_lite0 --save_dir "
            f"{DEFAULT_MODEL}`, or point the app at a model: `streamlit run app.py -- --model_dir DIR` or "
            "`ASL_MODEL_DIR=DIR streamlit run app.py` (DIR: a training output folder, a .pt checkpoint, or an "
            "MLflow model URI such as `models:/asl/1`).")


def sidebar(cfg: AppConfig, predictor: predict.Predictor) -> tuple[float, bool, bool]:
    """Model facts and the settings; returns (confidence threshold, show Grad-CAM, mirror the image)."""
    with st.sidebar:
        st.header("Model")
        st.caption(f"`{cfg.model}` on {cfg.device}")
        st.markdown("\n".join(f"- **{key}**: {value}" for key, value in model_info(predictor).items()))
        with st.expander("Class names"):
            st.write(", ".join(predictor.classes))
        st.header("Settings")
        threshold = st.slider("Confidence threshold", 0.0, 1.0, predict.DEFAULT_THRESHOLD, 0.05,
                              help="Below this probability the app says it is unsure instead of guessing.")
        explain = st.toggle("Show where the model looked (Grad-CAM)", value=False)
        # a model trained on one signer's hand reads the other hand's signs poorly unless trained with --hflip
        mirror = st.toggle("Mirror the image (signing with the other hand)", value=False,
                           help="A mirrored letter is the same letter signed with the other hand.")
    return threshold, explain, mirror


@dataclass(frozen=True)
class Chosen:
    """The image to classify, as uploaded bytes, and its true sign when known (an example's file name)."""
    data: bytes
    name: str
    truth: str | None = None


def choose_input(cfg: AppConfig) -> Chosen | None:
    """The image from the chosen source, or None while there is none."""
    examples = _examples(cfg)
    sources = ["Upload", "Camera"] + (["Example"] if examples else [])
    source = st.radio("Image source", sources, horizontal=True, label_visibility="collapsed")
    if source == "Example":
        path = st.selectbox("Example image (from the test set)", examples, format_func=lambda p: p.name)
        return Chosen(path.read_bytes(), path.name, data_loader.label_from_filename(path))
    if source == "Camera":
        shot = st.camera_input("Show a sign to the camera")
        return Chosen(shot.getvalue(), "camera photo") if shot else None
    upload = st.file_uploader("Upload a photo of a hand sign", type=UPLOAD_TYPES, max_upload_size=MAX_UPLOAD_MB)
    return Chosen(upload.getvalue(), upload.name) if upload else None


def _examples(cfg: AppConfig) -> list[Path]:
    if not cfg.examples_dir:
        return []
    if not Path(cfg.examples_dir).is_dir():
        st.sidebar.warning(f"Examples folder '{cfg.examples_dir}' does not exist; set --examples_dir or "
                           "ASL_EXAMPLES_DIR to a folder of images.")
        return []
    return example_images(cfg.examples_dir)


def show_result(predictor: predict.Predictor, chosen: Chosen, threshold: float, explain: bool,
                mirror: bool = False, cam_model: Callable[[], predict.Predictor] | None = None) -> None:
    """The image with the hand found, the model's view, the answer and the top classes. `cam_model` gives the
    PyTorch model for Grad-CAM when `predictor` runs on ONNX Runtime."""
    image = decode_image(chosen.data, chosen.name)
    if mirror:
        image = ImageOps.mirror(image)
    reading = predictor.read([image])[0]
    top = predictor.top_k(image, TOP_K, reading.probs)
    verdict = predict.decide(predictor.classes, reading.probs,
                             reading.hand is not None if predictor.uses_hands else None, threshold)
    view = model_view(predictor, image)
    images, result = st.columns([3, 2], gap="large")
    with images:
        panels = st.columns(3 if explain else 2)
        if reading.hand is not None:
            panels[0].image(draw_hand(image, reading.hand), caption=f"Your image ({image.width}x{image.height}), "
                            f"the hand MediaPipe found ({reading.hand.handedness.lower()})", width="stretch")
        else:
            panels[0].image(image, caption=f"Your image ({image.width}x{image.height})"
                            + (", no hand found" if predictor.uses_hands else ""), width="stretch")
        panels[1].image(view, caption=f"As the model saw it ({view.shape[1]}x{view.shape[0]})", width="stretch")
        if explain:
            heat = grad_cam(cam_model() if cam_model else predictor, image, predictor.classes.index(verdict.label))
            if heat is None:
                panels[2].info("Grad-CAM needs the model's layers; this model (an exported graph, e.g. from "
                               "MLflow) has none to look into. Point the app at the training folder instead.")
            elif heat.any():
                panels[2].image(overlay(view, heat), caption=f"Where it looked for '{verdict.label}'",
                                width="stretch")
            else:  # every region lowered the score: there is nothing to show, and a blank overlay would mislead
                panels[2].info(f"Grad-CAM is empty: no region of this image raised the score of '{verdict.label}'.")
    with result:
        show_verdict(verdict, threshold)
        if chosen.truth is not None:
            st.caption(f"True sign, from the file name: **{chosen.truth}** "
                       f"({'correct' if chosen.truth == verdict.label else 'wrong'})")
        chart = pd.DataFrame(top, columns=["class", "probability"])
        st.bar_chart(chart, x="class", y="probability", horizontal=True, sort="-probability", height=220)


def show_verdict(verdict: predict.Verdict, threshold: float) -> None:
    """The sign in large type; a question mark and the best guess when the model is unsure; no letter at all
    when there is no hand to read."""
    big = html.escape("–" if verdict.no_hand else verdict.label if verdict.sure else "?")
    st.markdown(f"<div style='font-size:7rem;font-weight:700;line-height:1.05'>{big}</div>",
                unsafe_allow_html=True)
    if verdict.no_hand:
        st.warning("**No hand found.** The images on the left show what the app looked at. Show one hand, "
                   "fingers in view, filling a good part of the picture, in even light.")
    elif verdict.sure:
        st.markdown(f"Prediction: **{verdict.label}**, probability **{verdict.probability:.1%}**")
    else:
        st.warning(f"Not sure: the best guess, **{verdict.label}**, has probability {verdict.probability:.1%}, "
                   f"below the {threshold:.0%} threshold. Try a clearer photo: one hand, plain background.")


def page() -> None:
    """Settings, model, input, result; each problem the user can fix ends in its own message."""
    try:
        cfg = parse_config(sys.argv[1:], os.environ)
        stamp = _stamp(cfg.model)
        predictor = load_model(cfg.model, cfg.device, stamp, fastest_backend(cfg.model, cfg.device))
    except (ConfigError, hands.HandModelError) as err:
        st.error(str(err))
        return
    except predict.ModelLoadError as err:
        show_missing_model(err)
        return
    threshold, explain, mirror = sidebar(cfg, predictor)
    chosen = choose_input(cfg)
    if chosen is None:
        return
    try:
        show_result(predictor, chosen, threshold, explain, mirror,
                    cam_model=lambda: load_model(cfg.model, cfg.device, stamp))
    except InputError as err:
        st.error(str(err))


def main() -> None:
    st.set_page_config(page_title="ASL sign reader", page_icon="🤟", layout="wide")
    st.title("ASL sign reader")
    st.caption("Show a hand sign of the American Sign Language alphabet; the model reads the letter.")
    try:
        page()
    except Exception as err:  # the last line of defence: the user gets a message, the server log the traceback
        log.exception("The page failed")
        st.error(f"Something went wrong ({type(err).__name__}). The details are in the server's log; please "
                 "report it, with the image if one was involved.")


if __name__ == "__main__":  # also true under `streamlit run` and AppTest; false when tests import the helpers
    main()
