"""The Backend contract (fxport.lowering.backend): both backends keep it, the builder refuses a
module that does not, and no backend reaches up into the builder or the model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fxport import builder
from fxport.lowering import cuda, xnnpack
from fxport.lowering.backend import Backend

LOWERING = Path(xnnpack.__file__).parent


def test_both_backends_keep_the_contract():
    assert isinstance(xnnpack, Backend) and isinstance(cuda, Backend)
    assert [(b.NAME, b.PROGRAM_SUFFIX, b.METHODS) for b in (xnnpack, cuda)] == [
        ("xnnpack", ".pte", ("prefill",)), ("cuda", ".pte", ("prefill", "decode"))]
    assert builder.backend_module("xnnpack") is xnnpack and builder.backend_module("cuda") is cuda


def test_a_module_missing_a_step_is_refused(monkeypatch):
    monkeypatch.delattr(xnnpack, "dry_run")
    with pytest.raises(TypeError, match=r"^fxport\.lowering\.xnnpack is not a fxport\.lowering\.backend\.Backend: "
                                        r"it lacks dry_run$"):
        builder.backend_module("xnnpack")


def test_xnnpack_offers_no_dry_run():
    with pytest.raises(ValueError, match="^--dry-run is a --backend cuda option; --backend xnnpack builds on this CPU: "
                                         "drop --dry-run$"):
        xnnpack.dry_run({})


def test_no_backend_imports_the_builder_or_the_model():
    reached = set()
    for path in sorted(LOWERING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            reached |= {(path.name, n) for n in names if n.startswith(("fxport.builder", "fxport.models"))}
    assert reached == set()
