"""ExecuTorch's own ``MultimodalRunner`` driving a fxport multimodal program (the runner layout).

``executorch.extension.llm.runner.MultimodalRunner`` (Python bindings of the C++
``extension/llm/runner``, the runner behind ExecuTorch's multimodal apps) loads the ``.pte``, its
``.ptd`` weights and the ``tokenizer.json`` beside it and runs a prompt given as segments. The
program is the one :func:`fxport.builder.multimodal.export_runner_multimodal_pte` writes (``fxport
export`` on a multimodal checkpoint); its docstring states the layout. A user's own script::

    import executorch.kernels.quantized            # the quantized ops the program may use
    from executorch.extension.llm.runner import (GenerationConfig, MultimodalRunner, make_audio_input,
                                                 make_image_input, make_text_input)
    runner = MultimodalRunner("model.pte", "model.tokenizer/tokenizer.json", "model.ptd")
    image = ...  # uint8 (3, H, W), resized to fxport.runtime.image.target_size(...)
    runner.generate([make_text_input("<bos>Describe "), make_image_input(image), make_text_input(" please")],
                    GenerationConfig(echo=False, max_new_tokens=32, temperature=0.0))

:class:`StockMultimodalRunner` wraps it as :class:`fxport.runtime.stock_runner.StockRunner` wraps
``TextLLMRunner``: the runner's printf / log output kept off the terminal (fds 1 and 2 captured
around each call), failures as :class:`StockRunnerError` with the runner's own reason, and the
caller's inputs (text, token ids, images, log-mel features) turned into the runner's segments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch


from .stock_runner import RunnerGeneration, StockRunnerError, _native_output, rss_bytes, run_generation, runner_files


class Tokens(list):
    """A prompt segment given as token ids (``make_token_input``): no tokenizer, no BOS added."""


def image_segment(image: Any, patch_size: int, pooling_kernel_size: int, max_soft_tokens: int) -> torch.Tensor:
    """What goes to ``make_image_input``: the image (path, PIL image) converted to RGB and resized as
    transformers' processor resizes it (:func:`fxport.runtime.image.target_size`, bicubic), as a
    uint8 (3, H, W) tensor (channels first: ExecuTorch 1.5.1's ``make_image_input`` reads every
    3-D tensor as (C, H, W); its "channels last" branch only matches 4-D strides). A uint8 tensor
    is passed on as it is."""
    if isinstance(image, torch.Tensor):
        return image
    import numpy as np
    from PIL import Image

    from .image import load_image, target_size

    im = load_image(image)
    w, h = im.size
    th, tw = target_size(h, w, patch_size, max_soft_tokens * pooling_kernel_size**2, pooling_kernel_size)
    if (th, tw) != (h, w):
        im = im.resize((tw, th), resample=Image.BICUBIC)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)))


class StockMultimodalRunner:
    """ExecuTorch's ``MultimodalRunner`` over a program in the runner layout.

    pte: the program; tokenizer: its ``tokenizer.json`` (default: beside the program, as ``fxport
    export`` writes it); data: its ``.ptd`` weights (default: ``<stem>.ptd`` when it exists).
    verbose: show the runner's log. Raises :class:`StockRunnerError` when a file is missing or the
    runner cannot load the program.
    """

    def __init__(self, pte: str | Path, tokenizer: str | Path | None = None, data: str | Path | None = None,
                 *, verbose: bool = False):
        pte, tokenizer, data = runner_files(pte, tokenizer, data)
        self.pte, self.tokenizer, self.data, self.verbose = pte, tokenizer, data, verbose
        self.rss_before = rss_bytes()
        with _native_output(verbose):
            from fxport.contract import load_llm_kernels

            load_llm_kernels()  # the quantized ops and llama::custom_sdpa for the runner's kernel registry
            from executorch.extension.llm.runner import MultimodalRunner
            from executorch.runtime import Runtime

            try:
                program = Runtime.get().load_program(str(pte))
                names = set(program.method_names)
                self.constants = {name: _constant(program, name) for name in names
                                  if name.startswith(("get_", "use_", "enable_"))}
                self.methods = sorted(n for n in names if n not in self.constants)
                self._runner = MultimodalRunner(str(pte), str(tokenizer), None if data is None else str(data))
            except Exception as exc:  # the bindings raise RuntimeError with the runner's status
                raise StockRunnerError(f"ExecuTorch's MultimodalRunner cannot load {pte}: {exc}") from None
        from fxport import contract

        missing = [m for m in (contract.TOKEN_EMBEDDING, contract.TEXT_DECODER) if m not in self.methods]
        if missing:
            raise StockRunnerError(f"{pte} has no {' / '.join(missing)} method (methods: {self.methods}): it is not in "
                                   "the runner layout; re-export it with `fxport export` (a multimodal checkpoint)")

    def segments(self, prompt: Sequence[Any]) -> list:
        """The runner's inputs for ``prompt``: ``str`` -> ``make_text_input`` (keep it within
        ``get_max_seq_len`` tokens), :class:`Tokens` -> ``make_token_input`` per ``get_max_seq_len``
        ids (each segment is one text_decoder call: a chunked prefill), ``("image", x)`` ->
        ``make_image_input`` (x: a path, PIL image or uint8 tensor; see :func:`image_segment`), ``("audio", features)`` -> ``make_audio_input``
        (float32 (1, F, n_mels) or (F, n_mels) log-mel frames, the real ones only)."""
        from executorch.extension.llm.runner import make_audio_input, make_image_input, make_text_input, make_token_input

        from fxport import contract

        out = []
        chunk = int(self.constants[contract.MAX_SEQ_LEN])
        for seg in prompt:
            if isinstance(seg, Tokens):  # the runner puts a segment in one text_decoder call: split at its bound
                ids = [int(t) for t in seg]
                out += [make_token_input(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
            elif isinstance(seg, str):
                out.append(make_text_input(seg))
            elif isinstance(seg, tuple) and len(seg) == 2 and seg[0] == "image":
                if contract.VISION_ENCODER not in self.methods:
                    raise StockRunnerError(f"{self.pte} has no vision_encoder method; it takes no images")
                c = self.constants
                img = image_segment(seg[1], c[contract.PATCH_SIZE], c[contract.POOLING_KERNEL_SIZE],
                                    c[contract.MAX_SOFT_TOKENS])
                self._check_image(img)
                out.append(make_image_input(img.contiguous()))
            elif isinstance(seg, tuple) and len(seg) == 2 and seg[0] == "audio":
                if contract.AUDIO_ENCODER not in self.methods:
                    raise StockRunnerError(f"{self.pte} has no audio_encoder method; it takes no audio")
                feats = torch.as_tensor(seg[1], dtype=torch.float32)
                feats = feats[None] if feats.dim() == 2 else feats
                self._check_audio(feats)
                out.append(make_audio_input(feats.contiguous()))
            else:
                raise StockRunnerError(f"prompt segment {type(seg).__name__} {seg!r:.60}: pass text, Tokens([...]), "
                                       "('image', image) or ('audio', features)")
        return out

    def _check_image(self, img: torch.Tensor) -> None:
        """The program's image contract, checked before the runner (which checks only upper bounds:
        the graph drops pixels past whole cells, so a wrong size would be a silently cropped image)."""
        from fxport import contract

        c = self.constants
        side = c[contract.PATCH_SIZE] * c[contract.POOLING_KERNEL_SIZE]
        cells = c[contract.MAX_IMAGE_CELLS]
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise StockRunnerError(f"image tensor {img.dtype} {tuple(img.shape)}: the vision_encoder takes uint8 (3, H, W)")
        h, w = img.shape[1], img.shape[2]
        if h % side or w % side or not (2 <= h // side <= cells and 2 <= w // side <= cells):
            raise StockRunnerError(f"image of {h}x{w} pixels: the vision_encoder takes sides that are multiples of {side} "
                                   f"pixels, 2 to {cells} cells each; resize it with fxport.runtime.image.target_size "
                                   "(pass a path or PIL image and it is done for you)")
        if (h // side) * (w // side) > c[contract.MAX_SOFT_TOKENS]:
            raise StockRunnerError(f"image of {h}x{w} pixels gives {(h // side) * (w // side)} soft tokens, more than the "
                                   f"program's {c[contract.MAX_SOFT_TOKENS]}; resize it with "
                                   "fxport.runtime.image.target_size")

    def _check_audio(self, feats: torch.Tensor) -> None:
        from fxport import contract
        from fxport.models.gemma4.runner_methods import MIN_AUDIO_FRAMES

        top = self.constants.get(contract.MAX_AUDIO_FRAMES, 0)
        if feats.dim() != 3 or feats.shape[0] != 1 or not MIN_AUDIO_FRAMES <= feats.shape[1] <= top:
            raise StockRunnerError(f"audio features {tuple(feats.shape)}: the audio_encoder takes (1, F, n_mels) with F in "
                                   f"[{MIN_AUDIO_FRAMES}, {top}] frames (the real frames of one clip; split a longer clip)")

    def generate(self, prompt: Sequence[Any], max_new_tokens: int, *, temperature: float = 0.0, num_bos: int = 0,
                 on_piece: Callable[[str], None] | None = None, warmup: bool = False) -> RunnerGeneration:
        """Greedy (``temperature=0``) generation of up to ``max_new_tokens`` after the segments of
        ``prompt`` (see :meth:`segments`). Every call starts a new sequence (the runner is reset).
        ``num_bos=1`` makes the runner's tokenizer prepend BOS to a first text segment."""
        return run_generation(self._runner, "MultimodalRunner", self.pte, self.verbose, self.segments(prompt),
                              max_new_tokens, temperature=temperature, num_bos=num_bos, on_piece=on_piece,
                              warmup=warmup, reason=_error_lines)

    def rss_delta(self) -> int:
        """Bytes of RSS this runner added: RSS now minus RSS before it was created."""
        return rss_bytes() - self.rss_before


def _constant(program, name: str):
    value = program.load_method(name).execute([])[0]
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _error_lines(log: list[str]) -> str:
    """MultimodalRunner's failure in its log: its last two error / "Check failed" lines."""
    return " / ".join([line.split("] ", 1)[-1] for line in log if "rror" in line or "Check failed" in line][-2:])
