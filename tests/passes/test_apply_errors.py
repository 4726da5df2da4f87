"""Library misuse of passes.pipeline.apply: a TypeError that says what to pass."""

from __future__ import annotations

import pytest
import torch

from fxport.passes.pipeline import apply
from fxport.passes.sdpa_dispatch import SDPADispatch


class _Double(torch.nn.Module):
    def forward(self, x):
        return x * 2


@pytest.fixture(scope="module")
def ep():
    return torch.export.export(_Double(), (torch.ones(2),))


def _type_error(*args) -> str:
    with pytest.raises(TypeError) as info:
        apply(*args, dump=False)
    return str(info.value)


def test_a_class_instead_of_an_instance(ep):
    assert _type_error(ep, [SDPADispatch]) == (
        "apply: passes[0] is the class SDPADispatch, not an instance; pass SDPADispatch() (with its options) instead")


def test_a_module_instead_of_a_program():
    assert _type_error(_Double(), [SDPADispatch()]) == (
        "apply: the first argument must be a torch.export.ExportedProgram; got the module _Double; export it "
        "first: apply(torch.export.export(model, example_args), passes)")


def test_a_string_instead_of_a_program():
    assert _type_error("x", []) == (
        "apply: the first argument must be a torch.export.ExportedProgram; got the path 'x'; load it first: "
        "apply(torch.export.load(path), passes)")
    assert _type_error(3, []) == ("apply: the first argument must be a torch.export.ExportedProgram; got an int (3); "
                                  "pass torch.export.export(model, example_args)")


def test_a_single_pass_or_a_non_pass(ep):
    assert _type_error(ep, SDPADispatch()) == (
        "apply: passes must be a list of pass instances, got a SDPADispatch; write apply(ep, [SomePass()])")
    assert _type_error(ep, [3]) == (
        "apply: passes[0] is an int (3), not a pass; pass instances of fxport.passes.base.Pass "
        "(or callables p(ep, ctx) -> PassResult)")


def test_valid_call_still_runs(ep):
    assert apply(ep, [], dump=False).ep is not None
