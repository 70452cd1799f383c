"""Prefill programs of causal LMs, and their rewrite with a reduced prompt.

``CausalLMPrefill`` wraps a Hugging Face causal LM so that its export returns plain tensors: the last
token's logits, then key and value of every layer. ``compile_decoder`` exports it, picks the layer K
and the number of span tokens kept from a prefill-FLOPs budget, and inserts FastV's plan after the
attention of layer K-1 with the project's rewrite passes: layers >= K (and their caches) see only the
kept tokens, layers < K keep every token in their caches.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule

from ..errors import TokenCompileError
from ..flops import CostModel, build_cost_model, count_flops
from ..graph_utils import aten
from ..passes import REDUCTION_PASSES, RewriteContext, run_passes
from .analysis import DecoderAnalysis, Span, analyse_decoder, rope_table
from .fastv import FastV

tc = torch.ops.tokencompile


class CausalLMPrefill(torch.nn.Module):
    """input_ids [B, N] -> (logits of the last token [B, V], key_0, value_0, key_1, value_1, ...), each
    cache [B, H_kv, N, D] with RoPE applied (as the model caches them)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        caches = []
        for layer in returned_cache(out).layers:
            caches += [layer.keys, layer.values]
        return (out.logits[:, -1], *caches)


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


def as_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.model if isinstance(model, CausalLMPrefill) else model


def export_prefill(model: torch.nn.Module, input_ids: torch.Tensor) -> ExportedProgram:
    """The prefill program of a causal LM with a symbolic batch axis (token count static)."""
    wrapper = model if isinstance(model, CausalLMPrefill) else CausalLMPrefill(model)
    example = input_ids if input_ids.shape[0] > 1 else torch.cat([input_ids, input_ids])
    with torch.no_grad():
        return torch.export.export(wrapper, (example,), dynamic_shapes=({0: Dim.AUTO},))


def _schedule(layers: int, layer: int, removed: int) -> list[int]:
    schedule = [0] * layers
    schedule[layer - 1] = removed
    return schedule


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


def choose_schedule(cost: CostModel, budget: float, layer: int, removable: int) -> tuple[int, int]:
    """(K, removed): K = ``layer`` if the budget can be met there, else the deepest earlier layer that
    meets it; removed = the fewest span tokens that meet the budget at K."""
    for k in range(layer, 0, -1):
        removed = _removed_for_budget(cost, budget, k, removable)
        if removed is not None:
            return k, removed
    best = cost.flops(_schedule(len(cost.blocks), 1, removable)) / cost.original
    raise TokenCompileError(f"prefill budget {budget:g} cannot be met by removing the span: the best reachable "
                            f"FLOPs ratio is {best:.3f} (every span token removed after layer 1)",
                            f"use a budget of {best + 0.005:.2f} or more, or a longer span")


def _restore_early_caches(gm: GraphModule, analysis: DecoderAnalysis, site_block: int, originals: list) -> None:
    """The rewrite gathers every per-token tensor read after the site, the output included; the caches of
    layers before the reduced ones must stay whole, so give the output their original nodes back."""
    output = next(node for node in gm.graph.nodes if node.op == "output")
    values = list(output.args[0])
    for index, (layer, _) in analysis.cache_outputs.items():
        if layer <= site_block:
            values[index] = originals[index]
    output.args = (tuple(values),)


def _renumber_positions(gm: GraphModule, analysis: DecoderAnalysis, n_out: int) -> None:
    """positions=renumber: the kept tokens take the first n_out rotary positions instead of their own."""
    tables = set(analysis.rope_tables)
    for node in list(gm.graph.nodes):
        if node.target == tc.gather_tokens.default and rope_table(node.args[0]) in tables:
            with gm.graph.inserting_after(node):
                first = gm.graph.call_function(aten.slice.Tensor, (node.args[0], node.args[2], 0, n_out))
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)


def rewrite_prefill(ep: ExportedProgram, input_ids: torch.Tensor, method: FastV, removed: int) -> GraphModule:
    """A fresh module of the prefill program with ``removed`` span tokens pruned after layer K-1."""
    gm = ep.module()
    analysis = analyse_decoder(gm, input_ids)
    site_block = method.layer - 1
    method.input_ids = analysis.input_ids
    method.scale = analysis.scales[site_block]
    output = next(node for node in gm.graph.nodes if node.op == "output")
    originals = list(output.args[0])
    schedule = _schedule(analysis.layers, method.layer, removed)
    ctx = RewriteContext(analysis.base, method, schedule, proportional_attention=False)
    gm = run_passes(gm, ctx, REDUCTION_PASSES[:-1])
    _restore_early_caches(gm, analysis, site_block, originals)
    if method.positions == "renumber":
        _renumber_positions(gm, analysis, analysis.tokens - removed)
    return run_passes(gm, ctx, REDUCTION_PASSES[-1:])


