"""VTC-CLS on a VLM: image tokens pruned before the language model, scored in the vision tower.

VTC-CLS (Wang et al., [CLS] Attention is All You Need for Training-Free Visual Token Pruning, 2024)
scores each image patch by the attention the vision encoder's [CLS] token gives it, summed over the
last vision layers, and keeps the top patches in their original order before the language model.

In the prefill graph: the vision stack's [CLS] query row is attended against each layer's keys (one
probe row per layer; SDPA stays fused). The patch scores are put at the prompt's image placeholders
exactly as the model puts the image features there (``masked_scatter`` in placeholder order; the
vision tower's prefix tokens are dropped when the model drops them). Text tokens are never removed.
The plan is applied where the language model's first block reads the merged embeddings, with the
project's reduction pass, so every layer, cache, position table and mask downstream sees the kept
tokens only (``first_reduced_layer`` = 0).
"""

from __future__ import annotations

import dataclasses
import operator
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from ..analysis import Block, ModelAnalysis, analyse, block_stacks
from ..errors import TokenCompileError, UnsupportedModelError
from ..flops import count_flops
from ..graph_utils import GraphBuilder, ancestors, aten, shape_of
from ..methods.base import Method, Plan, SiteInputs
from ..methods.evit import cls_attention_row
from ..passes import REDUCTION_PASSES, RewriteContext, run_passes
from .analysis import DecoderAnalysis, Span, analyse_decoder

tc = torch.ops.tokencompile
DEFAULT_VISION_LAYERS = 4


@dataclass
class VtcCls(Method):
    """``layers``: how many of the last vision layers (up to the one the model takes its features
    from) sum their [CLS] attention."""

    name: ClassVar[str] = "vtc-cls"
    family: ClassVar[str] = "prune"
    summary: ClassVar[str] = "VLM: keep the image tokens the vision tower's [CLS] attends to most, before the LM"
    reference: ClassVar[str] = ("Wang et al., [CLS] Attention is All You Need for Training-Free Visual Token "
                                "Pruning (VTC-CLS), 2024")
    merges: ClassVar[bool] = False

    layers: int | None = None  # default: the last DEFAULT_VISION_LAYERS the features come through
    span: Span = dataclasses.field(default_factory=Span)
    vision: ModelAnalysis | None = None  # set by the rewrite
    input_ids: Node | None = None
    vision_images: int = 0               # image tokens per sample (set by the rewrite)

    def image_scores(self, builder: GraphBuilder) -> Node:
        """[B, images]: summed [CLS] attention of the last ``layers`` vision blocks to each patch."""
        total = None
        for block in self.vision.blocks[-self.layers:]:
            row = cls_attention_row(builder, block.attention.query, block.keys, None,
                                    f"vision_block{block.index}_cls_attention")
            total = row if total is None else builder.call(aten.add.Tensor, total, row)
        prefix = self.vision.tokens - self.vision_images
        if prefix < 0:
            raise UnsupportedModelError(f"the prompt holds {self.vision_images} image tokens, the vision tower only "
                                        f"{self.vision.tokens}", "give one image's placeholders per sample")
        return builder.call(aten.slice.Tensor, total, 1, prefix, self.vision.tokens, name="vtc_cls_image_scores")

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        image = builder.call(aten.eq.Scalar, self.input_ids, self.span.token_id, name="image_tokens")  # [B, N]
        scores = builder.cast(self.image_scores(builder), torch.float32)
        zeros = builder.call(aten.zeros_like.default, image, dtype=torch.float32)
        placed = builder.call(aten.masked_scatter.default, zeros, image, scores)                   # [B, N]
        keep_text = builder.call(aten.full_like.default, placed, float("inf"))
        score = builder.call(aten.where.self, image, placed, keep_text, name="vtc_cls_score")
        plan = builder.call(tc.topk_plan.default, score, None, site.n - r, 0, False, False, name="vtc_cls_plan")
        return Plan(*(builder.call(operator.getitem, plan, i) for i in range(3)))


def block_input(block: Block, tokens: int) -> Node:
    """The residual stream entering ``block``: its first node's [B, N, C] input from outside the block."""
    inside = set(block.nodes)
    for node in block.nodes:
        for arg in node.all_input_nodes:
            shape = shape_of(arg)
            if arg not in inside and shape is not None and len(shape) == 3 and shape[1] == tokens:
                return arg
    raise UnsupportedModelError(f"cannot find the input of block {block.name!r}", "report the model")


def vision_analysis(gm: GraphModule, decoder: DecoderAnalysis) -> ModelAnalysis:
    """The blocks of the vision tower: the one stack besides the language model's."""
    language = decoder.base.blocks[0].name.rsplit(".", 1)[0]
    others = [name for name in block_stacks(gm) if name != language]
    if len(others) != 1:
        raise UnsupportedModelError(f"vtc-cls needs one vision tower in the prefill graph, found {len(others)} "
                                    "other stacks of blocks", "export the VLM with its vision tower (pixel inputs)")
    return analyse(gm, others[0])


