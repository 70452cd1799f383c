"""The compiled ToMe equals an independent loop reference, on a ViT and on BERT with padding."""

import pytest
import torch
from tome_reference import bert_mean_pooled, timm_vit

import tokencompile
from models import text_inputs


@pytest.mark.parametrize("prop_attn", [True, False])
def test_vit_matches_loop_reference(recipe, prop_attn):
    module, program = recipe("vit_small")
    schedule = [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]
    result = tokencompile.optimize(program, budget=None, schedule=schedule, proportional_attention=prop_attn)
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    expected = timm_vit(module, images, schedule, prop_attn)
    got = result.program.module()(images)
    assert torch.allclose(got, expected, atol=2e-4, rtol=1e-4), (got - expected).abs().max()
    # and it really reduced: the last attention sees 197 - 11 * 8 tokens
    assert result.report["attention_tokens"][-1] == 197 - 11 * 8


@pytest.mark.parametrize("name", ["hf_bert", "hf_bert_eager"])
def test_bert_with_padding_matches_loop_reference(recipe, name):
    module, program = recipe(name)
    schedule = [10, 8, 6, 4, 2, 0, 0, 0]  # one entry per layer: the reference zips layers with it
    result = tokencompile.optimize(program, schedule=schedule)
    assert result.report["analysis"]["attention"] == ("eager" if name.endswith("eager") else "sdpa")
    ids, mask = text_inputs(4, 64, seed=5)
    assert (mask == 0).any(), "the test needs padded samples"
    expected = bert_mean_pooled(module.model, ids, mask, schedule)
    got = result.program.module()(ids, mask)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
