"""Insert a reduction after the attention of every block the schedule reduces.

At each site the method inserts its plan (rep, src, dst); the pass then merges the residual stream,
sums the token sizes, gathers every other per-token tensor that later blocks read (attention mask,
validity, position tensors), and re-specialises all downstream shapes.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .. import ops  # noqa: F401
from ..graph_utils import GraphBuilder, aten, descendants, latest, pseudo_module_stack
from ..methods import SiteInputs
from .context import ReductionSite, RewriteContext
from .respecialize_token_shapes import respecialize_token_shapes

tc = torch.ops.tokencompile


def _original_value(node: Node):
    """A node's value before any site changed token counts (gathers stand for their source)."""
    return node.meta["tc_original_val"] if "tc_original_val" in node.meta else node.meta.get("val")


def _token_dims(node: Node, tokens: int) -> list[int]:
    """Dims of a tensor that index tokens: of the original token count, past the batch axis (judged on
    original shapes: shapes stay stale until the propagation). Parameters qualify only when
    batch-broadcast ([1, N, ...]), so that weight matrices are never mistaken for them."""
    value = _original_value(node)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return []
    if node.op == "get_attr" and value.shape[0] != 1:
        return []
    return [d for d in range(1, value.dim()) if value.shape[d] == tokens]


def _insert_validity(gm: GraphModule, ctx: RewriteContext) -> Node | None:
    mask = ctx.analysis.mask_input
    if mask is None:
        return None
    builder = GraphBuilder(gm, mask)
    return builder.call(aten.ne.Scalar, mask, 0, name="token_valid")


def _rescale_to_largest_norm(builder: GraphBuilder, site: Node, merged: Node, plan, prefix: str) -> Node:
    """MLERP (ToFu): keep each merged token's direction, give it the largest norm among its members, so
    that averaging dissimilar tokens does not shrink the residual stream."""
    norms = builder.call(aten.linalg_vector_norm.default, site, 2, [-1])
    largest = builder.call(tc.max_tokens.default, norms, plan.rep, plan.src, plan.dst, name=f"{prefix}_largest_norm")
    current = builder.call(aten.clamp.default, builder.call(aten.linalg_vector_norm.default, merged, 2, [-1]), 1e-12)
    factor = builder.call(aten.unsqueeze.default, builder.call(aten.div.Tensor, largest, current), -1)
    return builder.call(aten.mul.Tensor, merged, factor, name=f"{prefix}_mlerp")


def _insert_site(gm: GraphModule, ctx: RewriteContext, block_index: int, n_in: int, r: int, valid: Node | None,
                 sizes: Node | None, replaced: dict) -> tuple[Node | None, Node]:
    """Insert one site's nodes. Shapes downstream stay stale until the single propagation at the end;
    ``replaced`` collects, for every new node standing in for an old tensor, that tensor's original value."""
    block = ctx.analysis.blocks[block_index]
    site = block.site
    n_out = n_in - r
    downstream = descendants([site])
    live_ins = {}
    for user in downstream:
        for arg in user.all_input_nodes:
            if arg is not site and arg not in downstream and arg not in live_ins:
                dims = _token_dims(arg, ctx.analysis.tokens)
                if dims:
                    live_ins[arg] = dims

    scope = pseudo_module_stack(site, f"{block.name}.token_reduction")
    builder = GraphBuilder(gm, site, scope)
    prefix = f"block{block_index}"
    if sizes is None:
        first = builder.call(aten.select.int, site, -1, 0, name="token_first_channel")
        sizes = builder.call(aten.ones_like.default, first, name="token_sizes")
    inputs = SiteInputs(block=block_index, x=site, query=block.attention.query, keys=block.keys, valid=valid,
                        sizes=sizes, num_prefix=ctx.analysis.num_prefix,
                        protect_last_valid=ctx.analysis.protect_last_valid, n=n_in,
                        depth=len(ctx.analysis.blocks),
                        probabilities=block.attention.node if block.attention.kind == "eager" else None)
    plan = ctx.method.plan(builder, inputs, r)
    rep, src, dst = plan.rep, plan.src, plan.dst
    weight = sizes if plan.weight is None else plan.weight
    merged = builder.call(tc.merge_tokens.default, site, weight, rep, src, dst, name=f"{prefix}_merge")
    if plan.keep_norm:
        merged = _rescale_to_largest_norm(builder, site, merged, plan, prefix)
    new_sizes = builder.call(tc.sum_tokens.default, sizes, rep, src, dst, name=f"{prefix}_sizes")
    merged.meta["tc_original_val"] = replaced[merged] = _original_value(site)
    gathered = {}
    for arg, dims in live_ins.items():
        value = arg
        # a live-in may be computed late in graph order (e.g. a pooling mask after the last block)
        gather_builder = GraphBuilder(gm, latest(gm, builder.cursor, arg), scope)
        for dim in dims:
            value = gather_builder.call(tc.gather_tokens.default, value, rep, dim, name=f"{prefix}_gather_{arg.name}")
        value.meta["tc_original_val"] = replaced[value] = _original_value(arg)
        gathered[arg] = value
    new_valid = builder.call(tc.gather_tokens.default, valid, rep, 1, name=f"{prefix}_valid") \
        if valid is not None else None

    for user in downstream:
        user.replace_input_with(site, merged)
        for arg, value in gathered.items():
            user.replace_input_with(arg, value)
    ctx.sites.append(ReductionSite(block_index, n_in, n_out, rep, src, dst, new_sizes))
    return new_valid, new_sizes


def insert_token_reduction(gm: GraphModule, ctx: RewriteContext) -> GraphModule:
    if not any(ctx.schedule):
        return gm
    valid = _insert_validity(gm, ctx)
    sizes, replaced, n = None, {}, ctx.analysis.tokens
    for block_index, r in enumerate(ctx.schedule):
        if r > 0:
            valid, sizes = _insert_site(gm, ctx, block_index, n, r, valid, sizes, replaced)
            n -= r
    first = ctx.analysis.blocks[ctx.sites[0].block].site
    nodes = list(gm.graph.nodes)
    respecialize_token_shapes(gm, nodes[nodes.index(first) + 1:], replaced, ctx.analysis.num_prefix)
    return gm
