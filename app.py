"""The Streamlit app: show a hand sign, read the letter. `streamlit run app.py [-- --model_dir DIR]`.

Three modes, switched in the sidebar: Read (classify a photo), Live (fingerspell to the camera: the letters held
become words; live.py) and Teach (collect photos of your own hand per letter in
`COLLECT_DIR/<CLASS>/<timestamp>.jpg`, and print the command that fine-tunes the model on them).

The script serves itself as `app = st.App(...)` with Live mode's route added to Streamlit's server (live.py);
`streamlit run app.py` finds that object and runs it, and runs this file again as the page's script.

Configuration (command line after `--`, else environment, else default):

* `--model_dir` / `ASL_MODEL_DIR`: a training output folder (`--save_dir` of pt_train.py), a `.pt` checkpoint,
  or an MLflow model URI (`runs:/...`, `models:/...`); default `runs/latest`.
* `--runs_dir` / `ASL_RUNS_DIR`: the folder of training runs; its sub-folders that hold a `best.pt` are offered
  in the sidebar's model picker beside `--model_dir`; default `runs`.
* `--collect_dir` / `ASL_COLLECT_DIR`: where Teach mode saves photos (the only folder the app writes to);
  default `data/my_hand`.
* `--examples_dir` / `ASL_EXAMPLES_DIR`: a flat folder of example images (e.g. the test set's `A_test.jpg`).
* `--device` / `ASL_DEVICE`: `cpu` (default) or e.g. `cuda`.
* `ASL_VERBOSE=1`: also show the libraries' own logs (MediaPipe's C++ lines) and third-party deprecation warnings
  in the server's terminal (terminal.py).

The page code stays thin: the model's own view of the image, the Grad-CAM map, the model facts and the collected
photos (save, count, delete) are small functions here that the tests call directly. Prediction and the "unsure"
decision are predict.py's (`load_predictor`, `Predictor`, `decide`); what counts as a readable image, the limits on
an uploaded photo and decoding it to upright RGB are image_io.py's (`decode_photo`), as for the MLflow model.
"""
from __future__ import annotations

import argparse
import contextlib
import html
import io
import logging
import os
import shlex
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import streamlit as st
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageOps
from streamlit.runtime.uploaded_file_manager import UploadedFile
from torch import nn

import data_loader
import hands
import image_io
import live
import predict
import run_artifacts
import spelling
import terminal

log = logging.getLogger("app")

DEFAULT_MODEL = "runs/latest"
DEFAULT_RUNS_DIR = "runs"
DEFAULT_COLLECT_DIR = "data/my_hand"
FINETUNE_RUN = "my_hand"  # the fine-tuned model's folder under --runs_dir, where the model picker finds it
READ, LIVE, TEACH = "Read", "Live", "Teach"
THUMBS_PER_ROW = 6
THUMB_PX = 160  # Streamlit shrinks the image to this before sending it: a letter's photos stay a light page
UPLOAD_TYPES = [ext.lstrip(".") for ext in image_io.IMG_EXTENSIONS]
TOP_K = 5
# The model is shared by every session (st.cache_resource), and Grad-CAM hooks into it: one map at a time.
_CAM_LOCK = threading.Lock()


class ConfigError(RuntimeError):
    """A setting the app cannot run with; the message says which and how to change it."""


class CollectError(ValueError):
    """A write or delete that would reach outside the collect folder's class sub-folders."""


# ---------------------------------------------------------------------------------------------- testable logic

@dataclass(frozen=True)
class AppConfig:
    model: str
    examples_dir: str | None
    device: str
    runs_dir: str = DEFAULT_RUNS_DIR
    collect_dir: str = DEFAULT_COLLECT_DIR


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> AppConfig:
    """Settings from the command line (after `streamlit run app.py --`), else the environment, else defaults."""
    # parse_known_args: under `streamlit.testing` sys.argv belongs to pytest; abbreviations could catch its flags
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    parser.add_argument("--model_dir", default=environ.get("ASL_MODEL_DIR") or DEFAULT_MODEL)
    parser.add_argument("--examples_dir", default=environ.get("ASL_EXAMPLES_DIR") or None)
    parser.add_argument("--device", default=environ.get("ASL_DEVICE") or "cpu")
    parser.add_argument("--runs_dir", default=environ.get("ASL_RUNS_DIR") or DEFAULT_RUNS_DIR)
    parser.add_argument("--collect_dir", default=environ.get("ASL_COLLECT_DIR") or DEFAULT_COLLECT_DIR)
    args, _ = parser.parse_known_args(list(argv))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"Device '{args.device}' was asked for but no CUDA GPU is available; use --device cpu "
                          "(the default) or unset ASL_DEVICE.")
    return AppConfig(args.model_dir, args.examples_dir, args.device, args.runs_dir, args.collect_dir)


