"""Prompt reduction across Hugging Face decoder families (random weights, mixtures of experts among them):
the graph analysis finds causal SDPA, RoPE (full or partial) and the caches from the graph alone, so
FastV must equal a reference built from each model's own code, with both position policies; and models
it cannot serve are refused in one line. The reference never re-implements a layer: FastV's score comes
from the model's eager attention probabilities, and the reduced forward is the model's own forward with
hooks that keep the chosen rows from layer K on."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_decoder import reference_kept

from tokencompile.decoder import compile_decoder, generate, prefill, teacher_forced_logits
from tokencompile.decoder.analysis import Span
from tokencompile.errors import TokenCompileError, UnsupportedModelError

TOKENS, CONTINUATION, LAYER, SPAN, KEPT = 24, 5, 2, (4, 16), 8
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1)
# family: (config, model, config options); head_dim given where a family derives it otherwise
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),              # q / k RMS norms
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),                        # sliding window 4096
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),               # scaled embeddings
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),                # fused qkv projection
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),                        # attention multiplier
    "phi": ("PhiConfig", "PhiForCausalLM", {}),                                    # partial rotary, parallel
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),                     # partial rotary
    # mixtures of experts: [B*N*k] token-expert pairs sorted by expert (Hugging Face's grouped experts)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2,  # + shared
                                                            "moe_intermediate_size": 32,
                                                            "shared_expert_intermediate_size": 64}),
    # layers without positions (NoPE) among RoPE layers: renumbering must leave their cached keys as they are
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"pad_token_id": 0}),       # layer 3 of 4 NoPE
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {"sliding_window": 64}),    # global layers NoPE
    # parallel blocks (attention and MLP read the same input): reduced at the block's output
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"use_parallel_residual": True}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": False, "parallel_attn": True}),
    "falcon_new": ("FalconConfig", "FalconForCausalLM", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    # positions=keep only: learned positions added before the first layer (OPT); interleaved rotary pairs and
    # multi-head latent attention, whose keys are filled in place by two copy_ (DeepSeek V2 / V3)
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", MLA | {"n_group": 1, "topk_group": 1}),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", MLA),
    # eager attention only (no SDPA): soft-capped logits, a cap that bites on random weights (a q / k probe
    # without it keeps other tokens), so FastV must read the model's own probabilities
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 64,
                                                     "attn_logit_softcapping": 0.02}),
}
DEFAULT_RUN = {"phi", "mixtral", "smollm3", "gpt_neox", "gemma2"}  # partial rotary; experts; NoPE; parallel; eager
KEEP_ONLY = {"opt", "deepseek_v3", "deepseek_v2"}
EAGER_ONLY = {"gemma2"}


def build(family: str, attention: str | None = None, **changes) -> torch.nn.Module:
    config_name, model_name, options = FAMILIES[family]
    attention = attention or ("eager" if family in EAGER_ONLY else "sdpa")
    config = getattr(transformers, config_name)(**{**COMMON, **options, **changes}, attn_implementation=attention)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def families():
    return [family if family in DEFAULT_RUN else pytest.param(family, marks=pytest.mark.sweep)
            for family in FAMILIES]


def kept_rows(model, family: str, ids: torch.Tensor) -> torch.Tensor:
    """[B, n] prompt rows kept: outside the span, and the span's KEPT best by the last token's attention
    probabilities at layer LAYER - 1 (mean over heads), read from the model's eager twin."""
    twin = build(family, "eager")
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        scores = twin(input_ids=ids, output_attentions=True).attentions[LAYER - 1][:, :, -1].mean(1)
    return reference_kept(scores, Span(*SPAN).removable(ids), KEPT)


