"""Prefill programs of causal LMs, and their rewrite with a reduced prompt.

``CausalLMPrefill`` wraps a Hugging Face causal LM so that its export returns plain tensors: the last
token's logits, then key and value of every layer. ``compile_decoder`` exports it, picks the stages
(layer K and the span tokens kept from it on; one stage for FastV, several for PyramidDrop) from a
prefill-FLOPs budget, and inserts each stage's plan after the attention of layer K-1 with the
project's rewrite passes. Every layer's cache holds exactly the tokens that layer saw: layers before
the first stage every token, layers between stages the survivors of the earlier stages.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule, Node

from ..errors import TokenCompileError, UnsupportedModelError
from ..flops import CostModel, build_cost_model, count_flops
from ..graph_utils import SDPA, GraphBuilder, aten, latest, refresh_fake_values, shape_of
from ..passes import REDUCTION_PASSES, RewriteContext, eliminate_dead_positions, run_passes
from ..rebuild import rebuild_program
from .analysis import DecoderAnalysis, Span, analyse_decoder, rope_table
from .fastv import AHEAD, POSITION_POLICIES, FastV, PyramidDrop, pyramid_layers
from .span_scored import SPAN_SCORES, span_scored

tc = torch.ops.tokencompile


MASK = "attention_mask"


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions of a left-padded batch, as Hugging Face's generate numbers them: each prompt's
    tokens from 0, padding at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


class CausalLMPrefill(torch.nn.Module):
    """(input_ids [B, N], *extra) -> (logits of the last token [B, V], key_0, value_0, key_1, value_1, ...),
    each cache [B, H_kv, N, D] with RoPE applied (as the model caches them). ``extra_inputs``: the
    keywords of further inputs, e.g. ("pixel_values",) for a VLM, or ("inputs_embeds",): a VLM's embeddings
    with its image features merged in (``tokencompile.decoder.vlm.language_model_inputs``), which the model
    reads instead of input_ids (they still place a span of token ids), with ("position_ids",) [B, axes, N]
    for multimodal RoPE. With an ``attention_mask`` input
    [B, N] (1: token, 0: padding on the left) positions follow it, and every layer's key mask follows
    the caches: (..., mask_0, mask_1, ...). A model whose own forward does not export (e.g. it fixes
    the batch) gets a subclass that overrides ``model_inputs`` and takes ``(model, extra_inputs)``, as
    ``tokencompile.decoder.vlm.LlavaPrefill`` does."""

    def __init__(self, model: torch.nn.Module, extra_inputs: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.extra_inputs = tuple(extra_inputs)

    def model_inputs(self, named: dict) -> dict:
        """The model's keyword inputs from the prefill's named extra inputs (a subclass may compute some of
        them itself, e.g. a VLM's image features)."""
        return named

    def forward(self, input_ids, *extra):
        named = dict(zip(self.extra_inputs, extra))
        mask = named.get(MASK)
        positions = multimodal_positions(named)
        if positions is not None:  # [B, axes, N] (batch first, so that its export axis 0 is the batch)
            named["position_ids"] = positions.transpose(0, 1)
        elif mask is not None:
            named["position_ids"] = padded_positions(mask)
        inputs = {"input_ids": input_ids, **self.model_inputs(named)}
        if "inputs_embeds" in inputs:  # a VLM's merged embeddings: input_ids only place the span
            del inputs["input_ids"]
        out = self.model(use_cache=True, logits_to_keep=1, **inputs)
        caches = cache_tensors(returned_cache(out))
        masks = [mask] * (len(caches) // 2) if mask is not None else []
        return (out.logits[:, -1], *caches, *masks)


def multimodal_positions(extra: dict | None) -> torch.Tensor | None:
    """The extra input ``position_ids`` [B, axes, N] of multimodal RoPE (Qwen2-VL), if given."""
    positions = (extra or {}).get("position_ids")
    return positions if positions is not None and positions.dim() == 3 else None


def cache_tensors(cache) -> list[torch.Tensor]:
    """key_0, value_0, key_1, value_1, ... of a Hugging Face cache."""
    other = next((type(layer).__name__ for layer in cache.layers
                  if not hasattr(layer, "keys") or hasattr(layer, "conv_states") or hasattr(layer, "recurrent_states")),
                 None)
    if other is not None:
        raise UnsupportedModelError(f"the model's cache holds {other} layers besides key / value attention (a "
                                    "hybrid of attention and convolution or state-space layers)", "use a decoder "
                                    "whose every layer is attention with a key / value cache")
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def prefill_module(model: torch.nn.Module, extra_inputs: tuple[str, ...] = ()) -> CausalLMPrefill:
    """``model`` as a prefill module: a recipe's own CausalLMPrefill as is, a LLaVA model given pixel values
    as a ``LlavaPrefill`` (``tokencompile.decoder.vlm``), else a causal LM wrapped."""
    from .vlm import PIXELS, LlavaPrefill, is_llava

    if isinstance(model, CausalLMPrefill) and MASK not in model.extra_inputs and set(extra_inputs) == {
            MASK, *model.extra_inputs}:  # padded prompts add the mask to a recipe's wrapper
        try:
            wrapper = type(model)(model.model, tuple(extra_inputs))
        except TypeError:
            raise TokenCompileError(f"padded prompts need {type(model).__name__} to take an attention_mask: its "
                                    "__init__ does not take extra_inputs", "give its __init__ an extra_inputs "
                                    "argument (inputs reach model_inputs by name)") from None
    elif isinstance(model, CausalLMPrefill):
        wrapper = model
    elif PIXELS in extra_inputs and is_llava(model):
        wrapper = LlavaPrefill(model, extra_inputs)
    else:
        wrapper = CausalLMPrefill(model, extra_inputs)
    if wrapper.extra_inputs != tuple(extra_inputs):
        raise TokenCompileError(f"the prefill takes input_ids, {', '.join(wrapper.extra_inputs) or 'nothing else'}; "
                                f"got input_ids, {', '.join(extra_inputs) or 'nothing else'}",
                                "pass extra_inputs={name: tensor} for each of its inputs")
    return wrapper.eval()


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a Hugging Face causal LM takes its KV cache by (``cache`` from transformers 5.2x on)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@dataclass
class DecoderProgram:
    """A reduced prefill program and the causal LM whose weights decode on its caches."""

    prefill: ExportedProgram
    model: torch.nn.Module
    prompt_tokens: int
    first_reduced_layer: int | None   # K: layers >= K cache only the kept tokens (None: no reduction)
    positions: str = "keep"
    report: dict = field(default_factory=dict)
    tokens_per_layer: list[int] = field(default_factory=list)        # prompt tokens each layer sees and caches
    stages: list[tuple[int, int]] = field(default_factory=list)      # (layer, span tokens kept from it on)
    extra_inputs: tuple[str, ...] = ()  # the prefill's inputs after input_ids (a VLM's pixel_values)
    example_inputs: tuple = ()          # (input_ids, *extra) it was compiled with, batch >= 2 (for exports)


def decode_position(program: DecoderProgram) -> int:
    """The rotary position of the first generated token: the prompt length when kept tokens keep their
    positions or their cached keys were rotated to continue from it (``report["decode_position"]``);
    otherwise, with positions=renumber, the token count every layer saw (all layers must agree)."""
    if program.positions == "keep" or program.first_reduced_layer is None:
        return program.prompt_tokens
    if "decode_position" in program.report:
        return program.report["decode_position"]
    counts = set(program.tokens_per_layer)
    if len(counts) != 1:
        raise TokenCompileError("decoding after positions=renumber needs rotary positions (one cos / sin pair) or "
                                "every layer to see the same tokens: layers before and after the reduction would "
                                "need different positions", "compile with positions=keep")
    return counts.pop()


def as_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.model if isinstance(model, CausalLMPrefill) else model


def span_token_count(span: Span, input_ids: torch.Tensor) -> dict:
    """For a span of token ids (a VLM's image tokens): the id and how many each prompt holds, which every
    prompt given to the program must hold too (the program removes a fixed number of them)."""
    if span.token_id is None:
        return {}
    return {"span_token_id": span.token_id, "span_token_count": int((input_ids[0] == span.token_id).sum())}


def batched_example(inputs: tuple) -> tuple:
    """The inputs with a batch of two when they hold one sample (so that the batch axis stays symbolic)."""
    return inputs if inputs[0].shape[0] > 1 else tuple(torch.cat([x, x]) for x in inputs)


def export_with_batch_axis(module: torch.nn.Module, inputs: tuple, varargs: bool = False) -> ExportedProgram:
    """torch.export with axis 0 of every input symbolic; ``varargs``: forward(first, *rest)."""
    axis = Dim("batch", min=1, max=4096) if len(inputs) > 1 else Dim.AUTO  # one batch shared by every input
    batch = [{0: axis} for _ in inputs]
    dynamic = (batch[0], tuple(batch[1:])) if varargs and len(inputs) > 1 else tuple(batch)
    with torch.no_grad():
        return torch.export.export(module, batched_example(inputs), dynamic_shapes=dynamic)


def export_prefill(model: torch.nn.Module, input_ids: torch.Tensor, extra: dict | None = None) -> ExportedProgram:
    """The prefill program of a causal LM with a symbolic batch axis (token count static). ``extra``:
    further keyword inputs of the model (a VLM's pixel_values), in program input order after input_ids."""
    extra = extra or {}
    wrapper = prefill_module(model, tuple(extra))
    varargs = any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(wrapper.forward).parameters.values())
    try:
        return export_with_batch_axis(wrapper, (input_ids, *extra.values()), varargs=varargs)
    except TokenCompileError:
        raise
    except Exception as error:  # noqa: BLE001 - torch.export fails in many ways; the user needs which model and why
        lines = [line.strip(" -") for line in str(error).splitlines() if line.strip(" -")]
        reason = next((line for line in lines if "specialized it to be a constant" in line), lines[0] if lines else
                      type(error).__name__)
        fix = ("wrap the model in a CausalLMPrefill subclass whose model_inputs computes what does not export (see "
               "tokencompile.decoder.vlm.LlavaPrefill)")
        if set(extra) - {MASK, "inputs_embeds", "position_ids"}:
            fix += ("; a vision-language model: give extra_inputs=tokencompile.decoder.vlm.language_model_inputs("
                    "model, input_ids, **processor_outputs)")
        raise UnsupportedModelError(f"torch.export cannot trace the prefill of {type(as_causal_lm(model)).__name__} "
                                    f"with inputs input_ids{''.join(', ' + name for name in extra)} and a symbolic "
                                    f"batch ({first_sentence(reason)})", fix) from error


def first_sentence(text: str, limit: int = 160) -> str:
    """The text up to its first full stop, cut at a word (with "...") past ``limit`` characters."""
    sentence = re.split(r"\.\s+(?=[A-Z])", text)[0].rstrip(".")  # not at "e.g. the", "vs. (3, 2)"
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + "..."


@dataclass
class TracedPrefill:
    """What both compile paths start from: the causal LM, its exported prefill and the analysis."""

    lm: torch.nn.Module
    program: ExportedProgram
    extra_inputs: dict
    inputs: tuple       # (input_ids, *extra)
    module: GraphModule
    analysis: DecoderAnalysis

    @property
    def extra(self) -> tuple:
        return self.inputs[1:]

    @cached_property
    def flops(self) -> int:
        """FLOPs of the unreduced prefill on the example inputs (one forward)."""
        return count_flops(self.module, self.inputs)

    @cached_property
    def cost(self) -> CostModel:
        """Per-layer costs of the prefill as every compiled program runs it (the last layer computes the
        last token alone, but the keys and values of all), against the original FLOPs per sample."""
        live = eliminate_dead_positions(self.program.module())
        batch = self.inputs[0].shape[0]
        return replace(build_cost_model(live, self.analysis.base, self.inputs), reference=self.flops / batch)


def text_config(lm: torch.nn.Module):
    """The language model's config (a VLM's ``text_config``); None for a module without one."""
    config = getattr(lm, "config", None)
    return getattr(config, "text_config", None) or config


def eos_token_id(model: torch.nn.Module):
    """The end-of-sequence id(s) generation stops at: the generation config's, else the language model's
    config's (a VLM's top-level config has none)."""
    lm = as_causal_lm(model)
    for config in (getattr(lm, "generation_config", None), text_config(lm)):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return eos
    return None


def sliding_window(lm: torch.nn.Module) -> int | None:
    """The attention window of the model's sliding-window layers (None: every layer sees the whole
    sequence)."""
    config = text_config(lm)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def check_model_attention(lm: torch.nn.Module, prompt_tokens: int) -> None:
    """Prompt reduction reads causal attention (SDPA or eager) from the graph, over the whole prompt."""
    config = text_config(lm)
    used = getattr(config, "_attn_implementation", None)
    if used not in (None, "sdpa", "eager"):
        raise UnsupportedModelError(f"the language model computes attention with {used!r}; prompt reduction reads "
                                    "causal attention from the graph", "load it with attn_implementation='sdpa' "
                                    "(or 'eager' where the model has no SDPA)")
    if True in (getattr(config, "alibi", None), getattr(getattr(config, "attn_config", None), "alibi", None)):
        raise UnsupportedModelError(f"{type(lm).__name__} adds ALiBi position biases to its attention (alibi in its "
                                    "config), which prompt reduction does not support (kept keys need the biases of "
                                    "their original distances, over per-layer caches)",
                                    "use a model with rotary or learned positions")
    if getattr(config, "index_topk", None) is not None:
        raise UnsupportedModelError(f"{type(lm).__name__} uses sparse attention: an indexer picks the keys each "
                                    "query attends to (config.index_topk) and keeps a cache of its own; prompt "
                                    "reduction needs dense causal attention over a key / value cache",
                                    "use a model with dense attention")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{type(lm).__name__}'s language model lets the prompt's tokens attend both ways "
                                    "(use_bidirectional_attention, e.g. PaliGemma's prefix over the image and the "
                                    "prompt); prompt reduction and decoding on the reduced cache need causal attention",
                                    "use a causal decoder")
    window = sliding_window(lm)
    if window is not None and prompt_tokens >= window:  # its layers cache the last window - 1 tokens
        raise UnsupportedModelError(f"the prompt ({prompt_tokens} tokens) does not fit in the model's sliding "
                                    f"attention window ({window} tokens)", f"give prompts of at most {window - 1} "
                                    "tokens (reducing a prompt across a sliding window is not supported)")


