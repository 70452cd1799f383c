"""What a prompt reduction needs from a decoder's exported prefill graph.

The prefill program takes ``input_ids [B, N]`` and returns the last token's logits followed by every
layer's key and value cache (see ``tokencompile.decoder.prefill``). From its graph we find the blocks
(``tokencompile.analysis``), whether each attention is causal (SDPA's ``is_causal``, or a mask whose
value is lower-triangular: SDPA's, or the one eager attention adds to its logits), the rotary position
tables (the cos / sin that multiply q and k), which output is which layer's key or value cache, and the
span of prompt tokens a method may remove.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Interpreter, Node

from ..analysis import ModelAnalysis, analyse, block_stacks
from ..attention import Attention, find_attention
from ..errors import TokenCompileError, UnsupportedModelError
from ..graph_utils import ancestors, aten, in_place_writes, node_arg, shape_of


@dataclass(frozen=True)
class Span:
    """The prompt tokens a reduction may remove: positions ``start .. start+length-1``, or every
    token whose id is ``token_id`` (image tokens of a VLM). The last prompt token is never removed."""

    start: int = 0
    length: int | None = None   # None: up to the end of the prompt
    token_id: int | None = None

    def removable(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: tokens of the example prompt that the reduction may remove."""
        batch, n = input_ids.shape
        positions = torch.arange(n).expand(batch, n)
        if self.token_id is not None:
            inside = input_ids == self.token_id
        else:
            end = n if self.length is None else self.start + self.length
            inside = (positions >= self.start) & (positions < end)
        return inside & (positions < n - 1)

    def check(self, tokens: int) -> None:
        if self.token_id is not None:
            return
        end = tokens if self.length is None else self.start + self.length
        if self.start < 0 or (self.length is not None and self.length < 0) or end > tokens:
            raise TokenCompileError(f"span ({self.start}, {self.length}) does not fit a {tokens}-token prompt",
                                    f"give 0 <= start and start + length <= {tokens}")


@dataclass
class DecoderAnalysis:
    base: ModelAnalysis          # blocks, attention, sites (no protected prefix; padding from a mask input)
    input_ids: Node
    causal: list[bool]           # per block
    rope_tables: list[Node]      # per-token tables ([1 or B, N, D]) the attentions read: cos, sin (, cos, sin ...)
    cache_outputs: dict[int, tuple[int, str]]  # output index -> (layer, "key" | "value" | "mask")
    scales: list[float]          # per block: the attention's softmax scale

    @property
    def tokens(self) -> int:
        return self.base.tokens

    @property
    def layers(self) -> int:
        return len(self.base.blocks)

    def summary(self) -> dict:
        return {"tokens": self.tokens, "layers": self.layers, "attention": self.base.attention_kind,
                "causal": all(self.causal), "rope": bool(self.rope_tables),
                "kv_cache_outputs": sum(role != "mask" for _, role in self.cache_outputs.values()),
                "padding_mask_input": self.base.mask_input is not None}


class _MaskValues(Interpreter):
    """Runs the module once and keeps the values of the wanted nodes."""

    def __init__(self, gm: GraphModule, wanted: set[Node]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, node):
        result = super().run_node(node)
        if node in self.wanted:
            self.values[node] = result
        return result


def _is_causal_mask(mask: torch.Tensor) -> bool:
    """True when a [.., N, N] mask lets query i see exactly keys 0..i."""
    n_q, n_k = mask.shape[-2:]
    visible = mask if mask.dtype == torch.bool else torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min)
    return n_q == n_k and bool((visible == torch.ones(n_q, n_k, dtype=torch.bool).tril()).all())


_MASKING = (aten.where.self, aten.masked_fill.Scalar)


