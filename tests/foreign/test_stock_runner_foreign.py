"""fxport's CPU passes keep a user's own program runnable by ExecuTorch's stock ``TextLLMRunner``.

Two programs written by other people's export scripts, tiny and with random weights, each lowered
to XNNPACK twice: as the user's script does (no fxport pass) and after
:func:`fxport.passes.apply` with :func:`fxport.lowering.xnnpack.cpu_passes` (RingBufferKVCache
on the sliding layer, the XNNPACK rewrites, LastTokenLogits, EdgeDecompositions). Both ``.pte``
files then run in ExecuTorch's runner in fresh processes (:func:`runner_in_fresh_process`, one per
program, both at once) with a ``tokenizers`` tokenizer over the model's 128 ids, and must give
the same greedy tokens, equal to the eager model's:

* ExecuTorch's Llama example (``executorch.examples.models.llama``, exported as ``export_llama``
  does: one method ``forward(tokens, {"input_pos": start})``, tokens of dynamic length, the
  metadata of ``_load_llama_model_metadata`` plus ``--metadata`` BOS/EOS). Layer 0 is a sliding
  layer (banded mask, window 6). Prefill chunks of up to ``get_max_seq_len`` = 8 tokens: the
  17-token prompt takes 3 calls. One deviation from ``export_llama``: its token dim is
  ``Dim(max=max_seq_len - 1)`` while the runner sends chunks of ``get_max_seq_len`` tokens, so
  its own program fails on any prompt of ``max_seq_len`` tokens or more ("Attempted to resize a
  bounded tensor with a maximum capacity of 7 elements to 8 elements"); this test exports up to
  ``max_seq_len``.
* transformers' Qwen2 the optimum-executorch way (``TorchExportableModuleForDecoderOnlyLM``,
  ``forward(input_ids, cache_position)``, ``seq_length_dim`` up to ``min(cache, window) - 1``,
  the metadata of optimum's ``save_config_to_constant_methods``: ``get_max_seq_len`` is the
  cache length, so the runner sends the prompt in one call). Layer 1 is a sliding layer
  (window 8) with a full-length static cache that RingBufferKVCache shrinks to 16 slots.
  transformers 5 views SDPA's output to (B, H, L, D) before its transpose; SDPAAsMatmul follows
  that view (``test_hf_sdpa_as_matmul_follows_transformers5_views``).

SDPADispatch is not in the set: its ``fxport::sdpa*`` ops have no ExecuTorch kernel, so no
CPU runner could load the result.

Both generate 24 tokens, past the window and around the ring. Positions stay below
``get_max_context_len``: ExecuTorch 1.5.1's runner does not stop there (it resolved 20 new tokens
after a 46-token prompt with 64 positions, and the program then read out of bounds).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.export import Dim

from fxport import contract
from fxport.lowering.xnnpack import apply_method_passes, cpu_passes
from fxport.tests.lowering.helpers import lower_fast
from fxport.tests.runtime.stock_runner_helpers import runner_in_fresh_process, tiny_tokenizer

pytest.importorskip("executorch")

V, NEW = 128, 24
SPECIALS, BOS, EOS = ["<unk>", "<s>", "</s>", "<pad>"], 1, 2  # Llama 2's ids
PLAIN, PASSES = "plain", "passes"

# Llama: 8-token chunks, 64 positions, layer 0 sees the last 6 positions -> a ring of
# max(2*6, 6 + 8 - 1) = 13 slots.
LLAMA_CHUNK, LLAMA_CONTEXT, LLAMA_WINDOW = 8, 64, 6
LLAMA_PROMPTS = ["the quick brown fox", "hi yo"]  # 17 ids with BOS (chunks 8, 8, 1); 5 ids
# Qwen2: 64 cache positions, window 8, calls of up to min(64, 8) - 1 = 7 tokens -> 16 slots.
HF_CACHE, HF_WINDOW = 64, 8
HF_CHUNK = min(HF_CACHE, HF_WINDOW) - 1
HF_PROMPTS = ["hi yo", "ok go"]  # 5 ids each with BOS


def tokenizer():
    return tiny_tokenizer(V, bos_id=BOS, eos_ids=(EOS,), specials=SPECIALS)


def randomize(model: torch.nn.Module, head: torch.nn.Linear) -> None:
    """Weights ~N(0, 0.3) on every matrix (norms stay 1): greedy decoding wanders instead of
    repeating one token. The head's rows of the 4 special ids are zero, so EOS never wins
    (logit 0 against random others) and every generation has its ``NEW`` tokens."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
        head.weight[: len(SPECIALS)] = 0


