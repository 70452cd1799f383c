"""Re-specialise the graph downstream of a changed token count.

An exported graph bakes sizes into ``view`` / ``reshape`` / ``expand`` / ``slice`` arguments. After
a reduction changes the token count, every size that contains the token axis must follow. Sizes are
never matched by value: each dimension carries its factors as (old size, new size) pairs, propagated
from the node that changed them, so a token axis flattened with the batch (``[B*N, C]``) and split
again later keeps its identity even when the token count equals some other size.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import sympy
import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node

from ..errors import UnsupportedModelError
from ..graph_utils import aten, fake_value, node_arg, set_node_arg, size_expr

Factors = list[tuple[sympy.Expr, sympy.Expr]]  # (old, new) size of each factor of one dimension

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# ops whose size list repeats their source's shape, changed in some dims (DeepSeek's MLA builds its keys
# with ``kv.new_empty(*kv.shape[:-1], d)`` and copies the two halves in)
_NEW = {aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default}
_SIZED_LIKE_SOURCE = {aten.expand.default, aten.broadcast_to.default} | _NEW
_PROBE = 1_000_003  # value given to symbolic sizes when sizes must be ordered


def _number(expr: sympy.Expr) -> int:
    return int(expr.subs({symbol: _PROBE for symbol in expr.free_symbols}))


def _product(factors: Factors, which: int) -> sympy.Expr:
    result = sympy.Integer(1)
    for factor in factors:
        result *= factor[which]
    return result


def _group(inputs: list[tuple[sympy.Expr, sympy.Expr]], outputs: list[sympy.Expr]):
    """Minimal groups (input factor indices, output dim indices) with equal old products."""
    groups, i, j = [], 0, 0
    while i < len(inputs) or j < len(outputs):
        if i < len(inputs) and _number(inputs[i][0]) == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(outputs) and _number(outputs[j]) == 1:
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj = [i], [j]
        p_in, p_out = _number(inputs[i][0]), _number(outputs[j])
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out:
                p_in *= _number(inputs[i][0])
                gi.append(i)
                i += 1
            else:
                p_out *= _number(outputs[j])
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def _tensor_inputs(node: Node) -> list[Node]:
    """The tensor inputs of ``node``, looking through an input that holds several tensors (``topk`` or
    ``sort`` read by ``getitem``) to that node's own tensor inputs."""
    inputs = []
    for arg in node.all_input_nodes:
        value = arg.meta.get("val")
        if isinstance(value, torch.Tensor):
            inputs.append(arg)
        elif isinstance(value, (tuple, list)):
            inputs.extend(a for a in arg.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor))
    return inputs


