"""Transparent huge pages for the weights XNNPACK packs at load.

XNNPACK copies every weight into its own packed buffers when a method is loaded (~270 MB per
method for the Gemma 3 270M ``balanced`` program) and reads all of them once per decoded token.
With the kernel's transparent huge pages in ``madvise`` mode (the usual default, and this
machine's) plain ``malloc`` memory gets 4 KiB pages: every 4 KiB of weights costs a TLB entry and
the page walks show up in a bandwidth-bound GEMV. glibc's tunable ``glibc.malloc.hugetlb=1``
(glibc >= 2.35) makes malloc ``madvise(MADV_HUGEPAGE)`` its large chunks, so the packed weights
land on 2 MiB pages.

Measured (2026-11-29, ``fxport bench build/gemma3-270m-balanced.pte --prompt-len 32
--new-tokens 256``, 2 threads, five interleaved pairs): decode 64.8 -> 74.2 tok/s (median,
+14.5%); ETDump of a decode step: 15.5 -> 11.6 ms, the output head 7.1 -> 5.1 ms (168 MB at 33
GB/s instead of 24). ``AnonHugePages`` after loading both methods: 0 -> 700 MB; RSS unchanged.

A tunable is read when the process starts, so it cannot be switched on from inside Python:
:func:`reexec_with_huge_pages` re-executes the current command with it (``fxport run``,
``bench`` and ``demo`` do; ``FXPORT_HUGE_PAGES=0`` / ``off`` / ``false`` / ``no`` keeps the
process as it is, and so does a ``glibc.malloc.hugetlb`` the user already set in
``GLIBC_TUNABLES``, e.g. ``=0``: the user's value is never overridden). A Python user of
:class:`fxport.runtime.pte_backend.PteBackend` starts the interpreter with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
_OFF = ("0", "off", "false", "no")
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Whether ``env`` (default: this process's) starts processes with the tunable."""
    return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def available() -> bool:
    """Linux with glibc and transparent huge pages not set to ``never``."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def user_setting(env: Mapping[str, str] = os.environ) -> str | None:
    """The value of ``glibc.malloc.hugetlb`` in ``env``'s ``GLIBC_TUNABLES`` (None when unset)."""
    for item in env.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name.strip() == "glibc.malloc.hugetlb":
            return value.strip()
    return None


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` whose ``GLIBC_TUNABLES`` holds the tunable (other tunables kept; a
    ``glibc.malloc.hugetlb`` already there is kept as it is)."""
    out = dict(env)
    if user_setting(out) is None:
        out["GLIBC_TUNABLES"] = ":".join(t for t in (out.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return out


def wanted() -> bool:
    """True when this process should re-execute itself: huge pages are available,
    ``FXPORT_HUGE_PAGES`` is not ``0`` / ``off`` / ``false`` / ``no``, and ``GLIBC_TUNABLES``
    does not set ``glibc.malloc.hugetlb`` already (to 1: on; to anything else: the user's choice)."""
    if os.environ.get("FXPORT_HUGE_PAGES", "1").strip().lower() in _OFF:
        return False
    return available() and user_setting() is None


def reexec_with_huge_pages(argv: Sequence[str]) -> None:
    """Replace this process by ``argv`` run with the tunable (see :func:`wanted`); returns only
    when nothing is to be done. ``argv[0]`` is the program (e.g. ``sys.executable``)."""
    if wanted():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(argv[0], list(argv), with_huge_pages(os.environ))
