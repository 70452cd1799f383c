"""ToMe: bipartite soft matching on attention keys (Bolya et al., ICLR 2023)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .. import ops  # noqa: F401  (registers tokencompile:: ops)
from ..errors import TokenCompileError
from ..graph_utils import GraphBuilder, aten
from .base import Method, Plan, SiteInputs


@dataclass
class ToMe(Method):
    name = "tome"
    family = "merge"
    summary = "bipartite soft matching of alternate tokens on head-averaged keys; size-weighted merge"
    reference = "Bolya et al., Token Merging: Your ViT but Faster, ICLR 2023"
    merges = True
    # official: tokens leave each site as [protected, unmerged A, B] (the official code's order);
    # keep: every token keeps its original relative order
    order: str = "official"

    def __post_init__(self):
        getattr(super(), "__post_init__", lambda: None)()
        if self.order not in ("official", "keep"):
            raise TokenCompileError(f"option order={self.order!r} of method {self.name!r} is not official or keep",
                                    "give order=official (ToMe's token order, the default) or order=keep")

    def max_reduction(self, tokens: int, protected: int) -> int:
        """ToMe's cap, (tokens - protected) // 2, and never more than the unprotected A tokens."""
        prefix, last_valid = getattr(protected, "prefix", protected), getattr(protected, "last_valid", False)
        unprotected_a = (tokens + 1) // 2 - (prefix + 1) // 2 - int(last_valid)
        return max(min((tokens - protected) // 2, unprotected_a), 0)

    def plan_flops(self, tokens: int, metric_dim: int) -> int:
        return 2 * ((tokens + 1) // 2) * (tokens // 2) * metric_dim

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        metric = builder.call(aten.mean.dim, site.keys, [1], name=f"block{site.block}_tome_metric")
        plan = builder.call(torch.ops.tokencompile.tome_plan.default, metric, site.valid, r, site.num_prefix,
                            site.protect_last_valid, self.order == "official", name=f"block{site.block}_tome_plan")
        return Plan(*(builder.call(operator.getitem, plan, i, name=f"block{site.block}_tome_{part}")
                      for i, part in enumerate(("rep", "src", "dst"))))
