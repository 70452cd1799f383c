"""FastV and PyramidDrop on a decoder prompt.

FastV (Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024): at the probe layer the
span's tokens are scored by the attention the last prompt token gives them (softmax of
q_last . k / sqrt(d), averaged over heads). The row is computed from q and k next to the attention, so
the layer's SDPA stays fused and no N x N matrix is built (eager attention has one: the row is read from
its softmax, with whatever the model does to its logits, such as Gemma 2's soft-capping). The top
tokens of the span stay for every later layer; tokens outside the span, the first ``sinks`` prompt
tokens and the last token always stay.
``pool`` > 1 averages the score over that many neighbouring tokens first (SnapKV's pooling).
``lookup`` > 0 adds a prompt-lookup prior for continuations that copy earlier text (as prompt-lookup
decoding drafts tokens): the n-grams ending at the last ``lookup`` prompt tokens are looked up earlier
in the prompt, and the span tokens that follow a match, up to where it lines up with ``ahead`` tokens
past the prompt, rank before the others (by the number of matching n-grams, then by attention).

PyramidDrop (Xing et al., 2024) is the same score at several stages (the paper: layers 8/16/24 of 32,
each stage keeping half of the remaining span). Every stage scores at its own layer, over the tokens
that reached it; the span and the always-kept tokens are judged by original prompt positions, which the
method carries from stage to stage (gathered by each stage's plan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch.fx import Node

from ..errors import TokenCompileError
from ..graph_utils import GraphBuilder, aten
from ..methods.base import Plan, PruneMethod, SiteInputs
from .analysis import Span

tc = torch.ops.tokencompile

POSITION_POLICIES = ("keep", "renumber")
LOOKUP_NGRAM = 4  # the longest n-gram looked up
AHEAD = 64        # the default reach of a lookup match past the prompt


@dataclass
class FastV(PruneMethod):
    """``layer``: the first layer that sees only the kept tokens (scores come from the layer before);
    ``positions``: kept tokens keep their original RoPE positions (``keep``) or are renumbered
    0..n-1 from that layer on (``renumber``); ``probes``: the score is the attention row of the last
    prompt token (1, FastV) or the mean row of the last ``probes`` prompt tokens (an observation
    window, as SnapKV scores a KV cache), each row causal; ``pool``: average the score over that many
    neighbours (odd; SnapKV's pooling); ``sinks``: the first prompt tokens never removed; ``lookup``:
    the last prompt tokens whose n-grams are looked up earlier in the prompt (0: none), ``ahead``: how
    far past the prompt a match's following tokens count."""

    name: ClassVar[str] = "fastv"
    family: ClassVar[str] = "prune"
    summary: ClassVar[str] = "decoder prompt: keep the span tokens the last prompt token attends to most"
    reference: ClassVar[str] = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024"

    layer: int = 2
    positions: str = "keep"
    probes: int = 1
    span: Span = field(default_factory=Span)
    sinks: int = 0                 # the first prompt tokens never removed (attention sinks)
    pool: int = 1                  # average the score over a window of this many neighbours (odd)
    lookup: int = 0                # prompt-lookup prior: the n-grams of the last ``lookup`` prompt tokens ...
    ahead: int = AHEAD             # ... and how many tokens past the prompt a match's followers reach
    input_ids: Node | None = None  # the program's input_ids (set by the compiler, for token-id spans)
    scale: float = 1.0             # the probe attention's softmax scale (set by the compiler) ...
    scales: tuple = ()             # ... or one per block
    _removable: Node | None = field(default=None, init=False, repr=False)  # [B, n] at the current stage
    _lookup: Node | None = field(default=None, init=False, repr=False)     # [B, n] prior, carried like it
    keys_shifted: bool = field(default=False, init=False, repr=False)      # set by a renumbering rewrite

    def __post_init__(self):
        for key in ("layer", "probes", "sinks", "pool", "lookup", "ahead"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TokenCompileError(f"{key}={value!r} is not a whole number", f"give {key}=<int>")
        if self.positions not in POSITION_POLICIES:
            raise TokenCompileError(f"positions={self.positions!r} is not a position policy",
                                    f"give one of: {', '.join(POSITION_POLICIES)}")
        if self.probes < 1:
            raise TokenCompileError(f"probes={self.probes} is not a number of query rows", "give probes >= 1")
        if self.pool < 1 or self.pool % 2 == 0:
            raise TokenCompileError(f"pool={self.pool} is not an odd window", "give pool=1 (none) or an odd window, "
                                    "e.g. 7")
        if self.sinks < 0:
            raise TokenCompileError(f"sinks={self.sinks} is not a number of tokens", "give sinks >= 0")
        if self.lookup < 0 or self.ahead < 1:
            raise TokenCompileError(f"lookup={self.lookup}, ahead={self.ahead}: not a prompt-lookup window",
                                    "give lookup >= 0 (0: none) and ahead >= 1")
        if self.ahead != AHEAD and not self.lookup:
            raise TokenCompileError(f"ahead={self.ahead} only applies to the lookup prior", "give lookup=N too")
        if self.lookup and self.span.token_id is not None:
            raise TokenCompileError("lookup looks up the prompt's own text: an image-token span would match its "
                                    "placeholders everywhere", "use lookup with a position span (span=(start, "
                                    "length)) on text prompts")
        if self.layer < 1:
            raise TokenCompileError(f"layer={self.layer} is not a layer after the first",
                                    "give layer >= 1 (the first layer that sees the kept tokens)")

    def last_token_attention(self, builder: GraphBuilder, site: SiteInputs) -> Node:
        """[B, N]: mean over heads (and probe rows) of the last prompt tokens' causal attention rows (eager
        attention: read from its softmax, which holds the model's own soft-capping or biases)."""
        probes = min(self.probes, site.n)
        if site.probabilities is not None:
            rows = builder.call(aten.slice.Tensor, site.probabilities, 2, site.n - probes, site.n)  # [B, H, P, N]
            return builder.call(aten.mean.dim, builder.cast(rows, torch.float32), [1, 2],
                                name=f"block{site.block}_last_token_attention")
        rows = builder.call(aten.slice.Tensor, site.query, 2, site.n - probes, site.n)          # [B, H, P, D]
        logits = builder.call(aten.matmul.default, rows, builder.call(aten.transpose.int, site.keys, -2, -1))
        scale = self.scales[site.block] if self.scales else self.scale
        logits = builder.call(aten.mul.Tensor, builder.call(aten._to_copy.default, logits, dtype=torch.float32),
                              scale)                                                        # [B, H, P, N]
        if probes > 1:  # probe row j (position n - P + j) sees keys 0 .. n - P + j
            positions = builder.positions(site.x)                                                # [B, N]
            rows_at = builder.call(aten.slice.Tensor, positions, 1, site.n - probes, site.n)      # [B, P]
            future = builder.call(aten.gt.Tensor, builder.call(aten.unsqueeze.default, positions, 1),
                                  builder.call(aten.unsqueeze.default, rows_at, 2))              # [B, P, N]
            logits = builder.call(aten.masked_fill.Scalar, logits,
                                  builder.call(aten.unsqueeze.default, future, 1), float("-inf"))
        if site.valid is not None:  # padding is never attended to
            padding = builder.call(aten.logical_not.default, site.valid)
            logits = builder.call(aten.masked_fill.Scalar, logits, builder.call(
                aten.unsqueeze.default, builder.call(aten.unsqueeze.default, padding, 1), 1), float("-inf"))
        attention = builder.call(aten.softmax.int, logits, -1)
        return builder.call(aten.mean.dim, attention, [1, 2], name=f"block{site.block}_last_token_attention")

    def reset(self) -> None:
        """Forget the stages of an earlier rewrite (call before each rewrite of a program)."""
        self._removable = self._lookup = None

    def lookup_prior(self, builder: GraphBuilder, site: SiteInputs) -> Node:
        """[B, N] float: for each token, how many of the looked-up n-grams (lengths 1..LOOKUP_NGRAM
        ending at the last prompt token, 2..LOOKUP_NGRAM ending at each of the ``lookup`` - 1 before it)
        match earlier, ending at most ``back + ahead`` tokens before it (``back``: how far the looked-up
        n-gram ends before the prompt's end). A match must end more than ``lookup`` tokens before the
        looked-up n-gram ends (at p < N - 1 - back - lookup): not inside the recent text itself."""
        ids, n = self.input_ids, site.n
        window = min(self.lookup, n - 1)
        positions = builder.positions(ids)                                                # [B, N]
        if site.valid is not None:  # padding: a distinct negative id per column, so that it matches nothing
            ids = builder.call(aten.where.self, site.valid, ids, builder.call(aten.rsub.Scalar, positions, -1))
        backs = builder.call(aten.slice.Tensor, positions, 1, 0, window)                  # [B, W]: 0 .. W-1
        at = builder.call(aten.unsqueeze.default, positions, 1)                           # [B, 1, N]
        back = builder.call(aten.unsqueeze.default, backs, 2)                             # [B, W, 1]
        # a match ends before the window: p < N - 1 - back - window
        allowed = builder.call(aten.lt.Tensor, at, builder.call(aten.rsub.Scalar, back, n - 1 - window))
        # a match ending at p covers the tokens p + 1 .. p + back + ahead: count[j] = C[j] - C[j - reach]
        start = builder.call(aten.clamp.default, builder.call(
            aten.sub.Tensor, at, builder.call(aten.add.Scalar, back, self.ahead)), 0)    # [B, W, N]
        prior, match = None, None
        for d in range(min(LOOKUP_NGRAM, n - window)):
            earlier = ids if d == 0 else builder.call(aten.cat.default, [  # ids[p - d], -1 before the start
                builder.call(aten.full_like.default, builder.call(aten.slice.Tensor, ids, 1, 0, d), -1),
                builder.call(aten.slice.Tensor, ids, 1, 0, n - d)], 1)  # (constant_pad_nd fixes the batch)
            ending = builder.call(aten.flip.default, builder.call(aten.slice.Tensor, ids, 1, n - window - d, n - d),
                                  [1])                                                     # ids[N - 1 - back - d]
            equal = builder.call(aten.eq.Tensor, builder.call(aten.unsqueeze.default, earlier, 1),
                                 builder.call(aten.unsqueeze.default, ending, 2))         # [B, W, N]
            match = equal if match is None else builder.call(aten.logical_and.default, match, equal)
            counted = builder.call(aten.logical_and.default, match, allowed)
            if d == 0:  # single tokens are looked up for the last prompt token only
                counted = builder.call(aten.logical_and.default, counted, builder.call(aten.eq.Scalar, back, 0))
            hits = builder.cast(counted, torch.float32)
            before = builder.call(aten.sub.Tensor, builder.call(aten.cumsum.default, hits, 2), hits)  # C[j]
            covered = builder.call(aten.gt.Scalar, builder.call(
                aten.sub.Tensor, before, builder.call(aten.gather.default, before, 2, start)), 0)
            count = builder.call(aten.sum.dim_IntList, builder.cast(covered, torch.float32), [1])
            prior = count if prior is None else builder.call(aten.add.Tensor, prior, count)
        return prior

    def removable(self, builder: GraphBuilder, site: SiteInputs) -> Node:
        """[B, n] bool: tokens of the span, the sinks and the last token excluded. Judged on original
        positions: built at the first stage, then carried through each stage's plan."""
        if self._removable is not None:
            return self._removable
        positions = builder.positions(site.x)
        if self.span.token_id is not None:
            inside = builder.call(aten.eq.Scalar, self.input_ids, self.span.token_id)
        else:
            end = site.n if self.span.length is None else self.span.start + self.span.length
            inside = builder.call(aten.logical_and.default, builder.call(aten.ge.Scalar, positions, self.span.start),
                                  builder.call(aten.lt.Scalar, positions, end))
        if self.sinks:  # the first tokens of each prompt: after its padding
            own = positions if site.valid is None else builder.call(
                aten.sub.Scalar, builder.call(aten.cumsum.default, builder.cast(site.valid, torch.int64), 1), 1)
            inside = builder.call(aten.logical_and.default, inside, builder.call(aten.ge.Scalar, own, self.sinks))
        return builder.call(aten.logical_and.default, inside, builder.call(aten.lt.Scalar, positions, site.n - 1))

    def pooled(self, builder: GraphBuilder, score: Node) -> Node:
        """[B, N]: the score averaged over ``pool`` neighbours (SnapKV's pooling): a token next to
        attended ones rates higher, so the kept tokens come in runs rather than isolated words."""
        if self.pool == 1:
            return score
        pooled = builder.call(aten.avg_pool1d.default, builder.call(aten.unsqueeze.default, score, 1), [self.pool],
                              [1], [self.pool // 2], False, False)
        return builder.call(aten.squeeze.dim, pooled, 1)

    def score(self, builder: GraphBuilder, site: SiteInputs, n_keep: int) -> Node:
        attention = self.pooled(builder, self.last_token_attention(builder, site))
        if self.lookup:
            if self._lookup is None:  # first stage: original positions
                self._lookup = self.lookup_prior(builder, site)
            attention = builder.call(aten.add.Tensor, attention, self._lookup)  # attention <= 1: the prior ranks first
        keep_always = builder.call(aten.full_like.default, attention, float("inf"))
        self._removable = self.removable(builder, site)
        return builder.call(aten.where.self, self._removable, attention, keep_always,
                            name=f"block{site.block}_{self.name}_score")

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        plan = super().plan(builder, site, r)
        # the next stage sees only this stage's survivors: carry their removable flags along
        self._removable = builder.call(tc.gather_tokens.default, self._removable, plan.rep, 1,
                                       name=f"block{site.block}_{self.name}_removable_kept")
        if self._lookup is not None:
            self._lookup = builder.call(tc.gather_tokens.default, self._lookup, plan.rep, 1,
                                        name=f"block{site.block}_{self.name}_lookup_kept")
        return plan


@dataclass
class PyramidDrop(FastV):
    """FastV's last-token score at several stages (``compile_decoder(method="pyramiddrop")``): the paper
    drops at layers 8/16/24 of 32, each stage keeping ``ratio`` = 0.5 of the span that reached it, and
    renumbers positions (``positions="renumber"``; ``keep`` is the default here, so that decoding works)."""

    name: ClassVar[str] = "pyramiddrop"
    summary: ClassVar[str] = "decoder prompt: FastV's score at several stages, a pyramid of shrinking spans"
    reference: ClassVar[str] = "Xing et al., PyramidDrop: Accelerating Your Large Vision-Language Models via " \
                               "Pyramid Visual Redundancy Reduction, 2024"


def pyramid_layers(depth: int, stages: int = 3) -> tuple[int, ...]:
    """PyramidDrop's stage layers scaled to a model's depth: 8/16/24 of 32 are depth * i / (stages + 1)."""
    return tuple(sorted({min(max(int(depth * i / (stages + 1) + 0.5), 1), depth - 1) for i in range(1, stages + 1)}))


__all__ = ["POSITION_POLICIES", "FastV", "PyramidDrop", "pyramid_layers"]