def compile_decoder(model: torch.nn.Module, input_ids: torch.Tensor, *, budget: float | None = None,
                    keep: float | None = None, layer: int = 2, span: Span | tuple | None = None,
                    positions: str = "keep", probes: int = 1) -> DecoderProgram:
    """Reduce a causal LM's prompt in prefill with FastV.

    ``budget``: prefill FLOPs ratio to meet (counted on the final program); or ``keep``: the fraction of
    the span's tokens kept from layer ``layer`` on. ``span``: ``Span`` or (start, length); default the
    whole prompt but its last token. ``probes``: score by the last token's attention row (1, FastV) or
    the mean of the last ``probes`` rows. ``input_ids`` fixes the prompt length (shapes are static)."""
    if (budget is None) == (keep is None):
        raise TokenCompileError("give exactly one of budget and keep", "budget=<prefill FLOPs ratio> or keep=<ratio>")
    if budget is not None and not 0 < budget <= 1:
        raise TokenCompileError(f"budget {budget:g} is out of range", "give 0 < budget <= 1")
    if keep is not None and not 0 <= keep <= 1:
        raise TokenCompileError(f"keep {keep:g} is out of range", "give 0 <= keep <= 1")
    started = time.perf_counter()
    span = span if isinstance(span, Span) else Span(*span) if span is not None else Span()
    method = FastV(layer=layer, positions=positions, probes=probes, span=span)
    lm = as_causal_lm(model).eval()
    ep = export_prefill(lm, input_ids)
    inputs = (input_ids,)
    original = ep.module()
    analysis = analyse_decoder(original, input_ids)
    span.check(analysis.tokens)
    if layer >= analysis.layers:
        raise TokenCompileError(f"layer={layer} leaves no layer to reduce in a {analysis.layers}-layer model",
                                f"give 1 <= layer <= {analysis.layers - 1}")
    removable_per_sample = span.removable(input_ids).sum(1)
    if len(set(removable_per_sample.tolist())) != 1:
        raise TokenCompileError("the samples hold different numbers of span tokens",
                                "every prompt of a batch needs the same number of image tokens")
    removable = int(removable_per_sample[0])
    cost = build_cost_model(original, analysis.base, inputs)
    original_flops = count_flops(original, inputs)

    if keep is not None:
        removed = removable - round(keep * removable)
    else:
        method.layer, removed = choose_schedule(cost, budget, layer, removable)
    while True:
        gm = rewrite_prefill(ep, input_ids, method, removed) if removed else ep.module()
        with torch.no_grad():
            program = torch.export.export(gm, (torch.cat([input_ids, input_ids]) if input_ids.shape[0] == 1
                                               else input_ids,), dynamic_shapes=({0: Dim.AUTO},))
        flops = count_flops(program.module(), inputs)
        if budget is None or flops <= budget * original_flops + 1e-9 or removed >= removable:
            break
        removed += 1  # the cost model was optimistic
    if budget is not None and flops > budget * original_flops + 1e-9:
        raise TokenCompileError(f"prefill budget {budget:g} was not met (FLOPs ratio {flops / original_flops:.3f})",
                                "raise the budget or lengthen the span")

    reduced = bool(removed)
    tokens = [analysis.tokens if i < method.layer or not reduced else analysis.tokens - removed
              for i in range(analysis.layers)]
    report = {
        "method": "fastv",
        "budget": budget,
        "layer": method.layer if reduced else None,
        "positions": positions,
        "probes": probes,
        "span_tokens_removable": removable,
        "span_tokens_kept": removable - removed,
        "keep_ratio": (removable - removed) / removable if removable else 1.0,
        "prompt_tokens": analysis.tokens,
        "tokens_per_layer": tokens,
        "flops_original": original_flops,
        "flops_prefill": flops,
        "flops_ratio": flops / original_flops,
        "flops_ratio_modelled": cost.flops(_schedule(analysis.layers, method.layer, removed)) / cost.original,
        "analysis": analysis.summary(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return DecoderProgram(program, lm, analysis.tokens, method.layer if reduced else None, positions, report)


__all__ = ["CausalLMPrefill", "DecoderProgram", "choose_schedule", "compile_decoder", "export_prefill"]
