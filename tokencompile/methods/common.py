"""Graph-building helpers shared by the methods."""

from __future__ import annotations

import torch
from torch.fx import Node

from ..graph_utils import GraphBuilder, aten
from ..ops import PAD_PAIR_BONUS
from .base import SiteInputs


def unit_keys(builder: GraphBuilder, site: SiteInputs) -> Node:
    """Head-averaged keys, L2-normalised: [B, N, D]."""
    metric = builder.call(aten.mean.dim, site.keys, [1])
    norm = builder.call(aten.linalg_vector_norm.default, metric, 2, [-1], True)
    return builder.call(aten.div.Tensor, metric, builder.call(aten.clamp.default, norm, 1e-12))


def rows(builder: GraphBuilder, t: Node, index: Node) -> Node:
    """t [B, N, D] at index [B, k] -> [B, k, D]."""
    expanded = builder.call(aten.expand.default, builder.call(aten.unsqueeze.default, index, -1),
                            [-1, -1, t.meta["val"].shape[-1]])
    return builder.call(aten.gather.default, t, 1, expanded)


def protected(builder: GraphBuilder, site: SiteInputs) -> Node:
    """[B, N] bool: the tokens no method may remove (see tokencompile.ops.protected_mask)."""
    positions = builder.positions(site.x)
    protect = builder.call(aten.lt.Scalar, positions, site.num_prefix)
    if site.valid is not None and site.protect_last_valid:
        count = builder.call(aten.sum.dim_IntList, builder.cast(site.valid, torch.int64), [1], True)
        last = builder.call(aten.sub.Tensor, count, 1)
        protect = builder.call(aten.logical_or.default, protect, builder.call(aten.eq.Tensor, positions, last))
    return protect


def pad_pair_adjustment(builder: GraphBuilder, site: SiteInputs, a: Node, b: Node) -> Node | None:
    """[B, |a|, |b|] bonus making padding pair with padding first and never with real tokens."""
    if site.valid is None:
        return None
    pad = builder.call(aten.logical_not.default, site.valid)
    pad_a = builder.call(aten.unsqueeze.default, builder.call(aten.gather.default, pad, 1, a), 2)
    pad_b = builder.call(aten.unsqueeze.default, builder.call(aten.gather.default, pad, 1, b), 1)
    both = builder.cast(builder.call(aten.logical_and.default, pad_a, pad_b), torch.float32)
    one = builder.cast(builder.call(aten.logical_xor.default, pad_a, pad_b), torch.float32)
    return builder.call(aten.mul.Tensor, builder.call(aten.sub.Tensor, both, one), PAD_PAIR_BONUS)


def drop_padding(builder: GraphBuilder, site: SiteInputs, removed: Node, target: Node) -> Node:
    """Targets for route_plan with every removed padding token dropped (-1), never averaged into a
    real token."""
    if site.valid is None:
        return target
    real = builder.call(aten.gather.default, site.valid, 1, removed)
    return builder.call(aten.where.self, real, target, builder.call(aten.full_like.default, target, -1))
