"""Staged prompt reduction (PyramidDrop-like schedules): every stage scored at its own layer, each layer's
cache holding exactly the tokens that layer saw, decoding on those caches, the budget search, errors.
The eager reference is ``reference_staged`` of test_decoder (Hugging Face layers, no graph)."""

from __future__ import annotations

import pytest
import torch
from test_decoder import TOKENS, reference_staged

import models
from tokencompile.decoder import (
    Span,
    compile_decoder,
    generate,
    prefill,
    pyramid_layers,
    teacher_forced_logits,
)
from tokencompile.errors import TokenCompileError

pytestmark = pytest.mark.usefixtures("one_trace_per_prompt")


@pytest.fixture(scope="module")
def prompts():
    return models.decoders.prompt_ids(2, TOKENS, seed=1)[0]


@pytest.fixture(scope="module")
def two_stages(llama, prompts):
    """Span 4..19: 8 of its 16 tokens reach layer 1, 4 reach layer 3."""
    return compile_decoder(llama, prompts, method="pyramiddrop", layer=(1, 3), keep=(0.5, 0.25), span=(4, 16))


def test_two_stage_prefill_and_every_cache_match_reference(llama, prompts, two_stages):
    assert two_stages.tokens_per_layer == two_stages.report["tokens_per_layer"] == [24, 16, 16, 12]
    assert two_stages.stages == [(1, 8), (3, 4)] and two_stages.first_reduced_layer == 1
    assert [(s["layer"], s["span_kept"], s["tokens"]) for s in two_stages.report["stages"]] == [(1, 8, 16), (3, 4, 12)]
    with torch.no_grad():
        expected, expected_caches, kept = reference_staged(llama, prompts, [(1, 8), (3, 4)],
                                                           Span(4, 16).removable(prompts))
    # the second stage keeps a subset of the first stage's survivors, chosen by layer 2's own scores
    assert all(set(b.tolist()) < set(a.tolist()) for a, b in zip(kept[0], kept[1]))
    logits, caches = prefill(two_stages, prompts)
    torch.testing.assert_close(logits, expected[:, -1], atol=1e-5, rtol=1e-4)
    assert [k.shape[2] for k, _ in caches] == [24, 16, 16, 12]
    for (k, v), (k_ref, v_ref) in zip(caches, expected_caches):
        torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)


def test_decode_on_staged_caches_matches_reference(llama, prompts, two_stages):
    """Teacher-forced decode steps on caches of three lengths equal one eager pass over prompt and
    continuation with the same stages (the continuation always kept, scores from the prompt)."""
    continuation = models.decoders.prompt_ids(2, 5, seed=3)[0]
    ids = torch.cat([prompts, continuation], 1)
    removable = torch.cat([Span(4, 16).removable(prompts), torch.zeros(2, 5, dtype=torch.bool)], 1)
    with torch.no_grad():
        expected, _, _ = reference_staged(llama, ids, [(1, 8), (3, 4)], removable, prompt=TOKENS)
    logits = teacher_forced_logits(two_stages, prompts, continuation)
    torch.testing.assert_close(logits, expected[:, 11:16], atol=1e-5, rtol=1e-4)
    assert generate(two_stages, prompts, 3).shape == (2, TOKENS + 3)


def test_staged_renumbered_positions_probe_window_and_pooling_match_reference(llama, prompts):
    program = compile_decoder(llama, prompts, layer=(2, 3), keep=(0.75, 0.25), span=(0, 20), probes=3,
                              positions="renumber", pool=5)
    assert program.tokens_per_layer == [24, 24, 19, 9]
    with torch.no_grad():
        expected, _, _ = reference_staged(llama, prompts, [(2, 15), (3, 5)], Span(0, 20).removable(prompts),
                                          probes=3, renumber=True, pool=5)
    torch.testing.assert_close(prefill(program, prompts)[0], expected[:, -1], atol=1e-5, rtol=1e-4)


