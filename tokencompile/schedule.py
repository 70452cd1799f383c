"""Budget -> per-block token schedule (tokens removed after the attention of each block)."""

from __future__ import annotations

import numbers

from .errors import TokenCompileError
from .flops import CostModel


class Protected(int):
    """The number of tokens no site may remove, remembering which they are: ``prefix`` learned tokens
    (class, distillation, registers) and, with ``last_valid``, the last valid token ([SEP])."""

    def __new__(cls, prefix: int, last_valid: bool = False):
        value = super().__new__(cls, prefix + int(last_valid))
        value.prefix, value.last_valid = prefix, bool(last_valid)
        return value


def parse_schedule(text: str | None) -> str | list[int]:
    """`constant`, `decreasing`, `auto`, or `r=8` / `r=8,8,6,...` (ToMe's r-list: tokens removed per block)."""
    if text is None or text in ("constant", "decreasing", "auto"):
        return text or "constant"
    if text.startswith("r="):
        try:
            values = [int(v) for v in text[2:].split(",")]
        except ValueError:
            values = [-1]
        if values and all(v >= 0 for v in values):
            return values
    raise TokenCompileError(f"cannot read schedule {text!r}",
                            "use constant, decreasing, r=<int> or r=<int>,<int>,... (tokens removed per block)")


def check_r_list(values) -> list[int]:
    """An r-list given in Python: non-negative integers, as `r=...` accepts on the command line."""
    values = list(values)
    if not values or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TokenCompileError(f"cannot use schedule {values!r}",
                                "give a list of non-negative integers (tokens removed per block)")
    return [int(v) for v in values]


def capped(schedule: list[int], tokens: int, protected: int, method) -> list[int]:
    """Clip each block's r to what the method can remove at that point."""
    result, n = [], tokens
    for r in schedule:
        r = min(max(r, 0), method.max_reduction(n, protected))
        result.append(r)
        n -= r
    return result


def capped_blocks(requested: list[int], schedule: list[int]) -> list[dict]:
    """Where a capped schedule removes fewer tokens than requested, for the report."""
    return [{"block": index, "requested": want, "removed": got}
            for index, (want, got) in enumerate(zip(requested, schedule)) if got < want]


def expand_explicit(values: list[int], blocks: int) -> list[int]:
    if len(values) == 1:
        return values * blocks
    if len(values) > blocks:
        raise TokenCompileError(f"schedule has {len(values)} entries but the model has {blocks} blocks",
                                f"give at most {blocks} values")
    return values + [0] * (blocks - len(values))


def check_explicit(schedule: list[int], tokens: int, protected: int, method) -> None:
    n = tokens
    for index, r in enumerate(schedule):
        cap = method.max_reduction(n, protected)
        if r > cap:
            raise TokenCompileError(
                f"schedule removes {r} tokens in block {index}, where only {cap} of {n} can go "
                f"({protected} protected, method {method.name})", "lower r for that block")
        n -= r


def _shape(kind: str, level: float, blocks: int) -> list[int]:
    if kind == "constant":
        return [int(level)] * blocks
    # decreasing: linear from 2*level at the first block to 0 at the last
    return [int(round(2 * level * (blocks - 1 - i) / max(blocks - 1, 1))) for i in range(blocks)]


def schedule_for_budget(model: CostModel, budget: float, kind: str, protected: int, method) -> list[int]:
    """The mildest schedule of the given shape whose modelled FLOPs are at most budget x original."""
    blocks = len(model.blocks)
    target = budget * model.original
    if model.flops([0] * blocks) <= target:
        return [0] * blocks
    hi = model.tokens
    best_reachable = capped(_shape(kind, hi, blocks), model.tokens, protected, method)
    if model.flops(best_reachable, method) > target:
        ratio = model.flops(best_reachable, method) / model.original
        raise TokenCompileError(
            f"budget {budget:g} cannot be met with method {method.name} and a {kind} schedule: "
            f"the best reachable FLOPs ratio is {ratio:.3f}", f"use --budget {ratio + 0.005:.2f} or more")
    lo = 0
    while hi - lo > 1:  # smallest level that meets the budget
        mid = (lo + hi) // 2
        if model.flops(capped(_shape(kind, mid, blocks), model.tokens, protected, method), method) <= target:
            hi = mid
        else:
            lo = mid
    return capped(_shape(kind, hi, blocks), model.tokens, protected, method)
