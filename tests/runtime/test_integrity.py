"""A damaged or foreign ``.ptd`` is refused with one line before anything runs.

Two tiny ``balanced`` exports (1 layer, seeds 0 and 1: the lookup reads the head's int8 table,
so the weights live in a ``.ptd``). Each case is checked for a published program (its generation
records the pair's sha256) and for a plain copy of the pair (no record: the ``.ptd``'s own keys
and XNNPACK's content-addressed blobs are checked against the ``.pte``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from fxport.cli import main
from fxport.fileio import weights_file
from fxport.runtime.integrity import WeightsMismatchError, _read_flat_tensor, check_weights


def _export(folder: Path, seed: int) -> Path:
    out = folder / "t.pte"
    argv = ["export", "--preset", "tiny-gemma3", "--layers", "1", "--quant", "balanced", "--max-seq-len", "16",
            "--max-prefill-chunk", "5", "--seed", str(seed), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(seed-0 program, seed-1 program), both published with a ``.ptd``."""
    return (_export(tmp_path_factory.mktemp("seed0"), 0), _export(tmp_path_factory.mktemp("seed1"), 1))


@pytest.fixture(params=["published", "copied"])
def pair(request, exports, tmp_path):
    """A private copy of the seed-0 pair: as published (links + record) or copied plainly (cp -L)."""
    src = exports[0]
    if request.param == "published":
        shutil.copytree(src.parent, tmp_path / "p", symlinks=True)
        pte = tmp_path / "p" / "t.pte"
    else:
        (tmp_path / "p").mkdir()
        pte = tmp_path / "p" / "t.pte"
        shutil.copyfile(src, pte)
        shutil.copyfile(weights_file(src), pte.with_suffix(".ptd"))
    return request.param, pte, pte.with_suffix(".ptd")  # the name a user sees (a link when published)


def _damage(ptd: Path) -> None:
    """Flip the sign bit of every second byte of the largest blob (the shared head / lookup table)."""
    data = bytearray(ptd.read_bytes())
    _, named = _read_flat_tensor(data)
    _, start, size = max(named, key=lambda n: n[2])
    for i in range(start, start + size, 2):
        data[i] ^= 0x80
    ptd.write_bytes(bytes(data))


def test_an_intact_pair_loads(pair):
    from fxport.runtime.pte_backend import PteBackend

    _, pte, ptd = pair
    check_weights(pte, ptd)
    assert PteBackend(pte).vocab_size == 256


def test_damaged_weights_are_refused_before_running(pair, capfd):
    kind, pte, ptd = pair
    _damage(ptd)
    why = ("its sha256 is not the one recorded when the program was exported" if kind == "published" else
           "weight ")
    with pytest.raises(WeightsMismatchError, match=f"^{ptd} does not belong to {pte} or is damaged: {why}"):
        check_weights(pte, ptd)
    capfd.readouterr()
    assert main(["run", str(pte), "--prompt-ids", "2,3", "--max-new-tokens", "2"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fxport run: error: {ptd} does not belong to {pte} or is damaged: ")
    assert err[0].endswith("pass the .ptd exported with this program, or re-export it "
                           "(FXPORT_CHECK_WEIGHTS=0 skips this check)")


def test_the_check_can_be_turned_off(pair, monkeypatch):
    from fxport.runtime.pte_backend import PteBackend

    _, pte, ptd = pair
    _damage(ptd)
    monkeypatch.setenv("FXPORT_CHECK_WEIGHTS", "0")
    check_weights(pte, ptd)
    assert PteBackend(pte).vocab_size == 256  # loads (and would print garbage): the user asked


def test_another_exports_weights_are_refused(pair, exports):
    kind, pte, ptd = pair
    foreign = weights_file(exports[1])
    why = ("its sha256 is not the one recorded" if kind == "published" else
           r"it holds \d+ weight\(s\) the program does not use, e\.g\. '[0-9a-z_]+' \(another export's weights\)")
    with pytest.raises(WeightsMismatchError, match=f"^{foreign} does not belong to {pte} or is damaged: {why}"):
        check_weights(pte, foreign)
    from fxport.runtime.pte_backend import PteBackend

    with pytest.raises(WeightsMismatchError, match=f"^{foreign} does not belong to {pte}"):
        PteBackend(pte, data_path=foreign)


def test_a_file_that_is_not_a_weights_file_is_refused(pair, tmp_path):
    _, pte, _ = pair
    bad = tmp_path / "notes.ptd"
    bad.write_bytes(b"these are my notes, not weights" * 4)
    with pytest.raises(WeightsMismatchError, match=f"^{bad} does not belong to {pte} or is damaged: "):
        check_weights(pte, bad)


def test_a_symlinked_program_finds_its_weights_beside_the_target(exports, tmp_path):
    """``latest.pte -> .../t.pte``: the weights are found beside the link's target (no
    ``latest.ptd`` is needed), and the pair is checked like any other."""
    from fxport.runtime.pte_backend import PteBackend

    latest = tmp_path / "latest.pte"
    latest.symlink_to(exports[0])
    assert not (tmp_path / "latest.ptd").exists()
    assert PteBackend(latest).vocab_size == 256
