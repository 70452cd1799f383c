"""The method library: each method against an independent per-sample reference at one site, budgets,
batch independence and ONNX Runtime parity."""

import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import tokencompile
from tokencompile.cli import main
from tokencompile.compiler import export_module
from tokencompile.lowering.onnx_export import export_onnx, verify_onnx

from models import RECIPES, text_inputs
from test_passes import Tiny

PRUNERS = ["evit", "dart", "random"]


def _reference_scores(method, q, k, block, n):
    """Per-sample [N] scores, written from the papers' descriptions."""
    if method == "evit":
        heads = [torch.softmax(q[h, 0] @ k[h].T / math.sqrt(q.shape[-1]), -1) for h in range(q.shape[0])]
        return sum(heads) / len(heads)
    if method == "dart":
        metric = k.mean(0)
        pivots = sorted(range(n), key=lambda i: -float(metric[i].norm()))[:8]
        scores = []
        for i in range(n):
            if i in pivots:
                scores.append(math.inf)
            else:
                scores.append(-max(float(F.cosine_similarity(metric[i], metric[p], dim=0)) for p in pivots))
        return torch.tensor(scores)
    return torch.tensor([float(((i + 1) * 2654435761 + 7919 * (1 + block)) % (1 << 24)) for i in range(n)])


@torch.no_grad()
def _reference_forward(module, tokens, method, r):
    """Tiny with one pruning site after the attention of its last block."""
    outputs, pooled = [], []
    for sample in tokens:
        x = torch.cat([module.cls[0], sample])
        for block in module.blocks[:-1]:
            x = block(x[None])[0]
        last = module.blocks[-1]
        n, c = x.shape
        qkv = last.qkv(last.norm1(x)).reshape(n, 3, 2, c // 2).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        x = x + last.proj(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, c))
        scores = _reference_scores(method, q, k, len(module.blocks) - 1, n)
        fuse = method == "evit"
        n_keep = n - r - int(fuse)
        ranked = [0] + sorted(range(1, n), key=lambda i: -float(scores[i]))   # token 0 ([CLS]) is protected
        kept = sorted(ranked[:n_keep])
        rows = [x[i] for i in kept]
        if fuse:
            removed = ranked[n_keep:]
            weight = torch.stack([scores[i].clamp(min=1e-6) for i in removed])
            rows.append(sum(w * x[i] for w, i in zip(weight, removed)) / weight.sum())
        x = torch.stack(rows)
        x = x + last.fc2(F.gelu(last.fc1(last.norm2(x))))
        outputs.append(module.head(x[0]))
        pooled.append(x.mean(0))
    return torch.stack(outputs), torch.stack(pooled)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    module = Tiny(depth=2).eval()
    return module, export_module(module, (torch.randn(2, 15, 32),))


@pytest.mark.parametrize("method", PRUNERS)
def test_method_matches_reference_at_one_site(tiny, method):
    module, program = tiny
    result = tokencompile.optimize(program, schedule=[0, 5], method=method)
    tokens = torch.randn(3, 15, 32, generator=torch.Generator().manual_seed(1))
    want_logits, want_pooled = _reference_forward(module, tokens, method, 5)
    with torch.no_grad():
        logits, pooled = result.program.module()(tokens)
    assert torch.allclose(logits, want_logits, atol=1e-5), (logits - want_logits).abs().max()
    assert torch.allclose(pooled, want_pooled, atol=1e-5), (pooled - want_pooled).abs().max()


def test_methods_command_lists_every_method():
    out = CliRunner().invoke(main, ["methods"])
    assert out.exit_code == 0
    for name in ["tome", *PRUNERS]:
        assert out.output.count(f"\n{name} ") + out.output.startswith(f"{name} ") == 1


def test_unknown_option_is_explained(recipe):
    with pytest.raises(tokencompile.TokenCompileError, match="method 'dart' has no option 'pivot'.*pivots"):
        tokencompile.optimize(recipe("vit_small")[1], budget=0.5, method="dart", options={"pivot": "4"})
    with pytest.raises(tokencompile.TokenCompileError, match="pivots='many' of method 'dart' is not a int"):
        tokencompile.optimize(recipe("vit_small")[1], budget=0.5, method="dart", options={"pivots": "many"})


def _inputs(name, batch):
    if name in ("hf_bert", "minilm"):
        return text_inputs(batch, RECIPES[name].example_inputs(1)[0].shape[1], seed=3)
    return (torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(3)),)


@pytest.mark.parametrize("name", ["vit_small", "hf_bert"])
@pytest.mark.parametrize("method", PRUNERS)
def test_method_end_to_end(recipe, name, method, tmp_path):
    program = recipe(name)[1]
    result = tokencompile.optimize(program, budget=0.5, method=method)
    assert result.report["flops_ratio"] <= 0.5
    assert result.report["attention_tokens"] == result.report["tokens_entering_block"]
    module = result.program.module()
    inputs = _inputs(name, 6)
    together = module(*inputs)
    together = together[0] if isinstance(together, tuple) else together
    for i in range(6):
        alone = module(*(x[i:i + 1] for x in inputs))
        alone = alone[0] if isinstance(alone, tuple) else alone
        assert (alone - together[i:i + 1]).abs().max() <= 1e-5
    path = str(tmp_path / f"{method}.onnx")
    export_onnx(result.program, path, _inputs(name, 2))
    rows = verify_onnx(result.program, path, [_inputs(name, 1), _inputs(name, 8)])
    assert all(row["max_abs_error"] <= 1e-4 for row in rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_small_distilled", "minilm"])
@pytest.mark.parametrize("method", PRUNERS)
def test_method_end_to_end_more_models(recipe, name, method, tmp_path):
    test_method_end_to_end(recipe, name, method, tmp_path)
