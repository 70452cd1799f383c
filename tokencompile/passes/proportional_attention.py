"""Proportional attention (ToMe): a merged token stands for `size` tokens, so every later attention
adds log(size) to its logits over keys. Done through SDPA's mask argument so attention stays fused."""

from __future__ import annotations

from torch.fx import GraphModule

from ..graph_utils import GraphBuilder, aten, latest, pseudo_module_stack, node_arg, set_node_arg, tensor_meta
from .context import RewriteContext


def proportional_attention(gm: GraphModule, ctx: RewriteContext) -> GraphModule:
    if not ctx.proportional_attention or not ctx.method.merges:
        return gm
    for block in ctx.analysis.blocks:
        sizes = ctx.sizes_before_block(block.index)
        if sizes is None:
            continue
        attention = block.attention
        query = tensor_meta(attention.args[0])
        scope = pseudo_module_stack(attention, f"{block.name}.proportional_attention")
        builder = GraphBuilder(gm, latest(gm, sizes, attention.args[0]), scope)
        log_sizes = builder.call(aten.log.default, builder.call(aten.to.dtype, sizes, query.dtype))
        bias = builder.call(aten.unsqueeze.default, builder.call(aten.unsqueeze.default, log_sizes, 1), 1,
                            name=f"block{block.index}_log_sizes")
        mask = node_arg(attention, 3, "attn_mask")
        if mask is not None:
            mask_builder = GraphBuilder(gm, latest(gm, bias, mask), scope)
            if tensor_meta(mask).dtype.is_floating_point:
                bias = mask_builder.call(aten.add.Tensor, mask, bias, name=f"block{block.index}_attn_bias")
            else:
                bias = mask_builder.call(aten.where.ScalarOther, mask, bias, float("-inf"),
                                         name=f"block{block.index}_attn_bias")
        set_node_arg(attention, 3, "attn_mask", bias)
    return gm