def reference_logits(model, ids: torch.Tensor, rows: torch.Tensor, renumber: bool) -> torch.Tensor:
    """The model's own forward over ``ids`` where layers >= LAYER see only ``rows`` [B, n]: a pre-hook on
    each of them gathers the hidden states (at LAYER), the rotary tables (at the rows' positions, or the
    first n with ``renumber``), the mask and the positions."""
    def gather(value, first: bool):
        if isinstance(value, tuple):
            return tuple(gather(v, first) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        n = rows.shape[1]
        if value.dim() == 4 and value.shape[-1] == ids.shape[1]:   # a mask [B, 1, N, N]
            picked = value.expand(rows.shape[0], *value.shape[1:])
            picked = picked.gather(2, rows[:, None, :, None].expand(-1, picked.shape[1], -1, picked.shape[3]))
            return picked.gather(3, rows[:, None, None, :].expand(-1, picked.shape[1], n, -1))
        if value.dim() == 3 and value.shape[1] == ids.shape[1]:    # hidden states, cos / sin [B, N, D]
            if renumber and not first:
                return value[:, :n]
            return value.expand(rows.shape[0], -1, -1).gather(1, rows[..., None].expand(-1, -1, value.shape[-1]))
        if value.dim() == 2 and value.shape[1] == ids.shape[1]:    # position ids [B, N]
            return torch.arange(n)[None].expand_as(rows) if renumber else value.expand_as(ids).gather(1, rows)
        return value

    def hook(module, args, kwargs, first):
        if args:
            args = (gather(args[0], True) if first else args[0], *args[1:])
        else:
            kwargs["hidden_states"] = gather(kwargs["hidden_states"], True) if first else kwargs["hidden_states"]
        return args, {k: gather(v, False) if k != "hidden_states" else v for k, v in kwargs.items()}

    handles = [layer.register_forward_pre_hook(lambda m, a, k, first=index == LAYER: hook(m, a, k, first),
                                               with_kwargs=True)
               for index, layer in enumerate(decoder_layers(model)) if index >= LAYER]
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def decoder_layers(model) -> torch.nn.ModuleList:
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                and len(m) == model.config.num_hidden_layers)


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, TOKENS), generator=generator), \
        torch.randint(0, 256, (2, CONTINUATION), generator=generator)


@pytest.mark.parametrize("family", families())
def test_fastv_equals_the_models_own_code(family, prompts):
    model = build(family)
    ids, continuation = prompts
    kept = kept_rows(model, family, ids)
    rows = torch.cat([kept, torch.arange(TOKENS, TOKENS + CONTINUATION).expand(2, -1)], 1)
    for positions in ("keep",) if family in KEEP_ONLY else ("keep", "renumber"):
        program = compile_decoder(model, ids, keep=KEPT / SPAN[1], layer=LAYER, span=SPAN, positions=positions)
        assert program.tokens_per_layer == [24, 24, 16, 16]
        expected = reference_logits(model, torch.cat([ids, continuation], 1), rows, positions == "renumber")
        torch.testing.assert_close(teacher_forced_logits(program, ids, continuation),
                                   expected[:, -CONTINUATION - 1:-1], atol=1e-4, rtol=1e-4)
    full = compile_decoder(model, ids[:1], budget=1.0)
    assert torch.equal(generate(full, ids, 8), model.generate(ids, max_new_tokens=8, do_sample=False))


def test_attention_prompt_reduction_cannot_serve_is_refused(prompts):
    """Attention outside the graph (flex attention), eager attention with extra logit columns (GPT-OSS's
    sinks) or masked by where (GPT-Neo), ALiBi biases (Falcon's option, MPT, Bloom) and sparse attention over
    an indexer's top-k keys (DeepSeek V3.2, which kept its own indexer cache and crashed in decoding) are
    refused in one line."""
    with pytest.raises(UnsupportedModelError) as error:
        compile_decoder(build("qwen3", "flex_attention"), prompts[0], keep=0.5)
    assert str(error.value) == ("the language model computes attention with 'flex_attention'; prompt reduction reads "
                                "causal attention from the graph (load it with attn_implementation='sdpa' (or "
                                "'eager' where the model has no SDPA))")
    gpt_oss = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **{**COMMON, "num_hidden_layers": 2}, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")).eval()
    with pytest.raises(UnsupportedModelError, match=r"^no attention found in the language model's graph: prompt "
                                                    r"reduction reads SDPA, or eager attention as matmul -> softmax "
                                                    r"-> matmul with an additive mask \(load the model with "):
        compile_decoder(gpt_oss, prompts[0], budget=1.0)
    with pytest.raises(UnsupportedModelError, match=r"^FalconForCausalLM adds ALiBi position biases to its attention "
                                                    r"\(alibi in its config\), which prompt reduction does not "):
        compile_decoder(build("falcon", alibi=True), prompts[0], budget=1.0)
    mpt = transformers.MptForCausalLM(transformers.MptConfig(vocab_size=256, d_model=64, n_heads=4, n_layers=2))
    with pytest.raises(UnsupportedModelError, match=r"^MptForCausalLM adds ALiBi position biases"):
        compile_decoder(mpt.eval(), prompts[0], budget=1.0)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedModelError, match=r"^no attention found in the language model's graph"):
        compile_decoder(bloom.eval(), prompts[0], budget=1.0)   # ALiBi through baddbmm: not read as attention
    # GPT-Neo's local layers mask a window with where(): a check of the added mask alone would pass it, and
    # decoding on a reduced cache would measure the window in cache slots
    gpt_neo = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=256, max_position_embeddings=256)).eval()
    with pytest.raises(UnsupportedModelError) as error:
        compile_decoder(gpt_neo, prompts[0], budget=1.0)
    assert str(error.value) == ("the eager attention of blocks [0, 1] masks its logits with where / masked_fill (e.g. "
                                "a local attention window), which prompt reduction cannot check; it reads a mask "
                                "added to the logits right before the softmax (load the model with "
                                "attn_implementation='sdpa' where it has SDPA)")
    sparse = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(
        **{**COMMON, **MLA, "num_hidden_layers": 2}, n_group=1, topk_group=1, index_topk=64, index_n_heads=2,
        index_head_dim=16, attn_implementation="sdpa")).eval()
    with pytest.raises(UnsupportedModelError, match=r"^DeepseekV32ForCausalLM uses sparse attention: an indexer "
                                                    r"picks the keys each query attends to \(config.index_topk\)"):
        compile_decoder(sparse, prompts[0], budget=1.0)


