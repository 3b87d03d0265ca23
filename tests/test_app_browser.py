"""app.py end to end: `streamlit run` on a loopback port, a real headless Chromium uploads an image and reads
the prediction, teaches the app photos of two letters and deletes one, or fingerspells a word to Live mode
through a fake camera that plays a video made of another person's photos; and under load, eight Live pages at
once, each fingerspelling its own word, with bad requests mixed in. The screenshots land in test-artifacts/
(app.png, app_teach.png, app_live.png, ...).

Needs Debian's chromium (/usr/bin/chromium; `.ci/run` installs it) and the Python playwright package, which
drives it directly: no `playwright install`, no browser download.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from PIL import Image

import bench
import live
import predict
import spelling
import spelling_clips
from conftest import ROOT, SHARED_ASL, requires_shared, spelling_frames, truncated_jpeg, write_y4m

ARTIFACT = ROOT / "test-artifacts" / "app.png"
TIMEOUT_MS = bench.PAGE_TIMEOUT_MS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not bench.CHROMIUM.exists(),
                                                   reason="Debian's chromium is not installed (.ci/run does)")]


def app_environ() -> dict[str, str]:
    # one thread for torch and ONNX Runtime: the server shares two cores with the browser and the test
    return dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture
def serve(tmp_path):
    """Starts `streamlit run app.py` against a model on a free loopback port; returns its URL. Stopped after the
    test. Teach mode saves into tmp_path/my_hand, and the model picker lists tmp_path/runs."""
    with contextlib.ExitStack() as servers:
        yield lambda model_dir: servers.enter_context(bench.app_served(model_dir, tmp_path, app_environ()))[0]


@contextlib.contextmanager
def browser_page(artifact: Path, height: int = 800, camera: Path | None = None):
    """A page of headless Chromium; its screenshot lands in `artifact`, also when the test failed (it shows why).
    The screenshot shows `height` pixels: Streamlit scrolls inside the page, so a full-page shot shows no more.
    `camera`: a .y4m video that Chromium's fake camera plays (in a loop), allowed without asking."""
    from playwright.sync_api import sync_playwright

    artifact.parent.mkdir(exist_ok=True)
    flags = bench.CHROMIUM_FLAGS + ([] if camera is None else [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera}"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(bench.CHROMIUM), headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": height})
        try:
            yield page
        finally:
            page.screenshot(path=artifact, full_page=True)
            browser.close()
    assert artifact.stat().st_size > 10_000


def upload_at_threshold_0(page, url: str, image: Path) -> None:
    page.goto(url)
    # the tiny test models are rarely sure of themselves: move the threshold to 0 as a user would, by keyboard
    page.get_by_role("slider").focus(timeout=TIMEOUT_MS)
    page.keyboard.press("Home")
    page.locator("input[type=file]").set_input_files(image)


def test_uploading_an_image_in_a_real_browser_shows_the_prediction(serve, trained_run, synthetic_dir):
    from playwright.sync_api import expect

    image = synthetic_dir / "C" / "C3.jpg"
    label, probability = predict.load_predictor(trained_run).top_k(Image.open(image).convert("RGB"), 1)[0]
    with browser_page(ARTIFACT) as page:
        upload_at_threshold_0(page, serve(trained_run), image)
        expect(page.get_by_text("Prediction:")).to_have_text(
            f"Prediction: {label}, probability {probability:.1%}", timeout=TIMEOUT_MS)
        expect(page.get_by_text("As the model saw it")).to_be_visible()
        # the top-5 chart: drawn by Vega once its script has loaded
        expect(page.get_by_test_id("stVegaLiteChart").locator("canvas, svg").first).to_be_visible(
            timeout=TIMEOUT_MS)


def test_the_hand_aware_app_in_a_real_browser_draws_the_hand_or_says_there_is_none(serve, hand_run, tmp_path):
    from playwright.sync_api import expect

    image = SHARED_ASL / "train" / "B" / "B1300.jpg"
    label, _ = predict.load_predictor(hand_run).top_k(Image.open(image).convert("RGB"), 1)[0]
    url = serve(hand_run)
    with browser_page(ROOT / "test-artifacts" / "app_hands.png") as page:
        upload_at_threshold_0(page, url, image)
        expect(page.get_by_text("Prediction:")).to_contain_text(f"Prediction: {label},", timeout=TIMEOUT_MS)
        expect(page.get_by_text("the hand MediaPipe found")).to_be_visible()
    blank = tmp_path / "wall.png"
    Image.new("RGB", (160, 120), (90, 120, 160)).save(blank)
    with browser_page(ROOT / "test-artifacts" / "app_no_hand.png") as page:
        upload_at_threshold_0(page, url, blank)
        expect(page.get_by_text("No hand found.")).to_be_visible(timeout=TIMEOUT_MS)
        expect(page.get_by_text("Your image (160x120), no hand found")).to_be_visible(timeout=TIMEOUT_MS)
        expect(page.get_by_text("Prediction:")).to_have_count(0)
        expect(page.get_by_text("HandFinder")).to_have_count(0)  # nothing of the code leaks onto the page
    # the server's terminal: MediaPipe's C++ log lines stay hidden (terminal.py), the file watcher quiet
    (log,) = tmp_path.glob("streamlit-*.log")
    assert not [line for line in log.read_text().splitlines()
                if line.startswith(("W0000 ", "I0000 ", "INFO: [")) or "Inotify queue overflowed" in line], \
        log.read_text()[-3000:]


