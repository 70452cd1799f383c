"""Fused Triton kernels for the token-reduction ops, and launchers with the ops' signatures.

Kernels (the launchers below named after a ``tokencompile::`` op take and return what the op does):

- ``tome_match_kernel``: each ToMe A token's (even position) best B partner (odd position) by cosine
  similarity, with the padding bonus and protected tokens exactly as ``ops.tome_plan``;
- ``merge_tokens_kernel``: gather of the kept rows plus the removed rows of each block of slots,
  weighted by their sizes, divided by the summed size: memory-bound, one program per (sample, block of
  output slots, channel block);
- ``tome_rank_kernel``: ToMe's plan from the matches (ranking by counting, output order, slots);
- ``sum_tokens_kernel``: the per-slot sum of token sizes;
- ``probe_scores_kernel``: head mean of softmax(q[:, :, 0] . k / sqrt(d)) over valid keys (EViT's score);
- ``gather_tokens_kernel``: per-sample gather along a token axis (kept rows of any per-token tensor,
  or the un-merge gather with a slot map as the index).

Kernel parameters are ordered inputs, scalars, outputs (the calling convention of TensorRT's AOT
plugins). All kernels accumulate in fp32 and store in the input dtype. They assume contiguous tensors except the
probe scores, which take strides so that queries and keys in [B, N, H, D] layout are not copied. The plan ranking
(a stable sort) stays in torch, so plans equal the reference's, ties included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import ops

MERGE_BLOCK_S = 32      # output slots per merge program
MERGE_BLOCK_M = 32      # removed tokens tested per step when slots collect their merged rows
PROBE_BLOCK_N = 128     # keys per probe-score tile
PROBE_BLOCK_D = 32      # channels per probe-score step
RANK_BLOCK = 64         # tokens per step when the ToMe plan ranks by counting
MATCH_BLOCK = 32        # A rows, B rows and channels per tome_match tile (tl.dot needs >= 16)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest-even in ``dtype``, returned as fp32 (exact, so a later .to(dtype) is
    lossless). bf16 rounds with integer ops: the Triton interpreter truncates fp32 -> bf16 casts."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def tome_match_kernel(metric_ptr, valid_ptr, N, D, num_prefix, protect_last_valid, best_ptr, best_index_ptr,
                      PAD_BONUS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Grid (B, cdiv(NA, BLOCK_A)). metric is L2-normalised [B, N, D]; valid is int8 [B, N]. Protected
    tokens (``ops.protected_mask``): the first num_prefix and, with protect_last_valid, the last valid.
    Writes best [B, NA] (fp32 holding metric-dtype values) and best_index [B, NA] (int64)."""
    batch = tl.program_id(0).to(tl.int64)
    num_a = (N + 1) // 2
    num_b = N // 2
    count = tl.zeros((BLOCK_A,), tl.int32)
    for start in range(0, N, BLOCK_A):
        token = start + tl.arange(0, BLOCK_A)
        count += tl.load(valid_ptr + batch * N + token, mask=token < N, other=0).to(tl.int32)
    last = tl.where(protect_last_valid != 0, tl.sum(count, axis=0) - 1, -1)
    a_index = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a_index < num_a
    a_token = 2 * a_index
    metric = metric_ptr + batch * N * D
    a_pad = tl.load(valid_ptr + batch * N + a_token, mask=a_ok, other=1) == 0
    a_protected = (a_token < num_prefix) | (a_token == last)

    best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_A,), tl.int64)
    for b_start in range(0, num_b, BLOCK_B):
        b_index = b_start + tl.arange(0, BLOCK_B)
        b_ok = b_index < num_b
        b_token = 2 * b_index + 1
        score = tl.zeros((BLOCK_A, BLOCK_B), tl.float32)
        for d_start in range(0, D, BLOCK_D):
            d = d_start + tl.arange(0, BLOCK_D)
            d_ok = d < D
            a_rows = tl.load(metric + a_token[:, None] * D + d[None, :], mask=a_ok[:, None] & d_ok[None, :],
                             other=0.0)
            b_rows = tl.load(metric + b_token[:, None] * D + d[None, :], mask=b_ok[:, None] & d_ok[None, :],
                             other=0.0)
            score = tl.dot(a_rows.to(tl.float32), tl.trans(b_rows.to(tl.float32)), score, input_precision="ieee")
        # round like the reference, which computes the similarities and the bonus in the metric dtype
        element = metric_ptr.dtype.element_ty
        score = round_to(score, element)
        b_pad = tl.load(valid_ptr + batch * N + b_token, mask=b_ok, other=1) == 0
        both_pad = (a_pad[:, None] & b_pad[None, :]).to(tl.float32)
        one_pad = (a_pad[:, None] ^ b_pad[None, :]).to(tl.float32)
        score = round_to(score + PAD_BONUS * both_pad, element)
        score = round_to(score - PAD_BONUS * one_pad, element)
        b_protected = (b_token < num_prefix) | (b_token == last)
        excluded = a_protected[:, None] | b_protected[None, :] | (b_ok == 0)[None, :]
        score = tl.where(excluded, float("-inf"), score)

        tile_best = tl.max(score, axis=1)
        # lowest index among equal maxima, as torch.max returns
        candidates = tl.where(score == tile_best[:, None], b_index[None, :], num_b + BLOCK_B)
        tile_index = tl.min(candidates, axis=1).to(tl.int64)
        improved = tile_best > best  # strict: an earlier tile keeps a tie
        best_index = tl.where(improved, tile_index, best_index)
        best = tl.where(improved, tile_best, best)
    tl.store(best_ptr + batch * num_a + a_index, best, mask=a_ok)
    tl.store(best_index_ptr + batch * num_a + a_index, best_index, mask=a_ok)


