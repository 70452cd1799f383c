"""The method library: each method against an independent per-sample reference at one site, budgets,
batch independence and ONNX Runtime parity."""

import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_passes import Tiny

import tokencompile
from models import RECIPES, text_inputs
from tokencompile.cli import main
from tokencompile.compiler import export_module
from tokencompile.lowering.onnx_export import export_onnx, verify_onnx
from tokencompile.methods import METHODS

PRUNERS = ["evit", "dart", "random", "zipcache", "divprune"]
MERGERS = ["pitome", "tofu", "visionzip"]
NEW_METHODS = ["pitome", "tofu", "visionzip", "zipcache", "divprune"]


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _cls_attention(q, k):
    heads = [torch.softmax(q[h, 0] @ k[h].T / math.sqrt(q.shape[-1]), -1) for h in range(q.shape[0])]
    return sum(heads) / len(heads)


def _reference_scores(method, q, k, block, n):
    """Per-sample [N] scores of the pruners, written from the papers' descriptions."""
    if method == "evit":
        return _cls_attention(q, k)
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
    if method == "zipcache":  # 5% most recent + 5% strided probe queries; n = 16: probes 0 and 15
        probes = [0, 15]
        rows = [torch.softmax(q[h, p] @ k[h].T / math.sqrt(q.shape[-1]), -1) for h in range(q.shape[0]) for p in probes]
        return sum(rows) / len(rows)
    if method == "divprune":  # greedy farthest point from [CLS]; earlier picks rank higher
        unit = _unit(k.mean(0))
        chosen, scores = [0], torch.full((n,), -1.0)
        for step in range(n):
            rest = [i for i in range(n) if i not in chosen]
            if not rest:
                break
            pick = max(rest, key=lambda i: (min(1 - float(unit[i] @ unit[j]) for j in chosen), -i))
            scores[pick] = n - step
            chosen.append(pick)
        return scores
    return torch.tensor([float(((i + 1) * 2654435761 + 7919 * (1 + block)) % (1 << 24)) for i in range(n)])


def _prune_groups(method, q, k, block, n, r):
    """Output slots as (members, weights) lists; tokens in no slot are dropped."""
    scores = _reference_scores(method, q, k, block, n)
    fuse = method == "evit"
    n_keep = n - r - int(fuse)
    ranked = [0] + sorted(range(1, n), key=lambda i: -float(scores[i]))   # token 0 ([CLS]) is protected
    groups = [([i], [1.0]) for i in sorted(ranked[:n_keep])]
    if fuse:
        removed = ranked[n_keep:]
        groups.append((removed, [float(scores[i].clamp(min=1e-6)) for i in removed]))
    return groups


def _groups_into(kept, moves):
    """Slots of the kept tokens (in order), each with the removed tokens that fold into it."""
    return [([t] + [a for a, target in moves.items() if target == t], None) for t in sorted(kept)]


def _merge_groups(method, q, k, block, n, r, depth):
    unit = _unit(k.mean(0))
    cos = unit @ unit.T
    if method == "pitome":
        margin = 0.75 - 0.75 * block / depth
        energy = F.elu(cos - margin).mean(1)
        candidates = sorted(range(1, n), key=lambda i: -float(energy[i]))[:2 * r]
        a_side, b_side = candidates[0::2], candidates[1::2]
        moves = {a: max(b_side, key=lambda b: (float(cos[a, b]), -b_side.index(b))) for a in a_side}
    elif method == "tofu":  # ToMe matching: A = even, B = odd, [CLS] (0) never merges
        best = {a: max(range(1, n, 2), key=lambda b: (float(cos[a, b]), -b)) for a in range(2, n, 2)}
        ranked = sorted(best, key=lambda a: -float(cos[a, best[a]]))
        moves = {a: best[a] for a in ranked[:r]}
    else:  # visionzip: n_out = 16 - r; contextual share 0.15
        n_out = n - r
        targets_count = max(1, min(round(0.15 * n_out), n_out - 1))
        score = _cls_attention(q, k)
        dominant = [0] + sorted(range(1, n), key=lambda i: -float(score[i]))[:n_out - targets_count - 1]
        rest = [i for i in range(n) if i not in dominant]
        step = len(rest) // targets_count
        targets = rest[0:targets_count * step:step]
        moves = {o: max(targets, key=lambda t: (float(cos[o, t]), -targets.index(t)))
                 for o in rest if o not in targets}
    kept = [i for i in range(n) if i not in moves]
    return _groups_into(kept, moves)