@pytest.mark.slow  # about 15 s
def test_zipcache_reads_eager_attention_probabilities(prompts):
    """ZipCache on Gemma 2 keeps the tokens of the saliency computed from the model's own attention
    probabilities (each key over the probes that see it) and then equals the model's own forward. (On these
    random weights q . k / sqrt(d) ranks the keys alike; tests/test_decoder_span_scores.py checks the score
    itself.)"""
    from tokencompile.methods.zipcache import probe_slices

    model = build("gemma2")
    ids, continuation = prompts
    with torch.no_grad():
        attention = model(input_ids=ids, output_attentions=True).attentions[LAYER - 1]            # [B, H, N, N]
    rows = torch.cat([torch.arange(TOKENS)[slice(*s)] for s in probe_slices(TOKENS, 0.2)])
    seen = torch.arange(TOKENS)[None, :] <= rows[:, None]                                          # [P, N]
    saliency = (attention[:, :, rows].mean(1) * seen).sum(1) / seen.sum(0).clamp(min=1)
    kept = reference_kept(saliency, Span(*SPAN).removable(ids), KEPT)
    program = compile_decoder(model, ids, keep=KEPT / SPAN[1], layer=LAYER, span=SPAN, method="zipcache",
                              options={"probes": 0.2})
    rows = torch.cat([kept, torch.arange(TOKENS, TOKENS + CONTINUATION).expand(2, -1)], 1)
    expected = reference_logits(model, torch.cat([ids, continuation], 1), rows, False)
    torch.testing.assert_close(teacher_forced_logits(program, ids, continuation),
                               expected[:, -CONTINUATION - 1:-1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # two ONNX exports: about 40 s
def test_eager_attention_pads_and_exports(prompts, tmp_path):
    """Gemma 2 (eager): a left-padded prompt gives what it gives alone (the model's own mask keeps the
    probe off the padding), and the ONNX graphs generate like the program."""
    from tokencompile.decoder.onnx_export import OnnxRunner, export_decoder_onnx

    model = build("gemma2", pad_token_id=0)
    ids, continuation = prompts
    ids, mask = ids.clone(), torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    padded = compile_decoder(model, ids, keep=KEPT / SPAN[1], layer=LAYER, span=SPAN, padding=True)
    forced = teacher_forced_logits(padded, ids, continuation, attention_mask=mask)
    # padding is removed first: the 8 removed slots take the 6 padding tokens and 2 of the span's 14 real ones
    # (4 real tokens follow the span)
    kept = int(prefill(padded, ids, {"attention_mask": mask})[1][-1][2][1].sum()) - 4
    assert kept == 12
    alone = compile_decoder(model, ids[1:, 6:], keep=kept / 14, layer=LAYER, span=(0, 14))
    torch.testing.assert_close(forced[1:], teacher_forced_logits(alone, ids[1:, 6:], continuation[1:]),
                               atol=1e-5, rtol=1e-4)
    export_decoder_onnx(padded, str(tmp_path))
    runner = OnnxRunner(str(tmp_path))
    assert torch.equal(generate(runner, ids, 8, attention_mask=mask), generate(padded, ids, 8, attention_mask=mask))


def test_decoders_that_are_not_causal_attention_caches_are_refused(prompts):
    """A prompt attended both ways (Gemma with use_bidirectional_attention, as PaliGemma's prefix and
    EmbeddingGemma use it) and hybrids whose cache holds convolution or state-space states (Falcon-H1, LFM2)
    are refused in one line: the first would otherwise be compiled as a causal prefill, silently different
    from the model, and Falcon-H1's Mamba states would be dropped from its cache."""
    with pytest.raises(UnsupportedModelError) as error:
        compile_decoder(build("gemma", use_bidirectional_attention=True), prompts[0], budget=1.0)
    assert str(error.value) == ("GemmaForCausalLM's language model lets the prompt's tokens attend both ways "
                                "(use_bidirectional_attention, e.g. PaliGemma's prefix over the image and the "
                                "prompt); prompt reduction and decoding on the reduced cache need causal attention "
                                "(use a causal decoder)")
    falcon_h1 = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(
        **{**COMMON, "num_hidden_layers": 2}, attn_implementation="sdpa")).eval()  # attention and Mamba in a layer
    with pytest.raises(UnsupportedModelError, match="^the model's cache holds LinearAttentionAndFullAttentionLayer "
                                                    "layers besides key / value attention"):
        compile_decoder(falcon_h1, prompts[0], budget=1.0)
    hybrid = transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        **{**COMMON, "num_hidden_layers": 2}, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
        attn_implementation="sdpa")).eval()
    with pytest.raises(UnsupportedModelError) as error:
        compile_decoder(hybrid, prompts[0], budget=1.0)
    assert str(error.value).startswith("the model's cache holds LinearAttentionLayer layers besides key / value "
                                       "attention (a hybrid of attention and convolution or state-space layers)")


