"""live.py: the sessions by token, and the Live route on a Starlette app of its own (what `st.App` mounts) with
a tiny trained model reading another person's photos: answers, spelling, busy frames, limits and bad input."""
from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.testclient import TestClient

import image_io
import live
import predict
from conftest import no_hand_frame


def jpeg(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor(hand_run) -> predict.Predictor:
    return predict.load_predictor(hand_run, backend="onnx")


@pytest.fixture(scope="module")
def photos(hand_word) -> dict[str, bytes]:
    """JPEGs of photos the tiny model reads steadily, by letter, and the word they spell under "word"."""
    found, word = hand_word
    return {"word": word, **{letter: jpeg(Image.open(path).convert("RGB")) for letter, path in found.items()}}


@pytest.fixture
def sessions() -> live.Sessions:
    return live.Sessions()


@pytest.fixture
def client(sessions) -> TestClient:
    return TestClient(Starlette(routes=live.routes(sessions)))


def post(client: TestClient, token: str, body: bytes = b"", action: str = "frame"):
    return client.post(f"/api/live/{token}/{action}", content=body, headers={"Content-Type": "image/jpeg"})


# ---------------------------------------------------------------------------------------------- sessions

def test_a_session_keeps_its_text_when_its_page_changes_its_settings(sessions):
    token = live.new_token()
    session = sessions.open(token, "model", live.Settings(hold=2, seconds=False))
    for letter in "AA":
        session.speller.feed(letter)
    assert session.speller.text == "A"
    assert sessions.open(token, "other model", live.Settings(hold=0.5, seconds=True)) is session
    assert session.predictor == "other model" and session.speller.seconds and session.speller.text == "A"
    assert sessions.get(token) is session and sessions.get(live.new_token()) is None


def test_idle_sessions_are_forgotten_and_the_least_recently_used_beyond_the_limit(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(live.time, "monotonic", lambda: now[0])
    sessions = live.Sessions(idle_s=60, most=2)
    first, second, third = (live.new_token() for _ in range(3))
    sessions.open(first, "model", live.Settings())
    now[0] += 30
    sessions.open(second, "model", live.Settings())
    now[0] += 31  # the first is idle for 61 s now, the second for 31 s
    assert sessions.get(first) is None and sessions.get(second) is not None
    sessions.open(first, "model", live.Settings())
    assert sessions.get(second) is not None  # used last: the first is now the least recently used
    sessions.open(third, "model", live.Settings())
    assert len(sessions) == 2 and sessions.get(first) is None and sessions.get(third) is not None


def test_tokens_are_unguessable_and_the_page_posts_to_its_own():
    tokens = {live.new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(live._TOKEN.fullmatch(t) for t in tokens)
    token = tokens.pop()
    data = live.page_data(token)
    assert data["frame"] == f"/api/live/{token}/frame" and data["clear"] == f"/api/live/{token}/clear"
    assert len(data["connections"]) == 21 and data["max_side"] == live.MAX_SIDE


# ---------------------------------------------------------------------------------------------- the route

def test_a_frame_is_answered_with_the_letter_the_hand_and_the_text(client, sessions, predictor, photos):
    token = live.new_token()
    sessions.open(token, predictor, live.Settings(hold=1, seconds=False))
    letter = photos["word"][-1]
    image = image_io.decode_photo(photos[letter], letter)
    expected = predictor.verdict(predictor.read([image])[0])
    response = post(client, token, photos[letter])
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == "ok" and answer["label"] == expected.label == letter and answer["answered"]
    assert answer["probability"] == pytest.approx(expected.probability, abs=1e-4)
    assert answer["text"] == letter and answer["typed"] == letter and answer["progress"] == 1.0
    hand = answer["hand"]
    assert len(hand["points"]) == 21 and len(hand["box"]) == 4 and len(hand["crop"]) == 4
    x0, y0, x1, y1 = hand["box"]
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in hand["points"])
    assert not answer["no_hand"] and answer["looks_for_hands"] and not answer["mirrored"]


def test_frames_spell_a_word_and_clear_empties_it(client, sessions, predictor, photos):
    token = live.new_token()
    sessions.open(token, predictor, live.Settings(hold=2, seconds=False))
    grey = jpeg(no_hand_frame((224, 224)))
    letters = list(photos["word"])
    frames = [grey, grey]
    for before, letter in zip([None, *letters], letters):
        frames += [grey, grey] if letter == before else []
        frames += [photos[letter]] * 3
    answers = [post(client, token, frame).json() for frame in frames]
    assert answers[-1]["text"] == "".join(letters)
    assert [a["typed"] for a in answers if a["typed"]] == letters
    assert answers[0]["no_hand"] and answers[0]["hand"] is None and answers[0]["letter"] is None
    assert post(client, token, action="clear").json() == {"status": "ok", "text": ""}
    assert post(client, token, grey).json()["text"] == ""


def test_each_page_spells_its_own_text(client, sessions, predictor, photos):
    one, other = live.new_token(), live.new_token()
    for token in (one, other):
        sessions.open(token, predictor, live.Settings(hold=1, seconds=False))
    first, last = photos["word"][0], photos["word"][-1]
    assert post(client, one, photos[first]).json()["text"] == first
    assert post(client, other, photos[last]).json()["text"] == last
    post(client, other, action="clear")
    assert sessions.get(one).speller.text == first


def test_a_mirrored_session_reads_the_mirrored_frame(client, sessions, predictor, photos):
    token = live.new_token()
    sessions.open(token, predictor, live.Settings(mirror=True))
    letter = photos["word"][-1]
    mirrored = image_io.decode_photo(photos[letter], letter).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    expected = predictor.read([mirrored])[0]
    answer = post(client, token, photos[letter]).json()
    assert answer["mirrored"] and answer["probability"] == pytest.approx(float(expected.probs.max()), abs=1e-4)
    assert answer["hand"]["box"] == pytest.approx(list(expected.hand.box), abs=1e-4)


def test_a_frame_sent_while_the_last_is_read_is_dropped_at_once(client, sessions):
    token = live.new_token()
    session = sessions.open(token, "never used", live.Settings())
    with session.reading:  # a frame of this session is being read
        response = post(client, token, jpeg(no_hand_frame((64, 48))))
    assert response.status_code == 429 and response.json() == {"status": "busy"}
    assert session.speller.text == "" and not session.reading.locked()


@pytest.mark.parametrize("token", ["unknown", "x" * 32, "dots.are.not.in.tokens.x"])
def test_an_unknown_session_is_refused(client, token):
    response = post(client, token, b"...")
    assert response.status_code == 404 and response.json()["status"] == "expired"


def test_an_unknown_action_is_refused(client, sessions):
    token = live.new_token()
    sessions.open(token, "never used", live.Settings())
    assert post(client, token, action="delete").status_code == 404
    assert client.get(f"/api/live/{token}/frame").status_code == 405


def test_bad_frames_are_refused_with_the_decoder_s_message(client, sessions, monkeypatch):
    token = live.new_token()
    session = sessions.open(token, "never used", live.Settings())
    response = post(client, token, b"just text")
    assert response.status_code == 400 and "is not a readable image" in response.json()["error"]
    assert "empty" in post(client, token, b"").json()["error"]
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")  # 17 KB that claim 144 megapixels
    response = post(client, token, buf.getvalue())
    assert response.status_code == 400 and "too large" in response.json()["error"]
    monkeypatch.setattr(live, "MAX_FRAME_BYTES", 1000)
    response = post(client, token, jpeg(no_hand_frame((200, 200))) + b"\0" * 1000)
    assert response.status_code == 413 and "larger than" in response.json()["error"]
    assert not session.reading.locked()


def asgi_post(sessions: live.Sessions, token: str, receive: Callable[[], Awaitable[dict]]) -> int:
    """A frame POSTed to the route straight through ASGI, its body as `receive` gives it (what a real server does
    with a slow or vanished client, which TestClient cannot): the status answered."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": f"/api/live/{token}/frame", "raw_path": f"/api/live/{token}/frame".encode(),
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"image/jpeg")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    statuses = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    asyncio.run(Starlette(routes=live.routes(sessions))(scope, receive, send))
    return statuses[0]


def test_a_frame_that_trickles_in_is_timed_out_and_its_session_freed(sessions, monkeypatch, caplog):
    monkeypatch.setattr(live, "FRAME_BODY_S", 0.3)
    token = live.new_token()
    session = sessions.open(token, "never used", live.Settings())

    async def a_byte_at_a_time() -> dict:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def gone() -> dict:
        return {"type": "http.disconnect"}

    assert asgi_post(sessions, token, a_byte_at_a_time) == 408
    assert asgi_post(sessions, token, gone) == 400  # the page closed mid-frame: not a server failure
    assert not session.reading.locked() and "Traceback" not in caplog.text


def test_a_failure_while_reading_is_a_message_not_a_traceback(client, sessions, caplog):
    token = live.new_token()
    sessions.open(token, "not a predictor", live.Settings())
    response = post(client, token, jpeg(no_hand_frame((64, 48))))
    assert response.status_code == 500 and "AttributeError" in response.json()["error"]
    assert "Reading a live frame failed" in caplog.text


def test_reading_frames_writes_nothing(client, sessions, predictor, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    token = live.new_token()
    sessions.open(token, predictor, live.Settings())
    assert post(client, token, photos[photos["word"][0]]).status_code == 200
    assert list(tmp_path.iterdir()) == []