def shown_counts(page) -> list[str]:
    return page.get_by_test_id("stTable").locator("tbody td").all_inner_texts()


def test_teach_mode_in_a_real_browser_saves_counts_and_deletes_photos(serve, trained_run, synthetic_dir, tmp_path):
    from playwright.sync_api import expect

    collect = tmp_path / "my_hand"
    url = serve(trained_run)
    with browser_page(ROOT / "test-artifacts" / "app_teach.png", height=1300) as page:
        page.goto(url)
        page.get_by_role("radio", name="Teach").click(timeout=TIMEOUT_MS)
        expect(page.get_by_text("Teach it your hand")).to_be_visible(timeout=TIMEOUT_MS)
        expect(page.get_by_text("python pt_train.py --init_from")).to_have_text(
            f"python pt_train.py --init_from {trained_run} --xtrain_path {collect} --save_dir {tmp_path / 'runs'}"
            "/my_hand")
        page.locator(".st-key-teach_upload_A input[type=file]").set_input_files(synthetic_dir / "A" / "A1.jpg")
        expect(page.get_by_text("Saved 1 photo of 'A'.")).to_be_visible(timeout=TIMEOUT_MS)
        expect(page.get_by_text("A: 1 photo", exact=True)).to_be_visible()

        page.get_by_role("combobox", name="Letter").click()
        page.get_by_role("option", name="B", exact=True).click()
        expect(page.get_by_text("B: 0 photos", exact=True)).to_be_visible(timeout=TIMEOUT_MS)
        page.locator(".st-key-teach_upload_B input[type=file]").set_input_files(
            [synthetic_dir / "B" / "B1.jpg", synthetic_dir / "B" / "B2.jpg"])
        expect(page.get_by_text("Saved 2 photos of 'B'.")).to_be_visible(timeout=TIMEOUT_MS)
        expect(page.get_by_text("B: 2 photos", exact=True)).to_be_visible()
        assert shown_counts(page) == ["1", "2", "0"]
        photos = sorted((collect / "B").iterdir())
        assert [p.name for p in sorted((collect / "A").iterdir())] != [] and len(photos) == 2

        page.locator(f".st-key-delete_B_{photos[0].stem} button").click()
        expect(page.get_by_text("B: 1 photo", exact=True)).to_be_visible(timeout=TIMEOUT_MS)
        expect(page.get_by_test_id("stTable").locator("tbody td")).to_have_text(["1", "1", "0"])
        expect(page.get_by_test_id("stImage")).to_have_count(1)
        assert sorted((collect / "B").iterdir()) == photos[1:]


def test_live_mode_in_a_real_browser_spells_the_word_the_camera_shows(serve, hand_run, hand_word, tmp_path):
    from playwright.sync_api import expect

    # another person's photos, each held 1.2 s at 15 frames/s, 0.8 s without a hand between two same letters; the
    # app types a letter held 0.6 s (its default)
    photos, word = hand_word
    clip = write_y4m(tmp_path / "clip.y4m", spelling_frames(photos, word, per_letter=18, gap=12, lead=30, trail=45))
    url = serve(hand_run)
    with browser_page(ROOT / "test-artifacts" / "app_live.png", height=1000, camera=clip) as page:
        # the fake camera is allowed by its flag; the clipboard for the Copy button (any grant replaces the others)
        page.context.grant_permissions(["camera", "clipboard-read", "clipboard-write"], origin=url)
        page.goto(url)
        page.get_by_role("radio", name="Live").click(timeout=TIMEOUT_MS)
        expect(page.get_by_text("Fingerspell to the camera")).to_be_visible(timeout=TIMEOUT_MS)
        text = page.get_by_test_id("live-text")
        # the clip plays in a loop: the word stands alone for the 3 s without a hand that end it
        expect(text).to_have_text(word, timeout=TIMEOUT_MS)
        expect(page.get_by_text("No hand found.")).to_be_visible()
        expect(page.get_by_text(re.compile(r"[\d.]+ frames/s read"))).to_be_visible()
        page.get_by_role("button", name="Copy").click()
        expect(page.get_by_role("button", name="Copied")).to_be_visible()
        assert page.evaluate("navigator.clipboard.readText()") == word
        page.get_by_role("button", name="Clear").click()
        expect(text).to_have_text("")
        # the clip again: its first letter typed anew, shown with the hand found (the screenshot shows it)
        expect(text).to_have_text(word[0], timeout=TIMEOUT_MS)
        expect(page.get_by_text(f"{word[0]}, probability", exact=False)).to_be_visible()


