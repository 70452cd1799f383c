"""Compute only the token positions that an output reads.

A program that returns one position of a sequence (a decoder prefill's last-token logits, a ViT's
[CLS] state) still computes every position in the layers after the last one whose keys and values
other positions need. Reading backwards from such a read (``x[:, -1:]``, ``x[:, 0]``), every node whose
all users only feed that read and which maps positions to positions (pointwise ops, norms over the
features, projections, views that keep the axis whole, attention on the query side) is recomputed on
that one position; the tensors it reads from outside get a slice. In a decoder's last layer only the
key / value projections (which the cache returns) then see every prompt token; in a [CLS]-pooled
encoder the last block's attention queries, output projection and MLP run on [CLS] alone. The result
is exact: the same values at the read position, fewer FLOPs.
"""

from __future__ import annotations

import sys

import sympy
import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

from ..graph_utils import (
    SDPA,
    GraphBuilder,
    aten,
    fake_value,
    node_arg,
    refresh_fake_values,
    set_node_arg,
    size_expr,
    tensor_meta,
)

_MAX = sys.maxsize
_SAME_POSITIONS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.contiguous.default,
                   aten.alias.default, aten.clone.default, aten.dropout.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# nodes that compute nothing: a region of only these saves nothing and is left alone
_LAYOUT = _VIEWS | {aten.slice.Tensor, aten.select.int, aten.transpose.int, aten.permute.default,
                    aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.alias.default,
                    aten.contiguous.default, aten.clone.default}


def _same_size(a, b) -> bool:
    return sympy.expand(size_expr(a) - size_expr(b)) == 0


def _prod(sizes) -> sympy.Expr:
    result = sympy.Integer(1)
    for size in sizes:
        result *= size_expr(size)
    return sympy.expand(result)


def _position_read(node: Node) -> tuple[int, int] | None:
    """(axis, index) when ``node`` reads one position of an axis with a constant index."""
    if node.op != "call_function" or node.target not in (aten.slice.Tensor, aten.select.int):
        return None
    source = tensor_meta(node.args[0]) if isinstance(node.args[0], Node) else None
    if source is None or source.dim() == 0:
        return None
    axis = node_arg(node, 1, "dim", 0) % source.dim()
    length = source.shape[axis]
    if not isinstance(length, int) or length < 2:
        return None
    if node.target == aten.slice.Tensor and tensor_meta(node).shape[axis] != 1:
        return None
    if node.target == aten.select.int:
        index = node_arg(node, 2, "index")
        return (axis, index) if isinstance(index, int) else None
    start, end, step = node_arg(node, 2, "start"), node_arg(node, 3, "end"), node_arg(node, 4, "step", 1)
    if not isinstance(start, int) or not isinstance(end, int | None) or step != 1:
        return None
    if not -length <= start < length:
        return None
    return axis, start  # (one position long, by the check above: start .. start + 1)


def _tensor_axis(value: torch.Tensor, out: torch.Tensor, axis: int) -> int | None:
    """The axis of a broadcast operand that lines up with ``axis`` of the result, or None when the
    operand is broadcast along it (or is not a tensor)."""
    if not isinstance(value, torch.Tensor):
        return None
    aligned = axis - (out.dim() - value.dim())
    if aligned < 0 or (_same_size(value.shape[aligned], 1) and not _same_size(out.shape[axis], 1)):
        return None
    return aligned


def _view_axis(source: torch.Tensor, out: torch.Tensor, axis: int) -> int | None:
    """The source axis a view keeps whole as ``axis`` (same size, same number of elements before it)."""
    before = _prod(out.shape[:axis])
    for candidate in range(source.dim()):
        if _same_size(source.shape[candidate], out.shape[axis]) and _prod(source.shape[:candidate]) == before:
            return candidate
    return None


