"""FLOP counting on programs (torch.utils.flop_counter plus the ops it does not know) and the
per-block cost model that turns a token schedule into FLOPs without rewriting the graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Interpreter
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from . import ops
from .analysis import ModelAnalysis


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The CPU fused attention kernel is missing from torch's flop registry (keys are op packets).
EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    **ops.FLOP_FORMULAS,
}


def count_flops(module: torch.nn.Module, example_inputs: tuple) -> int:
    """FLOPs of one forward pass on ``example_inputs``."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        module(*example_inputs)
    return counter.get_total_flops()


class _PerNodeFlops(Interpreter):
    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.flops: dict[str, int] = {}

    def run_node(self, node):
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
            result = super().run_node(node)
        if counter.get_total_flops():
            self.flops[node.name] = counter.get_total_flops()
        return result


def flops_per_node(gm: GraphModule, example_inputs: tuple) -> dict[str, int]:
    interpreter = _PerNodeFlops(gm)
    with torch.no_grad():
        interpreter.run(*example_inputs)
    return interpreter.flops


@dataclass
class BlockCost:
    """FLOPs of one block at the original token count N, split at the reduction site and by how they
    scale with tokens: linear (projections, MLP) or quadratic (attention scores)."""

    before_linear: int = 0
    before_quadratic: int = 0
    after_linear: int = 0
    after_quadratic: int = 0


@dataclass
class CostModel:
    tokens: int
    outside: int              # embedding and head: independent of the schedule
    blocks: list[BlockCost]
    metric_dim: int
    reference: float | None = None  # FLOPs budgets are a fraction of, when not those modelled at full width

    @property
    def original(self) -> float:
        if self.reference is not None:
            return self.reference
        return self.outside + sum(b.before_linear + b.before_quadratic + b.after_linear + b.after_quadratic
                                  for b in self.blocks)

    def tokens_per_block(self, schedule: list[int]) -> list[int]:
        counts, n = [], self.tokens
        for r in schedule:
            counts.append(n)
            n -= r
        return counts

    def flops(self, schedule: list[int], method=None) -> float:
        total, n = float(self.outside), self.tokens
        for cost, r in zip(self.blocks, schedule):
            a, m = n / self.tokens, (n - r) / self.tokens
            total += cost.before_linear * a + cost.before_quadratic * a * a
            total += cost.after_linear * m + cost.after_quadratic * m * m
            if r and method is not None:
                total += method.plan_flops(n, self.metric_dim)
            n -= r
        return total


def build_cost_model(gm: GraphModule, analysis: ModelAnalysis, example_inputs: tuple) -> CostModel:
    per_node = flops_per_node(gm, example_inputs)
    batch = next(x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor))
    owner = {}
    for block in analysis.blocks:
        after = False
        for node in block.nodes:
            owner[node.name] = (block.index, after)
            after = after or node is block.site
    costs = [BlockCost() for _ in analysis.blocks]
    outside = 0
    for name, flops in per_node.items():
        flops //= batch
        if name not in owner:
            outside += flops
            continue
        index, after = owner[name]
        quadratic = name in {node.name for node in analysis.blocks[index].attention.quadratic}
        field = ("after_" if after else "before_") + ("quadratic" if quadratic else "linear")
        setattr(costs[index], field, getattr(costs[index], field) + flops)
    metric_dim = analysis.blocks[0].keys.meta["val"].shape[-1]
    return CostModel(analysis.tokens, outside, costs, metric_dim)


__all__ = ["BlockCost", "CostModel", "build_cost_model", "count_flops", "flops_per_node"]
