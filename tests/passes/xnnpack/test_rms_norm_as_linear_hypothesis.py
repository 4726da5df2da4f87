"""RMSNormAsLinear on drawn norms: normalized size, leading shape, eps (None too), the weight's
spelling (none, a parameter, a buffer, ``param + c`` / ``c + param`` folded into a constant),
norms sharing one weight, and norms it must leave alone (two normalized dims, bfloat16 input).

Expected from the contract: every norm is matched; fp32 one-dim norms are rewritten (one
``fxport_rms_mean.<node>`` (1, D) constant of 1/D and one ``fxport_rms_eps.<node>`` (1,) bias of
eps each, no ``add`` left; offset weights folded into
``<param>_plus_<c>`` = param + c), the others skipped with the reason; values equal the
unrewritten program within fp32 summation order and an fp64 RMSNorm; a second run changes
nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxport.passes import RMSNormAsLinear
from fxport.passes.xnnpack.rms_norm_as_linear import _name_of

from fxport.tests.passes.hypothesis_helpers import assert_idempotent, examples, ops, run_pass

aten = torch.ops.aten
SKIP = "not fp32 or normalized over more than one dim"
WEIGHTS = ["none", "param", "buffer", "param + c", "c + param", "buffer + c"]


class Norms(nn.Module):
    """``kinds[i]`` = (weight spelling, eps, left alone as "2 dims" / "bf16" / None), in a row."""

    def __init__(self, D, kinds, c, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kinds, self.c, self.D = kinds, c, D
        self.w = nn.Parameter(torch.randn(D, generator=g))
        self.register_buffer("b", torch.randn(D, generator=g))

    def weight(self, spelling):
        return {"none": None, "param": self.w, "buffer": self.b, "param + c": self.w + self.c,
                "c + param": self.c + self.w, "buffer + c": self.b + self.c}[spelling]

    def forward(self, x):  # (..., D)
        for spelling, eps, alone in self.kinds:
            w = self.weight(spelling)
            if alone == "2 dims":
                x = F.rms_norm(x, x.shape[-2:], None, eps)
            elif alone == "bf16":
                x = F.rms_norm(x.bfloat16(), [self.D], None if w is None else w.bfloat16(), eps).float()
            else:
                x = F.rms_norm(x, [self.D], w, eps)
        return x


def rms_norm_fp64(x, weight, eps, dims=1):
    x = x.double()
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    y = x * torch.rsqrt((x * x).mean(dim=tuple(range(-dims, 0)), keepdim=True) + eps)
    return y if weight is None else y * weight.double()


# Offsets whose %g spelling is not an identifier part (-1.0 -> "-1", 1e-5 -> "1e-05") once gave
# constants ep.module() could not compile (SyntaxError); they are drawn now.
@examples(9)
@given(D=st.integers(1, 16), lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       kinds=st.lists(st.tuples(st.sampled_from(WEIGHTS), st.sampled_from([None, 1e-6, 1e-2]),
                                st.sampled_from([None, None, None, "2 dims", "bf16"])), min_size=1, max_size=3),
       c=st.sampled_from([1.0, 0.5, 3, -1.0, 1e-5]), scale=st.sampled_from([1e-2, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_fp32_norms_become_a_mean_linear(D, lead, kinds, c, scale, seed):
    model = Norms(D, kinds, c, seed)
    x = torch.randn(*lead, D, generator=torch.Generator().manual_seed(seed + 1)) * scale
    ep = torch.export.export(model, (x,))
    new, rec = run_pass(ep, RMSNormAsLinear())

    done = [k for k in kinds if k[2] is None]
    alone = len(kinds) - len(done)
    assert (rec.changed, rec.stats.matched, rec.stats.rewritten) == (bool(done), len(kinds), len(done))
    assert dict(rec.stats.skipped) == ({SKIP: alone} if alone else {})
    assert [(s["dim"], s["weight"]) for s in rec.stats.sites] == [
        (D, "folded" if "+" in w else "as is") for w, _, _ in done]
    means = {k: v for k, v in new.constants.items() if k.startswith("fxport_rms_mean.")}
    assert len(means) == len(done) and all(torch.equal(v, torch.full((1, D), 1 / D)) for v in means.values())
    biases = [v for k, v in new.constants.items() if k.startswith("fxport_rms_eps.")]
    want_eps = sorted(torch.finfo(torch.float32).eps if e is None else e for _, e, _ in done)
    assert sorted(float(v) for v in biases) == pytest.approx(want_eps, rel=1e-6) and all(v.shape == (1,) for v in biases)
    for source in {w.split(" ")[-1] if w.startswith("c") else w.split(" ")[0] for w, _, _ in done if "+" in w}:
        name = {"param": "w", "buffer": "b"}[source]
        folded = new.constants[f"{name}_plus_{_name_of(c)}".replace(".", "_")]  # param + c, computed once
        assert torch.equal(folded, getattr(model, name).detach() + c)
    assert ops(new)[aten.rms_norm.default] == alone and ops(new)[aten.linear.default] == len(done)
    linears = [n for n in new.graph.nodes if n.target == aten.linear.default]
    assert all(len(n.args) == 3 and [u.target for u in n.users] == [aten.rsqrt.default] for n in linears)  # eps is the bias

    got = new.module()(x)
    torch.testing.assert_close(got, ep.module()(x), rtol=1e-5, atol=1e-5)  # mean as a dot product with 1/D
    want = x.double()
    for spelling, eps, kind in kinds:
        w = model.weight(spelling)
        if kind == "bf16":  # the unrewritten bf16 norm, as the program computes it
            want = F.rms_norm(want.float().bfloat16(), [D], None if w is None else w.bfloat16(), eps).double()
        else:
            want = rms_norm_fp64(want.float(), None if kind else w, eps, 2 if kind else 1)
    assert ((got.double() - want).abs() <= 1e-5 * (1 + want.abs())).all()  # fp32 vs fp64
    assert_idempotent(new, RMSNormAsLinear())


def test_folded_constant_names_are_exact_identifiers():
    from fxport.passes.xnnpack.rms_norm_as_linear import _name_of

    names = [_name_of(c) for c in (1.0, 3, -1.0, 1e-5, 0.5, 1.0000001)]
    assert names == ["1", "3", "minus1", "1eminus05", "0p5", "1p0000001"]
    assert all(f"w_plus_{n}".isidentifier() for n in names)