# ---------------------------------------------------------------------------------------------- under load

LOAD_PAGES, LOAD_S = 8, 30
LOAD_WORDS = spelling_clips.WORDS[:LOAD_PAGES]  # each page fingerspells another word
HUGE_MB = 30
SLOW_S = 10  # the frame sent byte by byte would take this long; the route gives up on it after live.FRAME_BODY_S
# The server's memory at the end may exceed its memory after the warm-up by at most this: the frames sent in the
# run are about 30 MB as JPEG and ten times that decoded, and the two 30 MB bodies more, so keeping any share of
# them would show
MEMORY_BOUND_MB = 100


def word_clips(folder: Path) -> list[list[bytes]]:
    """Each of LOAD_WORDS as a camera sees it fingerspelled by the external person (spelling_clips.py: each letter
    the next 15 photos of it, frames without a hand around the word and between repeated letters): its frames'
    file bytes in order."""
    photos = spelling_clips.letter_photos(SHARED_ASL / "external", set("".join(LOAD_WORDS)))
    used: dict[str, int] = {}
    clips = []
    for word in LOAD_WORDS:
        spelling_clips.write_clip(word, photos, used, folder / word, hold=15, gap=8)
        frames = sorted((folder / word).iterdir(), key=lambda p: int(p.stem.removeprefix("frame_")))
        clips.append([frame.read_bytes() for frame in frames])
    return clips