def model_view(predictor: predict.Predictor, image: Image.Image) -> np.ndarray:
    """The model's input for `image` (after resize and crop) turned back into displayable uint8 RGB."""
    tensor = predictor.preprocess(image)
    mean = torch.tensor(predictor.transform_cfg["mean"]).view(-1, 1, 1)
    std = torch.tensor(predictor.transform_cfg["std"]).view(-1, 1, 1)
    pixels = (tensor * std + mean).clamp(0, 1).mul(255).round().byte()
    return pixels.permute(1, 2, 0).numpy()


def draw_hand(image: Image.Image, hand: hands.Hand, crop_margin: float | None = None) -> Image.Image:
    """A copy of `image` with the hand's box and skeleton (MediaPipe's 21 landmarks) drawn over it, and for a
    crop model (`crop_margin`) the square its image network reads."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(image.size) / 160))
    if crop_margin:
        left, top, right, bottom = hands.crop_box(hand.box, image.size, crop_margin)
        # PIL's rectangle includes its far corner; the crop does not
        draw.rectangle((left, top, right - 1, bottom - 1), outline=(80, 160, 255), width=width)
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
            "Reads": ("the square around the hand and the hand's landmarks (MediaPipe)" if predictor.crop_margin
                      else "the image and the hand's landmarks (MediaPipe)" if predictor.uses_hands
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


def list_runs(runs_root: str | os.PathLike) -> list[Path]:
    """The training folders directly under `runs_root` that hold a `best.pt`, sorted by name."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if (d / "best.pt").is_file())


def model_choices(current: str, runs: Sequence[Path]) -> tuple[list[str], int]:
    """The model picker's options and the index of `current` (--model_dir) among them; `current` is listed
    first when it is not one of `runs` (a checkpoint elsewhere, an MLflow URI)."""
    options = [str(run) for run in runs]
    if not current.startswith(predict.MLFLOW_URI_SCHEMES):
        here = Path(current).resolve()
        for index, run in enumerate(runs):
            if run.resolve() == here:
                return options, index
    return [current, *options], 0


def class_folder(collect_dir: str | os.PathLike, class_name: str, classes: Sequence[str]) -> Path:
    """`collect_dir/class_name`, for one of the model's classes only, and only if it stays inside `collect_dir`
    (a class name from a foreign checkpoint could hold `..` or a slash)."""
    if class_name not in classes:
        raise CollectError(f"'{class_name}' is not one of the model's classes ({', '.join(classes)}).")
    root = Path(collect_dir).resolve()
    folder = (root / class_name).resolve()
    if folder.parent != root or folder.name != class_name:
        raise CollectError(f"The class name '{class_name}' would lead outside '{collect_dir}'.")
    return folder


def collected_photos(collect_dir: str | os.PathLike, class_name: str) -> list[Path]:
    """The images training would read in `collect_dir/class_name` (image_io's policy), oldest first: the names
    are timestamps."""
    folder = Path(collect_dir) / class_name
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and data_loader.is_image_file(p))


def collected_counts(collect_dir: str | os.PathLike, classes: Sequence[str]) -> dict[str, int]:
    """How many photos each of the model's classes has in `collect_dir`, zero included."""
    return {name: len(collected_photos(collect_dir, name)) for name in classes}


def photo_path(folder: Path, when: datetime) -> Path:
    """`folder/<YYYYMMDDhhmmssffffff>.jpg` for a photo taken at `when`. Digits only: training reads the name as a
    frame number, so its block split keeps photos taken one after another on the same side. A name already
    taken moves on by a microsecond, so no photo is ever overwritten."""
    while (path := folder / f"{when:%Y%m%d%H%M%S%f}.jpg").exists():
        when += timedelta(microseconds=1)
    return path


