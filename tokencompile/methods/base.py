"""What every method provides: option parsing, a per-site cap on removed tokens, and plan nodes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from torch.fx import Node

from ..errors import TokenCompileError
from ..graph_utils import GraphBuilder


@dataclass
class SiteInputs:
    """Graph values a method may read at a reduction site."""

    block: int
    x: Node             # residual stream [B, N, C] after the attention
    query: Node         # attention queries [B, H, N, D]
    keys: Node          # attention keys [B, H, N, D]
    valid: Node | None  # [B, N] bool, False on padding (masked encoders)
    sizes: Node         # [B, N] tokens merged into each token so far
    num_prefix: int
    protect_last_valid: bool
    n: int              # tokens at the site
    depth: int          # blocks in the model
    probabilities: Node | None = None  # eager attention: its softmax [B, H, N, N] (SDPA computes none)


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: low <= value <= high (None: unbounded); ``open_low`` excludes low."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def accepts(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self, key: str) -> str:
        low = "<" if self.open_low else "<="
        if self.high is None:
            return f"{key} {'>' if self.open_low else '>='} {self.low:g}"
        return (f"{self.low:g} {low} " if self.low is not None else "") + f"{key} <= {self.high:g}"


@dataclass
class Method:
    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str]
    merges: ClassVar[bool]  # True: removed tokens are averaged into kept ones (sizes grow)
    ranges: ClassVar[dict[str, Range]] = {}  # option -> the values it accepts

    def __post_init__(self):
        for key, allowed in self.ranges.items():
            value = getattr(self, key)
            if not allowed.accepts(value):
                raise TokenCompileError(f"option {key}={value!r} of method {self.name!r} is out of range",
                                        f"give {allowed.describe(key)}")

    @staticmethod
    def parse_options(cls, options: dict, exclude: tuple[str, ...] = ()) -> dict:
        """Options by field name: strings (from the CLI) converted to the field's type, other values as
        given; fields in ``exclude`` are not options."""
        if not isinstance(options, dict):
            raise TokenCompileError(f"options of method {cls.name!r} must be a dict, got {type(options).__name__}",
                                    "give options={'name': value}")
        fields = {field.name: field for field in dataclasses.fields(cls) if field.init and field.name not in exclude}
        parsed = {}
        for key, text in options.items():
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise TokenCompileError(f"method {cls.name!r} has no option {key!r}", f"its options are: {known}")
            kind = type(fields[key].default)
            if not isinstance(text, str):
                accepted = (int, float) if kind is float else (kind,)
                if not isinstance(text, accepted) or (isinstance(text, bool) and kind is not bool):
                    raise TokenCompileError(f"option {key}={text!r} of method {cls.name!r} is not a {kind.__name__}",
                                            f"give {key}=<{kind.__name__}>")
                parsed[key] = text
                continue
            try:
                parsed[key] = (text.lower() in ("1", "true", "yes", "on")) if kind is bool else kind(text)
            except (TypeError, ValueError):
                raise TokenCompileError(f"option {key}={text!r} of method {cls.name!r} is not a {kind.__name__}",
                                        f"give {key}=<{kind.__name__}>") from None
        return parsed

    def max_reduction(self, tokens: int, protected: int) -> int:
        """The most tokens one site may remove from ``tokens`` with ``protected`` never removed."""
        return max(tokens - protected - 1, 0)

    def plan_flops(self, tokens: int, metric_dim: int) -> int:
        """FLOPs of the plan computation (matches the flop formulas of the plan ops)."""
        return 0

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        """Insert nodes computing the plan (rep [B, N - r], src [B, m], dst [B, m]) that removes r tokens
        (see tokencompile.ops)."""
        raise NotImplementedError


@dataclass
class Plan:
    rep: Node
    src: Node
    dst: Node
    weight: Node | None = None  # merge weight per token; None: token sizes
    keep_norm: bool = False     # merged tokens take the largest norm among their members (MLERP)


@dataclass
class PruneMethod(Method):
    """Score tokens, keep the best ones; the rest are dropped or (``fuse``) averaged into one token."""

    merges = False
    fuse: ClassVar[bool] = False

    def max_reduction(self, tokens: int, protected: int) -> int:
        return max(tokens - protected - 1 - int(self.fuse), 0)

    def score(self, builder: GraphBuilder, site: SiteInputs, n_keep: int) -> Node:
        """[B, N] importance: the n_keep highest stay."""
        raise NotImplementedError

    def merge_weight(self, builder: GraphBuilder, site: SiteInputs, score: Node) -> Node | None:
        return None

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        import operator

        import torch

        n_keep = site.n - r - int(self.fuse)
        score = self.score(builder, site, n_keep)
        plan = builder.call(torch.ops.tokencompile.topk_plan.default, score, site.valid, n_keep, site.num_prefix,
                            site.protect_last_valid, self.fuse, name=f"block{site.block}_{self.name}_plan")
        parts = [builder.call(operator.getitem, plan, i) for i in range(3)]
        return Plan(*parts, weight=self.merge_weight(builder, site, score))
