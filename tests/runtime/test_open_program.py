"""open_program picks the backend from the program's methods; a file fxport did not write is one line.

Three tiny programs lowered with ExecuTorch's portable kernels (no delegate, ~1 s each): a text
program (``prefill`` + the contract's constant methods), a multimodal one (``prefill`` taking
feature rows + ``image_encoder``), and a foreign one (``forward`` only, as any ExecuTorch export).
"""

from __future__ import annotations

import pytest
import torch
from torch.export import export

from fxport.runtime import PteError, as_backend, open_program
from fxport.runtime.backend import program_methods
from fxport.runtime.pte_backend import PteBackend

V, H, CHUNK, CONTEXT, IMAGE_TOKEN = 16, 4, 2, 8, 5


class _Prefill(torch.nn.Module):
    """tokens (1, L), input_pos (L,) -> logits (1, L, V): an embedding row per token plus its position."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.arange(V * V, dtype=torch.float32).reshape(V, V) / V)

    def forward(self, tokens, input_pos):
        return self.table[tokens] + input_pos.float()[None, :, None]


class _MultimodalPrefill(_Prefill):
    def forward(self, tokens, input_pos, image_features):
        return super().forward(tokens, input_pos) + image_features.sum()


class _ImageEncoder(torch.nn.Module):
    def forward(self, pixels):
        return pixels * 2.0


def _write(path, programs, constants=None):
    from executorch.exir import to_edge

    path.write_bytes(to_edge(programs, constant_methods=constants).to_executorch().buffer)
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    d = tmp_path_factory.mktemp("open_program")
    tokens, pos = torch.tensor([[3, 4]]), torch.arange(CHUNK)
    text_constants = {"get_max_seq_len": CHUNK, "get_max_context_len": CONTEXT, "get_vocab_size": V}
    text = _write(d / "text.pte", {"prefill": export(_Prefill(), (tokens, pos))}, text_constants)
    mm = _write(
        d / "mm.pte",
        {"prefill": export(_MultimodalPrefill(), (tokens, pos, torch.zeros(1, H))),
         "image_encoder": export(_ImageEncoder(), (torch.zeros(1, H),))},
        {**text_constants, "get_hidden_size": H, "get_image_token_id": IMAGE_TOKEN},
    )
    foreign = _write(d / "foreign.pte", {"forward": export(_ImageEncoder(), (torch.zeros(1, H),))})
    garbage = d / "notes.pte"
    garbage.write_bytes(b"these are notes, not a program")
    return dict(text=text, mm=mm, foreign=foreign, garbage=garbage, missing=d / "missing.pte")


def test_text_program_gets_the_text_backend(programs):
    backend = open_program(programs["text"], num_threads=1)
    assert type(backend) is PteBackend
    assert (backend.max_prefill_chunk, backend.max_seq_len, backend.vocab_size) == (CHUNK, CONTEXT, V)
    tokens, pos = torch.tensor([[3, 4]]), torch.tensor([5, 6])
    assert torch.equal(backend.prefill(tokens, pos), _Prefill()(tokens, pos))  # portable kernels: exact
    assert type(as_backend(str(programs["text"]))) is PteBackend


def test_multimodal_program_gets_the_multimodal_backend(programs):
    backend = open_program(programs["mm"], num_threads=1)
    assert type(backend).__name__ == "MultimodalPteBackend" and isinstance(backend, PteBackend)
    assert backend.has_images and not backend.has_audio
    assert (backend.multimodal["image_token_id"], backend.multimodal["hidden_size"]) == (IMAGE_TOKEN, H)
    tokens, pos = torch.tensor([[IMAGE_TOKEN, 4]]), torch.tensor([5, 6])
    feats = torch.ones(1, H)
    assert torch.equal(backend.prefill(tokens, pos, image_features=feats), _MultimodalPrefill()(tokens, pos, feats))
    assert type(as_backend(str(programs["mm"]))) is type(backend)
    assert program_methods(programs["mm"]) == {"prefill", "image_encoder", "get_max_seq_len", "get_max_context_len",
                                               "get_vocab_size", "get_hidden_size", "get_image_token_id"}


@pytest.mark.parametrize("name, message", [
    ("foreign", "{path} has no method(s) ['prefill'] (methods: ['forward']); export it with fxport"),
    ("garbage", "{path} is not a loadable ExecuTorch program (no 'ET' file identifier at byte 4)"),
    ("missing", "no such .pte file: {path}"),
])
def test_a_file_fxport_did_not_write_is_one_line(programs, name, message):
    path = programs[name]
    with pytest.raises(PteError) as err:
        open_program(path)
    assert str(err.value) == message.format(path=path)
    assert program_methods(path) == ({"forward"} if name == "foreign" else None)
