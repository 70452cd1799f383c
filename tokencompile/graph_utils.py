"""Small helpers over torch.fx graphs of exported programs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default


def tensor_meta(node) -> torch.Tensor | None:
    """The fake tensor recorded for a node, or None for non-tensor values."""
    if not isinstance(node, Node):
        return None
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def size_expr(size):
    """A size (int or SymInt) as a sympy expression: comparing those adds no guard to the shape env."""
    import sympy

    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def shape_of(node) -> tuple | None:
    value = tensor_meta(node)
    return tuple(value.shape) if value is not None else None


def module_path(node: Node) -> list[str]:
    """Module fqns enclosing a node, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [fqn for fqn, _ in stack.values() if fqn]


def input_nodes(node: Node) -> list[Node]:
    """Nodes a node reads, in argument order, without duplicates."""
    return list(dict.fromkeys(node.all_input_nodes))


def ancestors(node: Node, writes: dict[Node, list[Node]] | None = None) -> set[Node]:
    """Nodes ``node`` depends on; with ``writes`` (see ``in_place_writes``) also the values copied into
    the tensors it reads."""
    writes = writes or {}
    seen: set[Node] = set()
    todo = [*node.all_input_nodes, *writes.get(node, ())]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(current.all_input_nodes)
            todo.extend(writes.get(current, ()))
    return seen


_VIEW_OPS = {aten.slice.Tensor, aten.select.int, aten.view.default, aten.alias.default, aten.as_strided.default}


_ALLOCATIONS = {aten.new_empty.default, aten.new_zeros.default, aten.empty.memory_format, aten.zeros.default,
                aten.empty_like.default, aten.zeros_like.default}


def in_place_writes(graph: Graph) -> dict[Node, list[Node]]:
    """Tensor allocated in the graph -> the values written into it in place (``copy_`` into a slice of
    it), which fx's data flow does not show: e.g. DeepSeek's attention fills its keys with ``new_empty``
    + two ``copy_``. Writes into inputs or buffers (shared by every reader) are left out."""
    writes: dict[Node, list[Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.copy_.default:
            target = node.args[0]
            while target.op == "call_function" and target.target in _VIEW_OPS:
                target = target.args[0]
            if target.op == "call_function" and target.target in _ALLOCATIONS:
                writes.setdefault(target, []).append(node.args[1])
    return writes


def descendants(nodes: Iterable[Node]) -> set[Node]:
    seen: set[Node] = set()
    todo = [user for node in nodes for user in node.users]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(current.users)
    return seen


def user_inputs(graph: Graph) -> list[Node]:
    return [node for node in graph.nodes if node.op == "placeholder"]


def nodes_with_target(graph: Graph, *targets) -> Iterator[Node]:
    return (node for node in graph.nodes if node.op == "call_function" and node.target in targets)


def node_arg(node: Node, index: int, name: str, default=None):
    """An argument given either positionally or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_node_arg(node: Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.update_kwarg(name, value)


def fake_value(node: Node, fake_mode):
    """``node``'s value computed under ``fake_mode`` from the fake values recorded on its inputs."""
    from torch.fx.node import map_arg

    with fake_mode:
        return node.target(*map_arg(node.args, lambda n: n.meta["val"]),
                           **map_arg(node.kwargs, lambda n: n.meta["val"]))


class GraphBuilder:
    """Inserts call_function nodes one after another and records their fake values, so that later
    passes (and the shape propagation) see correct shapes without re-tracing."""

    def __init__(self, gm, after: Node, module_stack: dict | None = None):
        from torch._guards import detect_fake_mode

        self.graph = gm.graph
        self.cursor = after
        self.fake_mode = detect_fake_mode([node.meta.get("val") for node in gm.graph.nodes])
        self.module_stack = module_stack

    def call(self, target, *args, name: str | None = None, **kwargs) -> Node:
        with self.graph.inserting_after(self.cursor):
            node = self.graph.call_function(target, args, kwargs)
        if name:
            node.name = self.graph._graph_namespace.create_name(name, node)
        node.meta["tc_inserted"] = True  # its size arguments are right already (see respecialize_token_shapes)
        # Shapes downstream of an earlier site are stale until the final propagation, so a value may not
        # be computable yet: leave it to the propagation then (methods take token counts from SiteInputs).
        inputs = [n for n in node.all_input_nodes]
        if all("val" in n.meta for n in inputs):
            try:
                node.meta["val"] = fake_value(node, self.fake_mode)
            except RuntimeError:
                pass
        if self.module_stack is not None:
            node.meta["nn_module_stack"] = dict(self.module_stack)
        self.cursor = node
        return node

    def cast(self, value: Node, dtype: torch.dtype, name: str | None = None) -> Node:
        """``value`` in ``dtype``: no node when it already is; else ``_to_copy``, which torch.export
        keeps without the dtype/device assertion it adds for ``.to()`` (a program must still run after
        ``.half()`` or a move to another device)."""
        if tensor_meta(value) is not None and tensor_meta(value).dtype == dtype:
            return value
        return self.call(aten._to_copy.default, value, dtype=dtype, name=name)

    def positions(self, like: Node, name: str | None = None) -> Node:
        """Token positions 0..N-1 as int64 [B, N] on ``like``'s device (``like`` is [B, N, ...]): no
        ``arange``, whose device would be fixed when the graph is built."""
        first = like
        for _ in range(len(tensor_meta(like).shape) - 2):
            first = self.call(aten.select.int, first, -1, 0)
        ones = self.call(aten.ones_like.default, first, dtype=torch.int64)
        return self.call(aten.sub.Tensor, self.call(aten.cumsum.default, ones, 1), 1, name=name)


def _layout(value):
    """Shape, stride and dtype of a fake tensor as sympy expressions (comparing SymInts would add guards)."""
    if isinstance(value, (tuple, list)):
        return tuple(_layout(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return value.node.expr if isinstance(value, torch.SymInt) else value
    exprs = [tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in sizes)
             for sizes in (value.shape, value.stride())]
    return (*exprs, value.dtype)


def refresh_fake_values(gm, changed: Iterable[Node]) -> None:
    """Recompute, in graph order, the fake values of the users of ``changed`` and onwards while they
    change: a node replaced by one of another shape (e.g. a broadcastable [1, N, D] for [B, N, D]) leaves
    its users' values stale, and a program rebuilt from the graph keeps them."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode([node.meta.get("val") for node in gm.graph.nodes])
    stale = {user for node in changed for user in node.users}
    for node in gm.graph.nodes:
        if node not in stale or node.op != "call_function":
            continue
        old = node.meta.get("val")
        node.meta["val"] = fake_value(node, fake_mode)
        if _layout(node.meta["val"]) != _layout(old):
            stale.update(node.users)


def latest(gm, *nodes: Node) -> Node:
    """The node among ``nodes`` that comes last in graph order (where new nodes may read them all)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return max(nodes, key=order.__getitem__)


def pseudo_module_stack(anchor: Node, fqn: str) -> dict:
    """The module stack of ``anchor`` plus a pseudo-module ``fqn``: exported programs keep it, so inserted
    nodes stay attributed to their block (and ONNX node names show where they came from)."""
    parent = fqn.rsplit(".", 1)[0]
    stack = {}
    for key, (name, kind) in (anchor.meta.get("nn_module_stack") or {}).items():
        if name and name != parent and not parent.startswith(name + "."):
            break  # below the parent block: the anchor's own submodule is not where inserted nodes live
        stack[key] = (name, kind)
    stack[f"tokencompile.{fqn}"] = (fqn, "tokencompile.TokenReduction")
    return stack