def pieces(tok, ids: list[int]) -> list[str]:
    """What the runner's HFTokenizer prints per token ("▁" as a space)."""
    return [tok.backend.id_to_token(i).replace("▁", " ") for i in ids]


def lower_both(tmp: Path, export, passes: list, metadata: dict) -> dict:
    """The user's lowering and fxport's, each of its own ``export()`` (one ``run_decompositions``
    of ExecuTorch's Llama program leaves pending unbacked symbols of ``input_pos.item()`` in its
    shape environment, copies included). Returns ``{"plain"/"passes": .pte, "results":
    PipelineResult, "reports": {name: DelegationReport}, "tokenizer": where it goes}``."""
    programs, results = apply_method_passes({"forward": export()}, {"forward": passes}, dump=False)
    out = {"results": results["forward"], "tokenizer": tmp / "tokenizer.json", "reports": {}, "metadata": metadata}
    for name, progs in ((PASSES, programs), (PLAIN, {"forward": export()})):
        lowered = lower_fast(progs, constant_methods=metadata)
        out[name], out["reports"][name] = tmp / f"{name}.pte", lowered.report
        out[name].write_bytes(lowered.buffer)
    return out


def run_both(built: dict, tok_json: Path, prompts: list[str]) -> dict[str, list[dict]]:
    """Both programs in ExecuTorch's runner, each in its own fresh process, at the same time."""
    with ThreadPoolExecutor(2) as pool:
        jobs = {name: pool.submit(runner_in_fresh_process, built[name], tok_json, prompts, NEW) for name in (PLAIN, PASSES)}
        return {name: job.result() for name, job in jobs.items()}


def forward_signature(pte: Path) -> tuple:
    """(input sizes, output sizes) of ``forward`` as the runner reads them (max shapes)."""
    from executorch.runtime import Runtime

    meta = Runtime.get().load_program(pte).metadata("forward")
    return ([tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())],
            [tuple(meta.output_tensor_meta(i).sizes()) for i in range(meta.num_outputs())])


def runner_problems(built: dict, name: str) -> list[str]:
    """:func:`fxport.contract.contract_problems` (what ``fxport dump`` reports) of one program,
    from its metadata and ``forward``'s max shapes (int64 inputs, float logits)."""
    inputs, outputs = forward_signature(built[name])
    meta = built["metadata"]
    return contract.contract_problems(["forward", *meta], meta, {"forward": [(torch.long, s) for s in inputs]},
                                      {"forward": [(torch.float32, s) for s in outputs]})


def stats(result, name: str) -> dict:
    record = next(r for r in result.records if r.name == name)
    return {"rewritten": record.stats.rewritten, "skipped": dict(record.stats.skipped)}


# ----------------------------------------------------------------------------- ExecuTorch's Llama


