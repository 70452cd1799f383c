"""Decoder prompt reduction: analysis of the prefill graph, FastV against an eager reference built from
the Hugging Face layers, greedy generation on the reduced KV cache, budgets and errors."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import models
from tokencompile.attention import find_attention
from tokencompile.decoder import (
    CausalLMPrefill,
    Span,
    analyse_decoder,
    compile_decoder,
    export_prefill,
    generate,
    prefill,
    reuse_traces,
    teacher_forced_logits,
)
from tokencompile.errors import TokenCompileError, UnsupportedModelError

TOKENS = 24


@pytest.fixture(scope="module")
def prompts():
    return models.decoders.prompt_ids(2, TOKENS, seed=1)[0]


@pytest.fixture(scope="module")
def fastv_half(llama, prompts):
    """FastV from layer 2, half of the span (positions 4..19) kept."""
    return compile_decoder(llama, prompts, keep=0.5, layer=2, span=(4, 16))


# ---------------------------------------------------------------- eager reference (HF layers, no graph)

def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def reference_qk(lm, ids, layer: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Layer ``layer``'s queries and keys [B, H, N, D] (RoPE applied, key heads repeated) and its
    softmax scale, from the Hugging Face modules."""
    hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    attention = lm.model.layers[layer].self_attn
    x = lm.model.layers[layer].input_layernorm(hidden)
    shape = (*x.shape[:2], -1, attention.head_dim)
    q = attention.q_proj(x).view(shape).transpose(1, 2)
    k = attention.k_proj(x).view(shape).transpose(1, 2)
    cos, sin = lm.model.rotary_emb(x, torch.arange(ids.shape[1])[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, repeat_kv(k, attention.num_key_value_groups), attention.scaling


def reference_scores(lm, ids, layer: int, probes: int = 1) -> torch.Tensor:
    """[B, N]: mean over heads and the last ``probes`` query rows of layer ``layer``'s causal softmax
    attention (probes=1: the last token's row, FastV)."""
    q, k, scale = reference_qk(lm, ids, layer)
    logits = q @ k.transpose(-2, -1) * scale + _causal(ids.shape[1])
    return logits[:, :, -probes:].softmax(-1).mean((1, 2))


def reference_kept(scores: torch.Tensor, removable: torch.Tensor, n_keep_span: int) -> torch.Tensor:
    """[B, n]: sorted positions kept: every token outside the span, the top n_keep_span of the span."""
    kept = []
    for score, can_go in zip(scores, removable):
        span = can_go.nonzero()[:, 0]
        top = span[score[span].topk(n_keep_span).indices]
        kept.append(torch.cat([(~can_go).nonzero()[:, 0], top]).sort().values)
    return torch.stack(kept)


def reference_forward(lm, ids, first_reduced: int, kept: torch.Tensor | None, renumber: bool = False):
    """Logits of every token that reaches the head [B, n, V] and the per-layer (key, value) caches, with
    the rows ``kept`` selected after layer first_reduced - 1 (original positions unless ``renumber``)."""
    hidden = lm.model.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    cache = DynamicCache()
    for index, layer in enumerate(lm.model.layers):
        if index == first_reduced and kept is not None:
            hidden = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
            positions = torch.arange(kept.shape[1])[None].expand_as(kept) if renumber else kept
        cos_sin = lm.model.rotary_emb(hidden, positions)
        hidden = layer(hidden, attention_mask=_causal(hidden.shape[1]), position_embeddings=cos_sin, cache=cache,
                       use_cache=True)
    logits = lm.lm_head(lm.model.norm(hidden))
    return logits, [(layer.keys, layer.values) for layer in cache.layers]


def reference_lookup(ids: torch.Tensor, lookup: int, ahead: int, longest: int = 4) -> torch.Tensor:
    """[B, N]: per token, the number of (q, n) whose n-gram ending at prompt position q (one of the last
    ``lookup``; n = 1..longest at the last token, 2..longest before it) occurs ending at some p < q - lookup
    with p + 1 <= token <= p + (N - 1 - q) + ahead."""
    batch, n = ids.shape
    prior = torch.zeros(batch, n)
    for b in range(batch):
        for q in range(n - 1, n - 1 - min(lookup, n - 1), -1):
            for length in range(1 if q == n - 1 else 2, longest + 1):
                gram = ids[b, q - length + 1:q + 1].tolist()
                if q - length + 1 < 0:
                    continue
                covered = torch.zeros(n, dtype=torch.bool)
                for p in range(length - 1, q - lookup):
                    if ids[b, p - length + 1:p + 1].tolist() == gram:
                        covered[p + 1:p + 1 + (n - 1 - q) + ahead] = True
                prior[b] += covered
    return prior


def reference_staged(lm, ids, stages, removable: torch.Tensor, prompt: int | None = None, probes: int = 1,
                     renumber: bool = False, pool: int = 1, lookup: int = 0, ahead: int = 64):
    """Several stages: ``stages`` is [(layer, span tokens kept from that layer on)]. Before each stage
    layer L, the rows that reached layer L-1 are scored by the last prompt rows' causal attention at
    layer L-1 (over the prompt rows that reached it) and the top span rows stay. ``removable`` [B, N]:
    the span (prompt rows only); rows from ``prompt`` on (a continuation) always stay; ``pool``: scores
    averaged over that many neighbouring rows (padding not counted). Returns the
    logits [B, n, V], each layer's (key, value) cache and the kept original positions after each stage."""
    batch, n = ids.shape
    prompt = n if prompt is None else prompt
    hidden = lm.model.embed_tokens(ids)
    positions = torch.arange(n)[None].expand(batch, -1)
    kept_after = {layer: kept for layer, kept in stages}
    cache, kept_positions = DynamicCache(), []
    for index, layer in enumerate(lm.model.layers):
        cos_sin = lm.model.rotary_emb(hidden, torch.arange(hidden.shape[1])[None].expand_as(positions)
                                      if renumber else positions)
        if index + 1 in kept_after:
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (*x.shape[:2], -1, attention.head_dim)
            q = attention.q_proj(x).view(shape).transpose(1, 2)
            k = attention.k_proj(x).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *cos_sin)
            k = repeat_kv(k, attention.num_key_value_groups)
            rows = int((positions[0] < prompt).sum())
            logits = q[:, :, :rows] @ k[:, :, :rows].transpose(-2, -1) * attention.scaling + _causal(rows)
            scores = logits[:, :, rows - probes:].softmax(-1).mean((1, 2))
            scores = torch.nn.functional.avg_pool1d(scores[:, None], pool, 1, pool // 2, count_include_pad=False)[:, 0]
            if lookup:
                scores = scores + reference_lookup(ids[:, :prompt], lookup, ahead).gather(1, positions[:, :rows])
        hidden = layer(hidden, attention_mask=_causal(hidden.shape[1]), position_embeddings=cos_sin, cache=cache,
                       use_cache=True)
        if index + 1 in kept_after:
            can_go = removable.gather(1, positions[:, :rows])
            kept = reference_kept(scores, can_go, kept_after[index + 1])
            kept = torch.cat([kept, torch.arange(rows, positions.shape[1]).expand(batch, -1)], dim=1)
            hidden = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
            positions = positions.gather(1, kept)
            kept_positions.append(positions)
    logits = lm.lm_head(lm.model.norm(hidden))
    return logits, [(layer.keys, layer.values) for layer in cache.layers], kept_positions


# ---------------------------------------------------------------- analysis

def test_analysis_finds_causal_rope_and_caches(llama, prompts):
    ep = export_prefill(llama, prompts)
    analysis = analyse_decoder(ep.module(), prompts)
    assert analysis.layers == 4 and analysis.tokens == TOKENS
    assert analysis.causal == [True] * 4
    assert len(analysis.rope_tables) == 2  # cos and sin, shared by every layer
    assert analysis.cache_outputs == {1 + 2 * i + j: (i, role) for i in range(4) for j, role in
                                      enumerate(("key", "value"))}
    assert analysis.scales == [pytest.approx(16 ** -0.5)] * 4


def test_prefill_outputs_that_are_no_layers_cache_are_refused(llama, prompts):
    """A wrapper that also returns a per-token tensor: a reduction would gather it like the last layer's cache."""
    class WithHidden(CausalLMPrefill):
        def forward(self, input_ids):
            return (*super().forward(input_ids), self.model.model.embed_tokens(input_ids))

    ep = export_prefill(WithHidden(llama), prompts)
    with pytest.raises(UnsupportedModelError, match=r"^outputs \[9\] of the prefill program are not a layer's key / "
                                                    r"value cache that the graph's attention reads \(cache tensors "
                                                    r"per layer: \[2, 2, 2, 2\]\)"):
        analyse_decoder(ep.module(), prompts)


def test_span_removable_tokens():
    ids = torch.tensor([[1, 7, 7, 2, 7, 3]])
    assert Span(1, 3).removable(ids).tolist() == [[False, True, True, True, False, False]]
    assert Span().removable(ids).tolist() == [[True] * 5 + [False]]  # the last token always stays
    assert Span(token_id=7).removable(ids).tolist() == [[False, True, True, False, True, False]]


# ---------------------------------------------------------------- FastV prefill against the reference

def test_fastv_prefill_matches_eager_reference(llama, prompts, fastv_half):
    assert fastv_half.report["tokens_per_layer"] == [24, 24, 16, 16]
    # the last layer's queries: the last token alone (its keys and values: every kept token, for the cache)
    assert [a.tokens for a in find_attention(fastv_half.prefill.module())] == [24, 24, 16, 1]
    scores = reference_scores(llama, prompts, 1)
    kept = reference_kept(scores, Span(4, 16).removable(prompts), 8)
    with torch.no_grad():
        expected_logits, expected_caches = reference_forward(llama, prompts, 2, kept)
    logits, caches = prefill(fastv_half, prompts)
    torch.testing.assert_close(logits, expected_logits[:, -1], atol=1e-5, rtol=1e-4)
    assert [tuple(k.shape) for k, _ in caches] == [(2, 2, 24, 16)] * 2 + [(2, 2, 16, 16)] * 2
    for (k, v), (k_ref, v_ref) in zip(caches, expected_caches):
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)


def test_fastv_by_image_token_id_keeps_text(llama):
    ids = models.decoders.prompt_ids(2, TOKENS, seed=2)[0]
    ids[:, 3:15] = 5  # twelve "image" tokens; everything else is text and must stay
    program = compile_decoder(llama, ids, keep=0.25, layer=1, span=Span(token_id=5))
    assert program.report["span_tokens_kept"] == 3 and program.report["tokens_per_layer"] == [24, 15, 15, 15]
    kept = reference_kept(reference_scores(llama, ids, 0), Span(token_id=5).removable(ids), 3)
    with torch.no_grad():
        expected, _ = reference_forward(llama, ids, 1, kept)
    torch.testing.assert_close(prefill(program, ids)[0], expected[:, -1], atol=1e-5, rtol=1e-4)


def test_fastv_probe_window_matches_reference(llama, prompts):
    program = compile_decoder(llama, prompts, keep=0.25, layer=3, span=(0, 20), probes=4)
    kept = reference_kept(reference_scores(llama, prompts, 2, probes=4), Span(0, 20).removable(prompts), 5)
    with torch.no_grad():
        expected, _ = reference_forward(llama, prompts, 3, kept)
    assert program.report["tokens_per_layer"] == [24, 24, 24, 9]
    torch.testing.assert_close(prefill(program, prompts)[0], expected[:, -1], atol=1e-5, rtol=1e-4)


def test_fastv_renumbered_positions_match_reference(llama, prompts):
    program = compile_decoder(llama, prompts, keep=0.5, layer=2, span=(4, 16), positions="renumber")
    kept = reference_kept(reference_scores(llama, prompts, 1), Span(4, 16).removable(prompts), 8)
    with torch.no_grad():
        expected, _ = reference_forward(llama, prompts, 2, kept, renumber=True)
        kept_positions, _ = reference_forward(llama, prompts, 2, kept)
    logits = prefill(program, prompts)[0]
    torch.testing.assert_close(logits, expected[:, -1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits, kept_positions[:, -1], atol=1e-3)  # the policy changes the result
    assert program.report["decode_position"] == TOKENS  # the reduced layers' keys were rotated to continue there


def test_fastv_renumbered_decoding_gives_each_layer_its_own_positions(llama, prompts):
    """After a renumbered prefill, layers 0-1 continue at position 24 and layers 2-3 at 16 (their token
    counts): one eager pass over prompt + continuation with row-index positions per layer."""
    program = compile_decoder(llama, prompts, keep=0.5, layer=2, span=(4, 16), positions="renumber")
    continuation = models.decoders.prompt_ids(2, 5, seed=3)[0]
    ids = torch.cat([prompts, continuation], 1)
    removable = torch.cat([Span(4, 16).removable(prompts), torch.zeros(2, 5, dtype=torch.bool)], 1)
    with torch.no_grad():
        expected, _, _ = reference_staged(llama, ids, [(2, 8)], removable, prompt=TOKENS, renumber=True)
        kept_policy = compile_decoder(llama, prompts, keep=0.5, layer=2, span=(4, 16))
    logits = teacher_forced_logits(program, prompts, continuation)
    torch.testing.assert_close(logits, expected[:, 15:20], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits, teacher_forced_logits(kept_policy, prompts, continuation), atol=1e-3)


# ---------------------------------------------------------------- decoding on the reduced cache

def test_budget_one_greedy_equals_hugging_face(llama, prompts):
    program = compile_decoder(llama, prompts, budget=1.0)
    # FLOPs per sample, 24 tokens: per token q, o (64 -> 64), k, v (64 -> 32: 2 KV heads), MLP (64 -> 128 -> 64);
    # attention 4 heads of 16; the head on the last token. Only the last token's logits are returned, so the
    # last layer computes q, o, the MLP and attention for the last token alone (k, v for all: the cache).
    q_o, k_v, mlp, attention = 2 * 8192, 2 * 4096, 49152, 4 * 4 * 24 * 24 * 16
    full = 4 * (24 * (q_o + k_v + mlp) + attention) + 2 * 64 * 256
    live = full - 23 * (q_o + mlp) - attention * 23 // 24
    assert program.first_reduced_layer is None
    assert program.report["flops_ratio"] == pytest.approx(live / full)  # 6,051,840 / 7,700,480
    expected = llama.generate(prompts, max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(program, prompts, 12), expected)
    assert torch.equal(generate(llama, prompts, 12), expected)


def test_budget_one_sampling_equals_hugging_face(llama, prompts):
    """Seeded sampling draws what Hugging Face's generate(do_sample=True) draws (its warpers, one
    multinomial draw per step from torch's global generator)."""
    program = compile_decoder(llama, prompts, budget=1.0)
    greedy = generate(program, prompts, 12)
    for warpers in ({"temperature": 0.7, "top_k": 20, "top_p": 0.9}, {"top_k": 0}):
        torch.manual_seed(3)
        expected = llama.generate(prompts, max_new_tokens=12, do_sample=True, **warpers)
        torch.manual_seed(3)
        assert torch.equal(generate(program, prompts, 12, do_sample=True, **warpers), expected)
        assert not torch.equal(expected, greedy)  # the draws are not the greedy tokens


def test_sampling_with_a_generator_is_reproducible_and_checked(llama, prompts, fastv_half):
    draws = [generate(fastv_half, prompts, 8, do_sample=True, temperature=1.5,
                      generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*draws)
    assert not torch.equal(draws[0], generate(fastv_half, prompts, 8))
    for options, message in [({"do_sample": True, "temperature": 0.0}, "temperature 0 is not above 0"),
                             ({"do_sample": True, "top_p": 1.5}, "top_p 1.5 is out of range"),
                             ({"do_sample": True, "top_k": -1}, "top_k -1 is not a count"),
                             ({"temperature": 0.5}, "greedy decoding ignores them.*do_sample=True"),
                             ({"generator": torch.Generator()}, "generator shape sampling")]:
        with pytest.raises(TokenCompileError, match=message):
            generate(fastv_half, prompts, 2, **options)


def test_decode_on_reduced_cache_matches_reference(llama, prompts, fastv_half):
    """Teacher-forced decode steps on caches of different lengths equal one eager pass over prompt and
    continuation with the same prompt tokens dropped from layer 2 on (original positions)."""
    continuation = models.decoders.prompt_ids(2, 6, seed=3)[0]
    kept = reference_kept(reference_scores(llama, prompts, 1), Span(4, 16).removable(prompts), 8)
    kept = torch.cat([kept, TOKENS + torch.arange(6).expand(2, -1)], dim=1)
    with torch.no_grad():
        expected, _ = reference_forward(llama, torch.cat([prompts, continuation], 1), 2, kept)
    logits = teacher_forced_logits(fastv_half, prompts, continuation)
    torch.testing.assert_close(logits, expected[:, 15:21], atol=1e-5, rtol=1e-4)
    ids = generate(fastv_half, prompts, 5)
    assert ids.shape == (2, TOKENS + 5) and torch.equal(ids[:, :TOKENS], prompts)


# ---------------------------------------------------------------- budgets and errors

def test_budget_picks_layer_and_keep_and_is_met(llama, prompts):
    program = compile_decoder(llama, prompts, budget=0.7, layer=2)
    report = program.report
    assert report["flops_ratio"] <= 0.7 and report["layer"] == 2
    removed = report["span_tokens_removable"] - report["span_tokens_kept"]
    assert report["tokens_per_layer"] == [TOKENS, TOKENS, TOKENS - removed, TOKENS - removed]
    assert [tuple(k.shape)[2] for k, _ in prefill(program, prompts)[1]] == report["tokens_per_layer"]
    # the least pruning that meets the budget: one token fewer removed would not
    looser = compile_decoder(llama, prompts, keep=(report["span_tokens_kept"] + 1) / report["span_tokens_removable"],
                             layer=2)
    assert looser.report["flops_ratio"] > 0.7
    # layer 2 reaches 0.375 at best (every span token removed); a budget of 0.3 moves the reduction to layer 1
    deeper = compile_decoder(llama, prompts, budget=0.3, layer=2).report
    assert deeper["layer"] == 1 and deeper["flops_ratio"] <= 0.3


def test_reused_traces_compile_what_fresh_traces_compile(llama, prompts, fastv_half, monkeypatch):
    """Inside reuse_traces() the same model on equal prompts is exported once, and compiles to what a fresh
    trace compiles to; other prompts (also the same tensor changed in place) are traced again, and no trace
    outlives the block."""
    module = sys.modules["tokencompile.decoder.prefill"]
    exports, export = [], module.export_prefill
    monkeypatch.setattr(module, "export_prefill", lambda *args: exports.append(args[1].clone()) or export(*args))
    ids = prompts.clone()
    with reuse_traces():
        half = compile_decoder(llama, ids, keep=0.5, layer=2, span=(4, 16))
        by_budget = compile_decoder(llama, ids, budget=0.7, layer=2)
        assert len(exports) == 1
        ids[0, 0] += 1
        compile_decoder(llama, ids, keep=0.5, layer=2, span=(4, 16))
        assert len(exports) == 2 and torch.equal(exports[1], ids)
    fresh = compile_decoder(llama, prompts, budget=0.7, layer=2)
    assert len(exports) == 3
    continuation = models.decoders.prompt_ids(2, 3, seed=9)[0]
    for reused, traced_alone in ((half, fastv_half), (by_budget, fresh)):
        assert {k: v for k, v in reused.report.items() if k != "seconds"} == \
            {k: v for k, v in traced_alone.report.items() if k != "seconds"}
        assert torch.equal(teacher_forced_logits(reused, prompts, continuation),
                           teacher_forced_logits(traced_alone, prompts, continuation))


@pytest.mark.parametrize("kwargs, message", [
    ({"keep": 0.5, "budget": 0.5}, "exactly one"),
    ({"budget": 1.5}, "out of range"),
    ({"keep": 0.5, "span": (20, 10)}, "does not fit"),
    ({"keep": 0.5, "layer": 4}, "no layer to reduce"),
    ({"keep": 0.5, "positions": "shift"}, "position policy"),
    ({"budget": 0.05}, "cannot be met"),
])
def test_bad_input_is_one_line_error(llama, prompts, kwargs, message):
    with pytest.raises(TokenCompileError, match=message) as error:
        compile_decoder(llama, prompts, **kwargs)
    assert "\n" not in str(error.value)


def test_prompt_length_must_match_program(fastv_half):
    with pytest.raises(TokenCompileError, match="compiled for 24-token prompts"):
        generate(fastv_half, torch.ones(1, 10, dtype=torch.long), 2)


@pytest.mark.slow
def test_smollm2_greedy_64_tokens_equals_hugging_face(smollm2):
    """Real weights: the exported prefill + decode loop reproduces Hugging Face's greedy generation."""
    model = smollm2.model
    tokenizer = models.decoders.smollm2_tokenizer()
    prompt = tokenizer("The Apache License grants every contributor's users a license to", return_tensors="pt")
    ids = prompt.input_ids
    program = compile_decoder(model, ids, budget=1.0)
    expected = model.generate(ids, attention_mask=prompt.attention_mask, max_new_tokens=64, do_sample=False,
                              min_new_tokens=64)
    assert expected.shape[1] == ids.shape[1] + 64
    assert torch.equal(generate(program, ids, 64), expected)


def test_cli_generate_on_a_saved_model(llama, prompts, tmp_path):
    from click.testing import CliRunner

    from tokencompile.cli import main

    llama.save_pretrained(tmp_path)
    ids = ",".join(map(str, prompts[0].tolist()))
    result = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt-ids", ids, "--keep", "0.5", "--span",
                                       "4,16", "--max-new-tokens", "5", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    expected = generate(compile_decoder(llama, prompts[:1], keep=0.5, span=(4, 16)), prompts[:1], 5)
    assert result.stdout.strip().splitlines()[0] == ",".join(map(str, expected[0, TOKENS:].tolist()))
    assert "tokens per layer [24, 24, 16, 16]" in result.output
    bad = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt-ids", "1,x"])
    assert bad.exit_code == 2 and "cannot read --prompt-ids" in bad.output


def test_renumbered_caches_keep_the_model_dtype(llama, prompts):
    import copy

    half = copy.deepcopy(llama).to(torch.bfloat16)
    program = compile_decoder(half, prompts, keep=0.5, layer=2, span=(4, 16), positions="renumber")
    _, caches = prefill(program, prompts)
    assert {t.dtype for kv in caches for t in kv} == {torch.bfloat16}
    assert generate(program, prompts, 3).shape == (2, TOKENS + 3)


@pytest.mark.slow  # about 20 s: the default run keeps its 15-minute margin
def test_cli_chat_prompt_and_seeded_sampling(llama, tmp_path):
    """--chat wraps the prompt in the tokenizer's chat template; --sample --seed draws what the Python API
    draws with that seed; bad sampling options are one-line errors in the CLI's words."""
    from click.testing import CliRunner

    from tokencompile.cli import main

    tokenizer = models.decoders.byte_tokenizer()
    model_dir, tokenizer_dir = tmp_path / "model", tmp_path / "tokenizer"
    llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(tmp_path / "plain")
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    tokenizer.save_pretrained(tokenizer_dir)
    ids = tokenizer("[user] name a colour\n[assistant] ", return_tensors="pt").input_ids
    program = compile_decoder(llama, ids, keep=0.5, layer=2)
    options = ["--prompt", "name a colour", "--chat", "--keep", "0.5", "--layer", "2", "--max-new-tokens", "6",
               "--tokenizer", str(tokenizer_dir)]

    result = CliRunner().invoke(main, ["generate", str(model_dir), *options])
    assert result.exit_code == 0, result.output
    new = generate(program, ids, 6)[0, ids.shape[1]:]
    assert result.stdout.splitlines() == [tokenizer.decode(new, skip_special_tokens=True)]

    result = CliRunner().invoke(main, ["generate", str(model_dir), *options, "--sample", "--temperature", "2",
                                       "--top-k", "40", "--seed", "11"])
    assert result.exit_code == 0 and "sampled with --seed 11" in result.output, result.output
    drawn = generate(program, ids, 6, do_sample=True, temperature=2.0, top_k=40,
                     generator=torch.Generator().manual_seed(11))
    assert result.stdout.splitlines() == [tokenizer.decode(drawn[0, ids.shape[1]:], skip_special_tokens=True)]

    for flags, message in [(["--seed", "1"], "--seed seeds sampling.*add --sample"),
                           (["--top-p", "0.5"], "--temperature, --top-k, --top-p shape sampling.*add --sample"),
                           (["--sample", "--temperature", "0"], "--temperature 0 is not above 0"),
                           (["--tokenizer", str(tmp_path / "plain")], "has no chat template.*drop --chat")]:
        result = CliRunner().invoke(main, ["generate", str(model_dir), *options, *flags])
        assert result.exit_code == 2 and re.search(message, result.output), result.output


@pytest.mark.slow
def test_cli_chat_export_samples_like_torch(llama, tmp_path):
    """export-decoder --chat fixes the prompt length of the chat-formatted prompt; the export then samples
    (seeded) what the model folder samples in torch."""
    from click.testing import CliRunner

    from tokencompile.cli import main

    tokenizer = models.decoders.byte_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    llama.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    common = ["--prompt", "name a colour", "--chat"]
    sampled = ["--max-new-tokens", "6", "--sample", "--top-p", "0.8", "--seed", "3"]
    result = CliRunner().invoke(main, ["export-decoder", str(tmp_path / "model"), *common, "--keep", "0.5",
                                       "--layer", "2", "-o", str(tmp_path / "onnx"), "--verify"])
    assert result.exit_code == 0 and "8 greedy tokens identical" in result.output, result.output
    assert json.load(open(tmp_path / "onnx" / "decoder.json"))["prompt_tokens"] == len("<name a colour>")
    in_torch = CliRunner().invoke(main, ["generate", str(tmp_path / "model"), *common, "--keep", "0.5", "--layer",
                                         "2", *sampled])
    from_onnx = CliRunner().invoke(main, ["generate", str(tmp_path / "onnx"), *common, "--tokenizer",
                                          str(tmp_path / "model"), *sampled])
    assert in_torch.exit_code == 0 and from_onnx.exit_code == 0, in_torch.output + from_onnx.output
    assert in_torch.stdout == from_onnx.stdout and "sampled with --seed 3" in from_onnx.output
