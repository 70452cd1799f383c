"""Token-reduction operators as ``torch.library`` custom ops.

A reduction site computes a *plan* once and applies it to every per-token tensor that flows on:

- ``dest[b, i]``: the output slot of input token ``i`` (``n_out`` means "dropped");
- ``rep[b, j]``:  the input token that represents output slot ``j`` (kept tokens, original order).

Weighted merging (``merge_tokens``) averages every token into its slot; ``gather_tokens`` takes the
representative's value (masks, position ids, validity flags). Output shapes depend only on input
shapes and integer arguments, so programs that contain these ops export with static token counts.
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


def plan_from_keep(keep: Tensor, target: Tensor, n_out: int) -> tuple[Tensor, Tensor]:
    """Build (dest, rep) from a keep mask and, for tokens that are not kept, the token they merge into
    (``target`` = -1 drops the token). Kept tokens keep their original order."""
    batch, n = keep.shape
    slot = torch.cumsum(keep.to(torch.int64), dim=1) - 1
    merged_slot = torch.gather(slot, 1, target.clamp(min=0))
    dropped = torch.full_like(slot, n_out)
    dest = torch.where(keep, slot, torch.where(target >= 0, merged_slot, dropped))
    scatter_at = torch.where(keep, slot, torch.full_like(slot, n_out))
    positions = torch.arange(n, device=keep.device, dtype=torch.int64).expand(batch, n)
    rep = torch.zeros(batch, n_out + 1, dtype=torch.int64, device=keep.device)
    rep = rep.scatter(1, scatter_at, positions)[:, :n_out]
    return dest, rep


@torch.library.custom_op("tokencompile::tome_plan", mutates_args=())
def tome_plan(metric: Tensor, valid: Tensor | None, r: int, num_prefix: int,
              protect_last_valid: bool) -> tuple[Tensor, Tensor]:
    """ToMe bipartite soft matching: A = even positions, B = odd; the r A tokens with the most similar
    B partner merge into it. Returns (dest [B, N], rep [B, N - r])."""
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
    order = torch.sort(best, dim=1, descending=True, stable=True).indices
    merged_a = torch.zeros_like(best, dtype=torch.bool).scatter(1, order[:, :r], True)

    keep = torch.ones(batch, n, dtype=torch.bool, device=metric.device)
    keep[:, 0::2] = ~merged_a
    target = torch.full((batch, n), -1, dtype=torch.int64, device=metric.device)
    target[:, 0::2] = torch.where(merged_a, 2 * best_b + 1, -1)
    return plan_from_keep(keep, target, n - r)


@tome_plan.register_fake
def _(metric, valid, r, num_prefix, protect_last_valid):
    batch, n, _ = metric.shape
    return (metric.new_empty((batch, n), dtype=torch.int64),
            metric.new_empty((batch, n - r), dtype=torch.int64))


@torch.library.custom_op("tokencompile::merge_tokens", mutates_args=())
def merge_tokens(x: Tensor, weight: Tensor, dest: Tensor, n_out: int) -> Tensor:
    """Weighted mean of the tokens of x [B, N, C] that share a slot: sum(x*w) / sum(w)."""
    batch, _, channels = x.shape
    w = weight.to(x.dtype)
    index = dest.unsqueeze(-1).expand(-1, -1, channels)
    total = x.new_zeros((batch, n_out + 1, channels)).scatter_add(1, index, x * w.unsqueeze(-1))
    norm = w.new_zeros((batch, n_out + 1)).scatter_add(1, dest, w)
    return (total[:, :n_out] / norm[:, :n_out].unsqueeze(-1)).contiguous()


@merge_tokens.register_fake
def _(x, weight, dest, n_out):
    return x.new_empty((x.shape[0], n_out, x.shape[2]))


@torch.library.custom_op("tokencompile::sum_tokens", mutates_args=())
def sum_tokens(weight: Tensor, dest: Tensor, n_out: int) -> Tensor:
    """Per-slot sum of a [B, N] tensor (token sizes)."""
    total = weight.new_zeros((weight.shape[0], n_out + 1)).scatter_add(1, dest, weight)
    return total[:, :n_out].contiguous()


@sum_tokens.register_fake
def _(weight, dest, n_out):
    return weight.new_empty((weight.shape[0], n_out))


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


def _tome_plan_flops(metric_shape, valid_shape, r, num_prefix, protect_last_valid, out_shape=None, **_):
    batch, n, channels = metric_shape
    return 2 * batch * ((n + 1) // 2) * (n // 2) * channels


# Extra FLOPs the flop counter must see: the similarity matrix is the only non-linear-time part.
FLOP_FORMULAS = {torch.ops.tokencompile.tome_plan: _tome_plan_flops}  # keyed by packet, as FlopCounterMode looks them up
