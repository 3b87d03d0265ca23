"""app.py end to end: `streamlit run` on a loopback port, a real headless Chromium uploads an image and reads
the prediction, teaches the app photos of two letters and deletes one, or fingerspells a word to Live mode
through a fake camera that plays a video made of another person's photos. The screenshots land in
test-artifacts/ (app.png, app_teach.png, app_live.png, ...).

Needs Debian's chromium (/usr/bin/chromium; `.ci/run` installs it) and the Python playwright package, which
drives it directly: no `playwright install`, no browser download.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import predict
from conftest import ROOT, spelling_frames, write_y4m

CHROMIUM = Path("/usr/bin/chromium")
# the flags this machine needs: no sandbox as root, and no background traffic to hosts the network refuses
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACT = ROOT / "test-artifacts" / "app.png"
TIMEOUT_MS = 120_000  # a model load on a busy two-core CI machine

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run does)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"streamlit did not answer at {url} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def serve(tmp_path):
    """Starts `streamlit run app.py` against a model on a free loopback port; returns its URL. Stopped after the
    test. Teach mode saves into tmp_path/my_hand, and the model picker lists tmp_path/runs."""
    servers = []

    def start(model_dir: Path) -> str:
        port = free_port()
        log = tmp_path / f"streamlit-{port}.log"
        env = dict(os.environ, ASL_MODEL_DIR=str(model_dir), ASL_COLLECT_DIR=str(tmp_path / "my_hand"),
                   ASL_RUNS_DIR=str(tmp_path / "runs"), OMP_NUM_THREADS="1")
        with log.open("w") as out:
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port",
                 str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, servers[-1], log)
        return url

    yield start
    for server in servers:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def browser_page(artifact: Path, height: int = 800, camera: Path | None = None):
    """A page of headless Chromium; its screenshot lands in `artifact`, also when the test failed (it shows why).
    The screenshot shows `height` pixels: Streamlit scrolls inside the page, so a full-page shot shows no more.
    `camera`: a .y4m video that Chromium's fake camera plays (in a loop), allowed without asking."""
    from playwright.sync_api import sync_playwright

    artifact.parent.mkdir(exist_ok=True)
    flags = CHROMIUM_FLAGS + ([] if camera is None else [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera}"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=flags)
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

    from conftest import SHARED_ASL

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
