"""FastV on a decoder prompt (Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024).

At the probe layer the span's tokens are scored by the attention the last prompt token gives them
(softmax of q_last . k / sqrt(d), averaged over heads). The row is computed from q and k next to the
attention, so the layer's SDPA stays fused and no N x N matrix is built. The top tokens of the span
stay for every later layer; tokens outside the span and the last token always stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.fx import Node

from ..errors import TokenCompileError
from ..graph_utils import GraphBuilder, aten
from ..methods.base import PruneMethod, SiteInputs
from .analysis import Span

POSITION_POLICIES = ("keep", "renumber")


@dataclass
class FastV(PruneMethod):
    """``layer``: the first layer that sees only the kept tokens (scores come from the layer before);
    ``positions``: kept tokens keep their original RoPE positions (``keep``) or are renumbered
    0..n-1 from that layer on (``renumber``); ``probes``: the score is the attention row of the last
    prompt token (1, FastV) or the mean row of the last ``probes`` prompt tokens (an observation
    window, as SnapKV scores a KV cache), each row causal."""

    name: ClassVar[str] = "fastv"
    family: ClassVar[str] = "prune"
    summary: ClassVar[str] = "decoder prompt: keep the span tokens the last prompt token attends to most"
    reference: ClassVar[str] = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024"

    layer: int = 2
    positions: str = "keep"
    probes: int = 1
    span: Span = field(default_factory=Span)
    input_ids: Node | None = None  # the program's input_ids (set by the compiler, for token-id spans)
    scale: float = 1.0             # the probe attention's softmax scale (set by the compiler)

    def __post_init__(self):
        if self.positions not in POSITION_POLICIES:
            raise TokenCompileError(f"positions={self.positions!r} is not a position policy",
                                    f"give one of: {', '.join(POSITION_POLICIES)}")
        if self.probes < 1:
            raise TokenCompileError(f"probes={self.probes} is not a number of query rows", "give probes >= 1")
        if self.layer < 1:
            raise TokenCompileError(f"layer={self.layer} is not a layer after the first",
                                    "give layer >= 1 (the first layer that sees the kept tokens)")

    def last_token_attention(self, builder: GraphBuilder, site: SiteInputs) -> Node:
        """[B, N]: mean over heads (and probe rows) of the last prompt tokens' causal attention rows."""
        probes = min(self.probes, site.n)
        rows = builder.call(aten.slice.Tensor, site.query, 2, site.n - probes, site.n)          # [B, H, P, D]
        logits = builder.call(aten.matmul.default, rows, builder.call(aten.transpose.int, site.keys, -2, -1))
        logits = builder.call(aten.mul.Tensor, builder.call(aten._to_copy.default, logits, dtype=torch.float32),
                              self.scale)                                                        # [B, H, P, N]
        if probes > 1:  # probe row j (position n - P + j) sees keys 0 .. n - P + j
            positions = builder.positions(site.x)                                                # [B, N]
            rows_at = builder.call(aten.slice.Tensor, positions, 1, site.n - probes, site.n)      # [B, P]
            future = builder.call(aten.gt.Tensor, builder.call(aten.unsqueeze.default, positions, 1),
                                  builder.call(aten.unsqueeze.default, rows_at, 2))              # [B, P, N]
            logits = builder.call(aten.masked_fill.Scalar, logits,
                                  builder.call(aten.unsqueeze.default, future, 1), float("-inf"))
        attention = builder.call(aten.softmax.int, logits, -1)
        return builder.call(aten.mean.dim, attention, [1, 2], name=f"block{site.block}_last_token_attention")

    def removable(self, builder: GraphBuilder, site: SiteInputs) -> Node:
        """[B, N] bool: tokens of the span, the last token excluded."""
        positions = builder.positions(site.x)
        if self.span.token_id is not None:
            inside = builder.call(aten.eq.Scalar, self.input_ids, self.span.token_id)
        else:
            end = site.n if self.span.length is None else self.span.start + self.span.length
            inside = builder.call(aten.logical_and.default, builder.call(aten.ge.Scalar, positions, self.span.start),
                                  builder.call(aten.lt.Scalar, positions, end))
        return builder.call(aten.logical_and.default, inside, builder.call(aten.lt.Scalar, positions, site.n - 1))

    def score(self, builder: GraphBuilder, site: SiteInputs, n_keep: int) -> Node:
        attention = self.last_token_attention(builder, site)
        keep_always = builder.call(aten.full_like.default, attention, float("inf"))
        return builder.call(aten.where.self, self.removable(builder, site), attention, keep_always,
                            name=f"block{site.block}_fastv_score")


__all__ = ["POSITION_POLICIES", "FastV"]
