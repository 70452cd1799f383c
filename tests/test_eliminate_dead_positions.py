"""eliminate_dead_positions on small programs: which attention queries and projections shrink to the
read position, what stays whole, exact outputs and exact FLOPs."""

import pytest
import torch
import torch.nn.functional as F

from tokencompile.compiler import export_module
from tokencompile.flops import count_flops
from tokencompile.graph_utils import SDPA, nodes_with_target, tensor_meta
from tokencompile.passes import eliminate_dead_positions

DIM, TOKENS = 32, 16


class Block(torch.nn.Module):
    """Pre-norm attention block with separate q / k / v projections (2 heads)."""

    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal
        self.norm1, self.norm2 = torch.nn.LayerNorm(DIM), torch.nn.LayerNorm(DIM)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(DIM, DIM) for _ in range(4))
        self.fc1, self.fc2 = torch.nn.Linear(DIM, 2 * DIM), torch.nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        b, n, _ = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(b, n, 2, DIM // 2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.o(attn.transpose(1, 2).reshape(b, n, DIM))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Encoder(torch.nn.Module):
    def __init__(self, read=0, causal=False, mix=False):
        super().__init__()
        self.read, self.mix = read, mix
        self.blocks = torch.nn.ModuleList([Block(causal), Block(causal)])
        self.norm, self.head = torch.nn.LayerNorm(DIM), torch.nn.Linear(DIM, 5)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.mix:
            x = x.cumsum(1)  # mixes positions: what feeds it must stay whole
        return self.head(self.norm(x)[:, self.read])


def _program(module, batch=2):
    torch.manual_seed(0)
    module = module.eval()
    return module, export_module(module, (torch.randn(batch, TOKENS, DIM),))


def _query_lengths(gm):
    return [tensor_meta(node.args[0]).shape[-2] for node in nodes_with_target(gm.graph, SDPA)]


def _check_same_outputs(module, gm):
    for batch in (1, 3):
        x = torch.randn(batch, TOKENS, DIM)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), module(x), atol=1e-5, rtol=1e-5)


def test_cls_read_runs_the_last_block_on_cls_alone():
    module, ep = _program(Encoder(read=0))
    x = torch.randn(2, TOKENS, DIM)
    before = count_flops(ep.module(), (x,))
    gm = eliminate_dead_positions(ep.module())
    assert _query_lengths(gm) == [TOKENS, 1]
    linears = [tensor_meta(node).shape[1] for node in nodes_with_target(gm.graph, torch.ops.aten.linear.default)]
    assert linears[:12] == [TOKENS] * 6 + [1, TOKENS, TOKENS, 1, 1, 1]  # q, k, v, o, fc1, fc2 per block
    # per sample, the last block's q, o, fc1, fc2 (12 d^2 per token) and attention rows (4 N d) of the other 15 tokens
    saved = 12 * DIM * DIM * (TOKENS - 1) + 4 * TOKENS * DIM * (TOKENS - 1)
    assert count_flops(gm, (x,)) == before - 2 * saved
    _check_same_outputs(module, gm)


@pytest.mark.parametrize("read, queries, causal", [(-1, 1, False), (0, 1, True), (5, TOKENS, True)])
def test_causal_attention_read_at_one_position(read, queries, causal):
    """The last query sees every key (no causal flag needed); the first sees the first key (the flag's
    top-left alignment says so); another position would need a mask: its attention stays whole."""
    module, ep = _program(Encoder(read=read, causal=True))
    gm = eliminate_dead_positions(ep.module())
    last = list(nodes_with_target(gm.graph, SDPA))[-1]
    assert _query_lengths(gm) == [TOKENS, queries]
    assert bool(last.kwargs.get("is_causal", last.args[5] if len(last.args) > 5 else False)) is causal
    _check_same_outputs(module, gm)


