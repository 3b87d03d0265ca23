"""The app's Live mode, server side: camera frames in, the letter and the text spelled so far out.

The page (`PAGE`, a Streamlit custom component: live_page.js and live_page.css) shows the camera with
getUserMedia and POSTs one JPEG at a time to `/api/live/<token>/frame`, a route on Streamlit's own server: app.py
serves itself as `st.App(..., routes=live.routes())`, which `streamlit run app.py` finds and runs.
The route reads the frame with the model (`read_frame`: predict.py finds the hand and reads the letter; the
sidebar's threshold decides whether the page calls it sure) and feeds what it reads to a `spelling.Speller`; the
page draws the hand, the letter and the text from its JSON answer. Chosen by measurement over streamlit-webrtc
(docs/results.md, "Live and spelling"): on the same server, nothing to install, nothing to relay, and no frame
queued.

Each browser session has its own `LiveSession` (the model and settings its page chose, and its speller) under a
random token that the page's script run makes and hands to the page (`Sessions.open`); the route serves only
tokens it knows, so no page reads or types into another's text. A session reads one frame at a time: a frame
that arrives while the last is still being read is answered at once with `busy` and dropped, never queued (the
page sends its next frame only after the answer, so it drops the camera's frames in between). Frames are checked
as uploads are (`image_io.decode_photo`'s limits, here a smaller size limit first, and a frame must arrive within
FRAME_BODY_S) and nothing is written to disk.

The route's module and the page's script share this module: `streamlit run` imports app.py for the route, and
runs it again as the page's script, but both import this one module, so `SESSIONS` is one registry.
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import hands
import image_io
import predict
import spelling

log = logging.getLogger("live")

ROUTE = "/api/live/{token}/{action}"
# A camera frame is a JPEG of at most MAX_SIDE px: tens of KB. Anything far larger is refused before it is read.
MAX_FRAME_BYTES = 2 * 2**20
MAX_SIDE = 640  # the page shrinks frames to this longest side before sending them
# A frame's body must have arrived this long after its request began: a page's frame takes milliseconds on loopback
# and well under a second on a slow link, and while it arrives its session is busy, so a frame that trickles in
# (a stalled connection, or a client sending one byte at a time) would otherwise hold its page's session for good
FRAME_BODY_S = 5.0
PAGE_FPS = 15  # at most this many frames a second from one page: a webcam's usual rate
JPEG_QUALITY = 0.85
IDLE_S = 30 * 60  # a session neither sending frames nor rerun for this long is forgotten
MAX_SESSIONS = 64  # beyond this many, the least recently used session is forgotten
_TOKEN = re.compile(r"[A-Za-z0-9_-]{22,64}")



@dataclass(frozen=True)
class Settings:
    """What a page chose in the sidebar: the confidence threshold, the hold (frames, or seconds with
    `seconds`), and whether frames are mirrored before they are read."""
    threshold: float = predict.DEFAULT_THRESHOLD
    hold: float = spelling.DEFAULT_HOLD_S
    seconds: bool = True
    mirror: bool = False


class LiveSession:
    """One page's model, settings and speller; `reading` is held while one of its frames is read."""

    def __init__(self, predictor: predict.Predictor, settings: Settings):
        self.predictor, self.settings = predictor, settings
        self.speller = spelling.Speller(settings.hold, settings.seconds)
        self.reading = threading.Lock()
        self.lock = threading.Lock()  # guards the rest: a rerun or Clear may come while a frame is read
        self.seen = time.monotonic()

    def update(self, predictor: predict.Predictor, settings: Settings) -> None:
        """The page's latest choices; a new hold starts a new speller with the text so far."""
        with self.lock:
            if (settings.hold, settings.seconds) != (self.settings.hold, self.settings.seconds):
                self.speller = spelling.Speller(settings.hold, settings.seconds, self.speller.text)
            self.predictor, self.settings, self.seen = predictor, settings, time.monotonic()

    def clear(self) -> str:
        with self.lock:
            self.speller.clear()
            return self.speller.text


class Sessions:
    """The live sessions by token; a session idle for `idle_s` is forgotten, and the least recently used one
    beyond `most`."""

    def __init__(self, idle_s: float = IDLE_S, most: int = MAX_SESSIONS):
        self.idle_s, self.most = idle_s, most
        self._sessions: dict[str, LiveSession] = {}
        self._lock = threading.Lock()

    def open(self, token: str, predictor: predict.Predictor, settings: Settings) -> LiveSession:
        """The session of `token` with these choices, made on its page's first run."""
        with self._lock:
            self._forget_idle()
            session = self._sessions.pop(token, None)
            if session is None:
                session = LiveSession(predictor, settings)
            else:
                session.update(predictor, settings)
            self._sessions[token] = session  # last in the dict: the most recently used
            while len(self._sessions) > self.most:
                del self._sessions[next(iter(self._sessions))]
            return session

    def get(self, token: str) -> LiveSession | None:
        """The session of `token`, or None for a token never made here or forgotten since."""
        with self._lock:
            self._forget_idle()
            session = self._sessions.pop(token, None)
            if session is not None:
                session.seen = time.monotonic()
                self._sessions[token] = session
            return session

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for token in [t for t, s in self._sessions.items() if now - s.seen > self.idle_s]:
            del self._sessions[token]

    def __len__(self) -> int:
        return len(self._sessions)


SESSIONS = Sessions()


