"""Silence (and keep) what native code prints to file descriptor 2.

ExecuTorch's runtime logs through its C++ PAL to ``stderr``: every XNNPACK program load prints
five ``[cpuinfo_utils.cpp:...]`` lines, and a failed load prints its reason there too. Depending
on the build the lines reach fd 2 directly or go through Python's ``sys.stderr`` (the pybindings
route them there), so both are redirected. The log level is fixed when the runtime is built and the Python bindings expose no
switch, so fxport redirects fd 2 to a temporary file around the runtime calls that log
(:func:`capture_native_stderr`), keeps the text for error messages, and replays it when asked
(``fxport run --verbose``, ``FXPORT_VERBOSE=1``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

__all__ = ["NativeLog", "capture_native_stderr", "verbose_default"]


def verbose_default() -> bool:
    """True when ``FXPORT_VERBOSE`` is set to something other than ``""`` / ``0``."""
    return os.environ.get("FXPORT_VERBOSE", "") not in ("", "0")


class NativeLog:
    """What native code wrote to fd 2 inside :func:`capture_native_stderr` (``text`` after exit)."""

    def __init__(self) -> None:
        self.text = ""

    def lines(self) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()]


@contextlib.contextmanager
def capture_native_stderr(verbose: bool = False) -> Iterator[NativeLog]:
    """Redirect fd 2 to a temporary file for the block; ``verbose`` writes the text back after.

    ``sys.stderr`` is pointed at the same file for the block, so Python-level writes (and native
    logs routed through Python) are captured too. Nothing is redirected when fd 2 cannot be
    duplicated (no such descriptor).
    """
    log = NativeLog()
    try:
        saved = os.dup(2)
    except OSError:
        yield log
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(tmp.fileno(), 2)
        py_stderr = sys.stderr
        sys.stderr = open(os.dup(tmp.fileno()), "w", encoding="utf-8", errors="replace", buffering=1)
        try:
            yield log
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.close()
            sys.stderr = py_stderr
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            log.text = tmp.read().decode("utf-8", errors="replace")
            if verbose and log.text:
                sys.stderr.write(log.text)
                sys.stderr.flush()
