"""The rewrite pipeline: an ordered list of passes, each a plain function (gm, ctx) -> gm."""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import GraphModule

from .context import ReductionSite, RewriteContext
from .eliminate_dead_positions import eliminate_dead_positions
from .insert_token_reduction import insert_token_reduction
from .proportional_attention import proportional_attention
from .respecialize_token_shapes import respecialize_token_shapes
from .size_weighted_token_reductions import size_weighted_token_reductions

Pass = Callable[[GraphModule, RewriteContext], GraphModule]


def eliminate_dead_code(gm: GraphModule, ctx: RewriteContext) -> GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


REDUCTION_PASSES: list[Pass] = [
    insert_token_reduction,
    proportional_attention,
    size_weighted_token_reductions,
    eliminate_dead_code,
]


def run_passes(gm: GraphModule, ctx: RewriteContext, passes: list[Pass] = REDUCTION_PASSES,
               debug: Callable[[str, GraphModule], None] | None = None) -> GraphModule:
    for rewrite in passes:
        gm = rewrite(gm, ctx)
        if debug is not None:
            debug(rewrite.__name__, gm)
    return gm


__all__ = [
    "REDUCTION_PASSES",
    "ReductionSite",
    "RewriteContext",
    "eliminate_dead_code",
    "eliminate_dead_positions",
    "insert_token_reduction",
    "proportional_attention",
    "respecialize_token_shapes",
    "run_passes",
    "size_weighted_token_reductions",
]