def _causal_flags(gm: GraphModule, attentions: list[Attention], example_inputs: tuple) -> list[bool]:
    masks = {a.mask() for a in attentions if isinstance(a.mask(), Node)}
    values = {}
    if masks:
        runner = _MaskValues(gm, masks)
        with torch.no_grad():
            runner.run(*example_inputs)
        values = runner.values
    flags = []
    for attention in attentions:
        if attention.kind == "sdpa" and node_arg(attention.node, 5, "is_causal", False):
            flags.append(attention.mask() is None)
        else:
            mask = attention.mask()
            flags.append(isinstance(mask, Node) and _is_causal_mask(values[mask]))
    return flags


def _rotate_half_input(node: Node) -> Node | None:
    """x from cat([-x[..., d/2:], x[..., :d/2]], -1)."""
    if node.op != "call_function" or node.target != aten.cat.default or len(node.args[0]) != 2:
        return None
    negated, first_half = node.args[0]
    if negated.target != aten.neg.default or first_half.target != aten.slice.Tensor:
        return None
    return first_half.args[0] if negated.args[0].args[0] is first_half.args[0] else None


def rope_table(node: Node) -> Node:
    """The per-token table behind a broadcast view of it (unsqueeze over heads, dtype casts)."""
    while node.op == "call_function" and node.target in (aten.unsqueeze.default, aten.to.dtype,
                                                          aten._to_copy.default):
        node = node.args[0]
    return node


def _rope_tables(rotated: Node) -> list[Node]:
    """[cos, sin] of q*cos + rotate_half(q)*sin, or [] when ``rotated`` is not that."""
    if rotated.op != "call_function" or rotated.target != aten.add.Tensor:
        return []
    products = [a for a in rotated.args if isinstance(a, Node) and a.target == aten.mul.Tensor]
    if len(products) != 2:
        return []
    tables = {}
    for product in products:
        x, table = product.args
        if isinstance(table, Node) and _rotate_half_input(table) is not None:
            x, table = table, x
        if not isinstance(table, Node):
            return []
        tables["sin" if isinstance(x, Node) and _rotate_half_input(x) is not None else "cos"] = rope_table(table)
    return [tables["cos"], tables["sin"]] if len(tables) == 2 else []