_REUSED_TRACES: ContextVar[list | None] = ContextVar("tokencompile_reused_traces", default=None)


@contextlib.contextmanager
def reuse_traces():
    """Within the block, compiling the same model object on equal inputs again reuses its first trace
    (export, analysis, cost model; a third of a compile on SmolLM2): for sweeps over budgets and methods.
    Inputs are compared by value; the model must not change inside the block (its weights, its config).
    The traces are dropped when the block ends."""
    token = _REUSED_TRACES.set([])
    try:
        yield
    finally:
        _REUSED_TRACES.reset(token)


def _same_trace(entry: tuple, model, input_ids: torch.Tensor, extra_inputs: dict) -> bool:
    source, names, inputs, _ = entry
    given = (input_ids, *extra_inputs.values())
    return source is model and names == list(extra_inputs) and all(  # equal names: as many tensors
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(inputs, given))


def trace_prefill(model: torch.nn.Module, input_ids: torch.Tensor, extra_inputs: dict | None) -> TracedPrefill:
    """Export the prefill (keeping a recipe's own CausalLMPrefill wrapper) and analyse it; inside
    ``reuse_traces()`` an earlier trace of the same model and equal inputs is returned."""
    lm = as_causal_lm(model).eval()
    check_model_attention(lm, input_ids.shape[-1])
    extra_inputs = dict(extra_inputs or {})
    reused = _REUSED_TRACES.get()
    for entry in reused or ():
        if _same_trace(entry, model, input_ids, extra_inputs):
            return entry[-1]
    program = export_prefill(model, input_ids, extra_inputs)
    inputs = (input_ids, *extra_inputs.values())
    module = program.module()
    traced = TracedPrefill(lm, program, extra_inputs, inputs, module,
                           analyse_decoder(module, input_ids, inputs[1:], mask_index(extra_inputs)))
    if reused is not None:  # copies: the caller may change its tensors in place afterwards
        reused.append((model, list(extra_inputs), tuple(x.clone() for x in inputs), traced))
    return traced


