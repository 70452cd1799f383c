"""Attention as the compiler sees it: a fused SDPA node, or the eager matmul -> softmax -> matmul pattern.

Both give the query and key tensors ([B, H, N, D]) and a way to add a bias over keys to the logits
(proportional attention), so passes never care which form a model was exported with.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node

from .graph_utils import (
    SDPA,
    GraphBuilder,
    aten,
    descendants,
    latest,
    node_arg,
    set_node_arg,
    shape_of,
    tensor_meta,
)

_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_MATMUL = (aten.matmul.default, aten.bmm.default)
_LOGIT_OPS = (aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar,
              aten.where.self, aten.tanh.default)  # tanh: logit soft-capping (Gemma 2)


@dataclass
class Attention:
    kind: str                  # "sdpa" or "eager"
    node: Node                 # the SDPA node, or the softmax
    query: Node                # [B, H, N, D]
    keys: Node                 # [B, H, N, D]
    quadratic: tuple[Node, ...]  # nodes whose cost grows with tokens squared
    logits: Node | None = None   # eager: the softmax input
    added_mask: Node | None = None  # eager: the mask over keys added to the logits right before the softmax
    logit_ops: tuple[Node, ...] = ()  # eager: the ops between the q.k matmul and the softmax, softmax first

    @property
    def tokens(self) -> int:
        return shape_of(self.query)[-2]

    @property
    def key_tokens(self) -> int:
        return shape_of(self.keys)[-2]

    @property
    def values(self) -> Node | None:
        """[B, H, N, D]: SDPA's value input, or the right side of the eager probabilities' matmul."""
        if self.kind == "sdpa":
            return self.node.args[2]
        return self.quadratic[1].args[1] if len(self.quadratic) == 2 else None

    def mask(self) -> Node | None:
        """The additive / boolean mask over keys the model already applies (eager: an additive one)."""
        return node_arg(self.node, 3, "attn_mask") if self.kind == "sdpa" else self.added_mask

    def add_key_bias(self, gm: GraphModule, bias: Node, module_stack: dict | None = None) -> None:
        """Add ``bias`` ([B, 1, 1, N_keys]) to the attention logits, keeping SDPA fused."""
        if self.kind == "eager":
            builder = GraphBuilder(gm, latest(gm, bias, self.logits), module_stack)
            biased = builder.call(aten.add.Tensor, self.logits, builder.cast(bias,
                                                                              tensor_meta(self.logits).dtype))
            self.node.replace_input_with(self.logits, biased)
            return
        mask = self.mask()
        if mask is not None:
            builder = GraphBuilder(gm, latest(gm, bias, mask), module_stack)
            if tensor_meta(mask).dtype.is_floating_point:
                bias = builder.call(aten.add.Tensor, mask, bias)
            else:
                bias = builder.call(aten.where.ScalarOther, mask, bias, float("-inf"))
        set_node_arg(self.node, 3, "attn_mask", bias)


def _strip_transpose(node: Node) -> Node | None:
    """k from k.transpose(-2, -1) (as exported: transpose with the last two dims)."""
    if node.op == "call_function" and node.target == aten.transpose.int:
        rank = len(shape_of(node))
        if {d % rank for d in node.args[1:3]} == {rank - 2, rank - 1}:
            return node.args[0]
    return None


def _eager(softmax: Node) -> Attention | None:
    if len(shape_of(softmax) or ()) != 4 or softmax.args[1] not in (-1, 3):
        return None
    logits = softmax.args[0]
    node, ops = logits, []
    while node.op == "call_function" and node.target in _LOGIT_OPS:
        ops.append(node)
        node = next((a for a in node.args if isinstance(a, Node) and shape_of(a) == shape_of(softmax)), None)
        if node is None:
            return None
    if node.op != "call_function" or node.target not in _MATMUL:
        return None
    query, keys = node.args[0], _strip_transpose(node.args[1])
    if keys is None:
        return None
    weighted = next((n for n in sorted(descendants([softmax]), key=lambda n: list(softmax.graph.nodes).index(n))
                     if n.op == "call_function" and n.target in _MATMUL), None)
    quadratic = (node, weighted) if weighted is not None else (node,)
    mask = _added_mask(ops[0], ops[1] if len(ops) > 1 else node, shape_of(softmax)) if ops else None
    return Attention("eager", softmax, query, keys, quadratic, logits, mask, tuple(ops))


def _added_mask(last: Node, scores: Node, target) -> Node | None:
    """The [B or 1, 1, N, N_keys] mask that ``last``, the op right before the softmax, adds to the ``scores``
    (as Hugging Face's eager attention adds it, after any scaling or soft-capping), else None."""
    if last.target != aten.add.Tensor:
        return None
    for arg in last.args:
        shape = shape_of(arg) if isinstance(arg, Node) and arg is not scores else None
        if shape is not None and len(shape) == 4 and shape[0] in (1, target[0]) and shape[1] == 1 \
                and tuple(shape[2:]) == tuple(target[2:]):
            return arg
    return None


def find_attention(gm: GraphModule) -> list[Attention]:
    """Every attention of the graph, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == SDPA:
            found.append(Attention("sdpa", node, node.args[0], node.args[1], (node,)))
        elif node.target in _SOFTMAX:
            attention = _eager(node)
            # eager self-attention only: a probe row (queries << keys) scores tokens, it is not a block's attention
            if attention is not None and attention.tokens == attention.key_tokens:
                found.append(attention)
    return found
