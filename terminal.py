"""What the toolkit prints: its own progress, results and warnings, not its libraries' chatter.

MediaPipe and the LiteRT/TensorFlow Lite runtime inside it write a screenful of C++ log lines to the stderr file
descriptor when a hand finder starts, on its first detections and when it closes (`INFO: [cpu_registry.cc:75]
...`, `W0000 ... landmark_projection_calculator.cc:81] ...`, "WARNING: Logging before InitGoogle() ..."). No
setting reaches them: they come from absl logging before initialisation and from LiteRT's own printf logger,
which read none of GLOG_minloglevel, GLOG_stderrthreshold, GOOGLE_STDERRTHRESHOLD or TF_CPP_MIN_LOG_LEVEL
(mediapipe 1.2.3). So `native_logs_hidden` points the descriptor at a scratch file around the calls that log,
then writes back everything in it but those lines: an error from the library, or anything Python printed from
another thread meanwhile, still reaches the terminal.

`--verbose` on the command-line tools (or `ASL_VERBOSE=1`, which the app and child processes read) shows it all
again, and the third-party deprecation warnings that `configure` otherwise hides.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

VERBOSE_ENV = "ASL_VERBOSE"
PROJECT_DIR = Path(__file__).resolve().parent
# The native libraries' log lines below an error: TensorFlow Lite and LiteRT's own logger ("INFO: ...",
# "WARNING: ...") and absl's ("I0000 00:00:1796359331.690627    6889 file.cc:81] ...", W for warnings)
NATIVE_LOG_LINE = re.compile(rb"^(?:(?:INFO|WARNING|VERBOSE|DEBUG): |[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] )")

_lock = threading.Lock()
_depth = 0  # threads inside native_logs_hidden: the first points the descriptor away, the last back
_saved_fd: int | None = None
_scratch = None


def verbose() -> bool:
    """Whether the libraries' own logs are wanted (`ASL_VERBOSE` set to anything but 0)."""
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


def progress_interval() -> float:
    """Seconds between a progress bar's updates: a terminal's move every second, a log file gets a line every 30."""
    return 1.0 if sys.stderr.isatty() else 30.0


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help=f"also show the libraries' own logs (MediaPipe's C++ lines) and third-party "
                             f"deprecation warnings (same as {VERBOSE_ENV}=1)")


def configure(verbose_flag: bool = False) -> None:
    """At a command's start: `--verbose` sets ASL_VERBOSE, so that the processes it starts (the hand search's,
    the training ranks) follow it; without it, third-party deprecation warnings are hidden, and every warning
    that is shown is one line."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    warnings.showwarning = _one_line_warning
    if not verbose():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
            # ours stay: they are about this code, which its users can change
            warnings.filterwarnings("default", category=category, module=_our_modules())


def _our_modules() -> str:
    """A regex of this project's module names (warnings match it against the warning's module)."""
    names = sorted(path.stem for path in PROJECT_DIR.glob("*.py"))
    return rf"^(?:__main__|{'|'.join(map(re.escape, names))})$"


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None,
                      line: str | None = None) -> None:
    # Python's own format adds the source line on a second line; the log line says where
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message,
                                             Path(filename).name, lineno)


@contextlib.contextmanager
def native_logs_hidden() -> Iterator[None]:
    """Hide the native libraries' log lines written to the stderr descriptor while the block runs (see the
    module docstring); with ASL_VERBOSE, nothing is hidden. Safe from several threads at once: the descriptor
    is pointed away while any of them is inside, and what the others wrote meanwhile is written out after."""
    if verbose():
        yield
        return
    _enter()
    try:
        yield
    finally:
        _leave()


def _flush_stderr() -> None:
    if sys.stderr is not None:  # None without a console (pythonw)
        sys.stderr.flush()


def _enter() -> None:
    global _depth, _saved_fd, _scratch
    with _lock:
        if _depth == 0:
            _flush_stderr()  # what Python has buffered belongs before the block
            try:
                _saved_fd = os.dup(2)
            except OSError:  # no stderr descriptor at all: nothing to hide
                _saved_fd = None
            else:
                if _scratch is None:
                    _scratch = tempfile.TemporaryFile()
                os.dup2(_scratch.fileno(), 2)
        _depth += 1


def _leave() -> None:
    global _depth, _saved_fd
    with _lock:
        _depth -= 1
        if _depth or _saved_fd is None:
            return
        _flush_stderr()
        os.dup2(_saved_fd, 2)
        os.close(_saved_fd)
        _saved_fd = None
        # the descriptor shared the scratch file's offset: read it all, then start it afresh
        _scratch.seek(0)
        written = _scratch.read()
        _scratch.seek(0)
        _scratch.truncate()
        kept = b"".join(line for line in written.splitlines(keepends=True) if not NATIVE_LOG_LINE.match(line))
        while kept:  # a pipe may take less than all at once
            kept = kept[os.write(2, kept):]
