"""EViT: keep the tokens the [CLS] token attends to most; fuse the rest into one token weighted by
that attention (Liang et al., ICLR 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from ..graph_utils import GraphBuilder, aten, tensor_meta
from .base import PruneMethod, SiteInputs


def cls_attention(builder: GraphBuilder, site: SiteInputs) -> Node:
    """Head-averaged attention of token 0 over all keys, [B, N], from one probe query row: the full
    N x N attention is never materialised, so the model's attention stays fused."""
    return cls_attention_row(builder, site.query, site.keys, site.valid, f"block{site.block}_cls_attention")


def cls_attention_row(builder: GraphBuilder, query: Node, keys: Node, valid: Node | None, name: str) -> Node:
    """``cls_attention`` of any attention's query and keys [B, H, N, D] (valid: [B, N] or None)."""
    scale = tensor_meta(query).shape[-1] ** -0.5
    probe = builder.call(aten.slice.Tensor, query, 2, 0, 1)                       # [B, H, 1, D]
    logits = builder.call(aten.matmul.default, probe, builder.call(aten.transpose.int, keys, -2, -1))
    logits = builder.call(aten.mul.Tensor, logits, scale)                         # [B, H, 1, N]
    if valid is not None:
        key_ok = builder.call(aten.unsqueeze.default, builder.call(aten.unsqueeze.default, valid, 1), 1)
        logits = builder.call(aten.masked_fill.Scalar, logits, builder.call(aten.logical_not.default, key_ok),
                              float("-inf"))
    attention = builder.call(aten.softmax.int, logits, -1)
    return builder.call(aten.mean.dim, builder.call(aten.squeeze.dim, attention, 2), [1], name=name)


@dataclass
class EViT(PruneMethod):
    name = "evit"
    family = "prune"
    summary = "keep top tokens by [CLS] attention (one probe row), fuse the rest into one token"
    reference = "Liang et al., Not All Patches are What You Need (EViT), ICLR 2022"
    fuse = True

    def score(self, builder: GraphBuilder, site: SiteInputs, n_keep: int) -> Node:
        return cls_attention(builder, site)

    def merge_weight(self, builder: GraphBuilder, site: SiteInputs, score: Node) -> Node:
        # the fused token is the attention-weighted mean of the inattentive tokens (times their sizes)
        weight = builder.call(aten.clamp.default, score, 1e-6)
        return builder.call(aten.mul.Tensor, builder.cast(weight, tensor_meta(site.x).dtype),
                            site.sizes)