def check_token_count(analysis: DecoderAnalysis) -> None:
    """Tensors read past a reduction are gathered along their axes of the prompt's length: a prompt as long
    as an attention head (or its rotary part) would make the head axis of the rotary tables look like tokens."""
    heads = {shape_of(block.attention.query)[-1] for block in analysis.base.blocks}
    heads |= {shape_of(table)[-1] for table in analysis.rope_tables}
    if analysis.tokens in heads:
        raise UnsupportedModelError(f"a {analysis.tokens}-token prompt is as long as an attention head "
                                    f"({analysis.tokens} channels): the rewrite cannot tell the two axes apart",
                                    "compile for another prompt length (padding=True pads prompts to it)")


def mask_index(extra_inputs) -> int | None:
    """The program input index of the padding mask among (input_ids, *extra_inputs), if any."""
    names = list(extra_inputs)
    return 1 + names.index(MASK) if MASK in names else None


@dataclass(frozen=True)
class Stage:
    """From ``layer`` on, ``kept`` of the span's tokens remain (scored at layer - 1)."""

    layer: int
    kept: int


def stage_schedule(layers: int, removable: int, stages: list[Stage]) -> list[int]:
    """Tokens removed after the attention of each block (the rewrite's schedule)."""
    schedule, kept = [0] * layers, removable
    for stage in stages:
        schedule[stage.layer - 1] += kept - stage.kept
        kept = stage.kept
    return schedule


