"""Token-reduction operators as ``torch.library`` custom ops.

A reduction site computes a *plan* once and applies it to every per-token tensor that flows on.
A plan is sparse and has static shapes:

- ``rep [B, n_out]``: the input tokens kept, in their original order (slot j holds token rep[j]);
- ``src [B, m]``:     the input tokens removed;
- ``dst [B, m]``:     the slot each removed token folds into, or ``n_out`` if it is dropped.

Weighted merging (``merge_tokens``) averages removed tokens into their slots; ``gather_tokens`` takes
the kept token's value (masks, position ids, validity flags). Kept tokens are gathered and only the
m removed ones are scattered, so applying a plan costs O(n_out + m) rows, not a scatter over all N.
Output shapes depend only on input shapes and integer arguments, so programs that contain these ops
export with static token counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")
# Added to ToMe similarities (cosine, in [-1, 1]) so that padding merges into padding first and never
# into a real token while any other choice exists.
PAD_PAIR_BONUS = 4.0


def protected_mask(valid: Tensor | None, shape: tuple[int, int], num_prefix: int, protect_last_valid: bool,
                   device) -> Tensor:
    """Tokens that never merge or drop: a learned prefix (CLS, distillation, registers) and, for
    masked encoders, the last valid token ([SEP])."""
    batch, n = shape
    positions = torch.arange(n, device=device).expand(batch, n)
    protect = positions < num_prefix
    if valid is not None and protect_last_valid:
        last = valid.to(torch.int64).sum(1, keepdim=True) - 1
        protect = protect | (positions == last)
    return protect


@torch.library.custom_op("tokencompile::tome_plan", mutates_args=())
def tome_plan(metric: Tensor, valid: Tensor | None, r: int, num_prefix: int, protect_last_valid: bool,
              ab_order: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe bipartite soft matching: A = even positions, B = odd; the r A tokens with the most similar
    B partner merge into it. Returns the plan (rep [B, N - r], src [B, r], dst [B, r]); the kept
    tokens keep their order, or with ``ab_order`` take the official ToMe order (see ``tome_order_key``)."""
    batch, n, _ = metric.shape
    m = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)
    if valid is not None:
        pad_a = ~valid[:, 0::2, None]
        pad_b = ~valid[:, None, 1::2]
        scores = scores + PAD_PAIR_BONUS * (pad_a & pad_b).to(scores.dtype)
        scores = scores - PAD_PAIR_BONUS * (pad_a ^ pad_b).to(scores.dtype)
    protect = protected_mask(valid, (batch, n), num_prefix, protect_last_valid, metric.device)
    scores = scores.masked_fill(protect[:, 0::2, None], NEG_INF)
    scores = scores.masked_fill(protect[:, None, 1::2], NEG_INF)

    best, best_b = scores.max(dim=-1)
    return plan_from_matches(best, best_b, n, r, ab_order, valid, num_prefix, protect_last_valid)


