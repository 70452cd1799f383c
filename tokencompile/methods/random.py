"""Random pruning: the seeded baseline that every method must beat (UniPruneBench finds it strong)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from ..graph_utils import GraphBuilder, aten
from .base import PruneMethod, SiteInputs


@dataclass
class RandomPrune(PruneMethod):
    name = "random"
    family = "prune"
    summary = "keep a seeded pseudo-random subset of tokens (baseline)"
    reference = "baseline; see UniPruneBench (Peng et al., 2025) on random pruning"
    seed: int = 0

    def score(self, builder: GraphBuilder, site: SiteInputs, n_keep: int) -> Node:
        # An integer hash of (position, block, seed), exact in every runtime: the same for every sample
        # and run (batch-independent), and a bijection of positions (odd multiplier mod 2^24: no ties).
        positions = builder.positions(site.x)  # [B, N], 0-based
        mixed = builder.call(aten.add.Tensor, builder.call(aten.mul.Tensor, positions, 2654435761),
                             2654435761 + 7919 * (1 + site.block) + 104729 * self.seed)
        return builder.cast(builder.call(aten.remainder.Scalar, mixed, 1 << 24), torch.float32,
                            name=f"block{site.block}_random_score")