def stages_from_ratios(layers: tuple[int, ...], ratios: tuple[float, ...], removable: int) -> list[Stage]:
    """Stages keeping round(ratio * span) tokens (ratios of the whole span, non-increasing)."""
    stages, kept = [], removable
    for layer, ratio in zip(layers, ratios):
        kept = min(kept, round(ratio * removable))
        stages.append(Stage(layer, kept))
    return stages


def _schedule(layers: int, layer: int, removed: int) -> list[int]:
    return stage_schedule(layers, removed, [Stage(layer, 0)])


def _removed_for_budget(cost: CostModel, budget: float, layer: int, removable: int) -> int | None:
    """The fewest span tokens removed at layer K whose modelled prefill FLOPs meet the budget."""
    target = budget * cost.original
    layers = len(cost.blocks)
    if cost.flops(_schedule(layers, layer, removable)) > target:
        return None
    lo, hi = -1, removable
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost.flops(_schedule(layers, layer, mid)) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _unreachable(budget: float, best: float, how: str) -> TokenCompileError:
    return TokenCompileError(f"prefill budget {budget:g} cannot be met by removing the span: the best reachable "
                             f"FLOPs ratio is {best:.3f} ({how})",
                             f"use a budget of {best + 0.005:.2f} or more, or a longer span")


def choose_schedule(cost: CostModel, budget: float, layer: int, removable: int) -> tuple[int, int]:
    """(K, removed): K = ``layer`` if the budget can be met there, else the deepest earlier layer that
    meets it; removed = the fewest span tokens that meet the budget at K."""
    for k in range(layer, 0, -1):
        removed = _removed_for_budget(cost, budget, k, removable)
        if removed is not None:
            return k, removed
    best = cost.flops(_schedule(len(cost.blocks), 1, removable)) / cost.original
    raise _unreachable(budget, best, "every span token removed after layer 1")


AUTO_PREFIX_SHARE = 0.25


def auto_layer(cost: CostModel, budget: float, share: float = AUTO_PREFIX_SHARE) -> int:
    """``layer="auto"``: the deepest K whose layers before it (which see every token) cost at most
    ``share`` of the budget, so that most of the budget goes to the deeper layers' kept tokens (looser
    budgets reduce later). A rule, not a search over data: share = 1/4 was set on calibration texts
    apart from any evaluated ones (see benchmarks/decoder_fidelity.py); for SmolLM2 (30 layers) it
    gives K=4 at budget 0.6 and K=3 at 0.4."""
    full = [b.before_linear + b.before_quadratic + b.after_linear + b.after_quadratic for b in cost.blocks]
    layer = 1
    for k in range(2, len(full)):
        if sum(full[:k]) <= share * budget * cost.original:
            layer = k
    return layer


def choose_pyramid(cost: CostModel, budget: float, layers: tuple[int, ...], removable: int) -> list[Stage]:
    """Stages at ``layers`` keeping ratio**i of the span at stage i (PyramidDrop's geometric pyramid),
    with the largest ratio whose modelled prefill FLOPs meet the budget (bisection on the ratio)."""
    depth = len(cost.blocks)

    def flops(ratio: float) -> float:
        ratios = tuple(ratio ** (i + 1) for i in range(len(layers)))
        return cost.flops(stage_schedule(depth, removable, stages_from_ratios(layers, ratios, removable)))

    target = budget * cost.original
    if flops(0.0) > target:
        raise _unreachable(budget, flops(0.0) / cost.original, f"every span token removed after layer {layers[0]}")
    lo, hi = 0.0, 1.0
    if flops(hi) <= target:
        lo = hi
    for _ in range(40):
        if hi - lo < 1e-6:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops(mid) <= target else (lo, mid)
    ratios = tuple(lo ** (i + 1) for i in range(len(layers)))
    return stages_from_ratios(layers, ratios, removable)


def _cache_gathers_of_earlier_sites(gm: GraphModule, analysis: DecoderAnalysis, sites: list) -> None:
    """Each layer's cache holds exactly the tokens that layer saw. A site gathers every per-token tensor
    read after it, the program's outputs included, so the cache of layer L comes out of the rewrite as
    a chain of gathers, one per site (earliest innermost). A site after the attention of block s reduces
    the layers > s only: peel from each cache the gathers of the sites at blocks >= L."""
    reduces_from = {site.rep: site.block + 1 for site in sites}
    output = next(node for node in gm.graph.nodes if node.op == "output")
    values = list(output.args[0])
    for index, (layer, _) in analysis.cache_outputs.items():
        value = values[index]
        while (value.op == "call_function" and value.target == tc.gather_tokens.default
               and reduces_from.get(value.args[1], 0) > layer):
            value = value.args[0]
        values[index] = value
    output.args = (tuple(values),)


