"""Proportional attention (ToMe): a merged token stands for `size` tokens, so every later attention
adds log(size) to its logits over keys: through SDPA's mask argument, so attention stays fused, or
before the softmax of eager attention."""

from __future__ import annotations

from torch.fx import GraphModule

from ..graph_utils import GraphBuilder, aten, latest, pseudo_module_stack, tensor_meta
from .context import RewriteContext


def proportional_attention(gm: GraphModule, ctx: RewriteContext) -> GraphModule:
    if not ctx.proportional_attention or not ctx.method.merges:
        return gm
    for block in ctx.analysis.blocks:
        sizes = ctx.sizes_before_block(block.index)
        if sizes is None:
            continue
        attention = block.attention
        scope = pseudo_module_stack(attention.node, f"{block.name}.proportional_attention")
        builder = GraphBuilder(gm, latest(gm, sizes, attention.query), scope)
        log_sizes = builder.call(aten.log.default, builder.cast(sizes, tensor_meta(attention.query).dtype))
        bias = builder.call(aten.unsqueeze.default, builder.call(aten.unsqueeze.default, log_sizes, 1), 1,
                            name=f"block{block.index}_log_sizes")
        attention.add_key_bias(gm, bias, scope)
    return gm