def build_llama(tmp: Path):
    """ExecuTorch's Llama example lowered both ways into ``tmp``, and the eager model's greedy
    pieces for ``LLAMA_PROMPTS``: ``(built, expected)``."""
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=V,
                     max_seq_len=LLAMA_CHUNK, max_context_len=LLAMA_CONTEXT, use_kv_cache=True,
                     enable_dynamic_shape=True)
    model = construct_transformer(args).eval()
    randomize(model, model.output)
    causal = torch.tril(torch.ones(LLAMA_CONTEXT, LLAMA_CONTEXT, dtype=torch.bool))
    model.layers[0].attention.mask.copy_(causal & ~torch.tril(causal, -LLAMA_WINDOW))  # keys p-5..p
    eager = copy.deepcopy(model)  # its caches stay out of the exported program's

    def export():  # as export_llama (LLMEdgeManager), but up to max_seq_len tokens (module docstring)
        with torch.no_grad():
            return torch.export.export(model, (torch.tensor([[2, 3, 4]]), {"input_pos": torch.tensor([0])}),
                                       dynamic_shapes=({1: Dim("token_dim", max=LLAMA_CHUNK)}, {"input_pos": {0: 1}}),
                                       strict=False)

    # _load_llama_model_metadata(...) with --metadata '{"get_bos_id": 1, "get_eos_ids": [2]}'
    meta = {"get_max_seq_len": LLAMA_CHUNK, "get_max_context_len": LLAMA_CONTEXT, "get_n_layers": 2,
            "get_vocab_size": V, "use_kv_cache": True, "use_sdpa_with_kv_cache": False,
            "enable_dynamic_shape": True, "get_bos_id": BOS, "get_eos_ids": [EOS]}
    windows = {f"layers.0.attention.kv_cache.{kv}_cache": LLAMA_WINDOW for kv in ("k", "v")}
    passes = cpu_passes(windows=windows, max_prefill_chunk=LLAMA_CHUNK)["prefill"]
    built = lower_both(tmp, export, passes, meta)

    tok = tokenizer()
    tok.save(built["tokenizer"])
    expected = []
    with torch.no_grad():
        for prompt in LLAMA_PROMPTS:  # the eager model, chunked as the runner chunks, then greedy
            m, ids = copy.deepcopy(eager), tok.encode(prompt)
            for start in range(0, len(ids), LLAMA_CHUNK):
                logits = m(torch.tensor([ids[start:start + LLAMA_CHUNK]]), {"input_pos": torch.tensor([start])})
            new = [int(logits[0].argmax())]
            while len(new) < NEW:
                logits = m(torch.tensor([new[-1:]]), {"input_pos": torch.tensor([len(ids) + len(new) - 1])})
                new.append(int(logits[0].argmax()))
            expected.append(pieces(tok, new))
    built["prompt_ids"] = [len(tok.encode(p)) for p in LLAMA_PROMPTS]
    return built, expected


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    built, expected = build_llama(tmp_path_factory.mktemp("llama"))
    return built, run_both(built, built["tokenizer"], LLAMA_PROMPTS), expected


def test_llama_example_passes_rewrite_it(llama):
    built, _, _ = llama
    res = built["results"]
    ring = next(r for r in res.records if r.name == "ring_buffer_kv_cache").stats
    assert [(s["buffer"], s["ring_size"], s["chunk"], s["write"]) for s in ring.sites] == [
        (f"layers.0.attention.kv_cache.{kv}_cache", 13, LLAMA_CHUNK, "index_copy") for kv in ("k", "v")]
    assert stats(res, "sdpa_as_matmul") == {"rewritten": 2, "skipped": {}}
    # The example already returns the last position's logits (generate_full_logits=False): (1, V).
    assert stats(res, "last_token_logits") == {"rewritten": 0, "skipped": {"head input is not rank 3 (B, L, H)": 1}}
    for name in (PLAIN, PASSES):  # what the runner reads is unchanged: start_pos (1,), logits (1, V)
        assert forward_signature(built[name]) == ([(1, LLAMA_CHUNK), (1,)], [(1, V)]), name
        assert runner_problems(built, name) == [], name


def test_llama_example_runner_tokens_unchanged_by_passes(llama):
    built, gens, expected = llama
    prompt_tokens = built["prompt_ids"]
    assert prompt_tokens == [17, 5]  # 17 > one chunk of 8: the runner prefills in 3 calls
    for name in (PLAIN, PASSES):
        assert [g["prompt_tokens"] for g in gens[name]] == prompt_tokens, name
        assert [g["pieces"] for g in gens[name]] == expected, name
    for got in expected:  # 17 + 24 positions: past the window (6), three times around the ring (13)
        assert len(got) == NEW and len(set(got)) > NEW // 3, got


# ----------------------------------------------------------------------------- transformers / optimum


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=HF_CACHE,
                         use_sliding_window=True, sliding_window=HF_WINDOW, max_window_layers=1,
                         tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).eval()
    randomize(model, model.lm_head)
    model.generation_config.cache_implementation = "static"
    return model


def export_optimum_style(model):
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=HF_CACHE)
    L = Dim("seq_length_dim", max=HF_CHUNK)
    with torch.no_grad():
        return exportable.export(input_ids=torch.zeros(1, 3, dtype=torch.long), cache_position=torch.arange(3),
                                 dynamic_shapes={"input_ids": {1: L}, "cache_position": {0: L}}, strict=True)


