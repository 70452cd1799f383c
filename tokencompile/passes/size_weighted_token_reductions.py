"""Sums and means over the token axis after a merge must count a merged token `size` times:
sum(x) -> sum(x * s), mean(x) -> sum(x * s) / sum(s). A masked mean sum(h*m)/sum(m) becomes
sum(h*m*s)/sum(m*s), which is the masked mean over the original tokens."""

from __future__ import annotations

from torch.fx import GraphModule

from ..graph_utils import GraphBuilder, aten, latest, tensor_meta
from .context import RewriteContext


def size_weighted_token_reductions(gm: GraphModule, ctx: RewriteContext) -> GraphModule:
    if not ctx.sites or not ctx.method.merges:
        return gm
    sizes_by_count = {site.n_out: site.sizes for site in ctx.sites}
    tokens = ctx.analysis.tokens
    for node in list(gm.graph.nodes):
        if node.target not in (aten.sum.dim_IntList, aten.mean.dim):
            continue
        source = node.args[0]
        value, original = tensor_meta(source), source.meta.get("tc_original_val")
        dims = [d % value.dim() for d in node.args[1]] if value is not None else []
        if original is None or dims != [1] or original.shape[1] != tokens or value.shape[1] == tokens:
            continue
        sizes = sizes_by_count[value.shape[1]]
        builder = GraphBuilder(gm, latest(gm, source, sizes))
        weight = builder.cast(sizes, value.dtype)
        for _ in range(value.dim() - 2):
            weight = builder.call(aten.unsqueeze.default, weight, -1)
        weighted = builder.call(aten.mul.Tensor, source, weight, name=f"{node.name}_size_weighted")
        node.replace_input_with(source, weighted)
        if node.target == aten.mean.dim:
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            after = GraphBuilder(gm, node)
            total = after.call(aten.sum.dim_IntList, weighted, [1], keepdim)
            count = after.call(aten.sum.dim_IntList, weight, [1], keepdim)
            ratio = after.call(aten.div.Tensor, total, count, name=f"{node.name}_size_weighted")
            node.replace_all_uses_with(ratio)
            gm.graph.erase_node(node)
    return gm