def _renumber_positions(gm: GraphModule, analysis: DecoderAnalysis, sites: list) -> None:
    """positions=renumber: after each site the kept tokens take the first n_out rotary positions
    instead of their own: a gather of a rotary table becomes a slice of the table, or with padding a
    gather of each prompt's own first positions, which its row of the table holds after its padding."""
    tables = set(analysis.rope_tables)
    n_out = {site.rep: site.n_out for site in sites}
    mask = analysis.base.mask_input
    if mask is not None and any(type(shape_of(table)[0]) is int and shape_of(table)[0] == 1 for table in tables):
        raise TokenCompileError("padded prompts renumber their positions in each prompt's row of the rotary "
                                "tables, but the tables are shared by the batch (the prefill passes no "
                                "position_ids)", "give the model position_ids from the attention mask (as "
                                "CausalLMPrefill does), or use positions='keep'")
    renumbered, columns = [], {}
    for node in gm.graph.nodes:
        if node.target == tc.gather_tokens.default and node.args[1] in n_out:
            root, reps = node.args[0], [node.args[1]]
            while root.target == tc.gather_tokens.default:
                reps.append(root.args[1])
                root = root.args[0]
            if rope_table(root) in tables:
                renumbered.append((node, root, reps[::-1]))
    firsts = []
    for node, root, reps in renumbered:
        if mask is None:
            first = GraphBuilder(gm, node).call(aten.slice.Tensor, root, node.args[2], 0, n_out[node.args[1]])
        else:  # one column computation per chain of sites (cos and sin share it)
            if tuple(reps) not in columns:
                columns[tuple(reps)] = _renumbered_columns(GraphBuilder(gm, latest(gm, mask, *reps)), mask, reps,
                                                           analysis.tokens)
            builder = GraphBuilder(gm, latest(gm, node, columns[tuple(reps)]))
            first = builder.call(tc.gather_tokens.default, root, columns[tuple(reps)], node.args[2])
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        firsts.append(first)
    refresh_fake_values(gm, firsts)  # a table shared by the batch is sliced to [1, n, D], not gathered to [B, ...]


def _renumbered_columns(builder: GraphBuilder, mask: Node, reps: list[Node], tokens: int) -> Node:
    """[B, n]: the table column of each kept token's renumbered position. A prompt padded by P holds
    position p in column P + p; its kept tokens take positions 0, 1, ... in order (kept padding stays
    in padding columns: it is masked anyway)."""
    mask = builder.cast(mask, torch.int64)
    kept = mask
    for rep in reps:  # the sites up to this one, earliest first
        kept = builder.call(tc.gather_tokens.default, kept, rep, 1)
    rank = builder.call(aten.sub.Tensor, builder.call(aten.cumsum.default, kept, 1), 1)
    padding = _column_after(builder, mask, tokens)
    return builder.call(aten.clamp_min.default, builder.call(aten.add.Tensor, rank, padding), 0)


def _column_after(builder: GraphBuilder, flags: Node, tokens: int) -> Node:
    """[B, 1]: N - (ones per row of ``flags`` [B, n]); for a padding mask, each prompt's padding, i.e. the
    table column of its position 0; for a layer's key mask, the column of position (length - count)."""
    count = builder.call(aten.sum.dim_IntList, builder.cast(flags, torch.int64), [1], True)
    return builder.call(aten.rsub.Scalar, count, tokens)


def _rotated_by(gm: GraphModule, tables: set[Node]) -> set[Node]:
    """Nodes computed from the rotary tables within a layer (no attention in between): a layer's cached keys
    are among them when it applies RoPE, and not for a layer without positions (NoPE: SmolLM3, EXAONE 4)."""
    rotated = set(tables)
    for node in gm.graph.nodes:
        if node.target == SDPA:
            continue
        # a reduction's ops (every data movement after a site) carry the data of their first input; their plan
        # (scored with RoPE) only picks rows
        data = node.args[:1] if getattr(node.target, "namespace", None) == "tokencompile" else node.all_input_nodes
        if any(arg in rotated for arg in data if isinstance(arg, Node)):
            rotated.add(node)
    return rotated


