"""VisionZip-style dominant + contextual tokens: keep the tokens [CLS] attends to most; of the rest,
evenly strided ones become context targets and every other token merges into its most similar
target (Yang et al., 2024)."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..graph_utils import GraphBuilder, aten
from .base import Method, Plan, Range, SiteInputs
from .common import drop_padding, pad_pair_adjustment, rows, unit_keys
from .evit import cls_attention


@dataclass
class VisionZip(Method):
    name = "visionzip"
    family = "merge"
    summary = "dominant tokens by [CLS] attention + contextual tokens: the rest merged into strided targets"
    reference = "Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, 2024"
    merges = True
    contextual: float = 0.15  # share of the kept tokens that are contextual (merged groups)
    ranges = {"contextual": Range(0, 1)}

    def split(self, n_out: int, protected: int) -> int:
        """Contextual targets among n_out kept tokens (at least one, never a protected token's slot)."""
        return max(1, min(round(self.contextual * n_out), n_out - protected))

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        b = f"block{site.block}_visionzip"
        n_out = site.n - r
        protected = site.num_prefix + int(site.valid is not None and site.protect_last_valid)
        targets_count = self.split(n_out, protected)
        dominant = n_out - targets_count
        # topk_plan orders protected tokens first and padding last, with ties settled the same in every runtime
        split = builder.call(torch.ops.tokencompile.topk_plan.default, cls_attention(builder, site), site.valid,
                             dominant, site.num_prefix, site.protect_last_valid, False, name=f"{b}_dominant")
        rest = builder.call(operator.getitem, split, 1)                                 # [B, n - dominant], ascending
        if site.valid is not None:  # real tokens first (ascending), then padding: targets are real when possible
            padding = builder.call(aten.logical_not.default, builder.call(aten.gather.default, site.valid, 1, rest))
            key = builder.call(aten.add.Tensor, builder.call(aten.mul.Tensor, builder.cast(
                padding, torch.int64), site.n), rest)                   # distinct: no ties
            order = builder.call(operator.getitem, builder.call(
                aten.topk.default, builder.call(aten.neg.default, builder.cast(key, torch.float32)),
                site.n - dominant), 1)
            rest = builder.call(aten.gather.default, rest, 1, order)
        step = (site.n - dominant) // targets_count
        strided = builder.call(aten.slice.Tensor, rest, 1, 0, targets_count * step)
        grid = builder.call(aten.view.default, strided, [-1, targets_count, step])
        targets = builder.call(aten.select.int, grid, 2, 0)                            # [B, C]
        others = [builder.call(aten.slice.Tensor, rest, 1, targets_count * step, None)]   # the tail
        if step > 1:
            between = builder.call(aten.slice.Tensor, grid, 2, 1, None)
            batch = builder.call(aten.sym_size.int, site.x, 0)
            others.insert(0, builder.call(aten.reshape.default, between, [batch, targets_count * (step - 1)]))
        others = builder.call(aten.cat.default, others, 1) if len(others) > 1 else others[0]   # [B, r]

        unit = unit_keys(builder, site)
        similarity = builder.call(aten.matmul.default, rows(builder, unit, others),
                                  builder.call(aten.transpose.int, rows(builder, unit, targets), 1, 2))
        adjustment = pad_pair_adjustment(builder, site, others, targets)
        if adjustment is not None:
            similarity = builder.call(aten.add.Tensor, similarity, adjustment)
        target = builder.call(aten.gather.default, targets, 1, builder.call(aten.argmax.default, similarity, -1))
        target = drop_padding(builder, site, others, target)
        plan = builder.call(torch.ops.tokencompile.route_plan.default, others, target, site.n, name=f"{b}_plan")
        return Plan(*(builder.call(operator.getitem, plan, i) for i in range(3)))