def free_run_dir(runs_dir: str | os.PathLike, name: str) -> Path:
    """`runs_dir/name`, or `name-2`, `name-3`, ... where that holds a run: a new fine-tuning never lands on an
    earlier model (pt_train.py would refuse it anyway)."""
    path, n = Path(runs_dir) / name, 1
    while path.exists():
        n += 1
        path = Path(runs_dir) / f"{name}-{n}"
    return path


def save_photo(collect_dir: str | os.PathLike, class_name: str, data: bytes, classes: Sequence[str],
               name: str = "the photo") -> Path:
    """Save an uploaded photo as `collect_dir/class_name/<timestamp>.jpg` and return its path.

    The upload goes through `image_io.decode_photo` (its limits, its ImageError for a bad file, nothing written)
    and is saved re-encoded as a JPEG: what lands in the folder is always a valid upright RGB image. The path is
    made from the class name and the time alone, never from the upload's name; the write is atomic.
    """
    folder = class_folder(collect_dir, class_name, classes)
    image = image_io.decode_photo(data, name)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    folder.mkdir(parents=True, exist_ok=True)
    path = photo_path(folder, datetime.now())
    run_artifacts.save_bytes(buf.getvalue(), path)
    return path


def delete_photo(collect_dir: str | os.PathLike, path: str | os.PathLike, classes: Sequence[str]) -> None:
    """Delete one collected photo; a CollectError for anything but an image file directly in
    `collect_dir/<one of classes>/` (no symlink, no `..` leading elsewhere). A class folder left empty goes too:
    training refuses an empty class folder."""
    path = Path(path)
    folder = path.parent.resolve()
    if (folder.parent != Path(collect_dir).resolve() or folder.name not in classes or path.is_symlink()
            or path.suffix.lower() not in image_io.IMG_EXTENSIONS or path.is_dir()):
        raise CollectError(f"'{path}' is not a photo in a class folder of '{collect_dir}'; nothing was deleted.")
    path.unlink(missing_ok=True)  # already gone: deleted from another tab
    with contextlib.suppress(OSError):  # not empty
        folder.rmdir()


def finetune_command(model_dir: str, collect_dir: str | os.PathLike, save_dir: str | os.PathLike) -> str:
    """The shell command that fine-tunes `model_dir` on the collected photos into `save_dir`; a ConfigError for
    an MLflow model: fine-tuning starts from a training folder or checkpoint (pt_train.py --init_from)."""
    if str(model_dir).startswith(predict.MLFLOW_URI_SCHEMES):
        raise ConfigError(f"`{model_dir}` is a logged MLflow model, which cannot be fine-tuned: pick its training "
                          "folder (pt_train.py's --save_dir) as the model to fine-tune it on these photos.")
    return (f"python pt_train.py --init_from {shlex.quote(str(model_dir))} "
            f"--xtrain_path {shlex.quote(str(collect_dir))} --save_dir {shlex.quote(str(save_dir))}")


def grad_cam(predictor: predict.Predictor, image: Image.Image, class_index: int) -> np.ndarray:
    """Grad-CAM map (crop x crop, 0..1): where the last convolutional features raised this class's score.

    The feature map is the last 4-D activation before global pooling, found with hooks on the leaf modules, so
    the same code serves torchvision's and timm's EfficientNets (a PyTorch model: `show_result` passes one when
    the page serves with ONNX Runtime).
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
    Its hand finder is loaded by Read and Live modes alone (`ready_to_read`): Teach mode needs only the class names."""
    return predict.load_predictor(source, device, backend)


def ready_to_read(predictor: predict.Predictor) -> None:
    """Load a hand-aware model's hand finder now (once: the predictor is cached), so that a missing MediaPipe
    shows up at once rather than after the first upload."""
    if predictor.uses_hands:
        _ = predictor.finder  # an assignment: a bare expression would be drawn on the page (Streamlit's "magic")


def fastest_backend(device: str) -> str:
    """ONNX Runtime on the CPU (same answers, about a third of eager PyTorch's latency: bench.py; a logged MLflow
    model brings its own export), else PyTorch. Grad-CAM always uses the PyTorch model."""
    return "onnx" if torch.device(device).type == "cpu" else "torch"