def _reads(node: Node, axis: int) -> list[tuple[Node, int | None]] | None:
    """How ``node`` maps positions along ``axis`` of its result to its inputs: (input, its axis, or None for
    an input read whole) for each input, or None when it does not map positions to positions."""
    out = tensor_meta(node)
    if out is None or node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) \
            or node.target._schema.is_mutable:
        return None
    target, args = node.target, node.args
    # inputs that are not tensors are sizes (SymInts) of tensors outside the region or of its other axes
    values = {n: tensor_meta(n) for n in node.all_input_nodes if tensor_meta(n) is not None}
    source = args[0] if args and isinstance(args[0], Node) else None

    def operands():
        return [(n, _tensor_axis(v, out, axis)) for n, v in values.items()]

    if target == aten.dropout.default:
        return operands() if not (node_arg(node, 2, "train") and node_arg(node, 1, "p")) else None
    if torch.Tag.pointwise in target.tags or target in _SAME_POSITIONS:
        # a random op on fewer positions would draw other numbers
        return operands() if torch.Tag.nondeterministic_seeded not in target.tags else None
    if target in _SOFTMAX:
        return operands() if node_arg(node, 1, "dim") % out.dim() != axis else None
    if target in _REDUCTIONS:
        rank = values[source].dim()
        dims = node_arg(node, 1, "dim")
        dims = [d % rank for d in ([dims] if isinstance(dims, int) else dims or range(rank))]
        kept = range(rank) if node_arg(node, 2, "keepdim", False) else [d for d in range(rank) if d not in dims]
        mapped = list(kept)[axis]
        return [(source, mapped)] if mapped not in dims else None
    if target in (aten.layer_norm.default, aten.rms_norm.default, aten.linear.default):
        features = 1 if target == aten.linear.default else len(node_arg(node, 1, "normalized_shape"))
        parameters = [(a, None) for a in [*args[1:], *node.kwargs.values()] if isinstance(a, Node)]
        return [(source, axis), *parameters] if axis < out.dim() - features else None
    if target in (aten.matmul.default, aten.bmm.default):
        left, right = args[0], args[1]
        if left is right or axis == out.dim() - 1 or left not in values or right not in values \
                or values[left].dim() < 2 or values[right].dim() < 2:
            return None
        if axis == out.dim() - 2:  # rows of the left operand; the right one is contracted along it
            return [(left, values[left].dim() - 2), (right, None)]
        return operands()
    if target in _VIEWS:
        mapped = _view_axis(values[source], out, axis)
        return [(source, mapped)] if mapped is not None and isinstance(args[1][axis], int) else None
    if target == aten.expand.default:
        size = args[1][axis]
        return [(source, _tensor_axis(values[source], out, axis))] if isinstance(size, int) else None
    if target == aten.transpose.int:
        d0, d1 = (d % out.dim() for d in args[1:3])
        return [(source, d1 if axis == d0 else d0 if axis == d1 else axis)]
    if target == aten.permute.default:
        return [(source, args[1][axis] % out.dim())]
    if target == aten.unsqueeze.default:
        dim = args[1] % out.dim()
        return [(source, axis if axis < dim else axis - 1)] if axis != dim else None
    if target == aten.squeeze.dim:
        dim = args[1] % values[source].dim()
        if not _same_size(values[source].shape[dim], 1):  # squeeze changes nothing, unless it is the read axis
            return [(source, axis)] if dim != axis else None
        return [(source, axis if axis < dim else axis + 1)]
    if target == aten.select.int:
        dim = args[1] % values[source].dim()
        return [(source, axis if axis < dim else axis + 1)]
    if target == aten.slice.Tensor:
        dim = node_arg(node, 1, "dim", 0) % out.dim()
        return [(source, axis)] if dim != axis or _same_size(values[source].shape[dim], out.shape[dim]) else None
    if target == aten.cat.default:
        dim = node_arg(node, 1, "dim", 0) % out.dim()
        return [(n, axis) for n in args[0]] if dim != axis else None
    if target == SDPA:
        return _attention_reads(node, axis, out, values)
    return None


def _attention_reads(node: Node, axis: int, out, values) -> list | None:
    """Attention maps query positions to output positions; keys and values are read whole."""
    query, key, value = node.args[:3]
    mask = node_arg(node, 3, "attn_mask")
    if axis != out.dim() - 2 or query in (key, value, mask) or node_arg(node, 4, "dropout_p", 0.0):
        return None
    reads = [(query, values[query].dim() - 2), (key, None), (value, None)]
    if isinstance(mask, Node):  # broadcast against [..., L, S]: its rows are its axis -2, if it has one
        rows = values[mask].dim() - 2
        reads.append((mask, None if rows < 0 or _same_size(values[mask].shape[rows], 1) else rows))
    return reads


