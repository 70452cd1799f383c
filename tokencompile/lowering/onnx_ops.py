"""The tokencompile ops written with standard ONNX ops (opset 18), for torch.onnx's dynamo exporter.

Each function receives the op's tensor arguments as ONNX values and its integer arguments as Python
ints, exactly as the custom op is called in the graph, and must compute the same result as the
PyTorch reference in ``tokencompile.ops`` (checked by the parity tests in ONNX Runtime).
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import BOOL, FLOAT, INT64, script
from onnxscript import opset18 as op

INT64_MAX = 2**63 - 1


def _ints(*values):
    return op.Constant(value_ints=list(values))


def _every_other(t, start: int, axis: int):
    return op.Slice(t, _ints(start), _ints(INT64_MAX), _ints(axis), _ints(2))


def _protect(shape_source, valid, num_prefix: int, protect_last_valid: bool):
    n = op.Shape(shape_source, start=1, end=2)
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))
    protect = op.Unsqueeze(op.Less(positions, op.Constant(value_int=num_prefix)), _ints(0))
    if valid is not None and protect_last_valid:
        last = op.Sub(op.ReduceSum(op.Cast(valid, to=onnx.TensorProto.INT64), _ints(1), keepdims=1),
                      op.Constant(value_int=1))
        protect = op.Or(protect, op.Equal(op.Unsqueeze(positions, _ints(0)), last))
    return protect, positions, n


def tome_plan(metric, valid, r: int, num_prefix: int, protect_last_valid: bool, ab_order: bool = False):
    norm = op.Max(op.ReduceL2(metric, _ints(-1), keepdims=1), op.CastLike(op.Constant(value_float=1e-12), metric))
    m = op.Div(metric, norm)
    protect, positions, n = _protect(metric, valid, num_prefix, protect_last_valid)
    scores = op.MatMul(_every_other(m, 0, 1), op.Transpose(_every_other(m, 1, 1), perm=[0, 2, 1]))
    if valid is not None:
        pad_a = op.Unsqueeze(op.Not(_every_other(valid, 0, 1)), _ints(2))
        pad_b = op.Unsqueeze(op.Not(_every_other(valid, 1, 1)), _ints(1))
        bonus = op.CastLike(op.Constant(value_float=4.0), scores)
        scores = op.Add(scores, op.Mul(op.CastLike(op.And(pad_a, pad_b), scores), bonus))
        scores = op.Sub(scores, op.Mul(op.CastLike(op.Xor(pad_a, pad_b), scores), bonus))
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), scores)
    scores = op.Where(op.Unsqueeze(_every_other(protect, 0, 1), _ints(2)), neg_inf, scores)
    scores = op.Where(op.Unsqueeze(_every_other(protect, 1, 1), _ints(1)), neg_inf, scores)
    best = op.ReduceMax(scores, _ints(-1), keepdims=0)
    match = op.ArgMax(scores, axis=-1, keepdims=0, select_last_index=0)
    # TopK breaks ties towards the lower index, like the reference's stable descending sort
    num_a = op.Shape(best, start=1, end=2)
    _, a_order = op.TopK(best, num_a, axis=-1, largest=1, sorted=1)
    merged_a = op.Slice(a_order, _ints(0), _ints(r), _ints(1))
    two, one = op.Constant(value_int=2), op.Constant(value_int=1)
    src = op.Mul(merged_a, two)
    batch_by_n = op.Shape(metric, start=0, end=2)
    if ab_order:
        key = _tome_order_key(a_order, positions, n, num_a, valid, num_prefix, protect_last_valid)
    else:
        key = op.Expand(positions, batch_by_n)
    removed = op.ScatterElements(op.Expand(op.Constant(value_int=0), batch_by_n), src,
                                 op.Add(op.Mul(src, op.Constant(value_int=0)), one), axis=1)
    key = op.Where(op.Cast(removed, to=onnx.TensorProto.BOOL), op.Mul(n, op.Constant(value_int=8)), key)
    n_out = op.Sub(n, _ints(r))
    # the n_out smallest keys in ascending order (keys of kept tokens are distinct)
    _, rep = op.TopK(op.Neg(op.Cast(key, to=onnx.TensorProto.FLOAT)), n_out, axis=1, largest=1, sorted=1)
    slot_values = op.Expand(op.Range(op.Constant(value_int=0), op.Squeeze(n_out), one), op.Shape(rep))
    slot = op.ScatterElements(op.Expand(op.Constant(value_int=0), batch_by_n), rep, slot_values, axis=1)
    dst = op.GatherElements(slot, op.Add(op.Mul(op.GatherElements(match, merged_a, axis=1), two), one), axis=1)
    return rep, src, dst


def _tome_order_key(a_order, positions, n, num_a, valid, num_prefix: int, protect_last_valid: bool):
    """tokencompile.ops.tome_order_key in ONNX ops: [B, N] int64."""
    two = op.Constant(value_int=2)
    half = op.Div(positions, two)                                              # [N]
    batch_by_n = op.Concat(op.Shape(a_order, start=0, end=1), n, axis=0)
    if num_prefix > 0:
        a_key = op.Expand(half, batch_by_n)
    else:  # the rank of each A token in a_order
        ranks = op.Expand(op.Range(op.Constant(value_int=0), op.Squeeze(num_a), op.Constant(value_int=1)),
                          op.Shape(a_order))
        a_rank = op.ScatterElements(op.Mul(a_order, op.Constant(value_int=0)), a_order, ranks, axis=1)
        a_key = op.Gather(a_rank, half, axis=1)
    even = op.Equal(op.Mod(positions, two), op.Constant(value_int=0))
    key = op.Where(even, a_key, op.Expand(op.Add(half, num_a), batch_by_n))
    key = op.Where(op.Less(positions, op.Constant(value_int=num_prefix)), op.Expand(op.Sub(positions, n), batch_by_n),
                   key)
    if valid is not None:
        if protect_last_valid:
            last = op.Sub(op.ReduceSum(op.Cast(valid, to=onnx.TensorProto.INT64), _ints(1), keepdims=1),
                          op.Constant(value_int=1))
            key = op.Where(op.Equal(positions, last), op.Expand(op.Mul(n, two), batch_by_n), key)
        key = op.Where(valid, key, op.Add(key, op.Mul(n, op.Constant(value_int=4))))
    return key


def _slots_after_removing(batch_by_n, positions, removed, n_out):
    """For each token, its slot among the kept ones (cumsum of keep - 1), and the kept tokens (rep)."""
    one = op.Constant(value_int=1)
    keep = op.ScatterElements(op.Expand(one, batch_by_n), removed, op.Mul(removed, op.Constant(value_int=0)), axis=1)
    slot = op.Sub(op.CumSum(keep, one), one)
    # kept positions in ascending order: the largest values of -position among kept tokens
    key = op.Where(op.Cast(keep, to=onnx.TensorProto.BOOL), op.Neg(op.Cast(positions, to=onnx.TensorProto.FLOAT)),
                   op.Constant(value_float=-1e30))
    _, rep = op.TopK(key, n_out, axis=1, largest=1, sorted=1)
    return slot, rep


def route_plan(removed, target, n: int):
    batch_by_n = op.Concat(op.Shape(removed, start=0, end=1), _ints(n), axis=0)
    positions = op.Range(op.Constant(value_int=0), op.Constant(value_int=n), op.Constant(value_int=1))
    n_out = op.Sub(_ints(n), op.Shape(removed, start=1, end=2))
    slot, rep = _slots_after_removing(batch_by_n, positions, removed, n_out)
    zero = op.Constant(value_int=0)
    dst = op.Where(op.GreaterOrEqual(target, zero), op.GatherElements(slot, op.Max(target, zero), axis=1),
                   op.Squeeze(n_out))
    return rep, op.Identity(removed), dst


def _ascending(indices, k):
    """Sort int64 indices [B, k] ascending (TopK of their negation)."""
    _, order = op.TopK(op.Neg(op.Cast(indices, to=onnx.TensorProto.FLOAT)), _ints(k), axis=1, largest=1, sorted=1)
    return op.GatherElements(indices, order, axis=1)


def topk_plan(score, valid, n_keep: int, num_prefix: int, protect_last_valid: bool, fuse: bool):
    protect, _, n = _protect(score, valid, num_prefix, protect_last_valid)
    s = op.Cast(score, to=onnx.TensorProto.FLOAT)
    s = op.Where(protect, op.Constant(value_float=float("inf")), s)
    if valid is not None:
        s = op.Where(op.And(op.Not(valid), op.Not(protect)), op.Constant(value_float=float("-inf")), s)
    _, order = op.TopK(s, n, axis=1, largest=1, sorted=1)
    n_removed = op.Sub(n, _ints(n_keep + int(fuse)))
    kept = _ascending(op.Slice(order, _ints(0), _ints(n_keep), _ints(1)), n_keep)
    removed = op.Slice(order, _ints(n_keep + int(fuse)), _ints(INT64_MAX), _ints(1))
    _, removed_order = op.TopK(op.Neg(op.Cast(removed, to=onnx.TensorProto.FLOAT)), n_removed, axis=1, largest=1,
                               sorted=1)
    src = op.GatherElements(removed, removed_order, axis=1)
    rep = op.Concat(kept, op.Slice(order, _ints(n_keep), _ints(n_keep + 1), _ints(1)), axis=1) if fuse else kept
    dst = op.Expand(op.Constant(value_int=n_keep), op.Shape(src))
    return rep, src, dst


def _rows(t, index):
    """Per-sample rows t[b, index[b, k]] as one Gather over [B*N, ...] (copies whole rows)."""
    n = op.Shape(t, start=1, end=2)
    batch = op.Shape(index, start=0, end=1)
    offsets = op.Mul(op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(batch), op.Constant(value_int=1)),
                                  _ints(1)), n)
    flat = op.Reshape(t, op.Concat(_ints(-1), op.Shape(t, start=2), axis=0))
    return op.Gather(flat, op.Add(index, offsets), axis=0)


def _fold_matrix(kept, dst):
    """One-hot [B, n_out, m] routing removed tokens to their slots (slot n_out, "dropped", has no row).
    A MatMul with it adds the removed rows in: dense but tiny (m << N), and much faster in ONNX Runtime
    than ScatterElements with reduction, which also needs a plugin in TensorRT."""
    slots = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(kept, start=1, end=2)), op.Constant(value_int=1))
    return op.CastLike(op.Equal(op.Unsqueeze(slots, _ints(0, 2)), op.Unsqueeze(dst, _ints(1))), kept)


def merge_tokens(x, weight, rep, src, dst):
    # out = (x_rep * w_rep + route @ (x_src * w_src)) / norm, with 1 / norm folded into the small factors
    # so that only three ops touch [B, n_out, C]: the row gather, one Mul and the MatMul's Add.
    w = op.CastLike(weight, x)
    kept_w, moved_w = op.GatherElements(w, rep, axis=1), op.GatherElements(w, src, axis=1)
    route = _fold_matrix(kept_w, dst)
    norm = op.Add(kept_w, op.Squeeze(op.MatMul(route, op.Unsqueeze(moved_w, _ints(2))), _ints(2)))
    inverse = op.Unsqueeze(op.Reciprocal(norm), _ints(2))
    moved = op.Mul(_rows(x, src), op.Unsqueeze(moved_w, _ints(2)))
    kept = op.Mul(_rows(x, rep), op.Mul(op.Unsqueeze(kept_w, _ints(2)), inverse))
    return op.Add(kept, op.MatMul(op.Mul(route, inverse), moved))


def sum_tokens(weight, rep, src, dst):
    kept = op.GatherElements(weight, rep, axis=1)
    moved = op.Unsqueeze(op.GatherElements(weight, src, axis=1), _ints(2))
    return op.Add(kept, op.Squeeze(op.MatMul(_fold_matrix(kept, dst), moved), _ints(2)))


def max_tokens(t, rep, src, dst):
    kept = op.GatherElements(t, rep, axis=1)
    moved = op.Unsqueeze(op.GatherElements(t, src, axis=1), _ints(1))             # [B, 1, m]
    route = op.Cast(_fold_matrix(kept, dst), to=onnx.TensorProto.BOOL)             # [B, n_out, m]
    candidates = op.Where(route, moved, op.CastLike(op.Constant(value_float=float("-inf")), t))
    return op.Max(kept, op.ReduceMax(candidates, _ints(2), keepdims=0))


@script()
def _greedy_max_min(distance: FLOAT[None, None, None], nearest: FLOAT[None, None], taken: BOOL[None, None],
                    valid: BOOL[None, None], virtual_start: BOOL[None, 1], steps: INT64) -> FLOAT[None, None]:
    """One farthest-point pick per iteration, a fixed number of iterations (an ONNX Loop)."""
    n = op.Shape(nearest, start=1, end=2)
    positions = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1)),
                             op.Constant(value_ints=[0]))
    neg_inf = op.Constant(value_float=float("-inf"))
    floor = op.Constant(value_float=-1e30)
    rank = op.Expand(op.Constant(value_float=-1.0), op.Shape(nearest))
    for step in range(steps):
        candidate = op.Where(taken, neg_inf, op.Where(valid, nearest, floor))
        pick = op.ArgMax(candidate, axis=1, keepdims=1)
        hit = op.Equal(positions, pick)
        rank = op.Where(hit, op.Cast(op.Sub(steps, step), to=1), rank)
        taken = op.Or(taken, hit)
        # the picked row of the distance matrix, exactly (one-hot MatMul adds only zeros)
        row = op.MatMul(op.Unsqueeze(op.Cast(hit, to=1), op.Constant(value_ints=[1])), distance)
        row = op.Squeeze(row, op.Constant(value_ints=[1]))
        replace = op.And(virtual_start, op.Equal(step, op.Constant(value_int=0)))
        nearest = op.Where(replace, row, op.Min(nearest, row))
    return rank


def farthest_point_rank(metric, valid, k: int, num_prefix: int, protect_last_valid: bool):
    norm = op.Max(op.ReduceL2(metric, _ints(-1), keepdims=1), op.CastLike(op.Constant(value_float=1e-12), metric))
    unit = op.Cast(op.Div(metric, norm), to=onnx.TensorProto.FLOAT)
    one = op.Constant(value_float=1.0)
    distance = op.Sub(one, op.MatMul(unit, op.Transpose(unit, perm=[0, 2, 1])))
    protect, _, _ = _protect(metric, valid, num_prefix, protect_last_valid)
    protect = op.Expand(protect, op.Shape(metric, start=0, end=2))
    mean = op.ReduceMean(unit, _ints(1), keepdims=1)
    mean_norm = op.Max(op.ReduceL2(mean, _ints(-1), keepdims=0), op.Constant(value_float=1e-12))
    from_mean = op.Sub(one, op.Div(op.ReduceSum(op.Mul(unit, mean), _ints(-1), keepdims=0), mean_norm))
    to_protected = op.ReduceMin(op.Where(op.Unsqueeze(protect, _ints(1)), distance,
                                         op.Constant(value_float=float("inf"))), _ints(-1), keepdims=0)
    any_protected = op.Cast(op.ReduceMax(op.Cast(protect, to=onnx.TensorProto.INT64), _ints(1), keepdims=1),
                            to=onnx.TensorProto.BOOL)
    nearest = op.Where(any_protected, to_protected, from_mean)
    if valid is None:
        valid = op.Expand(op.Constant(value_int=1), op.Shape(protect))
        valid = op.Cast(valid, to=onnx.TensorProto.BOOL)
    return _greedy_max_min(distance, nearest, protect, valid, op.Not(any_protected), op.Constant(value_int=k))


def gather_tokens(t, rep, dim: int):
    rank = len(t.shape)
    batch, n = op.Shape(rep, start=0, end=1), op.Shape(rep, start=1, end=2)
    t = op.Expand(t, op.Concat(batch, op.Shape(t, start=1), axis=0))
    parts = [batch] + ([op.Shape(t, start=1, end=dim)] if dim > 1 else []) + [n]
    if dim + 1 < rank:
        parts.append(op.Shape(t, start=dim + 1))
    others = [i for i in range(1, rank) if i != dim]
    index = op.Unsqueeze(rep, _ints(*others)) if others else rep
    return op.GatherElements(t, op.Expand(index, op.Concat(*parts, axis=0)), axis=dim)


def is_all_true(t):
    """``aten._is_all_true`` (from ``torch._check`` on a tensor, e.g. a VLM's image-token count check): the
    exporter drops the assertion it feeds but still needs the op."""
    return op.Cast(op.ReduceMin(op.Cast(t, to=onnx.TensorProto.INT32), keepdims=0), to=onnx.TensorProto.BOOL)


@script()
def _grouped_matmul(rows: FLOAT[None, None], weight: FLOAT[None, None, None],
                    offsets: INT64[None]) -> FLOAT[None, None]:
    """rows[s:e] @ weight[i] for expert i's rows s = offsets[i - 1] (0 for i = 0) .. e = offsets[i]; rows past
    the last offset are 0. An ONNX Loop over the experts that have rows (the graph does not grow with the
    number of experts, and a decode step runs only its tokens' experts); each product is scattered into
    its rows of a fixed-shape result."""
    zero = op.Constant(value_ints=[0])
    out = op.Expand(op.Constant(value_float=0.0), op.Concat(op.Shape(rows, start=0, end=1),
                                                            op.Shape(weight, start=2, end=3), axis=0))
    starts = op.Concat(zero, op.Slice(offsets, zero, op.Constant(value_ints=[-1])), axis=0)
    active = op.Reshape(op.NonZero(op.Greater(offsets, starts)), op.Constant(value_ints=[-1]))
    for step in range(op.Squeeze(op.Shape(active))):
        expert = op.Gather(active, step)
        begin, end = op.Gather(starts, expert), op.Gather(offsets, expert)
        product = op.MatMul(op.Slice(rows, op.Reshape(begin, op.Constant(value_ints=[1])),
                                     op.Reshape(end, op.Constant(value_ints=[1])), zero),
                            op.Gather(weight, expert, axis=0))
        rows_of_expert = op.Unsqueeze(op.Range(begin, end, op.Constant(value_int=1)), op.Constant(value_ints=[1]))
        out = op.ScatterND(out, rows_of_expert, product)
    return out


def grouped_mm(rows, weight, offs):
    """Hugging Face's ``transformers::grouped_mm_fallback`` (mixture-of-experts layers, export on the CPU):
    [S, K] rows sorted by expert, [E, K, N] weights, [E] cumulative row counts. Computed in float32 (half
    precision weights are cast once, when ONNX Runtime loads the graph: they are held in float32)."""
    out = _grouped_matmul(op.Cast(rows, to=onnx.TensorProto.FLOAT), op.Cast(weight, to=onnx.TensorProto.FLOAT),
                          op.Cast(offs, to=onnx.TensorProto.INT64))
    return op.CastLike(out, rows)


def translation_table() -> dict:
    import tokencompile.ops  # noqa: F401

    tc = torch.ops.tokencompile
    table = {
        tc.tome_plan.default: tome_plan,
        tc.topk_plan.default: topk_plan,
        tc.route_plan.default: route_plan,
        tc.farthest_point_rank.default: farthest_point_rank,
        tc.max_tokens.default: max_tokens,
        tc.merge_tokens.default: merge_tokens,
        tc.sum_tokens.default: sum_tokens,
        tc.gather_tokens.default: gather_tokens,
        torch.ops.aten._is_all_true.default: is_all_true,
    }
    experts = getattr(torch.ops.transformers, "grouped_mm_fallback", None)
    if experts is not None:  # registered when transformers' mixture-of-experts module is imported
        table[experts.default] = grouped_mm
    return table