class EagerCausal(torch.nn.Module):
    """Eager attention: q @ k^T plus an additive causal mask, softmax, @ v (Gemma 2's form)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(DIM, DIM) for _ in range(3))
        self.register_buffer("mask", torch.full((TOKENS, TOKENS), float("-inf")).triu(1))

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / DIM ** 0.5 + self.mask
        return (scores.softmax(-1) @ self.v(x) + x)[:, -1]


def test_eager_attention_runs_its_last_row_alone():
    module, ep = _program(EagerCausal())
    gm = eliminate_dead_positions(ep.module())
    matmuls = [tuple(tensor_meta(n).shape[1:]) for n in nodes_with_target(gm.graph, torch.ops.aten.matmul.default)]
    assert matmuls == [(1, TOKENS), (1, DIM)]  # one row of scores, one row of weighted values
    _check_same_outputs(module, gm)


class SharedKeys(torch.nn.Module):
    """``y`` feeds the read path twice (a query projection, a residual) and the attention's keys and
    values, which need every position."""

    def __init__(self):
        super().__init__()
        self.inner, self.q = torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM)

    def forward(self, x):
        y = self.inner(x)
        return (F.scaled_dot_product_attention(self.q(y), y, y) + y)[:, -1]


def test_a_tensor_the_attention_reads_whole_stays_whole():
    module, ep = _program(SharedKeys())
    gm = eliminate_dead_positions(ep.module())
    (attention,) = nodes_with_target(gm.graph, SDPA)
    assert [tensor_meta(a).shape[1] for a in attention.args[:3]] == [1, TOKENS, TOKENS]
    inner = next(n for n in nodes_with_target(gm.graph, torch.ops.aten.linear.default))
    assert tensor_meta(inner).shape[1] == TOKENS
    _check_same_outputs(module, gm)


def test_a_position_mixing_op_stops_the_rewrite():
    module, ep = _program(Encoder(read=-1, mix=True))
    gm = eliminate_dead_positions(ep.module())
    assert _query_lengths(gm) == [TOKENS, TOKENS]
    head = list(nodes_with_target(gm.graph, torch.ops.aten.layer_norm.default))[-1]
    assert tensor_meta(head).shape[1] == 1  # the final norm, after the cumsum, runs on the read position
    _check_same_outputs(module, gm)


class ReadAndMean(Encoder):
    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0]), x.mean(1)


def test_outputs_reading_every_position_leave_the_graph_alone():
    module, ep = _program(ReadAndMean())
    gm = ep.module()
    code = gm.code
    assert eliminate_dead_positions(gm).code == code
    _check_same_outputs(module, gm)


class Masked(torch.nn.Module):
    """One attention with an explicit mask of the given shape; ``prefix`` learned keys before the tokens
    (fewer queries than keys)."""

    def __init__(self, mask_shape=None, prefix=0, causal=False):
        super().__init__()
        self.causal = causal
        self.q, self.kv = torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM)
        self.prefix = torch.nn.Parameter(torch.randn(1, prefix, DIM))
        mask = None if mask_shape is None else torch.rand(mask_shape) > 0.3
        if mask is not None:
            mask[..., -1] = True  # every row sees a key
        self.register_buffer("mask", mask)

    def forward(self, x):
        keys = self.kv(torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], 1))
        out = F.scaled_dot_product_attention(self.q(x), keys, keys, attn_mask=self.mask, is_causal=self.causal)
        return (out + x)[:, -1]


@pytest.mark.parametrize("mask_shape, rows", [((TOKENS,), TOKENS), ((TOKENS, TOKENS), 1), ((1, TOKENS, TOKENS), 1),
                                              ((1, 1, TOKENS), 1)])
def test_masks_of_any_rank_keep_their_key_axis(mask_shape, rows):
    """A mask's rows (axis -2 of [..., L, S]) follow the query; a mask without rows or with one row for
    all queries is read whole."""
    module, ep = _program(Masked(mask_shape))
    gm = eliminate_dead_positions(ep.module())
    (attention,) = nodes_with_target(gm.graph, SDPA)
    assert _query_lengths(gm) == [1]
    assert tuple(tensor_meta(attention.args[3]).shape) == ((TOKENS,) if len(mask_shape) == 1 else
                                                          (*mask_shape[:-2], rows, TOKENS))
    _check_same_outputs(module, gm)


def test_causal_attention_with_fewer_queries_than_keys_stays_whole():
    """With learned keys before the tokens, torch's top-left causal mask does not let the last query see
    every key: dropping the flag would change it."""
    module, ep = _program(Masked(prefix=3, causal=True))
    gm = eliminate_dead_positions(ep.module())
    assert _query_lengths(gm) == [TOKENS]
    _check_same_outputs(module, gm)


class Reads(torch.nn.Module):
    def __init__(self, read):
        super().__init__()
        self.read, self.block = read, Block()

    def forward(self, x):
        return self.read(self.block(x))


@pytest.mark.parametrize("read, queries", [
    (lambda h: h[:, -2:-1], 1), (lambda h: h[:, TOKENS - 1:TOKENS + 5], 1), (lambda h: h[:, 3], 1),
    (lambda h: h[:, 0:-TOKENS - 4], TOKENS),  # empty: not a one-position read
    (lambda h: (h * 2).squeeze(2)[:, -1], 1),  # a squeeze that removes nothing
    (lambda h: (h * 2).squeeze(1)[:, -1], TOKENS),  # ... of the read axis: on one position it would remove it
    # a 1-D right operand: the result has no row axis, its axis -2 (here the tokens) is not the left's
    (lambda h: (h.view(h.shape[0], TOKENS, 2, DIM // 2) @ torch.ones(DIM // 2))[:, -1], TOKENS),
])
def test_reads_by_slice_select_and_their_lookalikes(read, queries):
    module, ep = _program(Reads(read))
    gm = eliminate_dead_positions(ep.module())
    assert _query_lengths(gm) == [queries]
    _check_same_outputs(module, gm)


class TwoRoles(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(DIM, DIM)

    def forward(self, x):
        w = self.lin(x[0])  # [N, D]: the input of the read path and, whole, its weight
        return F.linear(w, w)[-1]


def test_an_input_read_both_by_position_and_whole_is_left_alone():
    module, ep = _program(TwoRoles())
    gm = eliminate_dead_positions(ep.module())
    assert all(tensor_meta(n).shape[0] == TOKENS for n in nodes_with_target(gm.graph, torch.ops.aten.linear.default))
    _check_same_outputs(module, gm)