def test_renumbering_needs_the_rotary_tables(prompts):
    """GPT-J rotates interleaved channel pairs from its own sin / cos table: the graph has no cos / sin pair to
    renumber, so positions=renumber is refused when compiling (it was compiled as keep under its name)."""
    gptj = transformers.GPTJForCausalLM(transformers.GPTJConfig(
        vocab_size=256, n_embd=64, n_layer=4, n_head=4, rotary_dim=8, attn_implementation="sdpa")).eval()
    with pytest.raises(TokenCompileError, match="^positions=renumber gives kept tokens new rotary positions, but "
                                                "the graph has no rotary tables"):
        compile_decoder(gptj, prompts[0], keep=0.5, layer=LAYER, span=SPAN, positions="renumber")


@pytest.mark.slow  # about 15 s: the default run keeps its 15-minute margin
def test_sliding_window_bounds_the_prompt_and_decoding(prompts):
    ids = prompts[0]
    with pytest.raises(UnsupportedModelError, match=r"^the prompt \(24 tokens\) does not fit in the model's sliding "
                                                    r"attention window \(24 tokens\) \(give prompts of at most 23"):
        compile_decoder(build("mistral", sliding_window=24), ids, keep=0.5)
    model = build("mistral", sliding_window=30)
    program = compile_decoder(model, ids, keep=0.5, layer=LAYER, span=SPAN)
    assert program.report["sliding_window"] == 30
    assert generate(program, ids, 7).shape == (2, 31)   # decodes positions 24..29: all inside the window
    full = compile_decoder(model, ids, budget=1.0)
    assert torch.equal(generate(full, ids, 7), model.generate(ids, max_new_tokens=7, do_sample=False))
    with pytest.raises(TokenCompileError, match=r"^decoding would reach position 30, past the model's sliding "
                                                r"attention window \(30 tokens\).*at most 7 tokens after this "
                                                r"prompt\)$"):
        generate(program, ids, 8)


def test_export_errors_quote_the_first_sentence_of_the_reason():
    from tokencompile.decoder.prefill import first_sentence

    assert first_sentence("You marked batch as dynamic but it became a constant (2). If you're using mark_dynamic") \
        == "You marked batch as dynamic but it became a constant (2)"
    assert first_sentence("e.g. the batch was fixed. More") == "e.g. the batch was fixed"
    assert first_sentence("Shapes (2, 3) vs. (3, 2) differ") == "Shapes (2, 3) vs. (3, 2) differ"
    assert first_sentence("word " * 40) == ("word " * 32).strip() + "..."


# two exports and generation: about 40 s (Mixtral) in the slow set; test_onnx checks the Loop itself
@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow),
                                    *(pytest.param(family, marks=pytest.mark.sweep)
                                      for family in ("qwen2_moe", "deepseek_v3"))])
def test_experts_export_to_onnx_and_generate_like_torch(family, prompts, tmp_path):
    """Hugging Face's grouped experts run through its own op (token-expert rows sorted by expert), lowered to
    an ONNX Loop over the experts: ONNX Runtime's prefill logits and greedy tokens equal torch's."""
    from tokencompile.decoder.onnx_export import OnnxRunner, export_decoder_onnx

    program = compile_decoder(build(family), prompts[0], keep=KEPT / SPAN[1], layer=LAYER, span=SPAN)
    export_decoder_onnx(program, str(tmp_path))
    runner = OnnxRunner(str(tmp_path))
    assert torch.allclose(runner.prefill(prompts[0])[0], prefill(program, prompts[0])[0], atol=1e-4)
    assert torch.equal(generate(runner, prompts[0], 6), generate(program, prompts[0], 6))
