"""DART: duplication-aware pruning; keep pivots and the tokens least similar to them (no attention
matrix needed, so it works with fused attention)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch.fx import Node

from ..graph_utils import GraphBuilder, aten
from .base import PruneMethod, Range, SiteInputs


@dataclass
class DART(PruneMethod):
    name = "dart"
    family = "prune"
    summary = "pick pivots by key norm, keep pivots and the tokens least similar to them"
    reference = "Wen et al., Stop Looking for Important Tokens... Duplication Matters More (DART), 2025"
    pivots: int = 8
    ranges = {"pivots": Range(1)}

    def score(self, builder: GraphBuilder, site: SiteInputs, n_keep: int) -> Node:
        b = f"block{site.block}_dart"
        metric = builder.call(aten.mean.dim, site.keys, [1])                                   # [B, N, D]
        norm = builder.call(aten.linalg_vector_norm.default, metric, 2, [-1])                  # [B, N]
        unit = builder.call(aten.div.Tensor, metric,
                            builder.call(aten.unsqueeze.default, builder.call(aten.clamp.default, norm, 1e-12), -1))
        pivots = min(self.pivots, site.n)
        chosen = builder.call(aten.topk.default, norm, pivots)
        index = builder.call(operator.getitem, chosen, 1, name=f"{b}_pivots")                 # [B, p]
        gather_index = builder.call(aten.expand.default, builder.call(aten.unsqueeze.default, index, -1),
                                    [-1, -1, site.keys.meta["val"].shape[-1]])
        pivot_vectors = builder.call(aten.gather.default, unit, 1, gather_index)             # [B, p, D]
        similarity = builder.call(aten.matmul.default, unit, builder.call(aten.transpose.int, pivot_vectors, 1, 2))
        duplication = builder.call(aten.amax.default, similarity, [-1])                       # [B, N]
        score = builder.call(aten.neg.default, duplication)
        return builder.call(aten.scatter.value, score, 1, index, float("inf"), name=f"{b}_score")
