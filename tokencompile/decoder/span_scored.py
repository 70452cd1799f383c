"""The project's token scores (DART, DivPrune, ZipCache, random) on a decoder prompt's span.

Each score is computed at the stage layer over the prompt as the encoder method computes it (DART's
pivots by key norm, DivPrune's farthest-point ranks, ZipCache's probe saliency, the seeded hash); only
the choice is restricted: tokens outside the span, the sinks and the last prompt token always stay.
Stages, KV caches and positions are FastV's (``SpanScored`` is FastV with another score).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from ..errors import TokenCompileError
from ..graph_utils import GraphBuilder, aten
from ..methods import (
    DART,
    DivPrune,
    Method,
    PruneMethod,
    RandomPrune,
    SiteInputs,
    ZipCache,
)
from .fastv import FastV

SPAN_SCORES: dict[str, type[PruneMethod]] = {cls.name: cls for cls in (DART, DivPrune, ZipCache, RandomPrune)}


@dataclass
class SpanScored(FastV):
    """FastV's stages with ``scorer``'s score (a PruneMethod of the encoder methods) in place of the
    last-token attention row."""

    scorer: PruneMethod | None = None

    @property
    def name(self) -> str:
        return self.scorer.name

    def __post_init__(self):
        super().__post_init__()
        if self.probes != 1 or self.pool != 1 or self.lookup:
            raise TokenCompileError(f"probes, pool and lookup shape FastV's attention score; {self.scorer.name} has "
                                    "its own", "leave probes=1, pool=1, lookup=0 (method options go in "
                                    "options={...}, --option)")

    def score(self, builder: GraphBuilder, site: SiteInputs, n_keep: int) -> Node:
        if isinstance(self.scorer, ZipCache):
            self.scorer.scale = self.scales[site.block] if self.scales else None
        inner = builder.cast(self.scorer.score(builder, site, n_keep), torch.float32)
        self._removable = self.removable(builder, site)
        keep_always = builder.call(aten.full_like.default, inner, float("inf"))
        return builder.call(aten.where.self, self._removable, inner, keep_always,
                            name=f"block{site.block}_{self.name}_span_score")


def span_scored(method: str, options: dict | None = None, **stage_options) -> SpanScored:
    """``SpanScored`` for the encoder method ``method`` with its ``options`` (values or strings)."""
    cls = SPAN_SCORES[method]
    # a decoder's ZipCache probes are causal: not an option here
    scorer = cls(**Method.parse_options(cls, options or {}, exclude=("causal",)))
    if isinstance(scorer, ZipCache):
        scorer.causal = True
    return SpanScored(scorer=scorer, **stage_options)


__all__ = ["SPAN_SCORES", "SpanScored", "span_scored"]
