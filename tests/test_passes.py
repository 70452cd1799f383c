"""Passes on small graphs: which nodes they insert, and shapes re-specialised by data flow, not value."""

import pytest
import torch
import torch.nn.functional as F

import tokencompile
from tokencompile.analysis import analyse
from tokencompile.compiler import export_module
from tokencompile.methods import get_method
from tokencompile.passes import REDUCTION_PASSES, RewriteContext, run_passes

tc = torch.ops.tokencompile
aten = torch.ops.aten


class Block(torch.nn.Module):
    """Flattens tokens with the batch around every linear ([B*N, C]), as many exported graphs do."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x).reshape(b * n, c)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, c)
        x = x + self.proj(attn).reshape(b, n, c)
        hidden = self.fc2(F.gelu(self.fc1(self.norm2(x).reshape(b * n, c))))
        return x + hidden.view(b, n, c)


class Tiny(torch.nn.Module):
    """A class token plus 15 input tokens: N = 16 equals the head dim (32 / 2), on purpose."""

    def __init__(self, dim=32, heads=2, depth=3):
        super().__init__()
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = torch.nn.Linear(dim, 5)

    def forward(self, tokens):
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0]), x.mean(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    module = Tiny().eval()
    return module, export_module(module, (torch.randn(2, 15, 32),))


def _rewrite(program, schedule, prop_attn=True):
    gm = program.module()
    ctx = RewriteContext(analyse(gm), get_method("tome"), schedule, prop_attn)
    return run_passes(gm, ctx, REDUCTION_PASSES), ctx


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def test_analysis_of_tiny(tiny):
    analysis = analyse(tiny[1].module())
    assert [b.name for b in analysis.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert analysis.tokens == 16 and analysis.num_prefix == 1 and analysis.mask_input is None
    assert all(b.site.target == aten.add.Tensor for b in analysis.blocks)


def test_inserts_one_plan_merge_and_size_sum_per_site(tiny):
    gm, ctx = _rewrite(tiny[1], [3, 0, 2])
    assert len(_calls(gm, tc.tome_plan.default)) == 2
    assert len(_calls(gm, tc.merge_tokens.default)) == 2
    assert len(_calls(gm, tc.sum_tokens.default)) == 2
    assert [s.n_out for s in ctx.sites] == [13, 11]


def test_flattened_token_views_follow_the_new_count(tiny):
    """[B*N, C] views after a site carry the new N even though N == head dim == 16."""
    gm, _ = _rewrite(tiny[1], [3, 0, 0])
    views = [n for n in _calls(gm, aten.view.default) + _calls(gm, aten.reshape.default)
             if any(fqn in ("blocks.1", "blocks.2") for fqn, _ in (n.meta.get("nn_module_stack") or {}).values())]
    assert len(views) == 12  # 6 per block
    for view in views:
        shape = view.meta["val"].shape
        if len(shape) == 5:
            assert shape[1:] == (13, 3, 2, 16)   # tokens follow, head dim 16 stays
        elif len(shape) == 2:
            assert str(shape[0]).startswith("13*") and shape[1] in (32, 64, 96)   # [13*B, C]
        else:
            assert shape[1] == 13
    sdpa = _calls(gm, aten.scaled_dot_product_attention.default)
    assert [n.args[0].meta["val"].shape[-2] for n in sdpa] == [16, 13, 13]


def test_proportional_attention_feeds_sdpa_mask(tiny):
    gm, _ = _rewrite(tiny[1], [3, 0, 0])
    masks = [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
             for n in _calls(gm, aten.scaled_dot_product_attention.default)]
    assert masks[0] is None and all(m is not None for m in masks[1:])
    gm, _ = _rewrite(tiny[1], [3, 0, 0], prop_attn=False)
    assert all(len(n.args) <= 3 and n.kwargs.get("attn_mask") is None
               for n in _calls(gm, aten.scaled_dot_product_attention.default))


def test_token_mean_becomes_size_weighted(tiny):
    module, program = tiny
    result = tokencompile.optimize(program, schedule=[0, 0, 2], proportional_attention=False)
    x = torch.randn(2, 15, 32)
    # the final mean over tokens after a merge equals the mean over the original tokens of the
    # merged stream: merging does not change a size-weighted mean at the merge point
    _, pooled = result.program.module()(x)
    assert pooled.shape == (2, 32)
    gm = result.program.module()
    weighted = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.mul.Tensor
                and any(a.op == "call_function" and a.target in (aten.unsqueeze.default, aten.to.dtype)
                        for a in n.all_input_nodes)]
    assert weighted, "the token mean must be weighted by token sizes"


def test_zero_schedule_changes_nothing(tiny):
    module, program = tiny
    result = tokencompile.optimize(program, schedule=[0])
    x = torch.randn(3, 15, 32)
    for got, want in zip(result.program.module()(x), module(x)):
        assert (got - want).abs().max() <= 1e-6


def test_reduced_tiny_matches_manual_merge(tiny):
    """With one site in the last block, the output equals merging by hand at that point."""
    module, program = tiny
    result = tokencompile.optimize(program, schedule=[0, 0, 4], proportional_attention=False)
    x = torch.randn(2, 15, 32)
    with torch.no_grad():
        h = torch.cat([module.cls.expand(2, -1, -1), x], dim=1)
        for block in module.blocks[:2]:
            h = block(h)
        last = module.blocks[2]
        b, n, c = h.shape
        qkv = last.qkv(last.norm1(h)).reshape(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
        h = h + last.proj(F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(b, n, c))
        plan = tc.tome_plan(qkv[1].mean(1), None, 4, 1, False)
        ones = torch.ones(b, n)
        merged = tc.merge_tokens(h, ones, *plan)
        sizes = tc.sum_tokens(ones, *plan)
        merged = merged + last.fc2(F.gelu(last.fc1(last.norm2(merged))))
        pooled = (merged * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)
    cls_logits, got_pooled = result.program.module()(x)
    assert torch.allclose(cls_logits, module.head(merged[:, 0]), atol=1e-5)
    assert torch.allclose(got_pooled, pooled, atol=1e-5)


class TinyDense(Tiny):
    def forward(self, tokens):
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return x


def test_per_token_outputs_are_refused():
    program = export_module(TinyDense().eval(), (torch.randn(2, 15, 32),))
    with pytest.raises(tokencompile.TokenCompileError, match="output 0 of the model is per-token"):
        tokencompile.optimize(program, schedule=[2])


class RoutedBlock(Block):
    """Block whose MLP is a mixture of experts dispatched as Hugging Face's grouped experts do: the [B*N*k]
    token-expert pairs sorted by expert, and put back with the inverse permutation arange(B*N*k), whose size
    the export writes as a constant times the batch. ``sorted_dispatch=False``: the same routing, dense."""

    def __init__(self, dim, heads, experts=4, top_k=2, sorted_dispatch=True):
        super().__init__(dim, heads)
        self.router = torch.nn.Linear(dim, experts, bias=False)
        self.experts = torch.nn.Parameter(torch.randn(experts, dim, dim) / dim ** 0.5)
        self.top_k, self.sorted_dispatch = top_k, sorted_dispatch

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x).reshape(b * n, c)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, c)).reshape(b, n, c)
        flat = self.norm2(x).reshape(-1, c)
        weights, chosen = self.router(flat).softmax(-1).topk(self.top_k)
        if not self.sorted_dispatch:
            out = sum(w[:, None] * torch.einsum("tc,tcd->td", flat, self.experts[e])
                      for w, e in zip(weights.unbind(1), chosen.unbind(1)))
            return x + out.view(b, n, c)
        experts, order = chosen.reshape(-1).sort()
        rows = flat[order // self.top_k]
        out = torch.einsum("tc,tcd->td", rows, self.experts[experts]) * weights.reshape(-1)[order][:, None]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.size(0))
        return x + out[inverse].view(-1, self.top_k, c).sum(1).view(b, n, c)


def _reduced_twins(block, twin_block, schedule):
    """Tiny with three blocks of each kind, the same weights, both optimized with ``schedule``."""
    torch.manual_seed(0)
    models = []
    for make in (block, twin_block):
        model = Tiny().eval()
        model.blocks = torch.nn.ModuleList(make() for _ in range(3))
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(2, 15, 32)
    return [tokencompile.optimize(export_module(model, (x,)), schedule=schedule) for model in models]


def _assert_same_outputs(results):
    y = torch.randn(3, 15, 32)
    for got, want in zip(results[0].program.module()(y), results[1].program.module()(y)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", [[3, 0, 0], [0, 4, 2]])
def test_sorted_expert_dispatch_follows_the_new_count(schedule):
    """After a reduction the routed pairs' arange(B*N*k), the sort's outputs (read through getitem) and the
    [B*N, k, C] view carry the new token count: the program equals the dense routing reduced the same way."""
    results = _reduced_twins(lambda: RoutedBlock(32, 2), lambda: RoutedBlock(32, 2, sorted_dispatch=False), schedule)
    arange = _calls(results[0].program.graph_module, aten.arange.default)
    pairs = [2 * (16 - sum(schedule[:block + 1])) for block in range(3)]  # a block's MLP runs after its site
    assert [int(n.meta["val"].shape[0].node.expr.as_coeff_Mul()[0]) for n in arange] == pairs  # pairs * batch
    _assert_same_outputs(results)


class ParallelBlock(Block):
    """Attention and MLP both read the block's input (GPT-NeoX, Falcon, Phi), a tanh GELU written out."""

    def __init__(self, dim, heads, mlp_width):
        super().__init__(dim, heads)
        self.fc1, self.fc2 = torch.nn.Linear(dim, mlp_width), torch.nn.Linear(mlp_width, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.proj(F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(b, n, c))
        h = self.fc1(self.norm2(x))
        h = 0.5 * h * (1 + torch.tanh(0.79788456 * (h + 0.044715 * h ** 3)))  # fans out inside the MLP
        return x + attn + self.fc2(h)


@pytest.mark.parametrize("mlp_width", [64, 32])  # 32: the GELU's input fans out at the model's width
def test_parallel_blocks_reduce_at_their_output(mlp_width):
    """A parallel block has no residual stream between attention and MLP: its site is the block's output
    (the MLP still sees every token), not a node of the MLP that fans out, and the program equals merging
    there by hand."""
    torch.manual_seed(0)
    module = Tiny().eval()
    module.blocks = torch.nn.ModuleList(ParallelBlock(32, 2, mlp_width) for _ in range(3))
    program = export_module(module, (torch.randn(2, 15, 32),))
    analysis = analyse(program.module())
    assert [b.site is b.nodes[-1] for b in analysis.blocks] == [True] * 3
    result = tokencompile.optimize(program, schedule=[0, 0, 4], proportional_attention=False)
    x = torch.randn(2, 15, 32)
    with torch.no_grad():
        h = torch.cat([module.cls.expand(2, -1, -1), x], dim=1)
        keys = module.blocks[2].qkv(module.blocks[2].norm1(module.blocks[1](module.blocks[0](h))))
        for block in module.blocks:
            h = block(h)
        plan = tc.tome_plan(keys.reshape(2, 16, 3, 2, 16)[:, :, 1].mean(2), None, 4, 1, False)
        ones = torch.ones(2, 16)
        merged, sizes = tc.merge_tokens(h, ones, *plan), tc.sum_tokens(ones, *plan)
    cls_logits, pooled = result.program.module()(x)
    torch.testing.assert_close(cls_logits, module.head(merged[:, 0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, (merged * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True),
                               atol=1e-5, rtol=1e-5)


class FilledKeysBlock(Block):
    """Keys assembled in place as DeepSeek's latent attention does (``new_empty`` + ``copy_`` of two halves
    of the head dim); ``filled=False``: the same keys from ``cat``."""

    def __init__(self, dim, heads, filled=True):
        super().__init__(dim, heads)
        self.filled = filled

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        half = k.shape[-1] // 2
        if self.filled:
            keys = k.new_empty(*k.shape[:-1], 2 * half)
            keys[..., :half].copy_(k[..., half:])
            keys[..., half:].copy_(k[..., :half])
        else:
            keys = torch.cat([k[..., half:], k[..., :half]], -1)
        x = x + self.proj(F.scaled_dot_product_attention(q, keys, v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def test_keys_filled_in_place_follow_the_new_count():
    """``new_empty``'s sizes repeat its source's shape: after a reduction they take the new token count,
    and the program equals the same keys built with ``cat``."""
    results = _reduced_twins(lambda: FilledKeysBlock(32, 2), lambda: FilledKeysBlock(32, 2, filled=False), [3, 0, 2])
    assert [n.meta["val"].shape[2] for n in _calls(results[0].program.graph_module, aten.new_empty.default)] \
        == [16, 13, 13]
    _assert_same_outputs(results)


def test_writes_into_an_allocated_tensor_count_as_its_inputs():
    """fx does not show ``copy_`` into a slice of a ``new_empty`` as an input of the tensor: ``in_place_writes``
    does (DeepSeek's keys), and only for tensors allocated in the graph, not for inputs every reader shares."""
    from tokencompile.graph_utils import ancestors, in_place_writes

    class Fill(torch.nn.Module):
        def forward(self, a, b, shared):
            keys = a.new_empty(*a.shape[:-1], 2 * a.shape[-1])
            keys[..., :4].copy_(a)
            keys[..., 4:].copy_(b)
            shared[..., :4].copy_(a * 2)
            return keys + 1, shared + 1

    gm = torch.export.export(Fill(), (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 8))).module()
    writes = in_place_writes(gm.graph)
    keys, shared_read = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    a, b, shared = [n for n in gm.graph.nodes if n.op == "placeholder"][:3]
    assert b in ancestors(keys, writes) and b not in ancestors(keys)
    assert a not in ancestors(shared_read, writes)
