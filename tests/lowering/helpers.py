"""Helpers of the lowering tests (import as ``from fxport.tests.lowering.helpers import ...``)."""

from __future__ import annotations


def lower_fast(programs, **kwargs):
    """``lower_to_xnnpack`` under the builder's lowering speedups, as :func:`fxport.builder.build`
    lowers (the same bytes as the plain lowering, a fraction of the time)."""
    from fxport.builder import speedups
    from fxport.lowering.xnnpack import lower_to_xnnpack

    with speedups.enabled(True) as fast, fast.lowering():
        return lower_to_xnnpack(programs, **kwargs)
