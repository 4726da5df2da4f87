"""fxport's Gemma chat prompt ids == transformers' ``apply_chat_template`` ids (tiny tokenizer).

transformers 5.23 ships no Gemma 4 chat template (checkpoints carry ``chat_template.jinja``), so
the reference is transformers rendering the published template's structure, written below from
llama.cpp's copy (models/templates/gemma4.jinja: the parts for system / user / model turns with
text, image and audio items, and the generation prompt), and Gemma 3's template as transformers'
gemma3 processor test fixture writes it. Equality is exact (token ids).
"""

from __future__ import annotations

import pytest
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from fxport.models.gemma4.tokenizer import (
    chat_format_of,
    encode_chat,
    load_tokenizer,
    split_media_markers,
    user_message,
)

from fxport.tests.runtime.stock_runner_helpers import SPECIALS, tiny_tokenizer

GEMMA4 = ["<|turn>", "<turn|>", "<|image|>", "<|audio|>", "<|channel>", "<channel|>", "<|image>", "<image|>",
          "<|audio>", "<audio|>"]

GEMMA4_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}"
    "{{- '<|turn>system\\n' -}}{{- messages[0]['content'] | trim -}}{{- '<turn|>\\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' }}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- elif message['content'] is sequence -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- elif item['type'] == 'image' -%}{{- '\\n\\n<|image|>\\n\\n' -}}"
    "{%- elif item['type'] == 'audio' -%}{{- '<|audio|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}"
    "{%- if THOUGHT and not enable_thinking | default(false) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}"
    "{%- endif -%}"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def _pair(extra_specials, template: str):
    """(fxport Tokenizer, transformers tokenizer) over the same tiny vocabulary with "\\n"."""
    tok = tiny_tokenizer(vocab_size=300, specials=SPECIALS + extra_specials)
    tok.backend.add_tokens([AddedToken("\n", normalized=False, special=False)])
    tok.chat_template = template
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token="<bos>", eos_token="<eos>",
                                 pad_token="<pad>", unk_token="<unk>")
    return tok, hf


def _hf_ids(hf, messages, template) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, chat_template=template)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


CONVERSATIONS = [
    [{"role": "user", "content": "what is in the picture?"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "hello there "}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "more please"}],
]


@pytest.mark.parametrize("thought", [False, True])
@pytest.mark.parametrize("messages", CONVERSATIONS + [
    [user_message("compare <image> with <image> and say it", images=2)],
    [user_message("describe it", images=1, audio=1)],
    [{"role": "system", "content": "You listen."}, user_message("<audio> what was said? <image>", images=1, audio=1)],
])
def test_gemma4_chat_ids_equal_transformers(messages, thought):
    template = GEMMA4_TEMPLATE.replace("THOUGHT", "true" if thought else "false")
    tok, hf = _pair(GEMMA4, template)
    if thought:  # the 26B / 31B templates write the closed thought channel literally
        tok.chat_template = template.replace("THOUGHT", "") + "{{- '<|channel>thought\\n<channel|>' -}}"
    else:
        tok.chat_template = None
    assert chat_format_of(tok) == "gemma4"
    ids = encode_chat(tok, messages, image_token_id=tok.token_to_id("<|image|>"),
                      audio_token_id=tok.token_to_id("<|audio|>"))
    assert ids == _hf_ids(hf, messages, template)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_gemma3_chat_ids_equal_transformers(messages):
    tok, hf = _pair(["<start_of_turn>", "<end_of_turn>"], GEMMA3_TEMPLATE)
    assert chat_format_of(tok) == "gemma3"
    assert encode_chat(tok, messages) == _hf_ids(hf, messages, GEMMA3_TEMPLATE)


def test_media_markers_and_placement():
    assert split_media_markers("a <image> b<|audio|>") == ["a ", {"type": "image"}, " b", {"type": "audio"}]
    assert user_message("text", images=2, audio=1)["content"] == [
        {"type": "image"}, {"type": "image"}, {"type": "audio"}, {"type": "text", "text": "text"}]
    with pytest.raises(ValueError, match=r"the prompt has 1 <image> marker\(s\) but 2 image input\(s\) were given"):
        user_message("<image> x", images=2)


def test_no_turn_tokens_is_refused():
    with pytest.raises(ValueError, match="neither <\\|turn> \\(Gemma 4\\) nor <start_of_turn>"):
        encode_chat(tiny_tokenizer(), CONVERSATIONS[0])


def test_chat_template_travels_with_the_tokenizer_sidecar(tmp_path):
    from fxport.builder import fill_tokenizer_dir

    tok, _ = _pair(GEMMA4, "{{ bos_token }}template")
    fill_tokenizer_dir(tok, tmp_path)  # what fxport export writes to MODEL.tokenizer/
    assert load_tokenizer(tmp_path).chat_template == "{{ bos_token }}template"
    tok.chat_template = None
    fill_tokenizer_dir(tok, tmp_path / "base")
    assert load_tokenizer(tmp_path / "base").chat_template is None
