"""The compiled ToMe equals an independent loop reference, on a ViT and on BERT with padding."""

import copy

import pytest
import torch
from tome_reference import bert_mean_pooled, timm_vit

import tokencompile
from models import text_inputs
from tokencompile.errors import TokenCompileError


def _compare_vit(recipe, name, r, order="official", prop_attn=True, dtype=torch.float64, tolerance=1e-6):
    module, program = recipe(name)
    schedule = [r] * len(module.blocks)
    result = tokencompile.optimize(program, budget=None, schedule=f"r={r}", proportional_attention=prop_attn,
                                   options={"order": order})
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    wide = copy.deepcopy(module).to(dtype)
    expected = timm_vit(wide, images.to(dtype), schedule, prop_attn, order)
    got = copy.deepcopy(result.program.module()).to(dtype)(images.to(dtype))
    assert got.dtype == dtype
    assert torch.allclose(got, expected, atol=tolerance, rtol=tolerance), (got - expected).abs().max()
    return result


# the distillation token and average pooling in the slow set: the default run keeps the [CLS] ViT
@pytest.mark.parametrize("name", ["vit_small", *(pytest.param(name, marks=pytest.mark.slow)
                                                 for name in ("deit_small_distilled", "vit_small_avg"))])
def test_official_tome_in_float64(recipe, name):
    result = _compare_vit(recipe, name, 8)
    protected = {"vit_small": 1, "deit_small_distilled": 2, "vit_small_avg": 0}[name]
    tokens = 196 + protected
    assert result.report["attention_tokens"][-1] == tokens - 11 * 8   # r=8 is below every cap


@pytest.mark.slow
@pytest.mark.parametrize("name,r", [(name, r) if (name, r) == ("vit_small", 16) else
                                    pytest.param(name, r, marks=pytest.mark.sweep) for r in (4, 16)
                                    for name in ("vit_small", "deit_small_distilled", "vit_small_avg")])
def test_official_tome_in_float64_other_r(recipe, name, r):
    result = _compare_vit(recipe, name, r)
    if r == 16:  # the official cap, (tokens - protected) // 2, holds from some block on
        assert result.report["capped_blocks"], result.report["schedule"]


def test_deit_cap_is_the_official_one(recipe):
    """Two protected tokens at 198: ToMe allows (198 - 2) // 2 = 98 merges."""
    _, program = recipe("deit_small_distilled")
    result = tokencompile.optimize(program, budget=None, schedule="r=100")
    assert result.report["schedule"][:3] == [98, 49, 24]
    assert result.report["capped_blocks"][0] == {"block": 0, "requested": 100, "removed": 98}
    with pytest.raises(TokenCompileError, match="only 98 of 198 can go"):
        tokencompile.optimize(program, budget=None, schedule="r=99,1")


@pytest.mark.parametrize("prop_attn", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_keep_order_matches_loop_reference(recipe, prop_attn):
    result = _compare_vit(recipe, "vit_small", 8, "keep", prop_attn, torch.float32, 2e-4)
    # and it really reduced: the last attention sees 197 - 11 * 8 tokens
    assert result.report["attention_tokens"][-1] == 197 - 11 * 8


@pytest.mark.parametrize("name,order", [("hf_bert", "official"), ("hf_bert_eager", "official"), ("hf_bert", "keep")])
def test_bert_with_padding_matches_loop_reference(recipe, name, order):
    module, program = recipe(name)
    schedule = [10, 8, 6, 4, 2, 0, 0, 0]  # one entry per layer: the reference zips layers with it
    result = tokencompile.optimize(program, schedule=schedule, options={"order": order})
    assert result.report["analysis"]["attention"] == ("eager" if name.endswith("eager") else "sdpa")
    ids, mask = text_inputs(4, 64, seed=5)
    assert (mask == 0).any(), "the test needs padded samples"
    expected = bert_mean_pooled(module.model, ids, mask, schedule, order=order)
    got = result.program.module()(ids, mask)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