def rss_mb(process: psutil.Process) -> float:
    """The resident memory of `process` and its children (the server and any workers it started), in MB."""
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def raw_post(url: str, path: str, parts: Iterable[bytes], headers: dict[str, str],
             close_early: bool = False) -> tuple[int, int]:
    """POST `path` at `url`, its body sent in `parts` until the server answers (or, with `close_early`, the
    connection closed after the parts, the body unfinished): the HTTP status (0: none) and the bytes sent."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.putrequest("POST", path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        sent = 0
        for part in parts:
            if select.select([connection.sock], [], [], 0)[0]:  # answered before the body ended
                break
            connection.sock.sendall(part)
            sent += len(part)
        if close_early:
            return 0, sent
        response = connection.getresponse()
        response.read()
        return response.status, sent
    finally:
        connection.close()


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    """`data` in HTTP/1.1 chunks of `size` bytes, no length declared."""
    for start in range(0, len(data), size):
        yield b"%x\r\n%s\r\n" % (min(size, len(data) - start), data[start:start + size])
    yield b"0\r\n\r\n"


def byte_by_byte(data: bytes, seconds: float) -> Iterator[bytes]:
    """`data` a byte at a time, evenly over `seconds`."""
    start = time.monotonic()
    for i in range(len(data)):
        time.sleep(max(0.0, start + i * seconds / len(data) - time.monotonic()))
        yield data[i:i + 1]


def misbehave(url: str, token: str, photo: bytes, server: psutil.Process, start: float) -> dict:
    """A ninth page's bad requests, one after another from `start` + 4 s (the pages warmed up): a truncated JPEG,
    30 MB declared and 30 MB chunked, a token never made, a frame abandoned half sent, a frame sent byte by byte
    over SLOW_S, then a good frame. What each got, and the server's memory (MB) after the warm-up."""
    frame = f"/api/live/{token}/frame"
    jpeg = {"Content-Type": "image/jpeg"}
    huge = b"\0" * (HUGE_MB * 2**20)
    time.sleep(max(0.0, start + 4 - time.monotonic()))
    got = {"warm_mb": rss_mb(server)}
    got["truncated"] = httpx.post(url + frame, content=truncated_jpeg(), headers=jpeg)
    got["declared"] = raw_post(url, frame, (huge[i:i + 2**18] for i in range(0, len(huge), 2**18)),
                               {**jpeg, "Content-Length": str(len(huge))})
    got["chunked"] = raw_post(url, frame, chunked(huge, 2**18), {**jpeg, "Transfer-Encoding": "chunked"})
    got["unknown"] = httpx.post(f"{url}/api/live/{live.new_token()}/frame", content=photo, headers=jpeg)
    raw_post(url, frame, [photo[:len(photo) // 2]], {**jpeg, "Content-Length": str(len(photo))}, close_early=True)
    # the server learns of that page's leaving asynchronously; until then its session is still reading, and the
    # next frame would be answered busy at once
    time.sleep(1.0)
    got["slow_from"] = time.monotonic() - start
    got["slow"] = raw_post(url, frame, byte_by_byte(photo, SLOW_S), {**jpeg, "Content-Length": str(len(photo))})
    got["slow_until"] = time.monotonic() - start
    got["after"] = httpx.post(url + frame, content=photo, headers=jpeg)
    return got


def replayed(answered: list[dict]) -> list[tuple]:
    """What a fresh speller with the pages' settings (a hold of 1 frame) makes of these answers' signs, in order:
    (letter, typed, text) after each."""
    speller = spelling.Speller(1, seconds=False)
    steps = [speller.feed(None if answer["no_hand"] else answer["label"]) for answer in answered]
    return [(step.letter, step.typed, step.text) for step in steps]


def read_alone(predictor: predict.Predictor, frames: list[bytes], indices: set[int]) -> dict[int, tuple]:
    """What the app's route reads in each of these frames sent alone, to a session of its own: (label,
    probability, no hand)."""
    readings = {}
    for i in indices:
        answer = live.read_frame(live.LiveSession(predictor, live.Settings()), frames[i], time.monotonic())
        readings[i] = (answer["label"], answer["probability"], answer["no_hand"])
    return readings


@requires_shared
def test_eight_live_pages_at_once_keep_their_own_text_and_bad_requests_stay_alone(hand_run, tmp_path):
    clips = word_clips(tmp_path / "clips")
    predictor = predict.load_predictor(hand_run, backend="onnx")  # as the app serves it on the CPU
    with (bench.app_served(hand_run, tmp_path, app_environ()) as (url, process),
          bench.live_pages(url, LOAD_PAGES + 1, hold_frames=1) as tokens,
          ThreadPoolExecutor(1) as odd):
        # a hold of 1 frame, not seconds: a hold of seconds types by the server's clock, which the pages never see
        pages, odd_token = list(zip(tokens, clips)), tokens[-1]
        server = psutil.Process(process.pid)
        photo = (SHARED_ASL / "external" / "B" / "0.jpg").read_bytes()
        start = time.monotonic() + 0.5  # one clock for the pages' frames and the bad requests
        bad = odd.submit(misbehave, url, odd_token, photo, server, start)
        logs = bench.live_load(url, pages, live.PAGE_FPS, LOAD_S, start)
        got = bad.result()
        end_mb = rss_mb(server)

    busy = 0
    for (token, frames), log, word in zip(pages, logs, LOAD_WORDS):
        assert len(log) == LOAD_S * live.PAGE_FPS and {s.status for s in log} <= {200, 429}, word  # no 5xx, no 4xx
        busy += sum(s.status == 429 for s in log)
        assert all(s.answer == {"status": "busy"} for s in log if s.status == 429), word
        answered = [s for s in log if s.status == 200]
        # each answer reads the frame its page sent, as that frame alone reads: no frame crossed to another page
        alone = read_alone(predictor, frames, {s.index for s in answered})
        for s in answered:
            label, probability, no_hand = alone[s.index]
            assert (s.answer["status"], s.answer["label"], s.answer["no_hand"]) == ("ok", label, no_hand), (word, s)
            assert s.answer["probability"] == pytest.approx(probability, abs=1e-3), (word, s)
        # the page's text is what its own answers spell, each answer in turn: nothing crossed in, nothing lost
        assert [(s.answer["letter"], s.answer["typed"], s.answer["text"]) for s in answered] == \
            replayed([s.answer for s in answered]), word
        # none starved: answers in every 5 s of the run, and while the slow frame was being sent
        assert {int(s.sent // 5) for s in answered} == set(range(LOAD_S // 5)), word
        assert any(got["slow_from"] < s.sent < got["slow_until"] for s in answered), word
    assert busy > 0  # more frames came than the server could read: the surplus was dropped, not queued
    assert any(s.answer["text"] for log in logs for s in log if s.status == 200)

    assert got["truncated"].status_code == 400 and "truncated or damaged" in got["truncated"].json()["error"]
    for name in ("declared", "chunked"):  # refused before its 30 MB were sent (and so before they were read)
        status, sent = got[name]
        assert status == 413 and sent < HUGE_MB * 2**20 // 2, name
    assert got["unknown"].status_code == 404 and got["unknown"].json()["status"] == "expired"
    # the trickling frame timed out, its session free again at once: its page's next frame is read
    status, sent = got["slow"]
    assert status == 408 and sent < len(photo), got["slow"]
    assert live.FRAME_BODY_S <= got["slow_until"] - got["slow_from"] < SLOW_S
    assert got["after"].status_code == 200 and got["after"].json()["status"] == "ok"
    assert end_mb - got["warm_mb"] < MEMORY_BOUND_MB, (got["warm_mb"], end_mb)
    (log,) = tmp_path.glob("streamlit-*.log")
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
