"""State shared by the passes of one optimization."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import Node

from ..analysis import ModelAnalysis
from ..methods import Method


@dataclass
class ReductionSite:
    block: int
    n_in: int
    n_out: int
    rep: Node
    src: Node
    dst: Node
    sizes: Node  # token sizes after the site, [B, n_out]


@dataclass
class RewriteContext:
    analysis: ModelAnalysis
    method: Method
    schedule: list[int]          # tokens removed after the attention of each block
    proportional_attention: bool = True
    sites: list[ReductionSite] = field(default_factory=list)

    def protected_count(self) -> int:
        return self.analysis.num_prefix + int(self.analysis.protect_last_valid)

    def sizes_before_block(self, block: int) -> Node | None:
        """Token sizes seen by the attention of ``block`` (None if no site comes before it)."""
        earlier = [site for site in self.sites if site.block < block]
        return earlier[-1].sizes if earlier else None