def _causal_read(node: Node, index: int) -> bool:
    """Whether causal attention read at ``index`` keeps its meaning on one query row. torch's flag aligns
    the mask top-left: the first query sees the first key; the last sees every key only when there
    are at least as many queries as keys."""
    if index == 0:
        return True
    queries, keys = (tensor_meta(node.args[i]).shape[-2] for i in (0, 1))
    return index == -1 and isinstance(queries, int) and isinstance(keys, int) and queries >= keys


def _neutral(user: Node, axis: int) -> bool:
    """Users that read only metadata the rewrite keeps (dtype checks, the sizes of other axes)."""
    if user.target == aten._assert_tensor_metadata.default:
        return node_arg(user, 1, "size") is None and node_arg(user, 2, "stride") is None
    if user.target == aten.sym_size.int:
        return user.args[1] % tensor_meta(user.args[0]).dim() != axis
    return False


def _region(read: Node, axis: int, index: int) -> tuple[dict[Node, int], dict[Node, list]]:
    """Nodes to recompute on the read position (each with the axis of its result that holds it) and how
    each reads its inputs; found walking the graph backwards from the read."""
    wanted: dict[Node, set[int]] = {read.args[0]: {axis}}
    whole: set[Node] = set()  # read whole by some node of the region: computed whole
    region: dict[Node, int] = {}
    reads: dict[Node, list] = {}
    pending = {read.args[0]}
    node = read.args[0]
    while pending:
        axes = wanted.get(node)
        pending.discard(node)
        if axes is not None and len(axes) == 1 and node not in whole:
            (node_axis,) = axes
            users_ok = all(user is read or user in region or _neutral(user, node_axis) for user in node.users)
            plan = _reads(node, node_axis) if users_ok else None
            if plan is not None and len({(source, source_axis) for source, source_axis in plan}) \
                    != len({source for source, _ in plan}):
                plan = None  # one input in two roles (e.g. linear(x, x)): one replacement cannot serve both
            if plan is not None and node.target == SDPA and node_arg(node, 5, "is_causal", False) \
                    and not _causal_read(node, index):
                plan = None
            if plan is not None:
                region[node] = node_axis
                reads[node] = plan
                for source, source_axis in plan:
                    if source_axis is None:
                        whole.add(source)
                    else:
                        wanted.setdefault(source, set()).add(source_axis)
                        pending.add(source)
        node = node.prev
    return region, reads


def _rewrite(gm: GraphModule, read: Node, axis: int, index: int, fake_mode) -> bool:
    region, reads = _region(read, axis, index)
    if all(node.target in _LAYOUT for node in region):
        return False
    pieces: dict[tuple[Node, int], Node] = {}
    for node in list(gm.graph.nodes):
        if node not in region:
            continue
        for source, source_axis in reads[node]:
            if source_axis is None or source in region:
                continue
            if (source, source_axis) not in pieces:  # the first reader comes first in graph order
                builder = GraphBuilder(gm, node.prev, node.meta.get("nn_module_stack"))
                pieces[source, source_axis] = builder.call(aten.slice.Tensor, source, source_axis, index,
                                                           _MAX if index == -1 else index + 1)
            node.replace_input_with(source, pieces[source, source_axis])
        if node.target in _VIEWS or node.target == aten.expand.default:
            sizes = list(node.args[1])
            if sizes[region[node]] != -1:
                sizes[region[node]] = 1
            node.args = (node.args[0], sizes, *node.args[2:])
        if node.target == SDPA and node_arg(node, 5, "is_causal", False) and index == -1:
            set_node_arg(node, 5, "is_causal", False)  # the last query sees every key
        node.meta["val"] = fake_value(node, fake_mode)
    if read.target == aten.select.int:
        set_node_arg(read, 2, "index", 0)
    else:
        set_node_arg(read, 2, "start", 0)
        set_node_arg(read, 3, "end", _MAX)
    read.meta["val"] = fake_value(read, fake_mode)
    refresh_fake_values(gm, [read])
    return True


def eliminate_dead_positions(gm: GraphModule, ctx=None) -> GraphModule:
    """Recompute the nodes that only feed a one-position read of their result on that position alone."""
    fake_mode = detect_fake_mode([node.meta.get("val") for node in gm.graph.nodes])
    changed = False
    for node in list(gm.graph.nodes):
        found = _position_read(node)
        if found is not None and node.graph is gm.graph:
            changed |= _rewrite(gm, node, *found, fake_mode)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return gm


__all__ = ["eliminate_dead_positions"]
