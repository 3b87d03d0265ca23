"""terminal.py: the native libraries' log lines hidden (and everything else kept) unless ASL_VERBOSE asks for
them; third-party deprecation warnings hidden, ours shown on one line."""
from __future__ import annotations

import os
import sys
import threading
import warnings

import pytest

import terminal

NATIVE = b"INFO: [cpu_registry.cc:75] XNNPACK CPU accelerator registered.\n" \
         b"W0000 00:00:1796359331.731444    6889 landmark_projection_calculator.cc:81] Using NORM_RECT\n" \
         b"WARNING: Logging before InitGoogle() is written to STDERR\n"
KEPT = b"ERROR: the library failed\nE0000 00:00:1796359331.731444    6889 graph.cc:12] broken\n"


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.delenv(terminal.VERBOSE_ENV, raising=False)


def test_native_log_lines_are_hidden_and_the_rest_still_printed(quiet, capfd):
    with terminal.native_logs_hidden():
        os.write(2, NATIVE)  # as the C++ code writes: to the descriptor, past Python
        os.write(2, KEPT)
        print("python's own", file=sys.stderr)
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    # (under pytest, Python's stderr does not go through the descriptor: it comes first)
    assert sorted(err.splitlines()) == sorted([*KEPT.decode().splitlines(), "python's own", "after"])
    assert err.endswith("after\n") and KEPT.decode() in err


def test_threads_inside_at_once_share_one_redirection(quiet, capfd):
    inside, leave = threading.Barrier(2), threading.Event()

    def log_natively(text: bytes) -> None:
        with terminal.native_logs_hidden():
            os.write(2, NATIVE)
            inside.wait()
            os.write(2, text)
            leave.wait()

    thread = threading.Thread(target=log_natively, args=(b"from the thread\n",))
    thread.start()
    with terminal.native_logs_hidden():
        inside.wait()
        os.write(2, NATIVE)
        leave.set()
    thread.join()
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == ["after", "from the thread"] and err.endswith("after\n")


def test_an_exception_inside_restores_the_descriptor(quiet, capfd):
    with pytest.raises(ValueError), terminal.native_logs_hidden():
        raise ValueError("boom")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_verbose_hides_nothing(monkeypatch, capfd):
    monkeypatch.setenv(terminal.VERBOSE_ENV, "1")
    with terminal.native_logs_hidden():
        os.write(2, NATIVE)
    assert capfd.readouterr().err == NATIVE.decode()


def test_third_party_deprecations_are_hidden_and_ours_are_one_line(quiet, caplog):
    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        terminal.configure()
        for category in (DeprecationWarning, FutureWarning):
            warnings.warn_explicit("old API", category, "/venv/somelib/core.py", 10, module="somelib.core")
        warnings.warn_explicit("our API changes", FutureWarning, "/repo/hands.py", 12, module="hands")
        warnings.warn_explicit("a third-party user warning", UserWarning, "/venv/somelib/core.py", 11,
                               module="somelib.core")
    messages = [r.getMessage() for r in caplog.records if r.name == "py.warnings"]
    assert messages == ["FutureWarning: our API changes (hands.py:12)",
                        "UserWarning: a third-party user warning (core.py:11)"]


def test_verbose_shows_third_party_deprecations_and_reaches_child_processes(monkeypatch, caplog):
    monkeypatch.delenv(terminal.VERBOSE_ENV, raising=False)
    with warnings.catch_warnings():
        terminal.configure(verbose_flag=True)
        warnings.warn_explicit("old API", FutureWarning, "/venv/somelib/core.py", 10, module="somelib.core")
    assert os.environ[terminal.VERBOSE_ENV] == "1"  # what the spawned search and training processes read
    assert [r.getMessage() for r in caplog.records if r.name == "py.warnings"] == [
        "FutureWarning: old API (core.py:10)"]