def rewrite_before_language_model(gm: GraphModule, decoder: DecoderAnalysis, method: VtcCls, removed: int,
                                  images_per_sample: int, positions: str = "keep") -> GraphModule:
    """Prune ``removed`` image tokens where the language model's first block reads its input; with
    ``positions="renumber"`` the kept tokens take positions 0..n-1 (the prompt is simply shorter)."""
    from .prefill import _renumber_positions

    first = decoder.base.blocks[0]
    entry = Block(0, f"{first.name}.entry", first.attention, block_input(first, decoder.tokens), [])
    vision = vision_analysis(gm, decoder)
    feeding = ancestors(entry.site)  # vision layers after the one the features come from do not count
    method.vision = dataclasses.replace(vision, blocks=[b for b in vision.blocks if b.site in feeding])
    method.input_ids = decoder.input_ids
    method.vision_images = images_per_sample
    available = len(method.vision.blocks)
    if method.layers is None:
        method.layers = min(DEFAULT_VISION_LAYERS, available)
    if not 1 <= method.layers <= available:
        raise TokenCompileError(f"layers={method.layers} is not a number of vision layers",
                                f"give 1 <= layers <= {available} (the layers the image features come through)")
    analysis = dataclasses.replace(decoder.base, blocks=[entry])
    ctx = RewriteContext(analysis, method, [removed], proportional_attention=False)
    gm = run_passes(gm, ctx, REDUCTION_PASSES[:-1])
    if positions == "renumber":
        _renumber_positions(gm, decoder, ctx.sites)
    return run_passes(gm, ctx, REDUCTION_PASSES[-1:])


def compile_before_language_model(model: torch.nn.Module, input_ids: torch.Tensor, *, budget: float | None,
                                  keep: float | None, span: Span, positions: str, method: str, layers: int | None,
                                  extra_inputs: dict | None, started: float):
    """``compile_decoder`` for the methods that prune before the language model (``layers``: vision
    layers whose [CLS] attention is summed). ``budget``: prefill FLOPs ratio, vision tower included;
    the fewest image tokens removed that meet it (counted on the rewritten programs)."""
    from .prefill import (
        DecoderProgram,
        batched_example,
        export_with_batch_axis,
        span_token_count,
        trace_prefill,
    )

    # budget / keep ranges and the position policy are checked by compile_decoder
    if isinstance(keep, (tuple, list)):
        raise TokenCompileError(f"{method} has one stage: keep={keep} gives several", "give one keep ratio")
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool)):
        raise TokenCompileError(f"{method}: layer={layers!r} is not a number of vision layers",
                                "give layer=N, the last N vision layers whose [CLS] attention is summed")
    if span.token_id is None:
        raise TokenCompileError(f"{method} prunes image tokens: it needs the image placeholder id",
                                "give span=Span(token_id=IMAGE_TOKEN_ID) (--image-token-id)")
    pruner = VISION_METHODS[method](span=span, **({} if layers is None else {"layers": layers}))
    traced = trace_prefill(model, input_ids, extra_inputs)
    ep, extra, inputs, analysis = traced.program, traced.extra, traced.inputs, traced.analysis
    per_sample = (input_ids == span.token_id).sum(1)
    if len(set(per_sample.tolist())) != 1 or int(per_sample[0]) == 0:
        raise TokenCompileError(f"the samples hold {sorted(set(per_sample.tolist()))} image tokens",
                                "every prompt of a batch needs the same, non-zero number of image tokens")
    images = int(per_sample[0])
    original_flops = count_flops(traced.module, inputs)

    def rewrite(removed: int) -> GraphModule:
        gm = ep.module()
        return rewrite_before_language_model(gm, analyse_decoder(gm, input_ids, extra), pruner, removed, images,
                                             positions) if removed else gm

    if keep is not None:
        removed = images - round(keep * images)
        gm = rewrite(removed)
        flops = count_flops(gm, inputs)
    else:
        lo, hi = -1, images  # the fewest removed that meet the budget, by bisection on counted FLOPs
        best = rewrite(images)
        best_flops = count_flops(best, inputs)
        if best_flops > budget * original_flops + 1e-9:
            raise TokenCompileError(f"prefill budget {budget:g} cannot be met by removing image tokens: removing "
                                    f"all of them gives {best_flops / original_flops:.3f}",
                                    f"use a budget of {best_flops / original_flops + 0.005:.2f} or more")
        removed, gm, flops = images, best, best_flops
        while hi - lo > 1:
            mid = (lo + hi) // 2
            candidate = rewrite(mid)
            candidate_flops = count_flops(candidate, inputs)
            if candidate_flops <= budget * original_flops + 1e-9:
                hi, removed, gm, flops = mid, mid, candidate, candidate_flops
            else:
                lo = mid
    program = export_with_batch_axis(gm, inputs)
    tokens = analysis.tokens - removed
    report = {
        "method": method, "budget": budget, "layer": 0 if removed else None, "stages": [], "positions": positions,
        "vision_layers_scored": pruner.layers, "image_tokens": images, "span_tokens_removable": images,
        **span_token_count(span, input_ids),
        "span_tokens_kept": images - removed, "keep_ratio": (images - removed) / images,
        "prompt_tokens": analysis.tokens, "tokens_per_layer": [tokens] * analysis.layers,
        "flops_original": original_flops, "flops_prefill": flops, "flops_ratio": flops / original_flops,
        "analysis": analysis.summary(), "seconds": round(time.perf_counter() - started, 2),
    }
    return DecoderProgram(program, traced.lm, analysis.tokens, 0 if removed else None, positions, report,
                          [tokens] * analysis.layers, [(0, images - removed)] if removed else [],
                          tuple(traced.extra_inputs), batched_example(inputs))


VISION_METHODS = {"vtc-cls": VtcCls}

__all__ = ["VISION_METHODS", "VtcCls", "block_input", "compile_before_language_model", "rewrite_before_language_model",
           "vision_analysis"]