def _shift_cached_keys(gm: GraphModule, analysis: DecoderAnalysis, removed_before: list[int]) -> bool:
    """positions=renumber: layer l's cached keys sit at positions 0..T_l - 1, and its next token belongs at
    T_l, which differs per layer (``removed_before[l]``: prompt tokens removed before layer l). Rotate
    each layer's keys by N - T_l positions so that every layer decodes from the prompt length N: rotary
    scores depend on position differences only. With padding the shift is each prompt's own (its length
    minus the tokens its layer-l key mask holds), read from its row of the tables. False (nothing
    changed) when the rotary tables are not one cos / sin pair."""
    if len(analysis.rope_tables) != 2:
        return False
    cos, sin = analysis.rope_tables
    output = next(node for node in gm.graph.nodes if node.op == "output")
    values = list(output.args[0])
    rotated = _rotated_by(gm, {cos, sin})
    reduced = {index: removed_before[layer] for index, (layer, role) in analysis.cache_outputs.items()
               if role == "key" and removed_before[layer]}
    shifts = {index: shift for index, shift in reduced.items() if values[index] in rotated}
    if reduced and not shifts:
        return False  # the tables rotate no cached key (e.g. a vision tower's): not the keys' rotary embedding
    if not shifts:
        return True
    rotary = shape_of(cos)[-1]
    if any(shape_of(values[index])[-1] < rotary for index in shifts):
        return False  # tables wider than the keys: not a rotary embedding of the keys
    mask = analysis.base.mask_input
    key_masks = {layer: values[index] for index, (layer, role) in analysis.cache_outputs.items() if role == "mask"}
    builder = GraphBuilder(gm, latest(gm, cos, sin, *(values[index] for index in shifts), *key_masks.values()))

    def row(table: Node, at: int | Node) -> Node:  # [B or 1, 1, 1, D], over heads and tokens
        picked = builder.call(aten.slice.Tensor, table, 1, at, at + 1) if isinstance(at, int) else \
            builder.call(tc.gather_tokens.default, table, at, 1)
        return builder.call(aten.unsqueeze.default, picked, 1)

    def piece(x: Node, start: int, end: int | None) -> Node:
        return builder.call(aten.slice.Tensor, x, -1, start, end)

    if mask is not None:  # each prompt's position 0 sits after its padding; its shift is its own
        origin = _column_after(builder, mask, analysis.tokens)
        columns = {}
        for index in shifts:
            layer_mask = key_masks[analysis.cache_outputs[index][0]]
            if layer_mask not in columns:
                columns[layer_mask] = _column_after(builder, layer_mask, analysis.tokens)
            shifts[index] = columns[layer_mask]
    else:
        origin = 0
    scale = row(cos, origin)  # cos(0) = 1: the tables' attention scaling, if any
    rotations = {}
    for shift in shifts.values():
        if shift not in rotations:
            rotations[shift] = (builder.call(aten.div.Tensor, row(cos, shift), scale),
                                builder.call(aten.div.Tensor, row(sin, shift), scale))
    for index, shift in shifts.items():
        key, (cos_shift, sin_shift) = values[index], rotations[shift]
        # partial rotary (Phi, StableLM): the first `rotary` channels are rotated, the rest pass through
        turned = piece(key, 0, rotary) if shape_of(key)[-1] > rotary else key
        half = rotary // 2
        rotated = builder.call(aten.cat.default, [builder.call(aten.neg.default, piece(turned, half, None)),
                                                  piece(turned, 0, half)], -1)
        shifted = builder.call(aten.add.Tensor, builder.call(aten.mul.Tensor, turned, cos_shift),
                               builder.call(aten.mul.Tensor, rotated, sin_shift))
        if turned is not key:
            shifted = builder.call(aten.cat.default, [shifted, piece(key, rotary, None)], -1)
        # computed in the tables' precision, cached in the key's dtype (copy takes it from the key at run
        # time: the program may be cast to fp16 / bf16 after compiling)
        values[index] = builder.call(aten.copy.default, key, shifted,
                                     name=f"layer{analysis.cache_outputs[index][0]}_key_at_prompt_positions")
    output.args = (tuple(values),)
    return True


def _unshiftable() -> TokenCompileError:
    return TokenCompileError("padded prompts decode from each prompt's own length: positions=renumber needs the "
                             "cached keys rotated to it, which needs rotary positions (one cos / sin pair)",
                             "use positions='keep' with padding")


def rewrite_prefill(ep: ExportedProgram, input_ids: torch.Tensor, method: FastV,
                    stages: list[Stage], removable: int, extra: tuple = (), mask: int | None = None) -> GraphModule:
    """A fresh module of the prefill program with the span reduced at every stage (after layer - 1)
    (``mask``: the program input index of a padding mask)."""
    gm = ep.module()
    analysis = analyse_decoder(gm, input_ids, extra, mask)
    method.reset()
    method.input_ids = analysis.input_ids
    method.scales = tuple(analysis.scales)
    schedule = stage_schedule(analysis.layers, removable, stages)
    ctx = RewriteContext(analysis.base, method, schedule, proportional_attention=False)
    gm = run_passes(gm, ctx, REDUCTION_PASSES[:-1])
    _cache_gathers_of_earlier_sites(gm, analysis, ctx.sites)
    if method.positions == "renumber":
        _renumber_positions(gm, analysis, ctx.sites)
        method.keys_shifted = _shift_cached_keys(gm, analysis, [sum(schedule[:layer]) for layer in
                                                               range(analysis.layers)])
    return run_passes(gm, ctx, REDUCTION_PASSES[-1:])


METHODS = {"fastv": FastV, "pyramiddrop": PyramidDrop}


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _check_stages(layers: tuple, keep, depth: int) -> None:
    if any(not isinstance(layer, int) or not 1 <= layer < depth for layer in layers):
        raise TokenCompileError(f"layer={_plain(layers)} leaves no layer to reduce in a {depth}-layer model",
                                f"give stage layers 1 <= layer <= {depth - 1}")
    if list(layers) != sorted(set(layers)):
        raise TokenCompileError(f"stage layers {_plain(layers)} are not increasing", "give e.g. layer=(8, 16, 24)")
    if isinstance(keep, (tuple, list)):
        if len(keep) != len(layers):
            raise TokenCompileError(f"{len(keep)} keep ratios for {len(layers)} stage layers",
                                    "give one keep ratio of the span per stage layer")
        if list(keep) != sorted(keep, reverse=True):
            raise TokenCompileError(f"keep ratios {_plain(keep)} grow from stage to stage",
                                    "give non-increasing ratios of the span, e.g. keep=(0.5, 0.25, 0.125)")


def _plain(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in _as_tuple(values))


