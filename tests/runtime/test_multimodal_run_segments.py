"""MultimodalRunner's layout in fxport's runtime, without a program: how the prompt becomes
segments (text chunks, each image's / clip's encoder output whole) and text_decoder calls at the
running position, where images and clips go, and the errors.

A fake backend stands for fxport.runtime.multimodal.RunnerLayoutBackend: its encoders return
rows numbered by call, its text_decoder records (rows, positions). The real program is run in
tests/cli/test_multimodal_cli.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fxport.runtime.audio import AudioError
from fxport.runtime.generate import generate
from fxport.runtime.multimodal import MultimodalError, build_prompt, prompt_ids

IMG, AUD, BOI, EOI, BOA, EOA, E = 95, 94, 92, 91, 90, 89, 5
CHUNK = 8


class FakeRunner:
    segmented = True
    has_images = has_audio = True

    def __init__(self):
        self.multimodal = dict(image_token_id=IMG, boi_token_id=BOI, eoi_token_id=EOI, audio_token_id=AUD,
                               boa_token_id=BOA, eoa_token_id=EOA, patch_size=2, pooling_kernel_size=2,
                               max_soft_tokens=6, bidirectional=True, max_audio_frames=40, n_mels=8)
        self.max_prefill_chunk, self.max_seq_len, self.vocab_size, self.bos_id = CHUNK, 64, 96, 2
        self.calls: list[tuple[str, list[int]]] = []
        self.encoded = 0

    def _rows(self, n: int) -> torch.Tensor:
        self.encoded += 1
        return torch.full((1, n + 2, E), float(self.encoded))

    def encode_image(self, image):
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.shape[1] % 4 == 0 == image.shape[2] % 4
        return self._rows(image.shape[1] // 4 * (image.shape[2] // 4))

    def encode_audio(self, features):
        assert features.shape[0] == 1 and features.shape[2] == 8
        F = features.shape[1]
        return self._rows(-(-(-(-F // 2)) // 2))

    def prefill(self, tokens, input_pos, embeddings=None):
        kind = "text" if embeddings is None else f"media{int(embeddings[0, 0, 0])}"
        if embeddings is not None:
            assert embeddings.shape[1] == tokens.shape[1]
        self.calls.append((kind, input_pos.tolist()))
        return torch.zeros(1, tokens.shape[1], 96)

    def decode(self, token, input_pos):
        self.calls.append(("decode", input_pos.tolist()))
        return torch.zeros(1, 1, 96)


def _img(h, w):
    return Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8), "RGB")


def _clip(frames: int):
    return np.zeros((frames, 8), np.float32), np.ones(frames, bool)


def test_segments_are_text_chunks_and_whole_encoder_outputs_at_the_running_position():
    be = FakeRunner()
    text = list(range(5, 15))  # 10 text tokens after the image
    ids = [2, 3, 4, IMG] + text
    r = generate(be, None, ids, 3, images=[_img(8, 8)], audio=_clip(13))
    # audio (no marker) after BOS: boa + 4 + eoa at 1..6; the image (marker) in place: boi + 4 + eoi
    assert r.prompt_tokens == [2, BOA] + [AUD] * 4 + [EOA, 3, 4, BOI] + [IMG] * 4 + [EOI] + text
    assert be.calls == [
        ("text", [0]), ("media2", list(range(1, 7))), ("text", [7, 8]), ("media1", list(range(9, 15))),
        ("text", list(range(15, 23))), ("text", [23, 24]), ("decode", [25]), ("decode", [26])]


def test_chunk_bounds_never_split_a_segment():
    be = FakeRunner()
    p = build_prompt(be, [2] + [7] * 9 + [IMG] + [7] * 3, [_img(8, 12)], bos_id=2)
    assert [(s, e) for s, e, _ in p.segments] == [(10, 18)] and p.runs == [(11, 17)]
    assert p.chunks(4) == [(0, 4), (4, 8), (8, 10), (10, 18), (18, 21)]
    assert p.features(10, 18)["embeddings"].shape == (1, 8, E) and p.features(0, 4) == {}


def test_marker_count_and_clip_length_errors_come_before_any_encoder_call():
    be = FakeRunner()
    with pytest.raises(MultimodalError, match=r"the prompt holds 2 image token\(s\) \(id 95\) but 1 image input\(s\)"):
        build_prompt(be, [2, IMG, IMG], [_img(8, 8)], bos_id=2)
    with pytest.raises(AudioError, match="the clip has 41 mel frames but the program's audio_encoder takes at most 40"):
        build_prompt(be, [2], [], _clip(41), bos_id=2)
    with pytest.raises(AudioError, match="the clip has 4 mel frames, fewer than the 5 the audio_encoder takes"):
        build_prompt(be, [2], [], _clip(4), bos_id=2)
    assert be.encoded == 0


def test_prompt_markers_without_chat():
    from fxport.tests.runtime.stock_runner_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    be = FakeRunner()
    ids = prompt_ids(tok, be, "ab <image> cd <audio>", images=1, audio=1, chat=False)
    assert ids == [2] + tok.encode("ab ", add_bos=False) + [IMG] + tok.encode(" cd ", add_bos=False) + [AUD]
    assert prompt_ids(tok, be, "plain text", chat=False) == "plain text"  # generate encodes it
    with pytest.raises(MultimodalError, match=r"the prompt has 2 <image> marker\(s\) but 1 --image file\(s\)"):
        prompt_ids(tok, be, "<image><image>", images=1, chat=False)


def _turn_tokenizer():
    from fxport.tests.runtime.stock_runner_helpers import SPECIALS, tiny_tokenizer
    from tokenizers import AddedToken

    tok = tiny_tokenizer(vocab_size=120, specials=SPECIALS + ["<|turn>", "<turn|>"])
    tok.backend.add_tokens([AddedToken("\n", normalized=False, special=False)])
    return tok


def test_stock_segments_hold_the_ids_fxport_lays_out():
    """The MultimodalRunner's segments, flattened with each image / clip as its one marker id, are
    the ids fxport's runtime expands (chat and markers); text stays fxport's token ids."""
    from fxport.runtime.multimodal import stock_segments
    from fxport.runtime.stock_multimodal_runner import Tokens

    tok = _turn_tokenizer()

    class Runner:  # what stock_segments reads of StockMultimodalRunner
        constants = {"get_max_audio_frames": 40}
        methods = ["text_decoder", "token_embedding", "vision_encoder"]
        pte = None

    be = FakeRunner()
    for prompt, chat in (("see <image> here", True), ("see <image> here", False), ("plain", False), ("plain", True)):
        segs = stock_segments(tok, Runner(), prompt, images=["img.png"], chat=chat)
        flat = [t for s in segs for t in (s if isinstance(s, Tokens) else [IMG])]
        want = prompt_ids(tok, be, prompt, images=1, chat=chat)
        if isinstance(want, str):  # generate encodes it with BOS; the image then goes after BOS
            want = [2, IMG] + tok.encode(want, add_bos=False)
        assert flat == want, (prompt, chat)
        assert [s for s in segs if not isinstance(s, Tokens)] == [("image", "img.png")]


def test_chat_text_for_the_text_runner():
    from fxport.runtime.multimodal import chat_text

    tok = _turn_tokenizer()
    assert chat_text(tok, " hi ") == "<|turn>user\nhi<turn|>\n<|turn>model\n"  # the runner adds BOS
    with pytest.raises(ValueError, match=r"chat: the prompt has 1 <image> marker\(s\) but 0 image input\(s\)"):
        chat_text(tok, "<image> hi")  # TextLLMRunner takes no images
