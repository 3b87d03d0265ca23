"""spell.py: its frame readers on videos and folders written here, and the command on another person's photos
with a tiny trained model (the text must be the word those photos spell, letter by letter as the model reads
them)."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import spell
from conftest import no_hand_frame, spelling_frames, write_y4m
from errors import UsageError

HOLD_FRAMES = 4


def write_mp4(path: Path, frames: list[Image.Image], fps: int = 15) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, frames[0].size)
    for frame in frames:
        writer.write(cv2.cvtColor(np.asarray(frame), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_folder(folder: Path, frames: list[Image.Image]) -> Path:
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"frame_{i}.png")  # unpadded numbers: 10 must still come after 9
    return folder


# ---------------------------------------------------------------------------------------------- the readers

@pytest.mark.parametrize("write", [write_y4m, write_mp4], ids=["y4m", "mp4"])
def test_a_video_is_read_frame_by_frame_with_its_times(tmp_path, write):
    frames = [Image.new("RGB", (64, 48), (v, 255 - v, 60)) for v in range(0, 240, 20)]
    path = write(tmp_path / f"clip.{write.__name__[-3:]}", frames, 15)
    got = list(spell.frames_of(str(path), fps=99))
    assert [f.index for f in got] == list(range(len(frames)))
    assert [f.time for f in got] == pytest.approx([i / 15 for i in range(len(frames))])  # the video's rate
    assert all(f.image.mode == "RGB" and f.image.size == (64, 48) for f in got)
    for read, written in zip(got, frames):  # colours survive (RGB, not OpenCV's BGR), up to compression
        assert np.abs(np.asarray(read.image, float) - np.asarray(written, float)).mean() < 8


def test_a_folder_is_read_in_frame_number_order_at_the_given_rate(tmp_path):
    frames = [Image.new("RGB", (32, 32), (i * 20, 0, 0)) for i in range(12)]
    folder = write_folder(tmp_path / "frames", frames)
    (folder / "notes.txt").write_text("not a frame")
    got = list(spell.frames_of(str(folder), fps=4))
    assert [f.image.getpixel((0, 0))[0] for f in got] == [i * 20 for i in range(12)]
    assert [f.time for f in got] == [i / 4 for i in range(12)]


def test_an_unreadable_frame_in_a_folder_is_skipped_keeping_the_others_times(tmp_path, caplog):
    folder = write_folder(tmp_path / "frames", [Image.new("RGB", (32, 32))] * 3)
    (folder / "frame_1.png").write_bytes(b"not a png")
    got = list(spell.frames_of(str(folder), fps=10))
    assert [f.index for f in got] == [0, 2] and [f.time for f in got] == [0.0, 0.2]
    assert "Skipped frame 1" in caplog.text


def test_sources_that_hold_no_frames_are_refused_with_the_reason(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        spell.frames_of(str(tmp_path / "missing.mp4"), 15)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no image files"):
        spell.frames_of(str(tmp_path / "empty"), 15)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(UsageError, match="not a video OpenCV can read"):
        spell.frames_of(str(text), 15)
    header_only = tmp_path / "header.y4m"
    header_only.write_bytes(b"YUV4MPEG2 W64 H48 F15:1 Ip A1:1 C420jpeg\n")
    with pytest.raises(UsageError, match="No frame of"):
        list(spell.frames_of(str(header_only), 15))


# ---------------------------------------------------------------------------------------------- the command

def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = spell.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_command_spells_a_folder_of_frames_and_writes_every_frame(hand_run, hand_word, tmp_path, capsys):
    found, word = hand_word
    frames = spelling_frames(found, word, per_letter=HOLD_FRAMES + 2, gap=3)
    folder = write_folder(tmp_path / "frames", frames)
    table = tmp_path / "frames.csv"
    code, out, err = run([str(folder), "--model_dir", str(hand_run), "--hold_frames", str(HOLD_FRAMES), "--csv",
                          str(table)], capsys)
    assert code == 0, err
    assert out == f"{word}\n"
    with table.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(frames) and [int(r["frame"]) for r in rows] == list(range(len(frames)))
    assert [float(r["time_s"]) for r in rows[:3]] == pytest.approx([0, 1 / 15, 2 / 15], abs=1e-4)
    grey = [i for i, frame in enumerate(frames) if frame.getpixel((0, 0)) == (128, 128, 128)]
    assert all(rows[i]["hand_found"] == "False" and rows[i]["answered"] == "False" for i in grey)
    letters = [r["label"] for i, r in enumerate(rows) if i not in grey]
    assert "".join(dict.fromkeys(letters)) == "".join(dict.fromkeys(word))  # each letter read as itself
    assert [r["typed"] for r in rows if r["typed"]] == list(word)
    assert rows[-1]["text"] == word and all(float(r["probability"]) > 0 for r in rows)


@pytest.mark.parametrize("write", [write_y4m, write_mp4], ids=["y4m", "mp4"])
def test_the_command_spells_a_video_holding_for_seconds(hand_run, hand_word, tmp_path, capsys, write):
    found, word = hand_word
    # at 15 frames/s a letter shown for 0.8 s, held for 0.5 s to be typed; a gap of 0.4 s between the L's
    frames = spelling_frames(found, word, per_letter=12, gap=6)
    video = write(tmp_path / f"clip.{write.__name__[-3:]}", frames, 15)
    code, out, err = run([str(video), "--model_dir", str(hand_run), "--hold_s", "0.5"], capsys)
    assert code == 0, err
    assert out == f"{word}\n"
    # a hold longer than the clip types nothing
    code, out, _ = run([str(video), "--model_dir", str(hand_run), "--hold_s", str(len(frames) / 15 + 0.1)], capsys)
    assert code == 0 and out == "\n"


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing.mp4"], "does not exist"),
    (["{tmp}"], "no image files"),
    (["{video}", "--model_dir", "{tmp}/no_model"], "does not exist. Point to a training output folder"),
    (["{video}", "--model_dir", "{model}", "--csv", "{tmp}/no/such/folder/out.csv"], "Could not write"),
])
def test_problems_the_user_fixes_are_one_line_and_exit_2(hand_run, tmp_path, capsys, argv, message):
    video = write_y4m(tmp_path / "clip.y4m", [no_hand_frame((64, 48))] * 2)
    values = {"tmp": tmp_path, "video": video, "model": hand_run}
    code, out, err = run([a.format(**values) for a in argv], capsys)
    lines = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert code == 2 and out == "" and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
