"""``fxport dump`` of a ``.pte`` in ExecuTorch ``MultimodalRunner``'s layout
(fxport.builder.multimodal's docstring): methods with their signatures, the constant methods, the
runner contract's verdict.

The program is a tiny stand-in with the layout's methods and shapes (E = 9 embedding columns,
C = 4 tokens per call, vocabulary 16, an 8 x 8 image, 12 x 3 log-mel frames), lowered without a
delegate: dump reads the layout, not the model (~2 s).
"""

from __future__ import annotations

import re

import pytest
import torch
from executorch.exir import to_edge

from fxport import contract
from fxport.cli import main
from fxport.debug.dump import describe_multimodal_pte, is_runner_multimodal

E, C, V = 9, 4, 16


class TokenEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(V, E)

    def forward(self, tokens):  # (1, T) int64 -> (1, T, E)
        return self.table(tokens)


class TextDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(E, V)

    def forward(self, embeddings, cache_position):  # (1, T, E), (T,) -> (1, 1, V)
        return self.head(embeddings[:, -1:] + cache_position[-1].float())


class VisionEncoder(torch.nn.Module):
    def forward(self, image):  # uint8 (3, 8, 8) -> (1, 4 + 2, E)
        cells = image.float().reshape(3, 2, 4, 2, 4).mean((0, 2, 4)).reshape(1, 4, 1)
        return torch.nn.functional.pad(cells.expand(1, 4, E), (0, 0, 1, 1))


class AudioEncoder(torch.nn.Module):
    def forward(self, features):  # (1, F, 3) -> (1, F, E)
        return torch.nn.functional.pad(features, (0, E - 3))


CONSTANTS = {
    **contract.runner_metadata(max_prefill_chunk=C, max_context_len=32, eos_ids=[1], vocab_size=V, bos_id=2),
    contract.HIDDEN_SIZE: 8, contract.PER_LAYER_COLUMNS: 0, contract.EMBEDDING_DIM: E,
    contract.BIDIRECTIONAL_VISION: 0, contract.IMAGE_TOKEN_ID: 13, contract.BOI_TOKEN_ID: 14,
    contract.EOI_TOKEN_ID: 15, contract.PATCH_SIZE: 2, contract.POOLING_KERNEL_SIZE: 2,
    contract.MAX_SOFT_TOKENS: 4, contract.MAX_IMAGE_CELLS: 2, contract.AUDIO_TOKEN_ID: 10,
    contract.BOA_TOKEN_ID: 11, contract.EOA_TOKEN_ID: 12, contract.MAX_AUDIO_FRAMES: 12,
}


def _write(path, constants):
    T = torch.export.Dim("T", min=1, max=C)
    F = torch.export.Dim("F", min=5, max=12)
    programs = {
        contract.TOKEN_EMBEDDING: torch.export.export(
            TokenEmbedding(), (torch.zeros(1, 2, dtype=torch.long),), dynamic_shapes=({1: T},)),
        contract.TEXT_DECODER: torch.export.export(
            TextDecoder(), (torch.zeros(1, 2, E), torch.arange(2)), dynamic_shapes=({1: T}, {0: T})),
        contract.VISION_ENCODER: torch.export.export(VisionEncoder(), (torch.zeros(3, 8, 8, dtype=torch.uint8),)),
        contract.AUDIO_ENCODER: torch.export.export(
            AudioEncoder(), (torch.zeros(1, 6, 3),), dynamic_shapes=({1: F},)),
    }
    path.write_bytes(to_edge(programs, constant_methods=constants).to_executorch().buffer)
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mm")
    partial = {k: v for k, v in CONSTANTS.items() if k not in (contract.MAX_CONTEXT_LEN, contract.PATCH_SIZE)}
    return _write(d / "runner.pte", CONSTANTS), _write(d / "partial.pte", partial)


def test_dump_runner_layout(programs, capsys):
    path, _ = programs
    assert main(["dump", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# {path}"
    start = lines.index("methods (ExecuTorch MultimodalRunner layout; max sizes):")
    assert lines[start + 1:start + 5] == [
        "  token_embedding: int64 (1, 4) -> float32 (1, 4, 9)",
        "  text_decoder: float32 (1, 4, 9), int64 (4,) -> float32 (1, 1, 16)",
        "  vision_encoder: uint8 (3, 8, 8) -> float32 (1, 6, 9)",
        "  audio_encoder: float32 (1, 12, 3) -> float32 (1, 12, 9)",
    ]
    assert lines[start + 5] == "constant methods (text contract):"
    for key, value in CONSTANTS.items():
        assert f"  {key}: {value}" in lines
    assert "  get_max_context_len: 32" in lines and "  get_eos_ids: [1]" in lines
    assert lines.index("constant methods (multimodal):") == start + 6 + len(contract.CONSTANT_METHODS)
    assert lines[-1] == "ExecuTorch MultimodalRunner contract: ok"


def test_dump_names_a_missing_constant(programs, capsys):
    _, path = programs
    assert main(["dump", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == describe_multimodal_pte(path).splitlines()
    assert "  get_max_context_len: missing" in lines and "  get_patch_size: missing" in lines
    assert lines[-1] == "ExecuTorch MultimodalRunner contract: constant method get_max_context_len is missing"


def test_which_programs_are_runner_layout():
    assert is_runner_multimodal({"token_embedding", "text_decoder", "get_max_seq_len"})
    assert is_runner_multimodal({"vision_encoder", "get_max_seq_len"})  # no text method: described, refused
    assert not is_runner_multimodal({"prefill", "decode", "image_encoder", "audio_encoder"})  # merged layout
    assert not is_runner_multimodal({"prefill", "get_max_seq_len"})


def test_dump_refuses_an_unloadable_file(tmp_path):
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program")
    with pytest.raises(ValueError, match="^" + re.escape(f"{bad} is not a loadable ExecuTorch program (")):
        describe_multimodal_pte(bad)