# optimum-executorch's save_config_to_constant_methods(config, generation_config, max_seq_len=64)
HF_META = {"get_dtype": 6, "get_bos_id": BOS, "get_eos_id": EOS, "get_eos_ids": [EOS], "get_head_dim": 32 / 4,
           "get_n_kv_heads": 2, "get_n_layers": 2, "get_vocab_size": V, "get_max_batch_size": 1,
           "get_max_seq_len": HF_CACHE, "use_kv_cache": True, "sliding_window": HF_WINDOW,
           "use_sdpa_with_kv_cache": False, "enable_dynamic_shape": True}


def hf_passes():
    windows = {f"{kv}_cache_1": HF_WINDOW for kv in ("key", "value")}  # layer 1 is the sliding one
    return cpu_passes(windows=windows)["prefill"]


def build_hf(tmp: Path):
    """The optimum-style Qwen2 lowered both ways into ``tmp``, and transformers' greedy pieces
    for ``HF_PROMPTS``: ``(built, expected)``."""
    model = qwen2()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ep = export_optimum_style(model)  # apply() copies it; one lowering of it after the other works
    built = lower_both(tmp, lambda: ep, hf_passes(), HF_META)
    tok = tokenizer()
    tok.save(built["tokenizer"])
    expected = []
    with torch.no_grad():
        for prompt in HF_PROMPTS:  # transformers' own forward over the whole sequence, greedy
            ids = tok.encode(prompt)
            while len(ids) < len(tok.encode(prompt)) + NEW:
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(pieces(tok, ids[-NEW:]))
    return built, expected


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    built, expected = build_hf(tmp_path_factory.mktemp("qwen2"))
    return built, run_both(built, built["tokenizer"], HF_PROMPTS), expected


def test_hf_optimum_style_passes_rewrite_it(hf):
    built, _, _ = hf
    res = built["results"]
    ring = next(r for r in res.records if r.name == "ring_buffer_kv_cache").stats
    assert [(s["buffer"], s["ring_size"], s["chunk"]) for s in ring.sites] == [
        (f"{kv}_cache_1", 16, HF_CHUNK) for kv in ("key", "value")]
    assert stats(res, "last_token_logits") == {"rewritten": 1, "skipped": {}}
    # LastTokenLogits changes what the runner reads, (1, T, V) -> (1, 1, V): the runner takes the
    # last row of a (1, T', V) output, so it reads the same logits.
    inputs = [(1, HF_CHUNK), (HF_CHUNK,)]  # tokens and cache_position (T,)
    assert forward_signature(built[PLAIN]) == (inputs, [(1, HF_CHUNK, V)])
    assert forward_signature(built[PASSES]) == (inputs, [(1, 1, V)])
    # optimum's own metadata, unchanged by the passes: the runner would send a prompt of up to
    # 64 tokens in one call, which both programs refuse (hence 5-token prompts here)
    for name in (PLAIN, PASSES):
        assert runner_problems(built, name) == [
            "constant method get_max_context_len is missing",  # the runner then takes get_max_seq_len
            f"get_max_seq_len = {HF_CACHE} but forward accepts at most {HF_CHUNK} tokens per call; "
            "get_max_seq_len must be the largest prefill chunk"], name


def test_hf_optimum_style_runner_tokens_unchanged_by_passes(hf):
    _, gens, expected = hf
    for name in (PLAIN, PASSES):
        assert [g["prompt_tokens"] for g in gens[name]] == [5, 5], name
        assert [g["pieces"] for g in gens[name]] == expected, name
    for got in expected:  # 5 + 24 positions: past the window (8) and around the ring (16)
        assert len(got) == NEW and len(set(got)) > NEW // 3, got


def test_hf_sdpa_as_matmul_follows_transformers5_views(hf):
    """transformers 5's ``sdpa_attention_forward`` views SDPA's output to (B, H, L, D) before
    ``transpose(1, 2).reshape(B, L, H*D)`` (both recorded as views); SDPAAsMatmul's matmul output is
    (B, H, L, D)-contiguous, so every view on that path becomes a reshape (before the fix the last
    view stayed and the re-trace failed: "Cannot view a tensor with shape [1, s, 4, 8] ...")."""
    built, _, _ = hf
    assert stats(built["results"], "sdpa_as_matmul") == {"rewritten": 2, "skipped": {}}