def test_pyramiddrop_defaults_scale_the_paper_to_the_depth(llama, prompts):
    assert pyramid_layers(32) == (8, 16, 24) and pyramid_layers(30) == (8, 15, 23) and pyramid_layers(4) == (1, 2, 3)
    program = compile_decoder(llama, prompts, method="pyramiddrop", span=(4, 16), sinks=6)  # span 6..19: 14
    assert program.stages == [(1, 7), (2, 4), (3, 2)]  # 0.5, 0.25, 0.125 of the span
    assert program.tokens_per_layer == [24, 17, 14, 12]
    kept = reference_staged(llama, prompts, program.stages, Span(4, 16).removable(prompts)
                            & (torch.arange(TOKENS) >= 6))
    with torch.no_grad():
        torch.testing.assert_close(prefill(program, prompts)[0], kept[0][:, -1], atol=1e-5, rtol=1e-4)
    assert all(set(range(6)) <= set(p.tolist()) for p in kept[2][-1])  # the sinks stay


def test_pyramid_budget_is_met_with_the_largest_ratio(llama, prompts):
    program = compile_decoder(llama, prompts, method="pyramiddrop", layer=(1, 2), budget=0.6)
    report = program.report
    assert report["budget"] == 0.6 and 0.55 < report["flops_ratio"] <= 0.6  # met, and tightly
    (l1, k1), (l2, k2) = program.stages
    removable = report["span_tokens_removable"]
    assert (l1, l2) == (1, 2) and k2 <= k1 < removable
    ratio = k1 / removable  # a geometric pyramid: the second stage keeps about ratio**2 of the span
    assert abs(k2 - ratio ** 2 * removable) <= 1.5
    assert [k.shape[2] for k, _ in prefill(program, prompts)[1]] == report["tokens_per_layer"]


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": (3, 1), "keep": 0.5}, "not increasing"),
    ({"layer": (1, 4), "keep": 0.5}, "no layer to reduce"),
    ({"layer": (1, 2), "keep": (0.5,)}, "1 keep ratios for 2 stage layers"),
    ({"layer": (1, 2), "keep": (0.25, 0.5)}, "grow from stage to stage"),
    ({"layer": (1, 2), "keep": (0.5, 1.5)}, "out of range"),
    ({"method": "pyramid", "keep": 0.5}, "not a decoder method"),
    ({"keep": 0.5, "sinks": -1}, "sinks=-1"),
    ({"keep": 0.5, "pool": 4}, "not an odd window"),
    ({"method": "pyramiddrop", "budget": 0.05}, "cannot be met"),
])
def test_bad_stage_options_are_one_line_errors(llama, prompts, kwargs, message):
    with pytest.raises(TokenCompileError, match=message) as error:
        compile_decoder(llama, prompts, **kwargs)
    assert "\n" not in str(error.value)


def test_auto_layer_rule_spends_a_quarter_of_the_budget_on_full_layers(llama, prompts):
    from tokencompile.decoder.prefill import auto_layer
    from tokencompile.flops import BlockCost, CostModel

    thirty = CostModel(512, 0, [BlockCost(before_linear=10, after_linear=90) for _ in range(30)], 64)
    assert [auto_layer(thirty, b) for b in (1.0, 0.6, 0.4, 0.1)] == [7, 4, 3, 1]
    program = compile_decoder(llama, prompts, budget=0.6, layer="auto", span=(4, 16))
    assert program.first_reduced_layer == 1 and program.report["flops_ratio"] <= 0.6
    with pytest.raises(TokenCompileError, match="chooses the layer from a budget"):
        compile_decoder(llama, prompts, keep=0.5, layer="auto")


def copying_prompts() -> torch.Tensor:
    """Two 24-token prompts whose end repeats an earlier passage (tokens 16-23 = 2-9; sample 1 shifted by
    one), so the n-grams at the end occur earlier and the tokens after them are what a copy continues."""
    prompts = models.decoders.prompt_ids(2, TOKENS, seed=7)[0].clone()  # no token twice before the copy
    prompts[0, 16:] = prompts[0, 2:10]
    prompts[1, 17:] = prompts[1, 5:12]
    return prompts


