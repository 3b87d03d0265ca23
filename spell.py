"""Spell the word fingerspelled in a video: `python spell.py VIDEO_OR_FOLDER --model_dir DIR [--csv PATH]`.

Reads every frame of a video file (anything OpenCV's FFmpeg reads: .mp4, .mov, .webm, .y4m, ...) or of a folder
of frames (image files in the order of the frame numbers in their names, `--fps` frames a second) with the model,
as the app's Live mode reads a camera: predict.py finds the hand and reads the letter (ONNX Runtime on the CPU,
like the app), and spelling.py types the signs held long enough (`--hold_s` seconds, or `--hold_frames` frames)
into text, `space` and `del` as keys. Prints the text; `--csv` also writes what every frame was read as (and
whether the app's Read mode would answer it, at the model's threshold) and the text so far.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import cv2
from PIL import Image, ImageOps

import data_loader
import image_io
import predict
import run_artifacts
import spelling
from errors import UsageError

log = logging.getLogger("spell")

EXIT_USAGE = 2
DEFAULT_FPS = 15.0  # a webcam's usual rate, for a folder of frames
BATCH = 16  # frames read at once: MediaPipe takes them one by one, the image network in a batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a video file, or a folder of frames (image files, in frame-number order)")
    p.add_argument("--model_dir", default="runs/latest",
                   help="a training output folder (--save_dir of pt_train.py) or a .pt checkpoint")
    hold = p.add_mutually_exclusive_group()
    hold.add_argument("--hold_s", type=float, help=f"seconds a sign must be held to be typed (default "
                                                   f"{spelling.DEFAULT_HOLD_S})")
    hold.add_argument("--hold_frames", type=int, help="frames a sign must be held to be typed, instead of seconds")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS, help="frames a second of a folder of frames")
    p.add_argument("--mirror", action="store_true", help="mirror every frame left-right (signing with the other "
                                                         "hand)")
    p.add_argument("--csv", help="write one row per frame here: what it was read as, and the text so far")
    args = p.parse_args(argv)
    if args.fps <= 0:
        p.error("--fps must be more than 0")
    if (args.hold_s or 0) < 0 or (args.hold_frames or 0) < 0:
        p.error("a hold cannot be negative")
    return args


@dataclass(frozen=True)
class Frame:
    index: int  # from 0
    time: float  # seconds from the first frame
    image: Image.Image


def video_frames(path: Path) -> Iterator[Frame]:
    """The frames of a video file as RGB images, with their timestamps; a UsageError at once for a file OpenCV
    cannot open, and at the first frame for one it cannot read a frame of."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise UsageError(f"'{path}' is not a video OpenCV can read; pass a video file (.mp4, .mov, .webm, .y4m, "
                         "...) or a folder of frames.")
    return _read_video(capture, path)


def _read_video(capture: cv2.VideoCapture, path: Path) -> Iterator[Frame]:
    fps = capture.get(cv2.CAP_PROP_FPS)
    try:
        for index in itertools.count():
            ok, bgr = capture.read()
            if not ok:
                if index == 0:
                    raise UsageError(f"No frame of '{path}' could be read: the file is empty, damaged or in a "
                                     "codec this OpenCV lacks. Convert it to .mp4 (H.264) and try again.")
                return
            # the frame's own timestamp (a phone's video has no fixed rate); a container without one: its rate
            at = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
            if index and at <= 0:
                at = index / (fps if fps > 0 else DEFAULT_FPS)
            yield Frame(index, at, Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    finally:
        capture.release()


def folder_frames(folder: Path, fps: float) -> Iterator[Frame]:
    """The image files of a folder in the order of the frame numbers in their names (`frame_9.jpg` before
    `frame_10.jpg`), `fps` a second; a UsageError at once for a folder without any. An unreadable file is
    skipped with a warning, its frame number kept free."""
    paths = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in image_io.IMG_EXTENSIONS),
                   key=lambda p: (data_loader.frame_number(str(p)) or 0, p.name))
    if not paths:
        raise UsageError(f"'{folder}' holds no image files ({', '.join(image_io.IMG_EXTENSIONS)}); pass a folder of "
                         "frames or a video file.")
    return _read_folder(paths, fps)


def _read_folder(paths: list[Path], fps: float) -> Iterator[Frame]:
    for index, path in enumerate(paths):
        try:
            image = image_io.load_rgb(path)
        except image_io.ImageError as err:
            log.warning("Skipped frame %d: %s", index, err)
            continue
        yield Frame(index, index / fps, image)


def frames_of(source: str, fps: float) -> Iterator[Frame]:
    """A folder's frames or a video's; a UsageError for a path that is neither."""
    path = Path(source).expanduser()
    if path.is_dir():
        return folder_frames(path, fps)
    if not path.is_file():
        raise UsageError(f"'{path}' does not exist; pass a video file or a folder of frames.")
    return video_frames(path)


@dataclass(frozen=True)
class Row:
    """One frame as read and spelled (a CSV row). `hand_found` None for a model that does not look for hands."""
    frame: int
    time_s: float
    hand_found: bool | None
    label: str
    probability: float
    answered: bool
    typed: str | None
    text: str


def spell(predictor: predict.Predictor, frames: Iterable[Frame], speller: spelling.Speller,
          mirror: bool = False) -> Iterator[Row]:
    """Read the frames with the model, `BATCH` at a time, and feed their answers to `speller`; one Row each."""
    frames = iter(frames)
    while batch := list(itertools.islice(frames, BATCH)):
        images = [ImageOps.mirror(f.image) if mirror else f.image for f in batch]
        for frame, reading in zip(batch, predictor.read(images)):
            verdict = predictor.verdict(reading)
            step = speller.feed(spelling.answer_of(verdict), frame.time)
            yield Row(frame.index, round(frame.time, 4), reading.hand is not None if predictor.uses_hands else None,
                      verdict.label, round(verdict.probability, 4), verdict.answered, step.typed, step.text)


def write_csv(rows: Iterable[Row], path: str | Path) -> None:
    """The rows as CSV, written atomically."""
    with run_artifacts.atomic_path(path) as tmp, tmp.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(field.name for field in fields(Row))
        writer.writerows(astuple(row) for row in rows)


def speller_for(args: argparse.Namespace) -> spelling.Speller:
    if args.hold_frames is not None:
        return spelling.Speller(args.hold_frames)
    return spelling.Speller(spelling.DEFAULT_HOLD_S if args.hold_s is None else args.hold_s, seconds=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    speller = speller_for(args)
    try:
        frames = frames_of(args.source, args.fps)
        predictor = predict.load_predictor(args.model_dir, backend="onnx")
        rows = list(spell(predictor, frames, speller, args.mirror))
        if args.csv:
            try:
                write_csv(rows, args.csv)
            except OSError as err:
                raise UsageError(f"Could not write '{args.csv}' ({err.strerror or err}); pass a --csv path in a "
                                 "folder that exists and can be written to.") from None
    except UsageError as err:
        log.error("%s", err)
        return EXIT_USAGE
    print(speller.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
