"""Fingerspelling: turn a stream of per-frame answers into text, the way a spelling keyboard types.

A word is fingerspelled by signing its letters one after another. Every frame brings one answer (`answer_of`):
the sign the model reads most likely wherever a hand is found, or none (no hand, or the empty scene `nothing`). A
`Speller` types a sign once it has been the answer of at least half the frames of the last `hold` frames (or
seconds): `share`. The hold, not each frame's confidence, is what makes a typed letter sure: on people the model
never saw, a frame is often unsure or wrong, but rarely the same wrong sign for half a hold, while requiring every
frame of the hold to be sure typed almost nothing (docs/results.md#live-and-spelling). The dataset's two control
signs are keys: `space` types a space, `del` deletes the last character.

A sign is typed once per hold: signing on does not repeat it. To type the same letter twice (the two L's of
HELLO) the signer drops the hand between them, or signs another letter. A gap counts as the hand dropped once it
lasts half the hold (`RELEASE_SHARE`), so that one frame without a hand does not type the held letter again. Each
typed sign starts a new hold, so that a letter read half the time as a look-alike (M and N) is not typed in turns
with it.

Pure Python, no model: spell.py feeds it a video's frames, the app's Live mode a camera's (live.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

SPACE, DELETE = "space", "del"  # the Kaggle dataset's control signs
# The hold: a sign that is most of this long is typed; on a camera at 15 frames/s, 9 frames
DEFAULT_HOLD_S = 0.6
DEFAULT_HOLD_FRAMES = 9
# A sign is typed when it is the answer of at least this share of the frames of the hold (the rest: flicker)
DEFAULT_SHARE = 0.5
# A gap with no answer must last this share of the hold before it counts as the hand dropped
RELEASE_SHARE = 0.5


class Answer(Protocol):
    """What the speller needs of one frame's `predict.Verdict`."""
    label: str
    no_hand: bool


def answer_of(verdict: Answer) -> str | None:
    """The sign a frame's verdict reads, sure or not, or None where it reads none (no hand, `nothing`)."""
    return None if verdict.no_hand else verdict.label


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
    """Types the signs that are the answer of at least `share` of the frames of the last `hold` frames (or seconds,
    with `seconds`) into `text`; see the module docstring."""

    def __init__(self, hold: float, seconds: bool = False, text: str = "", share: float = DEFAULT_SHARE):
        if not hold >= 0:
            raise ValueError(f"hold must be 0 or more, not {hold}")
        if not 0 < share <= 1:
            raise ValueError(f"share must be more than 0 and at most 1, not {share}")
        self.hold, self.seconds, self.share, self.text = float(hold), seconds, share, text
        # the latest frames (time or number, answer): the shortest run of them that spans the hold
        self._window: deque[tuple[float, str | None]] = deque()
        self._frames = 0
        self._gap_start: float | None = None  # when the current run of frames without an answer began
        # the sign last typed, or None once the hand has been dropped since: a sign is typed when it becomes this,
        # so once per hold
        self._settled: str | None = None

    def feed(self, answer: str | None, t: float | None = None) -> Step:
        """One frame's answer (`answer_of`) at time `t` in seconds (needed when holding for seconds)."""
        if self.seconds and t is None:
            raise ValueError("a speller that holds for seconds needs each frame's time")
        self._frames += 1
        now = t if self.seconds else float(self._frames)
        self._window.append((now, answer))
        while len(self._window) > 1 and self._span(self._window[1][0], now) >= self.hold:
            self._window.popleft()
        if answer is not None:
            self._gap_start = None
        else:
            self._gap_start = now if self._gap_start is None else self._gap_start
            if self._span(self._gap_start, now) >= self.hold * RELEASE_SHARE:
                self._settled = None
        before, typed = self.text, None
        share = self._share(answer)
        full = self._span(self._window[0][0], now) >= self.hold
        if answer is not None and answer != self._settled and full and share >= self.share:
            self._settled = typed = answer
            self.text = type_key(self.text, answer)
            # a new hold starts: a letter read half the time as a look-alike is typed once, not in turns with it
            self._window = deque([(now, answer)])
        if answer is None:
            progress = 0.0
        elif answer == self._settled:
            progress = 1.0
        else:
            progress = min(1.0, self._span(self._window[0][0], now) / self.hold) * min(1.0, share / self.share)
        return Step(answer, progress, typed, self.text, self.text != before)

    def _span(self, start: float, now: float) -> float:
        """How long from `start` to `now`: seconds, or frames counting both ends."""
        return now - start if self.seconds else now - start + 1

    def _share(self, answer: str | None) -> float:
        return sum(a == answer for _, a in self._window) / len(self._window)

    def clear(self) -> None:
        """Empty the text; the sign being held is not typed again."""
        self.text = ""


def type_key(text: str, sign: str) -> str:
    """`text` after typing one sign: a letter appended, `space` a space, `del` the last character removed."""
    if sign == DELETE:
        return text[:-1]
    return text + (" " if sign == SPACE else sign)
