"""ZipCache-style normalised attention saliency from a few probe queries (He et al., 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from ..graph_utils import GraphBuilder, aten, tensor_meta
from .base import PruneMethod, Range, SiteInputs


def probe_slices(n: int, fraction: float) -> list[tuple[int, int, int]]:
    """Probe query rows as (start, stop, step) slices: the last ``fraction`` of positions plus as many
    evenly strided earlier ones (a deterministic stand-in for the paper's random probes)."""
    count = max(1, math.ceil(fraction * n))
    recent = max(n - count, 0)
    if recent == 0:
        return [(0, n, 1)]
    step = max(recent // count, 1)
    return [(0, min(recent, step * count), step), (recent, n, 1)]


@dataclass
class ZipCache(PruneMethod):
    name = "zipcache"
    family = "prune"
    summary = "keep tokens by normalised attention saliency from probe queries (recent + strided)"
    reference = "He et al., ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification, 2024"
    probes: float = 0.05  # fraction of positions in each probe group (recent, strided)
    causal: bool = False  # a probe sees the keys at or before it only (decoder prompts)
    scale: float | None = field(default=None, init=False, repr=False)  # the attention's scale (decoders)
    ranges = {"probes": Range(0, 1, open_low=True)}

    def score(self, builder: GraphBuilder, site: SiteInputs, n_keep: int) -> Node:
        slices = probe_slices(site.n, self.probes)
        if self.causal and site.probabilities is not None:  # a decoder's eager attention: its own rows
            rows = builder.cast(self._take(builder, site.probabilities, 2, slices), torch.float32)  # [B, H, P, N]
            return self._causal_saliency(builder, site, slices, builder.call(aten.mean.dim, rows, [1]),
                                         self._future(builder, site, slices))
        probes = self._take(builder, site.query, 2, slices)                          # [B, H, P, D]
        scale = self.scale if self.scale is not None else tensor_meta(site.query).shape[-1] ** -0.5
        logits = builder.call(aten.matmul.default, probes, builder.call(aten.transpose.int, site.keys, -2, -1))
        if self.causal:  # decoders: float32 scores, as FastV's
            logits = builder.cast(logits, torch.float32)
        logits = builder.call(aten.mul.Tensor, logits, scale)                         # [B, H, P, N]
        if site.valid is not None:
            key_ok = builder.call(aten.unsqueeze.default, builder.call(aten.unsqueeze.default, site.valid, 1), 1)
            logits = builder.call(aten.masked_fill.Scalar, logits, builder.call(aten.logical_not.default, key_ok),
                                  float("-inf"))
        if self.causal:
            future = self._future(builder, site, slices)
            logits = builder.call(aten.masked_fill.Scalar, logits, builder.call(aten.unsqueeze.default, future, 1),
                                  float("-inf"))
            attention = builder.call(aten.mean.dim, builder.call(aten.softmax.int, logits, -1), [1])   # [B, P, N]
            return self._causal_saliency(builder, site, slices, attention, future)
        attention = builder.call(aten.mean.dim, builder.call(aten.softmax.int, logits, -1), [1])   # [B, P, N]
        # each key's saliency is normalised by the number of probe queries that see it: padding
        # queries see nothing (under a causal mask, queries before the key would not either)
        if site.valid is None:
            return builder.call(aten.mean.dim, attention, [1], name=f"block{site.block}_zipcache_saliency")
        seen_by = self._take(builder, site.valid, 1, slices)                                          # [B, P] bool
        # bool * attention keeps attention's dtype: no cast to a dtype fixed when the graph is built
        total = builder.call(aten.sum.dim_IntList, builder.call(
            aten.mul.Tensor, attention, builder.call(aten.unsqueeze.default, seen_by, -1)), [1])
        count = builder.call(aten.clamp.default, builder.call(aten.sum.dim_IntList, seen_by, [1], True), 1)
        return builder.call(aten.div.Tensor, total, count, name=f"block{site.block}_zipcache_saliency")

    def _future(self, builder: GraphBuilder, site: SiteInputs, slices) -> Node:
        """[B, P, N]: True at the keys after each probe."""
        positions = builder.positions(site.x)                                              # [B, N]
        probe_at = self._take(builder, positions, 1, slices)                               # [B, P]
        return builder.call(aten.gt.Tensor, builder.call(aten.unsqueeze.default, positions, 1),
                            builder.call(aten.unsqueeze.default, probe_at, 2))

    def _causal_saliency(self, builder: GraphBuilder, site: SiteInputs, slices, attention: Node,
                         future: Node) -> Node:
        """Each key's causal attention [B, P, N] (mean over heads) summed over the probes at or after it
        (``future``: True at the keys after a probe), divided by their number."""
        seen = builder.call(aten.logical_not.default, future)
        if site.valid is not None:
            seen = builder.call(aten.logical_and.default, seen, builder.call(
                aten.unsqueeze.default, self._take(builder, site.valid, 1, slices), -1))
        total = builder.call(aten.sum.dim_IntList, builder.call(aten.mul.Tensor, attention, seen), [1])
        count = builder.call(aten.clamp.default, builder.call(aten.sum.dim_IntList, seen, [1]), 1)
        return builder.call(aten.div.Tensor, total, count, name=f"block{site.block}_zipcache_saliency")

    @staticmethod
    def _take(builder: GraphBuilder, t: Node, dim: int, slices) -> Node:
        parts = [builder.call(aten.slice.Tensor, t, dim, start, stop, step) for start, stop, step in slices]
        return builder.call(aten.cat.default, parts, dim) if len(parts) > 1 else parts[0]
