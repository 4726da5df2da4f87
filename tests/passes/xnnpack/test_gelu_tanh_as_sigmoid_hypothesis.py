"""GeluTanhAsSigmoid on drawn chains of GELUs (tanh and exact forms mixed), shapes, magnitudes and
dtypes.

Expected from the contract: exactly the tanh GELUs are matched and rewritten, the exact ones
stay ``aten.gelu``; the rewritten program equals the unrewritten one within the dtype's
rounding and an fp64 tanh GELU within the dtype's tolerance; a second run changes nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxport.passes.xnnpack import GeluTanhAsSigmoid

from fxport.tests.passes.hypothesis_helpers import assert_idempotent, examples, ops, run_pass

aten = torch.ops.aten
#: |got - ref| <= TOL * (1 + |ref|): the formula's 6 rounded ops vs torch's kernel (fp32 inside)
TOL = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 4e-3}


class Gelus(nn.Module):
    def __init__(self, forms):
        super().__init__()
        self.forms = forms  # "tanh" | "none" per GELU, applied in a row with a scale between

    def forward(self, x):
        for i, form in enumerate(self.forms):
            x = F.gelu(x, approximate=form) * (1.5 if i % 2 else 1.0)
        return x


def gelu_tanh_fp64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@examples(8)
@given(forms=st.lists(st.sampled_from(["tanh", "none"]), min_size=1, max_size=4),
       shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       magnitude=st.sampled_from([0.1, 3.0, 20.0]), seed=st.integers(0, 2**16))
def test_tanh_gelus_become_the_formula(forms, shape, dtype, magnitude, seed):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * magnitude).to(dtype)
    ep = torch.export.export(Gelus(forms), (x,))
    new, rec = run_pass(ep, GeluTanhAsSigmoid())
    n_tanh = forms.count("tanh")
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten, dict(rec.stats.skipped)) == (
        n_tanh > 0, n_tanh, n_tanh, {})
    counts = ops(new)
    assert counts[aten.gelu.default] == forms.count("none") and counts[aten.sigmoid.default] == n_tanh
    # each tanh GELU: 4 muls (x*x, *K1, x*(...), x*sigmoid), 1 add, 1 sigmoid; the module scales after each GELU
    assert (counts[aten.tanh.default], counts[aten.add.Tensor], counts[aten.mul.Tensor]) == (0, n_tanh, 4 * n_tanh + len(forms))

    got = new.module()(x)
    tol = TOL[dtype]
    ref = ep.module()(x)
    assert got.dtype == dtype and ((got.double() - ref.double()).abs() <= tol * (1 + ref.double().abs())).all()
    want = x  # in fp64, each GELU's input rounded to the dtype as the program stores it
    for i, form in enumerate(forms):
        y = (gelu_tanh_fp64(want) if form == "tanh" else F.gelu(want.double())) * (1.5 if i % 2 else 1.0)
        want = y.to(dtype)
    assert ((got.double() - y).abs() <= tol * (1 + y.abs())).all()
    if n_tanh:
        assert_idempotent(new, GeluTanhAsSigmoid())


def test_former_name_imports_the_same_pass():
    from fxport.passes import GeluTanhAsTanh
    from fxport.passes.xnnpack import GeluTanhAsSigmoid as current

    assert GeluTanhAsTanh is current and GeluTanhAsTanh().name == "gelu_tanh_as_sigmoid"
