"""spelling_clips.py: clips built from photos frame by frame, the score, and the command on another person's photos
with a tiny trained model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

import spelling_clips
from errors import UsageError


def photo_folder(root: Path, counts: dict[str, int]) -> Path:
    """One sub-folder per letter, its photos numbered in file order and coloured by their number."""
    for letter, count in counts.items():
        (root / letter).mkdir(parents=True)
        for n in range(count):
            Image.new("RGB", (40, 30), (n * 10, ord(letter), 0)).save(root / letter / f"{n + 1}.png")
    return root


def frames_of(clip: Path) -> list[tuple[int, int] | None]:
    """Each frame as (letter's code, photo number), None for the grey scene, in frame order."""
    out = []
    for frame in sorted(clip.iterdir(), key=lambda p: int(p.stem.split("_")[1])):
        red, green, _ = Image.open(frame).convert("RGB").getpixel((5, 5))
        out.append(None if (red, green) == (128, 128) else (green, round(red / 10)))
    return out


def test_a_clip_holds_each_letter_with_its_next_photos_and_drops_the_hand_before_a_repeat(tmp_path):
    photos = spelling_clips.letter_photos(photo_folder(tmp_path / "photos", {"L": 5, "O": 3}), {"L", "O"})
    used: dict[str, int] = {}
    spelling_clips.write_clip("LLO", photos, used, tmp_path / "LLO", hold=4, gap=2)
    L, O = ord("L"), ord("O")
    assert frames_of(tmp_path / "LLO") == [
        None, None, (L, 0), (L, 1), (L, 2), (L, 3), None, None, (L, 4), (L, 0), (L, 1), (L, 2),
        (O, 0), (O, 1), (O, 2), (O, 0), None, None]
    assert used == {"L": 8, "O": 4}
    spelling_clips.write_clip("O", photos, used, tmp_path / "O", hold=2, gap=1)
    assert frames_of(tmp_path / "O") == [None, (O, 1), (O, 2), None]  # the next word takes the next photos


def test_the_score_counts_exact_words_and_edits_per_letter():
    text = spelling_clips.report([("HELLO", "HELLO"), ("LOVE", "LVE"), ("YOU", "")], "runs/x", "photos")
    assert "**1 of 3 words exactly right**, letter error rate 0.333." in text  # (0 + 1 + 3) edits / 12 letters
    assert "| YOU | (nothing) |" in text


def test_photos_missing_a_letter_of_the_words_are_refused_naming_it(tmp_path):
    folder = photo_folder(tmp_path / "photos", {"A": 2})
    with pytest.raises(UsageError, match="no photos of B, C"):
        spelling_clips.letter_photos(folder, {"A", "B", "C"})
    with pytest.raises(UsageError, match="is not a folder"):
        spelling_clips.letter_photos(tmp_path / "missing", {"A"})


def test_an_out_dir_that_cannot_be_written_is_one_line_and_exit_2(hand_run, tmp_path, capsys):
    folder = photo_folder(tmp_path / "photos", {"A": 2})
    blocker = tmp_path / "file"
    blocker.write_text("a file where the out_dir's parent should be")
    code = spelling_clips.main([str(folder), "--model_dir", str(hand_run), "--words", "A", "--out_dir",
                                str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Could not write under" in err and "Traceback" not in err


def test_the_command_refuses_words_that_are_not_letters(capsys):
    with pytest.raises(SystemExit):
        spelling_clips.parse_args(["photos", "--words", "HI5"])
    assert "letters A-Z only, not HI5" in capsys.readouterr().err


def test_the_command_spells_another_persons_photos_and_writes_the_table(hand_run, hand_word, tmp_path, capsys):
    found, word = hand_word
    folder = tmp_path / "photos"
    for letter, path in found.items():  # the photo the tiny model reads steadily, six times
        (folder / letter).mkdir(parents=True)
        for n in range(6):
            shutil.copy(path, folder / letter / f"{n}.jpg")
    out = tmp_path / "out"
    code = spelling_clips.main([str(folder), "--model_dir", str(hand_run), "--out_dir", str(out), "--words", word,
                                word[0], "--hold_frames", "12"])
    assert code == 0, capsys.readouterr().err
    table = (out / "spelling.md").read_text()
    assert "**2 of 2 words exactly right**, letter error rate 0.000." in table
    assert f"| {word} | {word} |" in table and capsys.readouterr().out == table
    assert len(list((out / "clips" / word).iterdir())) == 8 + 12 * len(word) + 8 * (len(word) - len(set(word))) + 8
