"""Fingerspelling: turn a stream of per-frame answers into text, the way a spelling keyboard types.

A word is fingerspelled by signing its letters one after another. Every frame brings one answer: a sign the app
names (`predict.Verdict.answered`), or none (no hand, the empty scene `nothing`, or unsure: `answer_of`). A
`Speller` types a sign once it has been the answer for `hold` consecutive frames (or seconds, from the run's first
frame to the current one); the dataset's two control signs are its keys: `space` types a space, `del` deletes the
last character.

A sign is typed once per hold: signing on does not repeat it. To type the same letter twice (the two L's of
HELLO) the signer drops the hand between them, or signs another letter. Both must last long enough to count, so
that one stray frame (a flicker to another letter, to unsure, or to no hand) neither types a letter nor types the
held one again: another sign must itself be held for `hold`, and a gap with no answer for half of it
(`RELEASE_SHARE`).

Pure Python, no model: spell.py feeds it a video's frames, the app's Live mode a camera's (live.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

SPACE, DELETE = "space", "del"  # the Kaggle dataset's control signs
# Held this long, a letter is typed; on a camera at 15 frames/s, 9 frames
DEFAULT_HOLD_S = 0.6
DEFAULT_HOLD_FRAMES = 9
# A gap with no answer must last this share of the hold before it counts as the hand dropped
RELEASE_SHARE = 0.5


class Answer(Protocol):
    """What the speller needs of one frame's `predict.Verdict`."""
    label: str

    @property
    def answered(self) -> bool: ...


def answer_of(verdict: Answer) -> str | None:
    """The sign a frame's verdict names, or None where it names none (no hand, `nothing`, unsure)."""
    return verdict.label if verdict.answered else None


@dataclass(frozen=True)
class Step:
    """What one frame did. `letter`: the sign being held (None: no answer); `progress`: how far its hold is, 0..1
    (1 once it is typed); `typed`: the sign this frame typed, if any; `text`: the text so far, and `changed`
    whether this frame changed it (`del` on empty text types but changes nothing)."""
    letter: str | None
    progress: float
    typed: str | None
    text: str
    changed: bool


class Speller:
    """Types the signs held for `hold` frames (or seconds, with `seconds`) into `text`; see the module docstring."""

    def __init__(self, hold: float, seconds: bool = False, text: str = ""):
        if not hold >= 0:
            raise ValueError(f"hold must be 0 or more, not {hold}")
        self.hold, self.seconds, self.text = float(hold), seconds, text
        self._run: str | None = None  # the answer of the current run of equal answers
        self._run_frames = 0
        self._run_start = 0.0
        # the answer last held long enough to count: a sign is typed when it becomes this, so once per hold
        self._settled: str | None = None

    def feed(self, answer: str | None, t: float | None = None) -> Step:
        """One frame's answer (`answer_of`) at time `t` in seconds (needed when holding for seconds)."""
        if self.seconds and t is None:
            raise ValueError("a speller that holds for seconds needs each frame's time")
        if answer != self._run or self._run_frames == 0:
            self._run, self._run_frames, self._run_start = answer, 0, t or 0.0
        self._run_frames += 1
        held = (t - self._run_start) if self.seconds else self._run_frames
        needed = self.hold if answer is not None else self.hold * RELEASE_SHARE
        before, typed = self.text, None
        if answer != self._settled and held >= needed:
            self._settled = answer
            if answer is not None:
                typed = answer
                self.text = type_key(self.text, answer)
        if answer is None:
            progress = 0.0
        elif answer == self._settled or self.hold == 0:
            progress = 1.0
        else:
            progress = min(1.0, held / self.hold)
        return Step(answer, progress, typed, self.text, self.text != before)

    def clear(self) -> None:
        """Empty the text; the sign being held is not typed again."""
        self.text = ""


def type_key(text: str, sign: str) -> str:
    """`text` after typing one sign: a letter appended, `space` a space, `del` the last character removed."""
    if sign == DELETE:
        return text[:-1]
    return text + (" " if sign == SPACE else sign)