def _stamp(source: str) -> int:
    # a retrained folder gets a new mtime (checkpoints are renamed into it), so the cache reloads it
    return os.stat(source).st_mtime_ns if os.path.exists(source) else 0


def show_missing_model(err: predict.ModelLoadError) -> None:
    st.error(f"**No model to run.** {err}")
    st.info("Train one, e.g. `python pt_train.py --xtrain_path DATA --arch efficientnet_lite0 --save_dir "
            f"{DEFAULT_MODEL}`, or point the app at a model: `streamlit run app.py -- --model_dir DIR` or "
            "`ASL_MODEL_DIR=DIR streamlit run app.py` (DIR: a training output folder, a .pt checkpoint, or an "
            "MLflow model URI such as `models:/asl/1`).")


def choose_model(cfg: AppConfig) -> str:
    """The model to load: --model_dir, or another training folder under --runs_dir picked in the sidebar."""
    runs = list_runs(cfg.runs_dir)
    if not runs:
        return cfg.model
    options, index = model_choices(cfg.model, runs)
    return st.selectbox("Model", options, index=index, key="model",
                        help=f"--model_dir, or a training folder in '{cfg.runs_dir}' (one that holds a best.pt)")


def show_model(source: str, device: str, predictor: predict.Predictor) -> None:
    """What the sidebar says about the loaded model."""
    st.caption(f"`{source}` on {device}")
    st.markdown("\n".join(f"- **{key}**: {value}" for key, value in model_info(predictor).items()))
    with st.expander("Class names"):
        st.write(", ".join(predictor.classes))


def threshold_slider(default: float) -> float:
    return st.slider("Confidence threshold", 0.0, 1.0, default, predict.THRESHOLD_STEP,
                     help="Below this probability the app says it is unsure instead of guessing. Its default is the "
                          "model's own, fitted on people it did not train on where it was calibrated on them. "
                          "`evaluate.py` on a folder of your photos reports what each setting buys: how many it "
                          "answers and how often rightly.")


def mirror_toggle() -> bool:
    # a model trained on one signer's hand reads the other hand's signs poorly unless trained with --hflip
    return st.toggle("Mirror the image (signing with the other hand)", value=False,
                     help="A mirrored letter is the same letter signed with the other hand.")


def read_settings(default_threshold: float) -> tuple[float, bool, bool]:
    """Read mode's settings; returns (confidence threshold, show Grad-CAM, mirror the image)."""
    with st.sidebar:
        st.header("Settings")
        threshold = threshold_slider(default_threshold)
        explain = st.toggle("Show where the model looked (Grad-CAM)", value=False)
        mirror = mirror_toggle()
    return threshold, explain, mirror


def live_settings(default_threshold: float) -> live.Settings:
    """Live mode's settings: the threshold, how long a letter is held to be typed (seconds or frames read), and
    the mirror."""
    with st.sidebar:
        st.header("Settings")
        threshold = threshold_slider(default_threshold)
        unit = st.segmented_control("Hold a letter for", ["seconds", "frames"], default="seconds", required=True,
                                    help="A letter is typed once it is what the app reads in at least half of "
                                         "the frames of this hold, sure or not. Frames count the frames the app "
                                         "read, which depends on its speed; seconds do not.")
        if unit == "seconds":
            hold = st.slider("Seconds", 0.1, 3.0, spelling.DEFAULT_HOLD_S, 0.1, key="hold_s")
        else:
            hold = st.slider("Frames", 1, 45, spelling.DEFAULT_HOLD_FRAMES, key="hold_frames")
        mirror = mirror_toggle()
    return live.Settings(threshold, hold, unit == "seconds", mirror)