def new_token() -> str:
    """An unguessable session token (URL-safe)."""
    return secrets.token_urlsafe(24)


def read_frame(session: LiveSession, data: bytes, arrived: float) -> dict:
    """What the route answers for one camera frame (a JPEG that arrived at `arrived`, in time.monotonic()
    seconds): the verdict, the hand found, the letter being held and the text; an image_io.ImageError for
    bytes that are not a usable image."""
    image = image_io.decode_photo(data, "the camera frame")
    with session.lock:
        predictor, settings = session.predictor, session.settings
    if settings.mirror:
        image = ImageOps.mirror(image)
    reading = predictor.read([image])[0]
    verdict = predictor.verdict(reading, settings.threshold)
    with session.lock:
        step = session.speller.feed(spelling.answer_of(verdict), arrived)
    return {"status": "ok", "label": verdict.label, "probability": round(verdict.probability, 4),
            "answered": verdict.answered, "no_hand": verdict.no_hand, "disagreed": verdict.disagreed,
            "looks_for_hands": predictor.uses_hands, "hand": hand_json(reading.hand, image, predictor.crop_margin),
            "mirrored": settings.mirror, "letter": step.letter, "progress": round(step.progress, 3),
            "typed": step.typed, "text": step.text}


def hand_json(hand: hands.Hand | None, image: Image.Image, crop_margin: float | None) -> dict | None:
    """The hand found as fractions of the image: its box, its 21 landmarks, and for a crop model the square its
    image network read; None without a hand."""
    if hand is None:
        return None
    found = {"box": [round(float(v), 4) for v in hand.box],
             "points": [[round(float(x), 4), round(float(y), 4)] for x, y, _ in hand.landmarks]}
    if crop_margin:
        left, top, right, bottom = hands.crop_box(hand.box, image.size, crop_margin)
        found["crop"] = [left / image.width, top / image.height, right / image.width, bottom / image.height]
    return found


async def _body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None as soon as it proves longer than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: str, message: str, code: int) -> JSONResponse:
    return JSONResponse({"status": status, "error": message}, status_code=code)


def routes(sessions: Sessions = SESSIONS) -> list[Route]:
    """The Live route for `st.App(routes=...)`: POST `/api/live/<token>/frame` (a JPEG; the answer of
    `read_frame`) and `/api/live/<token>/clear` (empties the text)."""

    async def live(request: Request) -> JSONResponse:
        arrived = time.monotonic()
        token, action = request.path_params["token"], request.path_params["action"]
        session = sessions.get(token) if _TOKEN.fullmatch(token) else None
        if session is None:
            return _error("expired", "This live session has ended; reload the page.", 404)
        if action == "clear":
            return JSONResponse({"status": "ok", "text": session.clear()})
        if action != "frame":
            return _error("error", f"Unknown action '{action[:20]}'; the page POSTs to frame or clear.", 404)
        if not session.reading.acquire(blocking=False):
            return JSONResponse({"status": "busy"}, status_code=429)
        try:
            async with asyncio.timeout(FRAME_BODY_S):
                data = await _body(request, MAX_FRAME_BYTES)
            if data is None:
                return _error("error", f"The frame is larger than {MAX_FRAME_BYTES // 2**20} MB; send a JPEG of at "
                                       f"most {MAX_SIDE} px.", 413)
            return JSONResponse(await run_in_threadpool(read_frame, session, data, arrived))
        except TimeoutError:
            return _error("error", f"The frame took more than {FRAME_BODY_S:g} s to arrive; it was dropped.", 408)
        except ClientDisconnect:  # the page left mid-frame (closed or reloaded): no one reads this answer
            return _error("error", "The page left before its frame arrived.", 400)
        except image_io.ImageError as err:  # the decoder's message: not an image, damaged, too many pixels
            return _error("error", str(err), 400)
        except Exception as err:  # the page shows a message, the server log the traceback
            log.exception("Reading a live frame failed")
            return _error("error", f"Reading the frame failed ({type(err).__name__}); the details are in the "
                                   "server's log.", 500)
        finally:
            session.reading.release()

    return [Route(ROUTE, live, methods=["POST"])]


def page_data(token: str) -> dict:
    """What the page's script needs: where to send frames, how often and how large, and how to draw a hand."""
    base = ROUTE.replace("{token}", token)
    return {"frame": base.replace("{action}", "frame"), "clear": base.replace("{action}", "clear"),
            "fps": PAGE_FPS, "max_side": MAX_SIDE, "quality": JPEG_QUALITY,
            "connections": [list(pair) for pair in hands.CONNECTIONS]}


_HERE = Path(__file__).resolve().parent
PAGE_HTML = """
<div class="live">
  <div class="view"><video autoplay muted playsinline></video><canvas class="overlay"></canvas></div>
  <div class="reading">
    <div class="letter">–</div>
    <div class="caption">Starting the camera…</div>
    <div class="hold"><div class="bar"></div></div>
    <div class="status"></div>
  </div>
  <div class="spelled">
    <div class="text" data-testid="live-text"></div>
    <div class="buttons"><button class="clear" type="button">Clear</button>
      <button class="copy" type="button">Copy</button></div>
  </div>
</div>
"""
# registered once, when this module is first imported: the page's script reruns, this module stays
PAGE = st.components.v2.component("asl_live", html=PAGE_HTML, css=(_HERE / "live_page.css").read_text(),
                                  js=(_HERE / "live_page.js").read_text())
