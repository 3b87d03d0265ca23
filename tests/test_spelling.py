"""spelling.py on hand-made answer sequences: holds, repeats, the control signs, flicker, unsure gaps, time."""
from __future__ import annotations

import pytest

import predict
import spelling
from spelling import Speller


def spell(answers: str, hold: float = 3) -> str:
    """Feed one answer per character ('.' no answer, '_' space, '<' del) and return the text."""
    speller = Speller(hold)
    keys = {".": None, "_": spelling.SPACE, "<": spelling.DELETE}
    for ch in answers:
        speller.feed(keys.get(ch, ch))
    return speller.text


@pytest.mark.parametrize("answers, text", [
    ("AAA", "A"),  # held for the hold: typed
    ("AA", ""),  # not long enough
    ("AAAAAAAAA", "A"),  # holding on does not repeat it
    ("HHHEEELLL..LLLOOO", "HELLO"),  # a gap of half the hold between the two L's
    ("LLL.LLL", "L"),  # a gap of one frame is a flicker, not a dropped hand
    ("LLLALLL", "L"),  # so is another letter in one frame of the hold
    ("LLLAAALLL", "LAL"),  # another letter for most of a hold in between: the same letter again
    ("AAABBB", "AB"),  # a change of letter needs no gap
    ("ABCABCABC", ""),  # a flicker among answers: none is the answer of half a hold
    ("A.A", "A"),  # an unsure frame inside a hold: the letter is still most of it
    ("AAA.A.A.A", "A"),  # unsure frames between answers: neither a gap nor a new hold
    ("HHHIII___", "HI "),
    ("AAABBB<<<", "A"),
    ("AAABBB<<<..<<<", ""),  # del again after dropping the hand
    ("<<<", ""),  # del on empty text
])
def test_held_signs_are_typed_once(answers, text):
    assert spell(answers) == text


def test_the_share_is_how_much_of_the_hold_a_sign_must_fill():
    flickering = "AABAABAAB"  # A in 2 of every 3 frames
    assert spell(flickering, hold=6) == "A"  # the default: half of the hold
    speller = Speller(6, share=1.0)  # every frame of the hold: a flicker breaks it
    for a in flickering:
        speller.feed(a)
    assert speller.text == ""
    with pytest.raises(ValueError, match="share"):
        Speller(3, share=0)


def test_a_letter_read_half_the_time_as_a_look_alike_is_typed_once():
    # M is typed when it fills most of a hold; N, as often as M after it, never fills a new hold of its own
    assert spell("MNMNMMNMN", hold=6) == "M"


def test_each_step_reports_the_letter_its_hold_and_what_changed():
    speller = Speller(4)
    steps = [speller.feed(a) for a in ["B", "B", "B", "B", "B", None, "A"]]
    assert [s.letter for s in steps] == ["B"] * 5 + [None, "A"]
    # A fills one frame of the last four, half of the share it needs
    assert [s.progress for s in steps] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.0, 0.5]
    assert [s.typed for s in steps] == [None, None, None, "B", None, None, None]
    assert [s.changed for s in steps] == [False, False, False, True, False, False, False]
    assert [s.text for s in steps] == ["", "", "", "B", "B", "B", "B"]
    speller = Speller(1)
    assert speller.feed(spelling.DELETE) == spelling.Step(spelling.DELETE, 1.0, spelling.DELETE, "", False)


def test_a_hold_in_seconds_counts_time_not_frames():
    speller = Speller(0.5, seconds=True)
    # a slow stream: two frames half a second apart are enough
    assert [speller.feed("A", t).typed for t in (10.0, 10.5)] == [None, "A"]
    # a fast one: ten frames within 0.45 s are not
    speller = Speller(0.5, seconds=True)
    steps = [speller.feed("B", 20 + i * 0.05) for i in range(10)]
    assert speller.text == "" and steps[-1].progress == pytest.approx(0.9)
    assert speller.feed("B", 20.5).typed == "B"
    # the gap that lets B be typed again is half the hold, in time too: 0.2 s is not, 0.25 s is
    for t in (21.0, 21.2):
        speller.feed(None, t)
    for t in (21.3, 21.8):
        speller.feed("B", t)
    assert speller.text == "B"
    for t in (22.0, 22.25):
        speller.feed(None, t)
    for t in (22.3, 22.8):
        speller.feed("B", t)
    assert speller.text == "BB"


def test_a_hold_in_seconds_needs_the_frames_times():
    with pytest.raises(ValueError, match="time"):
        Speller(0.5, seconds=True).feed("A")
    with pytest.raises(ValueError, match="hold"):
        Speller(-1)


def test_a_zero_hold_types_each_new_answer_at_once():
    assert spell("AB.B", hold=0) == "ABB"


def test_clear_empties_the_text_without_typing_the_held_sign_again():
    speller = Speller(3, text="HEL")
    for a in ["L", "L", "L"]:
        speller.feed(a)
    assert speller.text == "HELL"
    speller.clear()
    assert speller.feed("L").text == "" and speller.feed("O").text == "" and speller.feed("O").text == "O"


def test_the_answer_of_a_verdict_is_its_sign_wherever_a_hand_is_found_sure_or_not():
    import torch

    classes = ["A", "B", "nothing"]
    probs = torch.tensor([0.7, 0.2, 0.1])
    assert spelling.answer_of(predict.decide(classes, probs, True)) == "A"
    assert spelling.answer_of(predict.decide(classes, probs, True, threshold=0.8)) == "A"  # unsure
    assert spelling.answer_of(predict.decide(classes, probs, True, agreed=False)) == "A"  # networks disagree
    assert spelling.answer_of(predict.decide(classes, probs, False)) is None  # no hand found
    assert spelling.answer_of(predict.decide(classes, torch.tensor([0.1, 0.1, 0.8]), True)) is None  # nothing