@triton.jit
def tome_rank_kernel(best_ptr, best_index_ptr, valid_ptr, N, r, num_prefix, protect_last_valid, ab_order,
                     rep_ptr, src_ptr, dst_ptr, key_ptr, slot_ptr, BLOCK: tl.constexpr):
    """Grid (B,). ToMe's plan from each A token's best score and B partner, as ``ops.plan_from_matches``:
    the r best-scored A tokens (stable descending order) merge; the kept tokens' slots follow the sort
    key of ``ops.tome_order_key`` (or positions). Sorting is done by counting: a token's rank is the
    number of tokens before it, so the plan equals the reference's, ties included. key and slot are
    [B, N] int64 scratch."""
    batch = tl.program_id(0).to(tl.int64)
    num_a = (N + 1) // 2
    n_out = N - r
    best = best_ptr + batch * num_a
    valid = valid_ptr + batch * N
    keys = key_ptr + batch * N
    slots = slot_ptr + batch * N
    count = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, N, BLOCK):
        token = start + tl.arange(0, BLOCK)
        count += tl.load(valid + token, mask=token < N, other=0).to(tl.int32)
    last = tl.where(protect_last_valid != 0, tl.sum(count, axis=0) - 1, -1)  # the protected [SEP]

    # A tokens: rank by descending score (stable), merged when rank < r; their sort keys
    for start in range(0, num_a, BLOCK):
        a = start + tl.arange(0, BLOCK)
        a_ok = a < num_a
        score = tl.load(best + a, mask=a_ok, other=float("-inf"))
        rank = tl.zeros((BLOCK,), tl.int64)
        for other_start in range(0, num_a, BLOCK):
            other = other_start + tl.arange(0, BLOCK)
            other_score = tl.load(best + other, mask=other < num_a, other=float("-inf"))
            before = (other_score[None, :] > score[:, None]) | \
                ((other_score[None, :] == score[:, None]) & (other[None, :] < a[:, None]))
            rank += tl.sum((before & (other < num_a)[None, :]).to(tl.int64), axis=1)
        merged = a_ok & (rank < r)
        tl.store(src_ptr + batch * r + rank, 2 * a.to(tl.int64), mask=merged)
        key = tl.where(num_prefix > 0, a.to(tl.int64), rank)
        key = order_key(2 * a, key, N, num_prefix, last, valid, a_ok, ab_order)
        tl.store(keys + 2 * a, tl.where(merged, 8 * N, key), mask=a_ok)
    for start in range(0, N // 2, BLOCK):
        b = start + tl.arange(0, BLOCK)
        b_ok = b < N // 2
        key = order_key(2 * b + 1, (num_a + b).to(tl.int64), N, num_prefix, last, valid, b_ok, ab_order)
        tl.store(keys + 2 * b + 1, key, mask=b_ok)
    tl.debug_barrier()

    # kept tokens: slot = number of tokens with a smaller key (kept keys are distinct, removed ones largest)
    for start in range(0, N, BLOCK):
        token = start + tl.arange(0, BLOCK)
        token_ok = token < N
        key = tl.load(keys + token, mask=token_ok, other=0)
        slot = tl.zeros((BLOCK,), tl.int64)
        for other_start in range(0, N, BLOCK):
            other = other_start + tl.arange(0, BLOCK)
            other_key = tl.load(keys + other, mask=other < N, other=8 * N)
            slot += tl.sum((other_key[None, :] < key[:, None]).to(tl.int64), axis=1)
        kept = token_ok & (key < 8 * N)
        tl.store(rep_ptr + batch * n_out + slot, token.to(tl.int64), mask=kept)
        tl.store(slots + token, slot, mask=token_ok)
    tl.debug_barrier()

    for start in range(0, r, BLOCK):
        index = start + tl.arange(0, BLOCK)
        index_ok = index < r
        a = tl.load(src_ptr + batch * r + index, mask=index_ok, other=0) // 2
        partner = tl.load(best_index_ptr + batch * num_a + a, mask=index_ok, other=0)
        tl.store(dst_ptr + batch * r + index, tl.load(slots + 2 * partner + 1, mask=index_ok, other=0), mask=index_ok)


@triton.jit
def order_key(token, ab_key, N, num_prefix, last, valid, ok, ab_order):
    """``ops.tome_order_key`` for the tokens ``token`` whose key in the [A, B] order is ``ab_key``;
    their positions when ab_order is 0."""
    token = token.to(tl.int64)
    key = tl.where(token < num_prefix, token - N, ab_key.to(tl.int64))
    key = tl.where(token == last, 2 * N, key)
    is_valid = tl.load(valid + token, mask=ok, other=1) != 0
    key = tl.where(is_valid, key, key + 4 * N)
    return tl.where(ab_order != 0, key, token)


@triton.jit
def merge_tokens_kernel(x_ptr, weight_ptr, rep_ptr, src_ptr, dst_ptr, N, C, n_out, m, out_ptr,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (B, cdiv(n_out, BLOCK_S), cdiv(C, BLOCK_C)). out[b, j] = sum(x*w) / sum(w) over token rep[b, j]
    and the removed tokens src[b, i] with dst[b, i] == j, accumulated in fp32.

    Memory-bound: each program gathers its BLOCK_S kept rows, then reads dst in BLOCK_M chunks and loads
    only the removed rows whose slot lies in its block (a chunk without one costs one small load), so
    every row of x is read once per channel block. The rows are added with a [slots x removed] weighted
    one-hot matrix product, in exact fp32."""
    batch = tl.program_id(0).to(tl.int64)
    first_slot = tl.program_id(1) * BLOCK_S
    slot = first_slot + tl.arange(0, BLOCK_S)
    slot_ok = slot < n_out
    channel = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    x = x_ptr + batch * N * C
    weight = weight_ptr + batch * N

    kept = tl.load(rep_ptr + batch * n_out + slot, mask=slot_ok, other=0)
    norm = tl.load(weight + kept, mask=slot_ok, other=0.0).to(tl.float32)
    rows_ok = slot_ok[:, None] & channel_ok[None, :]
    total = tl.load(x + kept[:, None] * C + channel[None, :], mask=rows_ok, other=0.0).to(tl.float32) * norm[:, None]
    for start in range(0, m, BLOCK_M):
        index = start + tl.arange(0, BLOCK_M)
        target = tl.load(dst_ptr + batch * m + index, mask=index < m, other=-1)
        here = (index < m) & (target >= first_slot) & (target < first_slot + BLOCK_S) & (target < n_out)
        if tl.sum(here.to(tl.int32), axis=0) > 0:
            token = tl.load(src_ptr + batch * m + index, mask=here, other=0)
            token_weight = tl.load(weight + token, mask=here, other=0.0).to(tl.float32)
            rows = tl.load(x + token[:, None] * C + channel[None, :], mask=here[:, None] & channel_ok[None, :],
                           other=0.0).to(tl.float32)
            one_hot = tl.where(slot[:, None] == target[None, :], token_weight[None, :], 0.0)   # [S, M]
            total = tl.dot(one_hot, rows, total, input_precision="ieee")
            norm += tl.sum(one_hot, axis=1)
    out = out_ptr + (batch * n_out + slot[:, None]) * C + channel[None, :]
    tl.store(out, (total / norm[:, None]).to(out_ptr.dtype.element_ty), mask=rows_ok)


@triton.jit
def sum_tokens_kernel(weight_ptr, rep_ptr, src_ptr, dst_ptr, N, n_out, m, out_ptr,
                      BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (B, cdiv(n_out, BLOCK_S)). out[b, j] = weight[rep[b, j]] + sum of weight[src] folded into j."""
    batch = tl.program_id(0).to(tl.int64)
    slot = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    slot_ok = slot < n_out
    weight = weight_ptr + batch * N
    kept = tl.load(rep_ptr + batch * n_out + slot, mask=slot_ok, other=0)
    total = tl.load(weight + kept, mask=slot_ok, other=0.0).to(tl.float32)
    for start in range(0, m, BLOCK_M):
        index = start + tl.arange(0, BLOCK_M)
        index_ok = index < m
        target = tl.load(dst_ptr + batch * m + index, mask=index_ok, other=-1)
        token = tl.load(src_ptr + batch * m + index, mask=index_ok, other=0)
        token_weight = tl.load(weight + token, mask=index_ok, other=0.0).to(tl.float32)
        hits = target[None, :] == slot[:, None]
        total += tl.sum(tl.where(hits, token_weight[None, :], 0.0), axis=1)
    element = out_ptr.dtype.element_ty
    tl.store(out_ptr + batch * n_out + slot, round_to(total, element).to(element), mask=slot_ok)


@triton.jit
def probe_logits(q_ptr, k_ptr, valid_ptr, batch, head, key, N, D, scale, q_stride_b, q_stride_h, q_stride_d,
                 k_stride_b, k_stride_h, k_stride_n, k_stride_d, BLOCK_D: tl.constexpr):
    """Scaled logits of the probe query (row 0) of one head against the keys ``key``; -inf where invalid."""
    q_row = q_ptr + batch * q_stride_b + head * q_stride_h
    k_head = k_ptr + batch * k_stride_b + head * k_stride_h
    in_range = key < N
    logits = tl.zeros(key.shape, tl.float32)
    for d_start in range(0, D, BLOCK_D):
        d = d_start + tl.arange(0, BLOCK_D)
        d_ok = d < D
        probe = tl.load(q_row + d * q_stride_d, mask=d_ok, other=0.0).to(tl.float32)
        keys = tl.load(k_head + key[:, None] * k_stride_n + d[None, :] * k_stride_d,
                       mask=in_range[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        logits += tl.sum(keys * probe[None, :], axis=1)
    key_ok = in_range & (tl.load(valid_ptr + batch * N + key, mask=in_range, other=0) != 0)
    return tl.where(key_ok, logits * scale, float("-inf"))


@triton.jit
def probe_scores_kernel(q_ptr, k_ptr, valid_ptr, H, N, D, scale,
                        q_stride_b, q_stride_h, q_stride_d, k_stride_b, k_stride_h, k_stride_n, k_stride_d, out_ptr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (B,). out[b] = mean over heads of softmax over valid keys of (q[b, h, 0] . k[b, h, n]) * scale.
    q and k are [B, H, N, D] with any strides, valid is int8 [B, N], H <= BLOCK_H. Pass 1 finds each
    head's softmax max and normaliser over key blocks (online); pass 2 sums the probabilities."""
    batch = tl.program_id(0).to(tl.int64)
    head_index = tl.arange(0, BLOCK_H)
    head_max = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    head_norm = tl.zeros((BLOCK_H,), tl.float32)
    for head in range(H):
        running_max = tl.full((), float("-inf"), tl.float32)
        norm = tl.zeros((), tl.float32)
        for start in range(0, N, BLOCK_N):
            logits = probe_logits(q_ptr, k_ptr, valid_ptr, batch, head, start + tl.arange(0, BLOCK_N), N, D, scale,
                                  q_stride_b, q_stride_h, q_stride_d, k_stride_b, k_stride_h, k_stride_n,
                                  k_stride_d, BLOCK_D)
            new_max = tl.maximum(running_max, tl.max(logits, axis=0))
            # where() keeps -inf - -inf (NaN) out while no valid key has been seen
            rescale = tl.where(running_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
            norm = norm * rescale + tl.sum(tl.where(logits == float("-inf"), 0.0, tl.exp(logits - new_max)), axis=0)
            running_max = new_max
        head_max = tl.where(head_index == head, running_max, head_max)
        head_norm = tl.where(head_index == head, norm, head_norm)

    element = out_ptr.dtype.element_ty
    for start in range(0, N, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        total = tl.zeros((BLOCK_N,), tl.float32)
        for head in range(H):
            logits = probe_logits(q_ptr, k_ptr, valid_ptr, batch, head, key, N, D, scale, q_stride_b, q_stride_h,
                                  q_stride_d, k_stride_b, k_stride_h, k_stride_n, k_stride_d, BLOCK_D)
            this_head = head_index == head
            total += tl.exp(logits - tl.max(tl.where(this_head, head_max, float("-inf")), axis=0)) / \
                tl.sum(tl.where(this_head, head_norm, 0.0), axis=0)
        tl.store(out_ptr + batch * N + key, round_to(total / H, element).to(element), mask=key < N)


@triton.jit
def gather_tokens_kernel(t_ptr, rep_ptr, t_batch_stride, outer, N, inner, n_out, out_ptr,
                         BLOCK_S: tl.constexpr, BLOCK_I: tl.constexpr):
    """1-D grid over (sample, outer index, slot block, inner block) of t viewed as [Bt, outer, N, inner]:
    out[b, o, j, i] = t[b, o, rep[b, j], i]. t_batch_stride is 0 when t broadcasts over the batch."""
    pid = tl.program_id(0).to(tl.int64)
    inner_blocks = tl.cdiv(inner, BLOCK_I)
    slot_blocks = tl.cdiv(n_out, BLOCK_S)
    inner_block = pid % inner_blocks
    slot_block = (pid // inner_blocks) % slot_blocks
    row = pid // (inner_blocks * slot_blocks)  # batch * outer + o
    batch = row // outer
    o = row % outer
    slot = slot_block * BLOCK_S + tl.arange(0, BLOCK_S)
    slot_ok = slot < n_out
    i = inner_block * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < inner
    token = tl.load(rep_ptr + batch * n_out + slot, mask=slot_ok, other=0)
    mask = slot_ok[:, None] & i_ok[None, :]
    source = t_ptr + batch * t_batch_stride + o * N * inner
    values = tl.load(source + token[:, None] * inner + i[None, :], mask=mask)
    target = out_ptr + row * n_out * inner
    tl.store(target + slot[:, None] * inner + i[None, :], values, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

def _flags(mask: Tensor | None, like: Tensor, shape: tuple[int, int]) -> Tensor:
    """A [B, N] bool mask as contiguous int8 (all ones when absent)."""
    if mask is None:
        return torch.ones(shape, dtype=torch.int8, device=like.device)
    return mask.to(torch.int8).contiguous()


def tome_matches(metric: Tensor, valid: Tensor | None, num_prefix: int, protect_last_valid: bool,
                 flags: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Best B partner of every A token: (best score [B, NA] fp32, B index [B, NA] int64). ``flags``: valid
    as int8, when the caller has it already."""
    batch, n, dim = metric.shape
    # the same expression as the reference, so the normalised rows are bit-identical
    normalized = (metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)).contiguous()
    num_a = (n + 1) // 2
    best = torch.empty((batch, num_a), dtype=torch.float32, device=metric.device)
    best_index = torch.zeros((batch, num_a), dtype=torch.int64, device=metric.device)
    if batch * num_a:
        flags = _flags(valid, metric, (batch, n)) if flags is None else flags
        grid = (batch, triton.cdiv(num_a, MATCH_BLOCK))
        tome_match_kernel[grid](normalized, flags, n, dim, num_prefix, int(protect_last_valid and valid is not None),
                                best, best_index, PAD_BONUS=ops.PAD_PAIR_BONUS, BLOCK_A=MATCH_BLOCK,
                                BLOCK_B=MATCH_BLOCK, BLOCK_D=MATCH_BLOCK)
    return best, best_index


def tome_plan(metric: Tensor, valid: Tensor | None, r: int, num_prefix: int, protect_last_valid: bool,
              ab_order: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``tokencompile::tome_plan``: the matches and the plan, two kernel launches."""
    flags = _flags(valid, metric, metric.shape[:2])
    best, best_index = tome_matches(metric, valid, num_prefix, protect_last_valid, flags)
    return plan_from_matches(best, best_index, metric.shape[1], r, ab_order, valid, num_prefix, protect_last_valid,
                             flags)


def plan_from_matches(best: Tensor, best_index: Tensor, n: int, r: int, ab_order: bool, valid: Tensor | None,
                      num_prefix: int, protect_last_valid: bool,
                      flags: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``ops.plan_from_matches`` in one kernel launch (a dozen torch ops otherwise, whose launches
    dominate at ViT sizes)."""
    batch = best.shape[0]
    rep = torch.empty((batch, n - r), dtype=torch.int64, device=best.device)
    src = torch.empty((batch, r), dtype=torch.int64, device=best.device)
    dst = torch.empty((batch, r), dtype=torch.int64, device=best.device)
    if batch:
        flags = _flags(valid, best, (batch, n)) if flags is None else flags
        scratch = torch.empty((2, batch, n), dtype=torch.int64, device=best.device)
        tome_rank_kernel[(batch,)](best, best_index, flags, n, r, num_prefix,
                                   int(protect_last_valid and valid is not None), int(ab_order), rep, src, dst,
                                   scratch[0], scratch[1], BLOCK=RANK_BLOCK)
    return rep, src, dst


def merge_block_c(channels: int) -> int:
    return max(16, min(triton.next_power_of_2(channels), 128))


def merge_tokens(x: Tensor, weight: Tensor, rep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """``tokencompile::merge_tokens``: size-weighted mean of the tokens sharing each slot."""
    batch, n, channels = x.shape
    n_out, m = rep.shape[1], src.shape[1]
    out = torch.empty((batch, n_out, channels), dtype=x.dtype, device=x.device)
    if out.numel():
        block_c = merge_block_c(channels)
        grid = (batch, triton.cdiv(n_out, MERGE_BLOCK_S), triton.cdiv(channels, block_c))
        merge_tokens_kernel[grid](x.contiguous(), weight.contiguous(), rep.contiguous(), src.contiguous(),
                                  dst.contiguous(), n, channels, n_out, m, out, BLOCK_S=MERGE_BLOCK_S,
                                  BLOCK_C=block_c, BLOCK_M=MERGE_BLOCK_M)
    return out


def sum_tokens(weight: Tensor, rep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """``tokencompile::sum_tokens``: per-slot sum of token sizes [B, N] -> [B, n_out]."""
    batch, n = weight.shape
    n_out, m = rep.shape[1], src.shape[1]
    out = torch.empty((batch, n_out), dtype=weight.dtype, device=weight.device)
    if out.numel():
        block_s = 64
        grid = (batch, triton.cdiv(n_out, block_s))
        sum_tokens_kernel[grid](weight.contiguous(), rep.contiguous(), src.contiguous(), dst.contiguous(), n,
                                n_out, m, out, BLOCK_S=block_s, BLOCK_M=MERGE_BLOCK_M)
    return out


def probe_scores(query: Tensor, keys: Tensor, valid: Tensor | None) -> Tensor:
    """EViT's score, as ``methods.evit.cls_attention``: head mean of the softmax of query row 0 against
    all valid keys. query, keys [B, H, N, D] (any strides) -> [B, N] in query's dtype."""
    batch, heads, n, dim = keys.shape
    out = torch.empty((batch, n), dtype=query.dtype, device=query.device)
    if out.numel():
        block_n = max(16, min(triton.next_power_of_2(n), PROBE_BLOCK_N))
        block_d = max(16, min(triton.next_power_of_2(dim), PROBE_BLOCK_D))
        probe_scores_kernel[(batch,)](query, keys, _flags(valid, query, (batch, n)), heads, n, dim,
                                      float(query.shape[-1]) ** -0.5, query.stride(0), query.stride(1),
                                      query.stride(3), *keys.stride(), out, BLOCK_N=block_n, BLOCK_D=block_d,
                                      BLOCK_H=max(16, triton.next_power_of_2(heads)))
    return out


def probe_topk_plan(query: Tensor, keys: Tensor, valid: Tensor | None, n_keep: int, num_prefix: int,
                    protect_last_valid: bool, fuse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Probe scores by the kernel, then the top-k plan of ``tokencompile::topk_plan`` (a torch sort).
    Returns (score, rep, src, dst); the score is what the fused token's weight derives from."""
    score = probe_scores(query, keys, valid)
    rep, src, dst = ops.topk_plan(score, valid, n_keep, num_prefix, protect_last_valid, fuse)
    return score, rep, src, dst


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def gather_tokens(t: Tensor, rep: Tensor, dim: int) -> Tensor:
    """``tokencompile::gather_tokens``: per-sample rows rep [B, n_out] of t along token axis ``dim``
    (t's batch axis may be 1 and broadcast). Works for any dtype: it only moves bytes."""
    dim = dim % t.dim()
    batch, n_out = rep.shape
    n = t.shape[dim]
    outer = t.shape[1:dim].numel()
    inner = t.shape[dim + 1:].numel()
    out_shape = [batch, *t.shape[1:]]
    out_shape[dim] = n_out
    out = torch.empty(out_shape, dtype=t.dtype, device=t.device)
    if out.numel():
        source = t.contiguous()
        as_int = _SAME_WIDTH_INT[t.element_size()]
        block_s = min(triton.next_power_of_2(n_out), 64)
        block_i = min(triton.next_power_of_2(inner), 128)
        batch_stride = 0 if t.shape[0] == 1 else outer * n * inner
        grid = (batch * outer * triton.cdiv(n_out, block_s) * triton.cdiv(inner, block_i),)
        gather_tokens_kernel[grid](source.view(as_int), rep.contiguous(), batch_stride, outer, n, inner, n_out,
                                   out.view(as_int), BLOCK_S=block_s, BLOCK_I=block_i)
    return out

