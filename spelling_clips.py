"""How well a model spells words fingerspelled by a person, without a camera: clips made from photos of letters.

    python spelling_clips.py ../shared/asl/external --model_dir runs/asl --out_dir reports/spelling

PHOTOS holds one sub-folder of photos per letter (as a training folder does). Each word becomes a folder of frames,
OUT_DIR/clips/<WORD>/, as a 15 frames/s camera would see it: each letter held for `--hold_frames` frames (15: a second),
each frame the next photo of that letter in file order (another photo of the same sign, so a harder clip than a
video of one hand), and `--gap` frames (8) of a plain grey scene without a hand around the word and between a
letter and its repeat (the two L's of HELLO are spelled by dropping the hand). Every clip is then spelled by
spell.py's path (the app's Live mode, with its default hold) and scored: the words spelled exactly, and the
letter error rate (torchmetrics' character error rate: edits per letter). OUT_DIR/spelling.md has a row per word.

The default words are 20 common ones; `--words` takes others (letters A-Z that PHOTOS holds).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from PIL import Image
from torchmetrics.functional.text import char_error_rate

import data_loader
import image_io
import predict
import run_artifacts
import spell
import spelling
from errors import UsageError

log = logging.getLogger("spelling_clips")

EXIT_USAGE = 2
WORDS = ("HELLO", "THANK", "YOU", "PLEASE", "SORRY", "FRIEND", "FAMILY", "WATER", "HOUSE", "SCHOOL", "HAPPY",
         "MORNING", "NIGHT", "BOOK", "MUSIC", "WORK", "LOVE", "QUICK", "JUMP", "ZERO")
FPS = 15.0
GREY = (128, 128, 128)  # the scene without a hand


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", help="a folder with one sub-folder of photos per letter")
    p.add_argument("--model_dir", default="runs/latest",
                   help="a training output folder (--save_dir of pt_train.py) or a .pt checkpoint")
    p.add_argument("--out_dir", default="reports/spelling", help="the clips and spelling.md go here")
    p.add_argument("--words", nargs="+", default=list(WORDS), help="the words to spell (default: 20 common words)")
    p.add_argument("--hold_frames", type=int, default=15, help="frames each letter is shown for")
    p.add_argument("--gap", type=int, default=8, help="frames without a hand around a word and before a repeat")
    args = p.parse_args(argv)
    if args.hold_frames < 1 or args.gap < 1:
        p.error("--hold_frames and --gap must be 1 or more")
    args.words = [w.upper() for w in args.words]
    if bad := [w for w in args.words if not (w.isascii() and w.isalpha())]:
        p.error(f"words are letters A-Z only, not {', '.join(bad)}")
    return args


def letter_photos(folder: Path, letters: set[str]) -> dict[str, list[Path]]:
    """Each letter's photos in `folder`/<letter>/, in file order; a UsageError naming the letters it lacks."""
    if not folder.is_dir():
        raise UsageError(f"'{folder}' is not a folder; pass a folder with a sub-folder of photos per letter.")
    root, found = data_loader.find_class_folder(folder), {}
    for letter in sorted(letters):
        sub = root / letter
        paths = sorted((p for p in sub.iterdir() if p.suffix.lower() in image_io.IMG_EXTENSIONS),
                       key=lambda p: (data_loader.frame_number(str(p)) or 0, p.name)) if sub.is_dir() else []
        if paths:
            found[letter] = paths
    if missing := sorted(letters - found.keys()):
        raise UsageError(f"'{folder}' has no photos of {', '.join(missing)}; pass a folder with a sub-folder of "
                         "photos per letter of the words, or other --words.")
    return found


def write_clip(word: str, photos: dict[str, list[Path]], used: dict[str, int], folder: Path, hold: int,
               gap: int) -> None:
    """The frames of `word` into `folder` (frame_0, frame_1, ...); `used` counts each letter's photos taken so
    far, so that the next hold of a letter takes the next ones (from the first again once all were taken)."""
    with Image.open(photos[word[0]][0]) as first:
        size = first.size
    grey = folder / "grey.png"
    folder.mkdir(parents=True)
    Image.new("RGB", size, GREY).save(grey)
    frames: list[Path] = [grey] * gap
    for before, letter in zip([None, *word], word):
        if letter == before:
            frames += [grey] * gap
        own = photos[letter]
        frames += [own[(used.get(letter, 0) + i) % len(own)] for i in range(hold)]
        used[letter] = used.get(letter, 0) + hold
    for index, source in enumerate([*frames, *[grey] * gap]):
        shutil.copyfile(source, folder / f"frame_{index}{source.suffix.lower()}")
    grey.unlink()


def spell_clip(predictor: predict.Predictor, folder: Path) -> str:
    """The text the app's Live mode (its default hold) types for a clip's frames."""
    speller = spelling.Speller(spelling.DEFAULT_HOLD_S, seconds=True)
    for _ in spell.spell(predictor, spell.folder_frames(folder, FPS), speller):
        pass
    return speller.text


def report(rows: list[tuple[str, str]], model_dir: str, photos: str) -> str:
    right = sum(word == text for word, text in rows)
    rate = float(char_error_rate([t for _, t in rows], [w for w, _ in rows]))
    lines = [f"# Spelling: {photos}, model {model_dir}", "",
             f"**{right} of {len(rows)} words exactly right**, letter error rate {rate:.3f}.", "",
             "| word | spelled |", "| --- | --- |"]
    lines += [f"| {word} | {text or '(nothing)'} |" for word, text in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
    out = Path(args.out_dir)
    try:
        photos = letter_photos(Path(args.photos), set("".join(args.words)))
        predictor = predict.load_predictor(args.model_dir, backend="onnx")
        shutil.rmtree(out / "clips", ignore_errors=True)
        used: dict[str, int] = {}
        rows = []
        for word in args.words:
            clip = out / "clips" / word
            shutil.rmtree(clip, ignore_errors=True)  # a word asked for twice
            write_clip(word, photos, used, clip, args.hold_frames, args.gap)
            rows.append((word, spell_clip(predictor, clip)))
            log.info("%s: %s", word, rows[-1][1] or "(nothing)")
        text = report(rows, args.model_dir, args.photos)
        with run_artifacts.atomic_path(out / "spelling.md") as tmp:
            tmp.write_text(text)
    except OSError as err:
        log.error("Could not write under '%s' (%s); pass an --out_dir that can be written to.", out,
                  err.strerror or err)
        return EXIT_USAGE
    except UsageError as err:
        log.error("%s", err)
        return EXIT_USAGE
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