def _before_slices(node):
    """A cache output read back through slices (a sliding-window layer returns its last W - 1 tokens)."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in (
            aten.slice.Tensor, aten.alias.default, aten.detach.default):
        node = node.args[0]
    return node


def _before_casts(node):
    """The tensor an output passes through (torch.export records ``mask.to(mask.dtype)`` as a node)."""
    while isinstance(node, Node) and node.op == "call_function" and node.target in (
            aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.clone.default):
        node = node.args[0]
    return node


def _cache_outputs(gm: GraphModule, attentions: list[Attention],
                   mask: Node | None = None) -> dict[int, tuple[int, str]]:
    """Output index -> (layer, role) of the key and value caches and, with padding, of the layers' key masks
    (the attention mask itself, once per layer in layer order)."""
    output = next(node for node in gm.graph.nodes if node.op == "output")
    writes = in_place_writes(gm.graph)
    # an output feeds its own layer's attention first (and, through the residual stream, every later one)
    reads = [(layer, role, ancestors(source, writes) | {source}) for layer, attention in enumerate(attentions)
             for role, source in (("key", attention.keys), ("value", attention.values)) if source is not None]
    found = {}
    for index, arg in enumerate(output.args[0]):
        if mask is not None and _before_casts(arg) is mask:  # checked first: the mask shapes every key too
            found[index] = (sum(role == "mask" for _, role in found.values()), "mask")
            continue
        arg = _before_slices(arg)
        owner = next(((layer, role) for layer, role, sources in reads if arg in sources), None)
        if owner is not None:
            found[index] = owner
    return found


def analyse_decoder(gm: GraphModule, example_ids: torch.Tensor, extra_inputs: tuple = (),
                    mask: int | None = None) -> DecoderAnalysis:
    """Blocks, causality, RoPE and the key/value cache outputs of a prefill program's module. With more
    than one stack of blocks (a VLM's vision tower and language model) the one that sees the prompt's
    tokens is the decoder. ``extra_inputs``: the program's inputs after input_ids (a VLM's pixel values);
    ``mask``: the index among the program's inputs of a padding mask [B, N] (1: token, 0: padding)."""
    stacks = block_stacks(gm)
    if not stacks and not find_attention(gm):  # attention outside indexed blocks: ``analyse`` says so
        raise UnsupportedModelError("no attention found in the language model's graph: prompt reduction reads SDPA, "
                                    "or eager attention as matmul -> softmax -> matmul with an additive mask",
                                    "load the model with attn_implementation='sdpa' where it has SDPA (eager "
                                    "attention with sink logits, as GPT-OSS, or ALiBi, as Bloom and MPT, is not "
                                    "supported)")
    decoder_stacks = [name for name, tokens in stacks.items() if tokens == example_ids.shape[1]]
    if len(stacks) > 1 and len(decoder_stacks) != 1:
        raise UnsupportedModelError(f"cannot tell the decoder among the block stacks {stacks} for a "
                                    f"{example_ids.shape[1]}-token prompt", "export the language model alone")
    base = analyse(gm, decoder_stacks[0] if len(stacks) > 1 else None)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    mask_node = placeholders[mask] if mask is not None else None
    # A decoder prompt has no [CLS] to protect; padding comes from the mask input only (the causal mask
    # mixes it with the causal structure).
    base = dataclasses.replace(base, num_prefix=0, mask_input=mask_node, protect_last_valid=False)
    attentions = [block.attention for block in base.blocks]
    ids = [node for node in placeholders if node is not mask_node and shape_of(node) is not None
           and len(shape_of(node)) == 2
           and not node.meta["val"].dtype.is_floating_point]
    if len(ids) != 1:
        raise UnsupportedModelError("the prefill program needs exactly one integer [B, N] input (input_ids)",
                                    "export through tokencompile.decoder.CausalLMPrefill")
    masked = [i for i, a in enumerate(attentions) if any(op.target in _MASKING for op in a.logit_ops)]
    if masked:  # only an added mask is checked for causality: a window or a bias hidden in another op would not be
        raise UnsupportedModelError(f"the eager attention of blocks {masked} masks its logits with where / "
                                    "masked_fill (e.g. a local attention window), which prompt reduction cannot "
                                    "check; it reads a mask added to the logits right before the softmax",
                                    "load the model with attn_implementation='sdpa' where it has SDPA")
    causal = _causal_flags(gm, attentions, (example_ids, *extra_inputs))
    if not all(causal):
        raise UnsupportedModelError(f"attention of blocks {[i for i, c in enumerate(causal) if not c]} is not "
                                    "causal", "prompt reduction needs a causal decoder (SDPA, or eager attention that "
                                    "adds a causal mask to its logits)")
    rope = list(dict.fromkeys(table for node in gm.graph.nodes for table in _rope_tables(node)))
    scales = [node_arg(a.node, 6, "scale", None) or shape_of(a.query)[-1] ** -0.5 for a in attentions]
    caches = _cache_outputs(gm, attentions, mask_node)
    outputs = next(node for node in gm.graph.nodes if node.op == "output").args[0]
    unknown = [index for index in range(1, len(outputs)) if index not in caches]
    per_layer = [sum(layer == owner and role != "mask" for owner, role in caches.values())
                 for layer in range(len(attentions))]
    # a reduction would gather such outputs like the last layer's cache: silently wrong for earlier layers
    if unknown or set(per_layer) != {2}:
        raise UnsupportedModelError(f"outputs {unknown} of the prefill program are not a layer's key / value cache "
                                    f"that the graph's attention reads (cache tensors per layer: {per_layer})",
                                    "export through "
                                    "tokencompile.decoder.CausalLMPrefill (logits, then each layer's cache)")
    return DecoderAnalysis(base, ids[0], causal, rope, caches, scales)


__all__ = ["DecoderAnalysis", "Span", "analyse_decoder", "rope_table"]