@torch.no_grad()
def _reference_forward(module, tokens, method, r, options=None):
    """Tiny with one reduction site after the attention of its last block."""
    outputs, pooled = [], []
    depth = len(module.blocks)
    for sample in tokens:
        x = torch.cat([module.cls[0], sample])
        for block in module.blocks[:-1]:
            x = block(x[None])[0]
        last = module.blocks[-1]
        n, c = x.shape
        qkv = last.qkv(last.norm1(x)).reshape(n, 3, 2, c // 2).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        x = x + last.proj(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, c))
        if method in PRUNERS:
            groups = _prune_groups(method, q, k, depth - 1, n, r)
        else:
            groups = _merge_groups(method, q, k, depth - 1, n, r, depth)
        prune_early = method == "tofu" and (options or {}).get("prune_blocks") == "1.0"
        rows, sizes = [], []
        for members, weights in groups:
            if prune_early:
                members = members[:1]
            weights = weights or [1.0] * len(members)
            mean = sum(w * x[i] for w, i in zip(weights, members)) / sum(weights)
            if method == "tofu" and not prune_early:   # MLERP: the largest member norm
                mean = mean / mean.norm() * max(float(x[i].norm()) for i in members)
            rows.append(mean)
            sizes.append(len(members))
        x = torch.stack(rows)
        x = x + last.fc2(F.gelu(last.fc1(last.norm2(x))))
        outputs.append(module.head(x[0]))
        # merging methods make token means count each token by its size (pruners: no sizes)
        weight = torch.tensor(sizes, dtype=x.dtype)[:, None] if method in MERGERS else torch.ones(len(rows), 1)
        pooled.append((x * weight).sum(0) / weight.sum())
    return torch.stack(outputs), torch.stack(pooled)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    module = Tiny(depth=2).eval()
    return module, export_module(module, (torch.randn(2, 15, 32),))


@pytest.mark.parametrize("method,options,r", [(m, {}, 5) for m in PRUNERS + MERGERS] + [
    ("tofu", {"prune_blocks": "1.0"}, 5), ("visionzip", {}, 1), ("pitome", {}, 7)])
def test_method_matches_reference_at_one_site(tiny, method, options, r):
    module, program = tiny
    result = tokencompile.optimize(program, schedule=[0, r], method=method, options=options)
    tokens = torch.randn(3, 15, 32, generator=torch.Generator().manual_seed(1))
    want_logits, want_pooled = _reference_forward(module, tokens, method, r, options)
    with torch.no_grad():
        logits, pooled = result.program.module()(tokens)
    assert torch.allclose(logits, want_logits, atol=1e-5), (logits - want_logits).abs().max()
    assert torch.allclose(pooled, want_pooled, atol=1e-5), (pooled - want_pooled).abs().max()


def test_methods_command_lists_every_method():
    out = CliRunner().invoke(main, ["methods"])
    assert out.exit_code == 0
    assert len(METHODS) >= 9
    for name in METHODS:
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


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_exports_and_keeps_fused_attention(tiny, method, tmp_path):
    """ONNX Runtime parity at batch 1 and 8 on the small model; one fused SDPA per block, before and after."""
    _, program = tiny
    result = tokencompile.optimize(program, schedule=[3, 4], method=method)
    sdpa = [n for n in result.program.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 2
    assert not any(n.op == "call_function" and n.target == torch.ops.aten.bmm.default for n in result.program.graph.nodes)
    path = str(tmp_path / f"{method}.onnx")
    tokens = lambda b: (torch.randn(b, 15, 32, generator=torch.Generator().manual_seed(b)),)
    export_onnx(result.program, path, tokens(2))
    rows = verify_onnx(result.program, path, [tokens(1), tokens(8)])
    assert all(row["max_abs_error"] <= 1e-5 for row in rows), rows


def _end_to_end_cases():
    """Every method on ViT-S and BERT; the default set keeps one pruner on BERT (padding), ViT-S's methods
    are slow, and BERT's other methods sweep (every method's ONNX parity also runs on the small model above)."""
    return [(name, method) if name == "hf_bert" and method == "evit"
            else pytest.param(name, method, marks=pytest.mark.slow if name == "vit_small" else pytest.mark.sweep)
            for name in ("vit_small", "hf_bert") for method in sorted(METHODS) if method != "tome"]


@pytest.mark.parametrize("name,method", _end_to_end_cases())
def test_method_end_to_end(recipe, name, method, tmp_path):
    check_method_end_to_end(recipe(name)[1], name, method, tmp_path)


def check_method_end_to_end(program, name: str, method: str, tmp_path=None) -> None:
    """Budget met, every block's attention on the tokens entering it, batch independence, and with
    ``tmp_path`` ONNX Runtime parity at batch 1 and 8."""
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
    if tmp_path is None:
        return
    path = str(tmp_path / f"{method}.onnx")
    export_onnx(result.program, path, _inputs(name, 2))
    rows = verify_onnx(result.program, path, [_inputs(name, 1), _inputs(name, 8)])
    assert all(row["max_abs_error"] <= 1e-4 for row in rows), rows


@pytest.mark.sweep
@pytest.mark.parametrize("name", ["deit_small_distilled", "minilm"])
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"tome"}))
def test_method_end_to_end_more_models(recipe, name, method):
    """Without the ONNX export (10-20 s each): every method's ONNX parity runs on ViT-S and BERT above, and
    these models' in test_onnx."""
    check_method_end_to_end(recipe(name)[1], name, method)