class _Propagation:
    def __init__(self, gm: GraphModule, num_prefix: int):
        self.gm = gm
        self.graph = gm.graph
        self.num_prefix = num_prefix
        self.old: dict[Node, object] = {}
        self.factors: dict[Node, list[Factors]] = {}

    # --- factor bookkeeping -------------------------------------------------------------------
    def dims(self, node: Node) -> list[Factors]:
        if node in self.factors:
            return self.factors[node]
        old = self.old.get(node, node.meta["val"])
        new = node.meta["val"]
        return [[(size_expr(o), size_expr(n))] for o, n in zip(old.shape, new.shape)]

    def inherit_dims(self, node: Node, old_value, new_value) -> None:
        """Changed output dims take the factors of an input dim that changed the same way."""
        candidates = {}
        for arg in _tensor_inputs(node):
            for factors in self.dims(arg):
                candidates.setdefault((_product(factors, 0), _product(factors, 1)), factors)
        dims = []
        for o, n in zip(old_value.shape, new_value.shape):
            pair = (size_expr(o), size_expr(n))
            dims.append(candidates.get(pair, [pair]) if pair[0] != pair[1] else [pair])
        self.factors[node] = dims

    # --- size arguments -----------------------------------------------------------------------
    def size_arg(self, old_arg, old: sympy.Expr, new: sympy.Expr, anchor: Node):
        if old == new or (isinstance(old_arg, int) and old_arg == -1):
            return old_arg
        if not isinstance(old_arg, Node):
            if new.free_symbols:
                raise UnsupportedModelError(f"node {anchor.name!r}: a constant size became symbolic ({new})",
                                            "export the model with a symbolic batch size in view arguments")
            return int(new)
        ratio = sympy.nsimplify(new / old)
        numerator, denominator = sympy.fraction(ratio)
        with self.graph.inserting_before(anchor):
            scaled = self.graph.call_function(operator.mul, (old_arg, int(numerator)))
            scaled.meta["val"] = old_arg.meta["val"] * int(numerator)
            result = self.graph.call_function(operator.floordiv, (scaled, int(denominator)))
            result.meta["val"] = scaled.meta["val"] // int(denominator)
        return result

    def rewrite_view(self, node: Node) -> None:
        source = node.args[0]
        in_factors = [factor for factors in self.dims(source) for factor in factors]
        old_out = [size_expr(s) for s in self.old[node].shape]
        new_out = list(old_out)
        out_factors: list[Factors] = [[(s, s)] for s in old_out]
        for gi, gj in _group(in_factors, old_out):
            factors = [in_factors[i] for i in gi]
            if all(old == new for old, new in factors):
                continue
            if len(gj) == 1:
                new_out[gj[0]] = _product(factors, 1)
                out_factors[gj[0]] = factors
                continue
            remaining = list(factors)
            for j in gj:
                taken, size = [], 1
                while size != _number(old_out[j]) and remaining:
                    taken.append(remaining.pop(0))
                    size *= _number(taken[-1][0])
                if size != _number(old_out[j]):
                    raise UnsupportedModelError(
                        f"node {node.name!r} reshapes the token axis into {tuple(self.old[node].shape)}",
                        "token reduction cannot be placed before a reshape that splits the token axis "
                        "(e.g. back into a spatial grid)")
                new_out[j] = _product(taken, 1)
                out_factors[j] = taken
        old_args = list(node.args[1])
        node.args = (source, [self.size_arg(a, old_out[j], new_out[j], node) for j, a in enumerate(old_args)])
        self.factors[node] = out_factors

    def rewrite_expand(self, node: Node) -> None:
        """Sizes given with the source's dims (aligned from the right, as broadcasting does) follow them."""
        source, sizes = node.args[0], list(node.args[1])
        old_in, new_in = self.old.get(source, source.meta["val"]).shape, source.meta["val"].shape
        if node.target in _NEW and len(sizes) != len(old_in):
            return  # a new tensor of another rank: its sizes are not the source's
        offset = len(sizes) - len(old_in)
        for j, size in enumerate(sizes):
            d = j - offset
            if node.target in _NEW and size_expr(size.meta["val"] if isinstance(size, Node) else size) \
                    != size_expr(old_in[d]):
                continue  # a size of its own (another layout, an extra token): not the source's dim
            if d >= 0 and old_in[d] != new_in[d]:
                sizes[j] = self.size_arg(size, size_expr(old_in[d]), size_expr(new_in[d]), node)
        node.args = (source, sizes, *node.args[2:])

    def rewrite_arange(self, node: Node) -> None:
        """``arange(n)`` combined with a tensor whose dim of old size ``n`` changed (the inverse permutation of
        a sort of a mixture of experts' [B*N*k] token-expert pairs: ``index_put_(empty, [order], arange(n))``)
        follows that dim; ``n`` is a size expression that the export wrote as constants times the batch."""
        end = node.args[0]
        if not isinstance(end, Node) or not isinstance(end.meta.get("val"), torch.SymInt):
            return
        old = size_expr(end.meta["val"])
        partners = [arg for user in node.users for arg in _tensor_inputs(user) if arg is not node]
        news = {_product(factors, 1) for arg in partners if arg in self.factors for factors in self.factors[arg]
                if _product(factors, 0) == old}
        if len(news) > 1:
            raise UnsupportedModelError(f"node {node.name!r}: arange({old}) is combined with token axes that "
                                        "changed differently", "reduce in later blocks only")
        if news and news != {old}:
            node.args = (self.size_arg(end, old, news.pop(), node), *node.args[1:])

    def check_index(self, node: Node) -> None:
        source = node.args[0]
        dim = node_arg(node, 1, "dim", 0)
        old_in, new_in = self.old.get(source, source.meta["val"]).shape, source.meta["val"].shape
        dim = dim % len(old_in)
        if old_in[dim] == new_in[dim]:
            return
        if node.target == aten.select.int:
            index = node.args[2]
            if 0 <= index < self.num_prefix or index < 0:
                return
            raise UnsupportedModelError(f"node {node.name!r} reads token {index}, which a reduction may remove",
                                        "protect it (e.g. --protect-prefix) or reduce only after it is read")
        start = node_arg(node, 2, "start", None) or 0
        end = node_arg(node, 3, "end", None)
        if end is not None and end == old_in[dim]:
            set_node_arg(node, 3, "end", int(new_in[dim]))
        elif end is not None and start == 0 and end <= self.num_prefix:
            return
        elif end is not None and end < old_in[dim]:
            raise UnsupportedModelError(f"node {node.name!r} slices tokens [{start}:{end}] of {old_in[dim]}",
                                        "token reduction cannot be placed before a fixed token window")

    # --- propagation --------------------------------------------------------------------------
    def run(self, nodes: Iterable[Node], replaced: dict[Node, object]) -> None:
        nodes = [node for node in nodes if node.op == "call_function"]
        self.old.update(replaced)
        for node in nodes:
            if "val" in node.meta:
                self.old[node] = node.meta["val"]
                node.meta.setdefault("tc_original_val", node.meta["val"])
        fake_mode = detect_fake_mode([node.meta.get("val") for node in self.graph.nodes])
        for node in nodes:
            if node not in self.old or node.meta.get("tc_inserted"):  # sizes already right
                pass
            elif node.target in _VIEWS:
                self.rewrite_view(node)
            elif node.target in _SIZED_LIKE_SOURCE:
                self.rewrite_expand(node)
            elif node.target in (aten.select.int, aten.slice.Tensor):
                self.check_index(node)
            elif node.target == aten.arange.default:
                self.rewrite_arange(node)
            try:
                value = fake_value(node, fake_mode)
            except Exception as error:  # shape errors surface here; name the node, not torch internals
                raise UnsupportedModelError(
                    f"cannot re-specialise node {node.name!r} ({node.target}) to the reduced token count: "
                    f"{str(error).splitlines()[0]}",
                    "this op is not supported after a reduction site; reduce in later blocks only") from error
            node.meta["val"] = value
            if isinstance(value, torch.Tensor) and node not in self.factors and node in self.old:
                self.inherit_dims(node, self.old[node], value)


def respecialize_token_shapes(gm: GraphModule, nodes: Iterable[Node], replaced: dict[Node, object],
                              num_prefix: int) -> GraphModule:
    """Recompute shapes and size arguments of ``nodes`` (in graph order) after their inputs changed.

    ``replaced`` maps each new node that now stands where an old tensor was to that tensor's old
    value (fake tensor), so that the change of its token count is known."""
    _Propagation(gm, num_prefix).run(nodes, replaced)
    return gm