def test_lookup_prior_counts_the_matching_ngrams():
    from test_decoder import reference_lookup

    prompts = copying_prompts()
    prior = reference_lookup(prompts, 4, 3)
    # sample 0: the last token's 1..4-grams end at p = 9 and cover 10..12 (ahead 3); the 2..4-grams of
    # tokens 22, 21, 20 end at 8, 7, 6 and cover from there to 12 (3 n-grams each)
    assert prior[0, 7:14].tolist() == [3, 6, 9, 13, 13, 13, 0] and prior[0, :7].sum() == 0


@pytest.mark.parametrize("stages, keep", [((2,), 0.25), ((1, 3), (0.5, 0.25))])
def test_lookup_matches_reference_and_keeps_what_a_copy_continues(llama, stages, keep):
    prompts = copying_prompts()
    program = compile_decoder(llama, prompts, layer=stages if len(stages) > 1 else stages[0], keep=keep,
                              span=(0, 16), lookup=4, ahead=3, pool=3)
    removable = Span(0, 16).removable(prompts)
    with torch.no_grad():
        expected, expected_caches, kept = reference_staged(llama, prompts, program.stages, removable, lookup=4,
                                                           ahead=3, pool=3)
        logits, caches = prefill(program, prompts)
    torch.testing.assert_close(logits, expected[:, -1], atol=1e-5, rtol=1e-4)
    for (key, _), (key_ref, _) in zip(caches, expected_caches):
        torch.testing.assert_close(key, key_ref, atol=1e-5, rtol=1e-4)
    assert {10, 11, 12}.issubset(kept[0][0].tolist())  # what follows the earlier passage in sample 0
    assert program.report["lookup"] == 4 and program.report["ahead"] == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(lookup=-1), "lookup=-1, ahead=64: not a prompt-lookup window"),
    (dict(ahead=8), "ahead=8 only applies to the lookup prior"),
    (dict(lookup="4"), "lookup='4' is not a whole number"),
    (dict(lookup=4, span=Span(token_id=7)), "lookup looks up the prompt's own text"),
])
def test_lookup_errors(llama, kwargs, message):
    with pytest.raises(TokenCompileError, match=message):
        compile_decoder(llama, copying_prompts(), keep=0.5, **kwargs)


def test_lookup_prior_nodes_equal_the_reference():
    """FastV.lookup_prior's nodes, inserted in a small graph that returns them, against reference_lookup."""
    from test_decoder import reference_lookup

    from tokencompile.decoder import FastV
    from tokencompile.graph_utils import GraphBuilder
    from tokencompile.methods.base import SiteInputs

    class Identity(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids + 0

    prompts = copying_prompts()
    gm = torch.export.export(Identity(), (prompts,)).module()
    ids = next(node for node in gm.graph.nodes if node.op == "placeholder")
    # 14: the copy ends exactly 14 tokens before each looked-up n-gram: too close, not counted
    for lookup, ahead in [(4, 3), (1, 2), (8, 30), (14, 3)]:
        method = FastV(lookup=lookup, ahead=ahead)
        method.input_ids = ids
        site = SiteInputs(block=0, x=None, query=None, keys=None, valid=None, sizes=None, num_prefix=0,
                          protect_last_valid=False, n=TOKENS, depth=4)
        prior = method.lookup_prior(GraphBuilder(gm, ids), site)
        output = next(node for node in gm.graph.nodes if node.op == "output")
        output.args = ((prior,),)
        gm.recompile()
        assert torch.equal(gm(prompts), reference_lookup(prompts, lookup, ahead))


@pytest.mark.slow
def test_lookup_runs_in_onnx_runtime(llama, tmp_path):
    from tokencompile.decoder.onnx_export import OnnxRunner, export_decoder_onnx

    prompts = copying_prompts()
    program = compile_decoder(llama, prompts[:1], layer=2, keep=0.25, span=(0, 16), lookup=6, ahead=4, pool=3)
    export_decoder_onnx(program, str(tmp_path))
    runner = OnnxRunner(str(tmp_path))
    logits, caches = runner.prefill(prompts)
    expected, expected_caches = prefill(program, prompts)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(caches[-1][0], expected_caches[-1][0], atol=1e-5, rtol=1e-4)
    assert torch.equal(generate(runner, prompts, 6), generate(program, prompts, 6))