def live_mode(predictor: predict.Predictor) -> None:
    """Live mode: the camera in the browser, each frame read through Live's route (live.py) with this session's
    model and settings, the letters held typed into text."""
    settings = live_settings(predictor.threshold)
    token = st.session_state.setdefault("live_token", live.new_token())
    live.SESSIONS.open(token, predictor, settings)
    st.subheader("Fingerspell to the camera")
    hold = f"{settings.hold:g} {'second' if settings.seconds else 'frame'}{'' if settings.hold == 1 else 's'}"
    st.caption(f"Hold each letter for {hold} to type it; `space` and `del` are keys. To type a letter twice, drop "
               "the hand (or sign another letter) in between. The camera stays in your browser: frames are read "
               "one at a time and never stored.")
    live.PAGE(data=live.page_data(token), key="live_page")


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
    upload = st.file_uploader("Upload a photo of a hand sign", type=UPLOAD_TYPES,
                              max_upload_size=image_io.MAX_PHOTO_MB)
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
    image = image_io.decode_photo(chosen.data, chosen.name)
    if mirror:
        image = ImageOps.mirror(image)
    reading = predictor.read([image])[0]
    top = predictor.top_k(image, TOP_K, reading.probs)
    verdict = predictor.verdict(reading, threshold)
    seen = predictor.model_input(image, reading.hand)  # a crop model reads the square around the hand
    view = model_view(predictor, seen)
    images, result = st.columns([3, 2], gap="large")
    with images:
        panels = st.columns(3 if explain else 2)
        if reading.hand is not None:
            panels[0].image(draw_hand(image, reading.hand, predictor.crop_margin),
                            caption=f"Your image ({image.width}x{image.height}), the hand MediaPipe found "
                            f"({reading.hand.handedness.lower()})"
                            + (" and, in blue, the square the model read" if predictor.crop_margin else ""),
                            width="stretch")
        else:
            panels[0].image(image, caption=f"Your image ({image.width}x{image.height})"
                            + (", no hand found" if predictor.uses_hands else ""), width="stretch")
        panels[1].image(view, caption=f"As the model saw it ({view.shape[1]}x{view.shape[0]})", width="stretch")
        if explain:
            heat = grad_cam(cam_model() if cam_model else predictor, seen, predictor.classes.index(verdict.label))
            if heat.any():
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
    elif verdict.disagreed:
        st.warning(f"Not sure: the image and the hand's shape point to different letters; together the best "
                   f"guess is **{verdict.label}** ({verdict.probability:.1%}). Try another angle: palm or the "
                   "side of the hand towards the camera, the way the letter is usually shown.")
    else:
        st.warning(f"Not sure: the best guess, **{verdict.label}**, has probability {verdict.probability:.1%}, "
                   f"below the {threshold:.0%} threshold. Try a clearer photo: one hand, plain background.")


def teach(cfg: AppConfig, source: str, classes: Sequence[str]) -> None:
    """Teach mode: photos of the user's own hand per letter, their counts, and the fine-tuning command."""
    st.subheader("Teach it your hand")
    st.caption(f"Photos of your own signs, saved in `{cfg.collect_dir}` (one folder per letter), teach the model "
               "your hand: a few per letter, in different light and positions, help most.")
    letter = st.selectbox("Letter", classes, key="teach_letter", width=240)
    source_kind = st.radio("Photo source", ["Upload", "Camera"], horizontal=True, key="teach_source",
                           label_visibility="collapsed")
    # keyed by letter: choosing another letter starts an empty widget, so no photo is shown under the wrong one
    if source_kind == "Camera":
        shot = st.camera_input(f"Sign '{letter}' to the camera", key=f"teach_camera_{letter}")
        files = [shot] if shot else []
    else:
        files = st.file_uploader(f"Photos of '{letter}'", type=UPLOAD_TYPES, accept_multiple_files=True,
                                 max_upload_size=image_io.MAX_PHOTO_MB, key=f"teach_upload_{letter}")
    save_new_photos(cfg.collect_dir, letter, files, classes)
    show_collection(cfg.collect_dir, letter, classes)
    save_dir = free_run_dir(cfg.runs_dir, FINETUNE_RUN)
    st.subheader("Fine-tune on them")
    try:
        st.code(finetune_command(source, cfg.collect_dir, save_dir), language="bash", wrap_lines=True)
    except ConfigError as err:
        st.info(str(err))
        return
    st.markdown(f"After it finishes, pick `{save_dir}` in the sidebar's model picker (or "
                f"`streamlit run app.py -- --model_dir {shlex.quote(str(save_dir))}`).")


