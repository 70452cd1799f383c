"""A GPT-2 style decoder (learned absolute positions, no RoPE): FastV's prefill against an eager reference
written from the GPT-2 block's modules, greedy decoding equal to Hugging Face, ONNX export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from tokencompile.decoder import (
    compile_decoder,
    generate,
    prefill,
    teacher_forced_logits,
)
from tokencompile.decoder.onnx_export import OnnxRunner, export_decoder_onnx
from tokencompile.errors import TokenCompileError

TOKENS = 24


@pytest.fixture(scope="module")
def gpt2():
    return models.build("tiny_gpt2")[0].model


@pytest.fixture(scope="module")
def prompts():
    return models.decoders.prompt_ids(2, TOKENS, seed=3)[0]


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.view(*t.shape[:2], heads, -1).transpose(1, 2)


def reference(lm, ids: torch.Tensor, layer: int, keep_span: int, span: tuple[int, int], prompt: int | None = None):
    """Logits of every row that reaches the head and every layer's (key, value): FastV written out on the
    GPT-2 block's modules. Scores: the last prompt token's softmax attention row over the prompt at
    layer ``layer`` - 1, mean over heads. Rows from ``prompt`` on (a continuation) always stay; each row
    keeps its learned position."""
    heads, blocks = lm.config.n_head, lm.transformer.h
    n = ids.shape[1]
    prompt = n if prompt is None else prompt
    hidden = lm.transformer.wte(ids) + lm.transformer.wpe(torch.arange(n))[None]
    caches, scores = [], None
    for index, block in enumerate(blocks):
        if index == layer:
            can_go = torch.zeros(n, dtype=torch.bool)
            can_go[span[0]:span[0] + span[1]] = True
            kept = []
            for sample_scores in scores:
                top = can_go.nonzero()[:, 0][sample_scores[can_go].topk(keep_span).indices]
                kept.append(torch.cat([(~can_go[:prompt]).nonzero()[:, 0], top, torch.arange(prompt, n)]).sort().values)
            kept = torch.stack(kept)
            hidden = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
        q, k, v = block.attn.c_attn(block.ln_1(hidden)).split(hidden.shape[-1], -1)
        q, k, v = (_heads(t, heads) for t in (q, k, v))
        if index == layer - 1:
            row = (q[:, :, prompt - 1:prompt] @ k[:, :, :prompt].transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
            scores = torch.nn.functional.pad(row.mean((1, 2)), (0, n - prompt))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        hidden = hidden + block.attn.c_proj(attended)
        hidden = hidden + block.mlp(block.ln_2(hidden))
        caches.append((k, v))
    return lm.lm_head(lm.transformer.ln_f(hidden)), caches


def test_fastv_prefill_matches_the_eager_reference(gpt2, prompts):
    program = compile_decoder(gpt2, prompts, keep=0.5, layer=2, span=(4, 16))
    assert program.report["analysis"]["rope"] is False
    assert program.report["tokens_per_layer"] == [24, 24, 16, 16]
    logits, caches = prefill(program, prompts)
    with torch.no_grad():
        expected_logits, expected_caches = reference(gpt2, prompts, 2, 8, (4, 16))
    assert torch.allclose(logits, expected_logits[:, -1], atol=1e-5)
    for (k, v), (k_ref, v_ref) in zip(caches, expected_caches):
        assert k.shape == k_ref.shape
        assert torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)


def test_decode_on_the_reduced_cache_matches_the_reference(gpt2, prompts):
    """Teacher-forced decoding after the reduced prefill equals one eager pass over prompt + continuation
    in which only the prompt's span is reduced (continuation tokens at positions 24, 25, ...)."""
    program = compile_decoder(gpt2, prompts, keep=0.5, layer=2, span=(4, 16))
    continuation = prompts[:, :6].flip(1)
    got = teacher_forced_logits(program, prompts, continuation)
    with torch.no_grad():
        everything, _ = reference(gpt2, torch.cat([prompts, continuation], 1), 2, 8, (4, 16), prompt=TOKENS)
    # rows after layer 2: 8 kept prompt rows of 24 - 8 removed = 16, then the continuation
    assert torch.allclose(got, everything[:, 15:15 + 6], atol=1e-5)


def test_budget_one_greedy_equals_hugging_face(gpt2, prompts):
    program = compile_decoder(gpt2, prompts, budget=1.0)
    expected = gpt2.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(generate(program, prompts, 12), expected)


def test_onnx_graphs_generate_like_torch(gpt2, prompts, tmp_path):
    program = compile_decoder(gpt2, prompts, keep=0.5, layer=2, span=(4, 16))
    export_decoder_onnx(program, str(tmp_path))
    assert torch.equal(generate(OnnxRunner(str(tmp_path)), prompts, 10), generate(program, prompts, 10))


@pytest.mark.parametrize("padding", [False, True])
def test_renumbering_is_refused_without_rotary_positions(gpt2, prompts, padding):
    """Learned positions are added before the first layer: there is nothing to renumber after a reduction,
    so positions=renumber is refused when compiling (not compiled as positions=keep under its name)."""
    with pytest.raises(TokenCompileError, match="^positions=renumber gives kept tokens new rotary positions, but "
                       "the graph has no rotary tables .* \\(compile with positions='keep'\\)$"):
        compile_decoder(gpt2, prompts, keep=0.5, layer=2, span=(4, 16), positions="renumber", padding=padding)
