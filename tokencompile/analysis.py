"""Find the structure a token reduction needs from the exported graph itself.

Nothing here looks at class names: blocks come from module paths recorded by torch.export
(a ModuleList / Sequential index encloses each attention), attention from SDPA nodes or the eager
matmul-softmax-matmul pattern (``attention.py``), the token
count from the attention's query length, protected tokens from the data flow (learned prefix tokens
concatenated before the first block, tokens read by index after the last one, the [SEP] of a
masked encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from .attention import Attention, find_attention
from .errors import UnsupportedModelError
from .graph_utils import (
    ancestors,
    aten,
    descendants,
    module_path,
    node_arg,
    shape_of,
    tensor_meta,
)

# Ops that pass the token axis of their first argument through unchanged (walked when tracing
# the residual stream back to where its tokens were assembled).
_TOKEN_PRESERVING = {
    aten.add.Tensor, aten.mul.Tensor, aten.dropout.default, aten.layer_norm.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.sub.Tensor, aten.to.dtype,
}


@dataclass
class Block:
    index: int
    name: str
    attention: Attention
    site: Node
    nodes: list[Node] = field(repr=False)

    @property
    def keys(self) -> Node:
        return self.attention.keys


@dataclass
class ModelAnalysis:
    blocks: list[Block]
    tokens: int
    token_axis: int
    hidden: int
    num_prefix: int
    mask_input: Node | None
    protect_last_valid: bool

    @property
    def attention_kind(self) -> str:
        return "+".join(sorted({block.attention.kind for block in self.blocks}))

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            "token_axis": self.token_axis,
            "hidden": self.hidden,
            "blocks": len(self.blocks),
            "attention": self.attention_kind,
            "protected_prefix_tokens": self.num_prefix,
            "attention_mask_input": self.mask_input.name if self.mask_input is not None else None,
            "protect_last_valid_token": self.protect_last_valid,
        }


def _block_name(node: Node) -> str | None:
    """The innermost enclosing module that is an element of a container (fqn ends in an index)."""
    for fqn in reversed(module_path(node)):
        if fqn.rsplit(".", 1)[-1].isdigit():
            return fqn
    return None


def _in_block(node: Node, name: str) -> bool:
    return any(fqn == name for fqn in module_path(node))


def _find_site(attention: Attention, block_nodes: list[Node], tokens: int) -> Node:
    """The residual stream right after the attention: the first [B, N, C] node computed from the attention's
    output that fans out (to the MLP branch and to the skip connection), C the width of the block's output.
    A parallel block (attention and MLP both read the block's input: GPT-NeoX, Falcon, Phi) has none before
    its output, so there it is the block's output: its MLP still sees every token."""
    inside = set(block_nodes)
    outputs = [node for node in block_nodes if _is_tokens(node, tokens) and any(u not in inside for u in node.users)]
    if not outputs:
        raise UnsupportedModelError(
            f"block {_block_name(attention.node)!r}: no residual stream found after its attention",
            "tokencompile expects attention, then a residual add or an MLP, in every block")
    output = max(reversed(outputs), key=lambda node: shape_of(node)[-1])  # the widest: not a side output
    width = shape_of(output)[-1]
    after_attention = descendants([attention.quadratic[-1]])
    start = block_nodes.index(attention.quadratic[-1])
    return next((node for node in block_nodes[start + 1:] if node in after_attention and _is_tokens(node, tokens)
                 and shape_of(node)[-1] == width and len(node.users) >= 2), output)


def _is_tokens(node: Node, tokens: int) -> bool:
    shape = shape_of(node)
    return shape is not None and len(shape) == 3 and shape[1] == tokens


def _prefix_from_concat(first_block: Block, tokens: int, model_inputs: set[Node]) -> int:
    """Tokens concatenated in front of the input-derived ones (CLS, distillation, registers)."""
    entry = [arg for arg in first_block.nodes[0].all_input_nodes
             if _is_tokens(arg, tokens) and not _in_block(arg, first_block.name)]
    node = entry[0] if entry else None
    while node is not None and node.op == "call_function":
        if node.target == aten.cat.default and node_arg(node, 1, "dim", 0) in (1, -2):
            prefix = 0
            for part in node.args[0]:
                if (ancestors(part) | {part}) & model_inputs:
                    break
                prefix += shape_of(part)[1]
            return prefix
        if node.target not in _TOKEN_PRESERVING:
            return 0
        node = node.args[0]
    return 0


def _prefix_read_by_index(last_block: Block, tokens: int) -> int:
    """Tokens read by a constant index after the last block (CLS pooling) must survive."""
    prefix = 0
    for node in descendants([last_block.nodes[-1]]):
        if node.op != "call_function":
            continue
        source = shape_of(node.args[0]) if node.args else None
        if source is None or len(source) < 2 or source[1] != tokens:
            continue
        if node.target == aten.select.int and node.args[1] == 1 and node.args[2] >= 0:
            prefix = max(prefix, node.args[2] + 1)
        elif node.target == aten.slice.Tensor and node_arg(node, 1, "dim", 0) == 1:
            start = node_arg(node, 2, "start", 0) or 0
            end = node_arg(node, 3, "end", None)
            if start == 0 and end is not None and end < tokens:
                prefix = max(prefix, end)
    return prefix


def _mask_input(attentions: list[Attention], model_inputs: list[Node]) -> Node | None:
    """A [B, N] integer or boolean model input that feeds the attention mask (or, eager, the logits)."""
    for attention in attentions:
        mask = attention.mask() if attention.kind == "sdpa" else attention.logits
        if not isinstance(mask, Node):
            continue
        for candidate in model_inputs:
            value = tensor_meta(candidate)
            if candidate in ancestors(mask) | {mask} and value is not None and value.dim() == 2 \
                    and (not value.dtype.is_floating_point):
                return candidate
    return None


def _stack_of(node: Node) -> str | None:
    """The container of the block that holds ``node`` (its module path minus the index)."""
    name = _block_name(node)
    return None if name is None else name.rsplit(".", 1)[0]


def block_stacks(gm: GraphModule) -> dict[str, int]:
    """Containers of attention blocks (module path of the ModuleList, e.g. ``model.language_model.layers``)
    and the token count their first block sees, in graph order."""
    stacks: dict[str, int] = {}
    for attention in find_attention(gm):
        stack = _stack_of(attention.node)
        if stack is not None:
            stacks.setdefault(stack, attention.tokens)
    return stacks


def analyse(gm: GraphModule, stack: str | None = None) -> ModelAnalysis:
    """Find blocks, attention, reduction sites and protected tokens in an exported program's module.
    ``stack``: consider only the blocks of this container (see ``block_stacks``), e.g. the language
    model of a VLM whose vision tower has blocks too."""
    graph = gm.graph
    nodes = list(graph.nodes)
    attentions = find_attention(gm)
    if stack is not None:
        attentions = [a for a in attentions if _stack_of(a.node) == stack]
    if not attentions:
        raise UnsupportedModelError("no transformer blocks found: the graph has no attention",
                                    "tokencompile optimizes transformers (ViT, BERT, ...), not CNNs or MLPs")

    blocks: list[Block] = []
    for attention in attentions:
        name = _block_name(attention.node)
        if name is None:
            raise UnsupportedModelError(
                f"attention node {attention.node.name!r} is not inside an indexed block",
                "export the nn.Module itself (blocks in a ModuleList / Sequential) so that module paths are kept")
        if blocks and blocks[-1].name == name:
            raise UnsupportedModelError(f"block {name!r} has more than one attention",
                                        "cross-attention blocks are not supported yet")
        if attention.tokens != attention.key_tokens:
            raise UnsupportedModelError(f"attention in {name!r} is not self-attention",
                                        "only self-attention blocks can be reduced")
        block_nodes = [node for node in nodes if _in_block(node, name)]
        blocks.append(Block(len(blocks), name, attention, None, block_nodes))

    tokens = attentions[0].tokens
    for block in blocks:
        if block.attention.tokens != tokens:
            raise UnsupportedModelError(f"block {block.name!r} sees {block.attention.tokens} tokens, "
                                        f"the first block {tokens}", "the model already changes its token count")
        block.site = _find_site(block.attention, block.nodes, tokens)
    hidden = shape_of(blocks[0].site)[-1]

    model_inputs = [node for node in nodes if node.op == "placeholder"]
    mask_input = _mask_input(attentions, model_inputs)
    num_prefix = max(_prefix_from_concat(blocks[0], tokens, set(model_inputs)),
                     _prefix_read_by_index(blocks[-1], tokens))
    if mask_input is not None:
        num_prefix = max(num_prefix, 1)  # [CLS] of a masked encoder
    return ModelAnalysis(blocks=blocks, tokens=tokens, token_axis=1, hidden=hidden, num_prefix=num_prefix,
                         mask_input=mask_input, protect_last_valid=mask_input is not None)