def save_new_photos(collect_dir: str, letter: str, files: Sequence[UploadedFile], classes: Sequence[str]) -> None:
    """Save each upload once: Streamlit reruns the script on every click with the same files still in the
    widget, so the ids of those already handled are kept in the session."""
    handled = st.session_state.setdefault("teach_handled", set())
    saved = []
    for file in files:
        if file.file_id in handled:
            continue
        try:
            save_photo(collect_dir, letter, file.getvalue(), classes, file.name)
        except (image_io.ImageError, CollectError) as err:
            st.error(f"{err} It was not saved.")
        except OSError as err:  # not marked handled: the next rerun tries again
            st.error(f"Could not save '{file.name}' in '{collect_dir}' ({err.strerror or err}). Set --collect_dir "
                     "or ASL_COLLECT_DIR to a folder this app can write to.")
            continue
        else:
            saved.append(file.name)
        handled.add(file.file_id)
    if saved:
        st.success(f"Saved {_photos(len(saved))} of '{letter}'.")


def show_collection(collect_dir: str, letter: str, classes: Sequence[str]) -> None:
    """The count for every class, and the chosen letter's photos, each with its Delete button."""
    counts = collected_counts(collect_dir, classes)
    st.markdown("**Photos per letter**")
    st.table(pd.DataFrame([counts], index=["photos"]))
    photos = collected_photos(collect_dir, letter)
    st.markdown(f"**{letter}**: {_photos(len(photos))}")
    columns = st.columns(THUMBS_PER_ROW)
    for i, path in enumerate(photos):
        with columns[i % THUMBS_PER_ROW]:
            st.image(str(path), caption=path.name, width=THUMB_PX)
            if st.button("Delete", key=f"delete_{letter}_{path.stem}"):
                try:
                    delete_photo(collect_dir, path, classes)
                except CollectError as err:
                    st.error(str(err))
                else:
                    st.rerun()  # the counts above were drawn before the delete


def _photos(n: int) -> str:
    return f"{n} photo{'' if n == 1 else 's'}"


def page() -> None:
    """Mode, model, then Read's input and result or Teach's collection; each problem the user can fix ends in
    its own message."""
    try:
        cfg = parse_config(sys.argv[1:], os.environ)
        with st.sidebar:
            mode = st.segmented_control("Mode", [READ, LIVE, TEACH], default=READ, required=True,
                                        help="Read: classify a photo. Live: fingerspell to the camera, letters "
                                             "become words. Teach: collect photos of your own hand.")
            st.header("Model")
            source = choose_model(cfg)
        stamp = _stamp(source)
        predictor = load_model(source, cfg.device, stamp, fastest_backend(cfg.device))
        if mode != TEACH:
            ready_to_read(predictor)
    except (ConfigError, hands.HandModelError) as err:
        st.error(str(err))
        return
    except predict.ModelLoadError as err:
        show_missing_model(err)
        return
    with st.sidebar:
        show_model(source, cfg.device, predictor)
    if mode == TEACH:
        teach(cfg, source, predictor.classes)
        return
    if mode == LIVE:
        live_mode(predictor)
        return
    threshold, explain, mirror = read_settings(predictor.threshold)
    chosen = choose_input(cfg)
    if chosen is None:
        return
    try:
        show_result(predictor, chosen, threshold, explain, mirror,
                    cam_model=lambda: load_model(source, cfg.device, stamp))
    except image_io.ImageError as err:
        st.error(str(err))


def main() -> None:
    terminal.configure()
    st.set_page_config(page_title="ASL sign reader", page_icon="🤟", layout="wide")
    st.title("ASL sign reader")
    st.caption("Show a hand sign of the American Sign Language alphabet; the model reads the letter.")
    try:
        page()
    except Exception as err:  # the last line of defence: the user gets a message, the server log the traceback
        log.exception("The page failed")
        st.error(f"Something went wrong ({type(err).__name__}). The details are in the server's log; please "
                 "report it, with the image if one was involved.")


# What `streamlit run app.py` serves: Streamlit's server with Live mode's route (live.py). The page's script, this
# file run again as __main__, makes this object too, and nothing uses it.
app = st.App(Path(__file__), routes=live.routes())

if __name__ == "__main__":  # also true under `streamlit run` and AppTest; false when tests import the helpers
    main()
