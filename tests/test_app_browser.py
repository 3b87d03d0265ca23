"""app.py end to end: `streamlit run` on a loopback port, a real headless Chromium uploads an image and reads
the prediction. The screenshot lands in test-artifacts/app.png.

Needs Debian's chromium (/usr/bin/chromium; `.ci/run` installs it) and the Python playwright package, which
drives it directly: no `playwright install`, no browser download.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import predict
from conftest import ROOT

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
def served_app(trained_run, tmp_path):
    """`streamlit run app.py` against the tiny model on a free loopback port; stopped after the test."""
    port = free_port()
    log = tmp_path / "streamlit.log"
    env = dict(os.environ, ASL_MODEL_DIR=str(trained_run), OMP_NUM_THREADS="1")
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port",
             str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_uploading_an_image_in_a_real_browser_shows_the_prediction(served_app, trained_run, synthetic_dir):
    from playwright.sync_api import expect, sync_playwright

    image = synthetic_dir / "C" / "C3.jpg"
    label, probability = predict.load_predictor(trained_run).top_k(Image.open(image).convert("RGB"), 1)[0]
    ARTIFACT.parent.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        try:
            page.goto(served_app)
            # the tiny test model is rarely sure of itself: move the threshold to 0 as a user would, by keyboard
            page.get_by_role("slider").focus(timeout=TIMEOUT_MS)
            page.keyboard.press("Home")
            page.locator("input[type=file]").set_input_files(image)
            expect(page.get_by_text("Prediction:")).to_have_text(
                f"Prediction: {label}, probability {probability:.1%}", timeout=TIMEOUT_MS)
            expect(page.get_by_text("As the model saw it")).to_be_visible()
            # the top-5 chart: drawn by Vega once its script has loaded
            expect(page.get_by_test_id("stVegaLiteChart").locator("canvas, svg").first).to_be_visible(
                timeout=TIMEOUT_MS)
        finally:
            page.screenshot(path=ARTIFACT, full_page=True)  # also when it failed: the picture shows why
            browser.close()
    assert ARTIFACT.stat().st_size > 10_000
