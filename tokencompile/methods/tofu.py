"""ToFu: ToMe's matching, but prune in early blocks (where tokens still differ) and merge in later ones,
with a norm-preserving merge (Kim et al., WACV 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from ..graph_utils import GraphBuilder, aten
from .base import Plan, Range, SiteInputs
from .tome import ToMe


@dataclass
class ToFu(ToMe):
    name = "tofu"
    family = "merge"
    summary = "ToMe matching; prune in early blocks, merge (MLERP, norm-preserving) in later ones"
    reference = "Kim et al., Token Fusion: Bridging the Gap between Token Pruning and Token Merging, WACV 2024"
    prune_blocks: float = 0.5  # the first fraction of blocks prunes; the rest merge
    ranges = {"prune_blocks": Range(0, 1)}

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        plan = super().plan(builder, site, r)
        if site.block < round(self.prune_blocks * site.depth):
            dropped = builder.call(aten.full_like.default, plan.dst, site.n - r, name=f"block{site.block}_tofu_drop")
            return Plan(plan.rep, plan.src, dropped)
        return Plan(plan.rep, plan.src, plan.dst, keep_norm=True)
