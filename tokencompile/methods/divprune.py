"""DivPrune: keep the most diverse subset, by greedy max-min (farthest-point) selection on key cosine
distance, a fixed number of steps so that it exports (Alvar et al., CVPR 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from ..graph_utils import GraphBuilder, aten
from .base import PruneMethod, SiteInputs


@dataclass
class DivPrune(PruneMethod):
    name = "divprune"
    family = "prune"
    summary = "greedy max-min diversity selection on key cosine distance (fixed-step loop)"
    reference = "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, CVPR 2025"

    def plan_flops(self, tokens: int, metric_dim: int) -> int:
        return 2 * tokens * tokens * metric_dim

    def score(self, builder: GraphBuilder, site: SiteInputs, n_keep: int) -> Node:
        # n_keep steps always suffice: protected tokens are kept whatever their rank
        metric = builder.call(aten.mean.dim, site.keys, [1])
        return builder.call(torch.ops.tokencompile.farthest_point_rank.default, metric, site.valid, n_keep,
                            site.num_prefix, site.protect_last_valid, name=f"block{site.block}_divprune_rank")
