"""End-to-end optimize() on every supported model: parity at budget 1.0, budgets honoured on the
final program, token counts as reported, batch independence, reload in a fresh process."""

import subprocess
import sys

import pytest
import torch

import tokencompile
from models import RECIPES

FAST_MODELS = ["vit_small", "deit_small_distilled", "hf_vit", "hf_bert", "hf_bert_eager", "minilm"]


def _inputs(name, batch, seed=1):
    inputs = RECIPES[name].example_inputs(batch)
    if name in ("hf_bert", "hf_bert_eager", "minilm"):
        from models import text_inputs
        return text_inputs(batch, inputs[0].shape[1], seed=seed)
    return (torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed)),)


def _outputs(program, inputs):
    out = program.module()(*inputs)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", FAST_MODELS)
def test_budget_one_reproduces_original(recipe, optimized, name):
    module, _ = recipe(name)
    result = optimized(name, 1.0)
    assert result.report["schedule"] == [0] * len(result.report["schedule"])
    inputs = _inputs(name, 3)
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for got, want in zip(_outputs(result.program, inputs), expected):
        assert (got - want).abs().max() <= 1e-5


# every model at 0.5 (programs shared with other tests); ViT-S and BERT also at 0.75 and 0.25, the other
# models there sweep
@pytest.mark.parametrize("name, budget", [(name, budget) if budget == 0.5 or name in ("vit_small", "hf_bert") else
                                          pytest.param(name, budget, marks=pytest.mark.sweep)
                                          for name in FAST_MODELS for budget in (0.75, 0.5, 0.25)])
def test_budget_met_and_tokens_as_reported(optimized, name, budget):
    report = optimized(name, budget).report
    assert report["flops_ratio"] <= budget
    # tokens each attention processes in the final graph equal the report's schedule
    assert report["attention_tokens"] == report["tokens_entering_block"]
    n = report["analysis"]["tokens"]
    for entering, r in zip(report["tokens_entering_block"], report["schedule"]):
        assert entering == n
        n -= r
    # the cost model is exact for the blocks; the final program may also drop dead code (an unused pooler)
    assert report["flops_ratio"] <= report["flops_ratio_modelled"] + 1e-9
    assert report["flops_ratio"] == pytest.approx(report["flops_ratio_modelled"], abs=2e-3)


@pytest.mark.parametrize("name", ["vit_small", "deit_small_distilled", "hf_bert"])
def test_batch_of_eight_equals_batch_of_one(optimized, name):
    program = optimized(name, 0.5).program
    inputs = _inputs(name, 8, seed=7)
    together = _outputs(program, inputs)
    alone = [_outputs(program, tuple(x[i:i + 1] for x in inputs)) for i in range(8)]
    for k, out in enumerate(together):
        assert (out - torch.cat([a[k] for a in alone])).abs().max() <= 1e-5


def test_padding_goes_first(recipe):
    """A padded sample's embedding is unchanged while only padding is merged."""
    _, program = recipe("hf_bert")
    result = tokencompile.optimize(program, schedule=[8, 8])
    ids = torch.randint(1000, 2000, (1, 64))
    mask = torch.ones(1, 64, dtype=torch.long)
    mask[0, 30:] = 0  # 34 padding tokens: both sites can merge only padding
    original = program.module()(ids, mask)
    assert (result.program.module()(ids, mask) - original).abs().max() <= 1e-5


def test_deit_keeps_both_protected_tokens(optimized):
    report = optimized("deit_small_distilled", 0.25).report
    assert report["analysis"]["protected_prefix_tokens"] == 2
    assert report["tokens_after_reduction"][-1] >= 3


def test_optimized_program_loads_in_fresh_process(optimized, tmp_path):
    path = tmp_path / "vit.tc.pt2"
    result = optimized("vit_small", 0.5)
    torch.export.save(result.program, str(path))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = result.program.module()(x)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    script = (
        "import torch, tokencompile\n"
        f"p = torch.export.load({str(path)!r}); io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "print(float((p.module()(io['x']) - io['y']).abs().max()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) <= 1e-6


def test_unsupported_schedule_is_explained(recipe):
    _, program = recipe("vit_small")
    with pytest.raises(tokencompile.TokenCompileError, match="only 98 of 197 can go"):
        tokencompile.optimize(program, schedule=[150, 0])   # an explicit per-block list is never changed


def test_constant_r_is_capped_per_block_as_tome_does(recipe):
    _, program = recipe("vit_small")
    report = tokencompile.optimize(program, schedule="r=60").report
    assert report["schedule"] == [60, 60, 38, 19, 9, 5, 2, 1, 1, 0, 0, 0]   # (tokens - 1) // 2 from block 2 on
    assert report["capped_blocks"][0] == {"block": 2, "requested": 60, "removed": 38}
    assert len(report["capped_blocks"]) == 10


def test_unreachable_budget_reports_best_ratio(recipe):
    _, program = recipe("hf_bert")
    with pytest.raises(tokencompile.TokenCompileError, match="best reachable FLOPs ratio"):
        tokencompile.optimize(program, budget=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [1.0, 0.5, 0.25])
def test_vit_base(recipe, budget):
    module, program = recipe("vit_base")
    result = tokencompile.optimize(program, budget=budget)
    assert result.report["flops_ratio"] <= budget
    assert result.report["attention_tokens"] == result.report["tokens_entering_block"]
    if budget == 1.0:
        x = torch.randn(2, 3, 224, 224)
        assert (result.program.module()(x) - module(x)).abs().max() <= 1e-5
