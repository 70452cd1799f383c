"""PiToMe: merge only the highest-energy (most redundant) tokens, protecting the isolated, informative
ones (Tran et al., NeurIPS 2024)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..graph_utils import GraphBuilder, aten
from .base import Method, Plan, Range, SiteInputs
from .common import drop_padding, pad_pair_adjustment, protected, rows, unit_keys


@dataclass
class PiToMe(Method):
    name = "pitome"
    family = "merge"
    summary = "energy score on key cosine; merge among the 2r most redundant tokens, protect the rest"
    reference = "Tran et al., Accelerating Transformers with Spectrum-Preserving Token Merging (PiToMe), NeurIPS 2024"
    merges = True
    margin: float = 0.75  # at block 0; decays linearly to 0 at the last block
    ranges = {"margin": Range(-1, 1)}

    def max_reduction(self, tokens: int, protected: int) -> int:
        return max((tokens - protected) // 2, 0)

    def plan_flops(self, tokens: int, metric_dim: int) -> int:
        return 2 * tokens * tokens * metric_dim

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        b = f"block{site.block}_pitome"
        unit = unit_keys(builder, site)
        cosine = builder.call(aten.matmul.default, unit, builder.call(aten.transpose.int, unit, 1, 2))
        margin = self.margin - self.margin * site.block / site.depth
        elu = builder.call(aten.elu.default, builder.call(aten.sub.Tensor, cosine, margin))
        if site.valid is None:
            energy = builder.call(aten.mean.dim, elu, [-1])
        else:  # the mean over real tokens only: a token's energy must not depend on the padding
            # bool * elu keeps elu's dtype (no cast to a dtype fixed when the graph is built)
            total = builder.call(aten.sum.dim_IntList, builder.call(
                aten.mul.Tensor, elu, builder.call(aten.unsqueeze.default, site.valid, 1)), [-1])
            count = builder.call(aten.clamp.default, builder.call(aten.sum.dim_IntList, site.valid, [1], True), 1)
            energy = builder.call(aten.div.Tensor, total, count)
        # protected tokens are never candidates; padding always is, first. Energies lie in (-1, 1], so
        # padding gets distinct values above them: ties would be ordered differently by each runtime's top-k.
        energy = builder.call(aten.masked_fill.Scalar, energy, protected(builder, site), -10.0, name=f"{b}_energy")
        if site.valid is not None:
            positions = builder.positions(site.x)
            padding_energy = builder.call(aten.rsub.Scalar, builder.call(aten.div.Tensor, positions, site.n), 10.0)
            energy = builder.call(aten.where.self, site.valid, energy, padding_energy)
        candidates = builder.call(operator.getitem, builder.call(aten.topk.default, energy, 2 * r), 1)
        a = builder.call(aten.slice.Tensor, candidates, 1, 0, None, 2)               # [B, r]
        b_tokens = builder.call(aten.slice.Tensor, candidates, 1, 1, None, 2)        # [B, r]
        similarity = builder.call(aten.matmul.default, rows(builder, unit, a),
                                  builder.call(aten.transpose.int, rows(builder, unit, b_tokens), 1, 2))
        adjustment = pad_pair_adjustment(builder, site, a, b_tokens)
        if adjustment is not None:
            similarity = builder.call(aten.add.Tensor, similarity, adjustment)
        match = builder.call(aten.argmax.default, similarity, -1)
        target = builder.call(aten.gather.default, b_tokens, 1, match)
        target = drop_padding(builder, site, a, target)
        plan = builder.call(torch.ops.tokencompile.route_plan.default, a, target, site.n, name=f"{b}_plan")
        return Plan(*(builder.call(operator.getitem, plan, i) for i in range(3)))