def compile_decoder(model: torch.nn.Module, input_ids: torch.Tensor, *, budget: float | None = None,
                    keep=None, layer=None, span: Span | tuple | None = None, positions: str = "keep",
                    probes: int = 1, method: str = "fastv", sinks: int = 0, pool: int = 1, lookup: int = 0,
                    ahead: int = AHEAD, extra_inputs: dict | None = None, options: dict | None = None,
                    padding: bool = False) -> DecoderProgram:
    """Reduce a causal LM's prompt in prefill with FastV or PyramidDrop (FastV's score at several stages),
    or with the score of ``dart``, ``divprune``, ``zipcache`` or ``random`` restricted to the span
    (``options``: that method's options, e.g. ``{"pivots": 4}``; see ``tokencompile.decoder.span_scored``).

    ``layer``: the first layer that sees only the kept tokens (fastv; default: ``"auto"`` with a budget,
    2 with ``keep``), or the stage layers
    (a tuple; pyramiddrop's default: 8/16/24 of 32 scaled to the model's depth), or ``"auto"`` (with a
    budget: one stage at the layer of ``auto_layer``'s rule). ``keep``: the fraction
    of the span kept (one stage); with several stages a tuple of fractions of the span, one per stage
    (non-increasing), or one ratio r that each stage keeps of the span that reached it (r, r**2, ...).
    ``budget``: prefill FLOPs ratio to meet (counted on the final program), instead of ``keep``: one
    stage keeps the most span tokens that meet it at ``layer`` (or the deepest earlier layer that can);
    several stages keep r, r**2, ... with the largest r that meets it. ``span``: ``Span`` or
    (start, length); default the whole prompt but its last token. ``probes``: score by the last
    token's attention row (1, FastV) or the mean of the last ``probes`` rows. ``sinks``: the first
    prompt tokens never removed. ``pool``: average the score over that many neighbours (odd).
    ``lookup``: the span tokens that follow earlier occurrences of the n-grams ending at the last
    ``lookup`` prompt tokens rank first (for continuations that copy the prompt; ``ahead``: how many
    tokens past the prompt such a match reaches; see ``FastV``).
    ``input_ids`` fixes the prompt length (shapes are static).
    ``extra_inputs``: further keyword inputs of the model by name (a VLM's ``pixel_values``).
    ``padding``: the program takes an ``attention_mask`` [B, N] after input_ids, for batches of prompts
    padded on the left: padding is removed first and never attended to, positions and ``sinks`` count
    each prompt's own tokens, the span counts columns (so a protected suffix stays aligned), and every
    layer's cache comes with its key mask; with positions=renumber each prompt's kept tokens take its own
    first positions and its cached keys are rotated to decode from its own length (rotary positions
    only). vtc-cls and visionzip remove from each prompt the image tokens it removes alone and keep its
    padding, masked.
    pyramiddrop without budget or keep keeps 0.5 of the remaining span per stage (the paper).
    ``method="vtc-cls"`` or ``"visionzip"``: a VLM's image tokens (``span=Span(token_id=...)``) are
    reduced before the language model, read from the vision tower: vtc-cls keeps those its [CLS] attends
    to most (``layer``: the number of vision layers summed), visionzip keeps dominant tokens and merges
    the rest into contextual ones before the projector (``options={"contextual": 0.15}``); see
    ``tokencompile.decoder.vision``."""
    if method == "pyramiddrop" and budget is None and keep is None:
        keep = 0.5
    if (budget is None) == (keep is None):
        raise TokenCompileError("give exactly one of budget and keep", "budget=<prefill FLOPs ratio> or keep=<ratio>")
    if budget is not None and not 0 < budget <= 1:
        raise TokenCompileError(f"budget {budget:g} is out of range", "give 0 < budget <= 1")
    if keep is not None and any(not isinstance(k, (int, float)) or not 0 <= k <= 1 for k in _as_tuple(keep)):
        raise TokenCompileError(f"keep {_plain(keep)} is out of range", "give 0 <= keep <= 1")
    started = time.perf_counter()
    span = span if isinstance(span, Span) else Span(*span) if span is not None else Span()
    from .vision import VISION_METHODS, compile_before_language_model

    if positions not in POSITION_POLICIES:
        raise TokenCompileError(f"positions={positions!r} is not a position policy",
                                f"give one of: {', '.join(POSITION_POLICIES)}")

    if padding:
        if MASK in (extra_inputs or {}):
            raise TokenCompileError("padding=True adds the attention_mask input itself",
                                    "leave attention_mask out of extra_inputs")
        extra_inputs = {MASK: torch.ones_like(input_ids), **(extra_inputs or {})}
    if method in VISION_METHODS:
        if "inputs_embeds" in (extra_inputs or {}):
            raise TokenCompileError(f"{method} reads the vision tower, which merged embeddings (inputs_embeds) "
                                    "leave out of the program", "give pixel_values (a model whose vision path "
                                    "exports, e.g. LLaVA), or a language-model method on the image span (fastv)")
        shaping = [f"{key}={value}" for key, value, default in (("probes", probes, 1), ("sinks", sinks, 0),
                                                                 ("pool", pool, 1), ("lookup", lookup, 0),
                                                                 ("ahead", ahead, AHEAD)) if value != default]
        if shaping:
            raise TokenCompileError(f"{method} reduces the image tokens before the language model: "
                                    f"{', '.join(shaping)} shape the score of a language-model layer",
                                    "leave probes, sinks, pool, lookup and ahead at their defaults")
        return compile_before_language_model(model, input_ids, budget=budget, keep=keep, span=span,
                                             positions=positions, method=method, layers=layer,
                                             extra_inputs=extra_inputs, started=started, options=options)
    stage_options = dict(positions=positions, probes=probes, span=span, sinks=sinks, pool=pool, lookup=lookup,
                         ahead=ahead)
    if method in SPAN_SCORES:
        pruner = span_scored(method, options, **stage_options)
    elif method in METHODS:
        if options:
            raise TokenCompileError(f"{method} takes no options ({', '.join(options)} given)",
                                    "shape its score with probes, pool, sinks and lookup (--probes, --pool, "
                                    "--sinks, --lookup)")
        pruner = METHODS[method](**stage_options)
    else:
        raise TokenCompileError(f"method {method!r} is not a decoder method",
                                f"give one of: {', '.join([*METHODS, *SPAN_SCORES, *VISION_METHODS])}")
    if positions == "renumber" and multimodal_positions(extra_inputs) is not None:
        raise TokenCompileError("positions=renumber gives kept tokens consecutive positions; with multimodal RoPE "
                                "each token has a position on every rotary axis (an image's rows and columns)",
                                "compile with positions='keep'")
    traced = trace_prefill(model, input_ids, extra_inputs)
    lm, ep, extra_inputs, extra, inputs, analysis = (
        traced.lm, traced.program, traced.extra_inputs, traced.extra, traced.inputs, traced.analysis)
    if positions == "renumber" and not analysis.rope_tables:
        raise TokenCompileError("positions=renumber gives kept tokens new rotary positions, but the graph has no "
                                "rotary tables (one cos / sin pair) to renumber: learned positions are added before "
                                "the first layer, and interleaved rotary embeddings (GPT-J, Cohere, GLM) are not "
                                "recognised", "compile with positions='keep'")
    if padding and positions == "renumber" and len(analysis.rope_tables) != 2:
        raise _unshiftable()
    span.check(analysis.tokens)
    check_token_count(analysis)
    if layer is None:  # fastv: the layer rule with a budget (the solver picks K), FastV's K=2 with keep
        layer = pyramid_layers(analysis.layers) if method == "pyramiddrop" else "auto" if budget is not None else 2
    if layer == "auto" and budget is None:
        raise TokenCompileError("layer='auto' chooses the layer from a budget", "give budget=<prefill FLOPs ratio>")
    layers = _as_tuple(layer)
    if layer != "auto":
        _check_stages(layers, keep, analysis.layers)
    removable_per_sample = (span.removable(input_ids) & (torch.arange(analysis.tokens) >= sinks)).sum(1)
    if len(set(removable_per_sample.tolist())) != 1:
        raise TokenCompileError("the samples hold different numbers of span tokens",
                                "every prompt of a batch needs the same number of image tokens (images of one "
                                "size, for models whose token count follows the image size)")
    removable = int(removable_per_sample[0])
    cost, original_flops = traced.cost, traced.flops
    if layer == "auto":
        layers = (auto_layer(cost, budget),)

    if keep is not None:
        ratios = _as_tuple(keep)
        if len(ratios) == 1 and len(layers) > 1:
            ratios = tuple(ratios[0] ** (i + 1) for i in range(len(layers)))
        stages = stages_from_ratios(layers, ratios, removable)
    elif len(layers) == 1:
        k, removed = choose_schedule(cost, budget, layers[0], removable)
        stages = [Stage(k, removable - removed)]
    else:
        stages = choose_pyramid(cost, budget, layers, removable)
    while True:
        stages = [stage for stage, before in zip(stages, [removable] + [s.kept for s in stages])
                  if stage.kept < before]  # a stage that removes nothing is no stage
        gm = rewrite_prefill(ep, input_ids, pruner, stages, removable, extra, mask_index(extra_inputs)) \
            if stages else ep.module()
        gm = eliminate_dead_positions(gm)
        program = rebuild_program(ep, gm, lambda module: export_with_batch_axis(module, inputs))
        flops = count_flops(program.module(), inputs)
        if budget is None or flops <= budget * original_flops + 1e-9 or not stages or stages[-1].kept == 0:
            break
        stages[-1] = Stage(stages[-1].layer, stages[-1].kept - 1)  # the cost model was optimistic
    if budget is not None and flops > budget * original_flops + 1e-9:
        raise TokenCompileError(f"prefill budget {budget:g} was not met (FLOPs ratio {flops / original_flops:.3f})",
                                "raise the budget or lengthen the span")

    schedule = stage_schedule(analysis.layers, removable, stages)
    tokens = cost.tokens_per_block(schedule)
    kept = stages[-1].kept if stages else removable
    first = stages[0].layer if stages else None
    report = {
        "method": method,
        "budget": budget,
        "layer": first,
        "stages": [{"layer": s.layer, "span_kept": s.kept, "tokens": tokens[s.layer]} for s in stages],
        "positions": positions,
        "probes": probes,
        "sinks": sinks,
        "pool": pool,
        "lookup": lookup,
        "ahead": ahead,
        "options": dict(options or {}),
        "span_tokens_removable": removable,
        **span_token_count(span, input_ids),
        "span_tokens_kept": kept,
        "keep_ratio": kept / removable if removable else 1.0,
        "prompt_tokens": analysis.tokens,
        "tokens_per_layer": tokens,
        "flops_original": original_flops,
        "flops_prefill": flops,
        "flops_ratio": flops / original_flops,
        "flops_ratio_modelled": cost.flops(schedule) / cost.original,
        "analysis": analysis.summary(),
        "sliding_window": sliding_window(lm),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if positions == "renumber" and stages and pruner.keys_shifted:
        report["decode_position"] = analysis.tokens  # the cached keys were rotated to continue from it
    elif positions == "renumber" and stages and padding:
        raise _unshiftable()
    return DecoderProgram(program, lm, analysis.tokens, first, positions, report, tokens,
                          [(s.layer, s.kept) for s in stages], tuple(extra_inputs), batched_example(inputs))


__all__ = ["METHODS", "CausalLMPrefill", "DecoderProgram", "Stage", "auto_layer", "choose_pyramid", "eos_token_id",
           "choose_schedule", "compile_decoder", "export_prefill", "reuse_traces", "stage_schedule"]
