"""Transparent huge pages for the runtime (fxport.runtime.huge_pages): the environment it sets
and the re-execution of the commands that run programs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fxport.runtime import huge_pages


def test_the_tunable_joins_the_others_once():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/x"}
    out = huge_pages.with_huge_pages(env)
    assert out == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/x"}
    assert huge_pages.with_huge_pages(out) == out and huge_pages.enabled(out)
    assert huge_pages.with_huge_pages({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"  # the caller's mapping is not changed
    assert not huge_pages.enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


def test_opt_out_and_already_on(monkeypatch):
    monkeypatch.setenv("FXPORT_HUGE_PAGES", "0")
    assert not huge_pages.wanted()
    monkeypatch.delenv("FXPORT_HUGE_PAGES")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert not huge_pages.wanted()  # a re-executed process does not re-execute again
    called = []
    monkeypatch.setattr(os, "execve", lambda *a: called.append(a))
    huge_pages.reexec_with_huge_pages([sys.executable, "-c", "pass"])
    assert called == []


@pytest.mark.skipif(not huge_pages.available(), reason="needs Linux, glibc and transparent huge pages not 'never'")
def test_bench_reexecutes_with_huge_pages(tiny_pte):
    """``fxport bench`` (the command, not ``main([...])``) re-executes itself with the tunable
    and says so; ``FXPORT_HUGE_PAGES=0`` keeps it off."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FXPORT_HUGE_PAGES")}
    cmd = [sys.executable, "-m", "fxport.cli", "bench", str(tiny_pte), "--prompt-len", "4", "--new-tokens", "2"]
    on = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert on.returncode == 0, on.stderr
    assert on.stdout.strip().splitlines()[-1] == "(prompt 4 tokens, 2 decode steps, threads=default, huge pages on)"
    off = subprocess.run(cmd, env={**env, "FXPORT_HUGE_PAGES": "0"}, capture_output=True, text=True, timeout=300)
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip().splitlines()[-1].endswith("huge pages off)")