def tome_order_key(a_order: Tensor, n: int, valid: Tensor | None, num_prefix: int,
                   protect_last_valid: bool) -> Tensor:
    """[B, N] int64 sort key of the official ToMe output order, ``[protected prefix, unmerged A, B]``:
    the prefix (class, distillation tokens) first in position order; A tokens (even positions) in the
    order of ``a_order`` (descending best score), or in position order when there is a class token;
    then B tokens (odd positions) in position order. With padding, the protected last valid token
    ([SEP]) comes after the other real tokens and padding after it, so that valid tokens stay a prefix
    and a padded sample's tokens do not depend on its padding."""
    batch, num_a = a_order.shape
    positions = torch.arange(n, device=a_order.device).expand(batch, n)
    if num_prefix > 0:
        a_rank = positions[:, :num_a]
    else:
        a_rank = torch.empty_like(a_order).scatter_(1, a_order, positions[:, :num_a])
    key = torch.where(positions % 2 == 0, torch.gather(a_rank, 1, positions // 2), num_a + positions // 2)
    key = torch.where(positions < num_prefix, positions - n, key)
    if valid is not None:
        if protect_last_valid:
            last = valid.to(torch.int64).sum(1, keepdim=True) - 1
            key = torch.where(positions == last, 2 * n, key)
        key = torch.where(valid, key, key + 4 * n)
    return key


def plan_from_matches(best: Tensor, best_b: Tensor, n: int, r: int, ab_order: bool = False,
                      valid: Tensor | None = None, num_prefix: int = 0,
                      protect_last_valid: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's plan from each A token's best similarity and best B partner (index among B tokens): the r
    best-matched A tokens merge (ties: lower position first)."""
    batch = best.shape[0]
    a_order = torch.sort(best, dim=1, descending=True, stable=True).indices
    merged_a = a_order[:, :r]
    src = 2 * merged_a
    removed = torch.zeros(batch, n, dtype=torch.bool, device=best.device).scatter_(1, src, True)
    if ab_order:
        key = tome_order_key(a_order, n, valid, num_prefix, protect_last_valid)
    else:
        key = torch.arange(n, device=best.device).expand(batch, n)
    rep = torch.sort(key.masked_fill(removed, 8 * n), dim=1, stable=True).indices[:, :n - r].contiguous()
    slot = torch.zeros(batch, n, dtype=torch.int64, device=best.device)
    slot.scatter_(1, rep, torch.arange(n - r, device=best.device).expand(batch, n - r))
    dst = torch.gather(slot, 1, 2 * torch.gather(best_b, 1, merged_a) + 1)
    return rep, src.contiguous(), dst


@tome_plan.register_fake
def _(metric, valid, r, num_prefix, protect_last_valid, ab_order=False):
    batch, n, _ = metric.shape
    return (metric.new_empty((batch, n - r), dtype=torch.int64),
            metric.new_empty((batch, r), dtype=torch.int64),
            metric.new_empty((batch, r), dtype=torch.int64))


@torch.library.custom_op("tokencompile::topk_plan", mutates_args=())
def topk_plan(score: Tensor, valid: Tensor | None, n_keep: int, num_prefix: int, protect_last_valid: bool,
              fuse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the n_keep highest-scoring tokens (protected ones always, padding last); the others are
    dropped, or with ``fuse`` folded into one extra token placed last. Returns (rep, src, dst)."""
    batch, n = score.shape
    protect = protected_mask(valid, (batch, n), num_prefix, protect_last_valid, score.device)
    s = score.to(torch.float32).masked_fill(protect, float("inf"))
    if valid is not None:
        s = s.masked_fill(~valid & ~protect, NEG_INF)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    kept = torch.sort(order[:, :n_keep], dim=1).values
    # with fuse, the best removed token seeds the fused slot (its representative); the others fold into it
    src = torch.sort(order[:, n_keep + int(fuse):], dim=1).values
    rep = torch.cat([kept, order[:, n_keep:n_keep + 1]], dim=1) if fuse else kept
    dst = torch.full_like(src, n_keep)  # the fused slot, or (without fuse) the discarded one
    return rep.contiguous(), src.contiguous(), dst.contiguous()


@topk_plan.register_fake
def _(score, valid, n_keep, num_prefix, protect_last_valid, fuse):
    batch, n = score.shape
    return (score.new_empty((batch, n_keep + int(fuse)), dtype=torch.int64),
            score.new_empty((batch, n - n_keep - int(fuse)), dtype=torch.int64),
            score.new_empty((batch, n - n_keep - int(fuse)), dtype=torch.int64))


@torch.library.custom_op("tokencompile::route_plan", mutates_args=())
def route_plan(removed: Tensor, target: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The plan that removes the distinct tokens ``removed [B, m]`` from n, each folding into the kept
    token ``target [B, m]`` (or dropped where target < 0). For methods that choose pairs themselves."""
    batch, m = removed.shape
    keep = torch.ones(batch, n, dtype=torch.int64, device=removed.device).scatter(1, removed, 0)
    slot = torch.cumsum(keep, dim=1) - 1
    rep = torch.sort(1 - keep, dim=1, stable=True).indices[:, :n - m]
    dst = torch.where(target >= 0, torch.gather(slot, 1, target.clamp(min=0)), n - m)
    return rep.contiguous(), removed.clone(memory_format=torch.contiguous_format), dst.contiguous()


@route_plan.register_fake
def _(removed, target, n):
    batch, m = removed.shape
    return removed.new_empty((batch, n - m)), removed.new_empty((batch, m)), removed.new_empty((batch, m))


@torch.library.custom_op("tokencompile::farthest_point_rank", mutates_args=())
def farthest_point_rank(metric: Tensor, valid: Tensor | None, k: int, num_prefix: int,
                        protect_last_valid: bool) -> Tensor:
    """Greedy max-min diversity (farthest-point) selection on cosine distance, a fixed k steps.

    Starts from the protected tokens (without any: picks the token farthest from the mean first); each step
    picks the token whose nearest selected token is farthest. Returns [B, N] scores for topk_plan:
    k - step for the token picked at a step, -1 for the rest. Padding is picked only after every
    real token."""
    batch, n, _ = metric.shape
    metric = metric.to(accumulation_dtype(metric.dtype))
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    distance = 1 - unit @ unit.transpose(1, 2)                                    # [B, N, N]
    protect = protected_mask(valid, (batch, n), num_prefix, protect_last_valid, metric.device)
    mean = unit.mean(1, keepdim=True)
    from_mean = 1 - (unit * mean).sum(-1) / mean.norm(dim=-1).clamp(min=1e-12)   # [B, N]
    nearest = torch.where(protect.any(1, keepdim=True),
                          distance.masked_fill(~protect[:, None, :], float("inf")).amin(-1), from_mean)
    virtual_start = ~protect.any(1, keepdim=True)  # the mean stands in for a selected token until the first pick
    taken = protect.clone()
    pad_floor = torch.full_like(nearest, -1e30)
    rank = torch.full((batch, n), -1.0, device=metric.device)
    for step in range(k):
        candidate = nearest if valid is None else torch.where(valid, nearest, pad_floor)
        pick = candidate.masked_fill(taken, NEG_INF).argmax(1, keepdim=True)      # [B, 1]
        rank.scatter_(1, pick, float(k - step))
        taken.scatter_(1, pick, True)
        row = torch.gather(distance, 1, pick[:, :, None].expand(batch, 1, n))[:, 0]
        nearest = torch.where(virtual_start, row, torch.minimum(nearest, row)) if step == 0 \
            else torch.minimum(nearest, row)
    return rank


@farthest_point_rank.register_fake
def _(metric, valid, k, num_prefix, protect_last_valid):
    return metric.new_empty(metric.shape[:2], dtype=torch.float32)


@torch.library.custom_op("tokencompile::max_tokens", mutates_args=())
def max_tokens(t: Tensor, rep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Per-slot maximum of a [B, N] tensor over the tokens that share a slot."""
    kept = torch.gather(t, 1, rep)
    padded = torch.cat([kept, kept.new_full((kept.shape[0], 1), NEG_INF)], dim=1)
    return padded.scatter_reduce(1, dst, torch.gather(t, 1, src), "amax")[:, :kept.shape[1]].contiguous()


@max_tokens.register_fake
def _(t, rep, src, dst):
    return t.new_empty(rep.shape)


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """Per-sample rows of t [B, N, ...] at index [B, k] -> [B, k, ...]."""
    view = index.reshape(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
    return torch.gather(t, 1, view)


def _fold(kept: Tensor, moved: Tensor, dst: Tensor) -> Tensor:
    """kept [B, n_out, ...] plus moved [B, m, ...] added into slots dst (slot n_out discards)."""
    padded = torch.cat([kept, kept.new_zeros((kept.shape[0], 1, *kept.shape[2:]))], dim=1)
    index = dst.reshape(*dst.shape, *([1] * (moved.dim() - 2))).expand_as(moved)
    return padded.scatter_add(1, index, moved)[:, :kept.shape[1]]


@torch.library.custom_op("tokencompile::merge_tokens", mutates_args=())
def merge_tokens(x: Tensor, weight: Tensor, rep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Weighted mean of x [B, N, C] over the tokens that share a slot: sum(x*w) / sum(w), accumulated
    in fp32 (fp64 for fp64 inputs) and returned in x's dtype."""
    accumulate = accumulation_dtype(x.dtype)
    w = weight.to(accumulate)
    xw = x.to(accumulate) * w.unsqueeze(-1)
    total = _fold(_rows(xw, rep), _rows(xw, src), dst)
    norm = _fold(torch.gather(w, 1, rep), torch.gather(w, 1, src), dst)
    return (total / norm.unsqueeze(-1)).to(x.dtype).contiguous()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision inputs, else the input's own float dtype."""
    return torch.promote_types(dtype, torch.float32)


@merge_tokens.register_fake
def _(x, weight, rep, src, dst):
    return x.new_empty((x.shape[0], rep.shape[1], x.shape[2]))


@torch.library.custom_op("tokencompile::sum_tokens", mutates_args=())
def sum_tokens(weight: Tensor, rep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Per-slot sum of a [B, N] tensor (token sizes), accumulated in fp32 or wider."""
    w = weight.to(accumulation_dtype(weight.dtype)) if weight.is_floating_point() else weight
    return _fold(torch.gather(w, 1, rep), torch.gather(w, 1, src), dst).to(weight.dtype).contiguous()


@sum_tokens.register_fake
def _(weight, rep, src, dst):
    return weight.new_empty((weight.shape[0], rep.shape[1]))


def _gather_index(t_shape, rep: Tensor, dim: int) -> tuple[list[int], Tensor]:
    batch, n_out = rep.shape
    out_shape = [batch, *t_shape[1:]]
    out_shape[dim] = n_out
    view = [batch] + [1] * (len(t_shape) - 1)
    view[dim] = n_out
    return out_shape, rep.reshape(view).expand(out_shape)


@torch.library.custom_op("tokencompile::gather_tokens", mutates_args=())
def gather_tokens(t: Tensor, rep: Tensor, dim: int) -> Tensor:
    """Take, per sample, the representatives' entries along token axis ``dim`` of t (batch axis 0,
    which may be 1 and broadcast)."""
    out_shape, index = _gather_index(t.shape, rep, dim)
    source_shape = list(t.shape)
    source_shape[0] = rep.shape[0]
    return torch.gather(t.expand(source_shape), dim, index).contiguous()


@gather_tokens.register_fake
def _(t, rep, dim):
    out_shape, _ = _gather_index(t.shape, rep, dim)
    return t.new_empty(out_shape)


def _tome_plan_flops(metric_shape, valid_shape, r, num_prefix, protect_last_valid, ab_order=False, out_shape=None,
                     **_):
    batch, n, channels = metric_shape
    return 2 * batch * ((n + 1) // 2) * (n // 2) * channels


def _farthest_point_flops(metric_shape, valid_shape, k, num_prefix, protect_last_valid, out_shape=None, **_):
    batch, n, channels = metric_shape
    return 2 * batch * n * n * channels


# Extra FLOPs the flop counter must see: the similarity matrix is the only non-linear-time part.
FLOP_FORMULAS = {torch.ops.tokencompile.tome_plan: _tome_plan_flops,
                torch.ops.tokencompile.farthest_point_rank: _farthest_point_flops}  # keyed by packet, as FlopCounterMode looks them up
