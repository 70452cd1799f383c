"""Image tokens of a VLM reduced before the language model, read from the vision tower.

Both methods of ``VISION_METHODS`` need the vision tower's features to reach the prompt's image
placeholders one for one (LLaVA: ``masked_scatter`` in placeholder order; the tower's prefix tokens
dropped when the model drops them; a model that pools or shuffles patches is refused) and never remove
text tokens or padding. They prune where the language model's first block reads the merged embeddings,
with the project's reduction pass, so every layer, cache, position table and mask downstream sees the
kept tokens only (``first_reduced_layer`` = 0); with ``positions="renumber"`` the language model sees
exactly a shorter prompt (left-padded prompts: each its own, its cached keys rotated to decode from its
own length).

vtc-cls (Wang et al., [CLS] Attention is All You Need for Training-Free Visual Token Pruning, 2024)
scores each image patch by the attention the vision encoder's [CLS] token gives it, summed over the
last vision layers, and keeps the top patches in their original order. In the graph the [CLS] query
row is attended against each layer's keys (one probe row per layer; SDPA stays fused) and the scores
are put at the placeholders as the model puts the features there.

visionzip (Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, 2024)
reduces the features before the projector, at the vision layer they come from: dominant tokens (the
image tokens that layer's [CLS] attends to most, in original order), then contextual tokens (strided
targets among the rest, each the mean of the features of its group: the tokens whose head-mean keys
are most similar to it). The plan is the encoder method's (``tokencompile.methods.visionzip``). The
feature tensor keeps its shape, since the model wants one feature per placeholder: its first kept rows
become [dominant; contextual], the others stay as they were and reach only placeholders pruned at the
language model's entry, which keeps the first kept image placeholders. So the projector still runs on
the unused rows (a per-token MLP, small next to the language model; counted in the FLOPs).
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
from ..graph_utils import GraphBuilder, ancestors, aten, pseudo_module_stack, shape_of
from ..methods.base import Method, Plan, SiteInputs
from ..methods.common import rows
from ..methods.evit import cls_attention, cls_attention_row
from ..methods.visionzip import VisionZip
from ..passes import REDUCTION_PASSES, RewriteContext, eliminate_dead_positions, run_passes
from ..rebuild import rebuild_program
from .analysis import DecoderAnalysis, Span, analyse_decoder

tc = torch.ops.tokencompile
DEFAULT_VISION_LAYERS = 4


@dataclass
class VisionMethod(Method):
    """A method that reduces a VLM's image tokens before the language model: ``prepare`` reads (and
    may rewrite) the vision tower, ``plan`` prunes at the language model's entry."""

    family: ClassVar[str] = "prune"
    merges: ClassVar[bool] = False  # the entry site only drops tokens
    state: ClassVar[tuple[str, ...]] = ("span", "vision", "input_ids", "vision_images")  # not options

    span: Span = dataclasses.field(default_factory=Span)
    vision: ModelAnalysis | None = None  # the vision layers the features come through (set by the rewrite)
    input_ids: Node | None = None
    vision_images: int = 0               # image tokens per sample (set by the rewrite)

    @property
    def prefix(self) -> int:
        """Vision tokens before the image ones ([CLS]), which the model drops from the features."""
        prefix = self.vision.tokens - self.vision_images
        if prefix < 0:
            raise UnsupportedModelError(f"the prompt holds {self.vision_images} image tokens, the vision tower only "
                                        f"{self.vision.tokens}", "give one image's placeholders per sample")
        if prefix not in (0, self.vision.num_prefix):  # e.g. pixel shuffle: 4 patches become one token
            raise UnsupportedModelError(
                f"{self.name} maps vision-tower tokens to image placeholders one for one, but the language model "
                f"gets {self.vision_images} image tokens per image from {self.vision.tokens} vision tokens "
                f"({self.vision.num_prefix} of them prefix tokens such as [CLS]): the model pools or rearranges "
                "patches on the way", "reduce the image span in the language model instead (method fastv, dart, "
                "divprune, ...)")
        return prefix

    def prepare(self, gm: GraphModule, language_input: Node, removed: int) -> None:
        """Before the entry's plan: check the options against the vision tower, rewrite it if need be."""

    def report(self, kept: int) -> dict:
        return {}

    def image_tokens(self, builder: GraphBuilder) -> Node:
        """[B, N] bool: the prompt's image placeholders."""
        return builder.call(aten.eq.Scalar, self.input_ids, self.span.token_id, name="image_tokens")

    def keep_best_images(self, builder: GraphBuilder, site: SiteInputs, r: int, image: Node, score: Node,
                         name: str) -> Plan:
        """Every text token and the image tokens (``image`` [B, N]) of highest ``score`` [B, N]."""
        keep_text = builder.call(aten.full_like.default, score, float("inf"))
        score = builder.call(aten.where.self, image, score, keep_text, name=f"{name}_score")
        plan = builder.call(tc.topk_plan.default, score, None, site.n - r, 0, False, False, name=f"{name}_plan")
        return Plan(*(builder.call(operator.getitem, plan, i) for i in range(3)))


@dataclass
class VtcCls(VisionMethod):
    """``layers``: how many of the last vision layers (up to the one the model takes its features
    from) sum their [CLS] attention."""

    name: ClassVar[str] = "vtc-cls"
    summary: ClassVar[str] = "VLM: keep the image tokens the vision tower's [CLS] attends to most, before the LM"
    reference: ClassVar[str] = ("Wang et al., [CLS] Attention is All You Need for Training-Free Visual Token "
                                "Pruning (VTC-CLS), 2024")

    layers: int | None = None  # default: the last DEFAULT_VISION_LAYERS the features come through
    state: ClassVar[tuple[str, ...]] = (*VisionMethod.state, "layers")  # given as compile_decoder's layer=

    def prepare(self, gm: GraphModule, language_input: Node, removed: int) -> None:
        available = len(self.vision.blocks)
        if self.layers is None:
            self.layers = min(DEFAULT_VISION_LAYERS, available)
        if not 1 <= self.layers <= available:
            raise TokenCompileError(f"layers={self.layers} is not a number of vision layers",
                                    f"give 1 <= layers <= {available} (the layers the image features come through)")

    def report(self, kept: int) -> dict:
        return {"vision_layers_scored": self.layers}

    def image_scores(self, builder: GraphBuilder) -> Node:
        """[B, images]: summed [CLS] attention of the last ``layers`` vision blocks to each patch."""
        total = None
        for block in self.vision.blocks[-self.layers:]:
            row = cls_attention_row(builder, block.attention.query, block.keys, None,
                                    f"vision_block{block.index}_cls_attention")
            total = row if total is None else builder.call(aten.add.Tensor, total, row)
        return builder.call(aten.slice.Tensor, total, 1, self.prefix, self.vision.tokens, name="vtc_cls_image_scores")

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        image = self.image_tokens(builder)
        scores = builder.cast(self.image_scores(builder), torch.float32)
        zeros = builder.call(aten.zeros_like.default, image, dtype=torch.float32)
        placed = builder.call(aten.masked_scatter.default, zeros, image, scores)                   # [B, N]
        return self.keep_best_images(builder, site, r, image, placed, "vtc_cls")


class FeatureVisionZip(VisionZip):
    """The encoder's VisionZip at the feature layer, its contextual share counted on the image tokens
    kept (the prefix [CLS] is kept too but never reaches the language model)."""

    def split(self, n_out: int, protected: int) -> int:
        return super().split(n_out - protected, 0)


@dataclass
class VisionZipVLM(VisionMethod):
    """``contextual``: share of the kept image tokens that are contextual (merged groups); the paper's
    LLaVA-1.5 setting keeps 54 dominant + 10 contextual of 64."""

    name: ClassVar[str] = "visionzip"
    family: ClassVar[str] = "merge"
    summary: ClassVar[str] = ("VLM: dominant image tokens by [CLS] attention + contextual ones (the rest merged into "
                              "strided targets), at the feature layer before the projector")
    reference: ClassVar[str] = VisionZip.reference
    ranges: ClassVar[dict] = VisionZip.ranges

    contextual: float = VisionZip.contextual

    def split(self, kept: int) -> int:
        """Contextual tokens among ``kept`` image tokens."""
        return FeatureVisionZip(contextual=self.contextual).split(kept, 0) if kept else 0

    def report(self, kept: int) -> dict:
        contextual = self.split(kept) if kept < self.vision_images else 0
        return {"vision_layer": self.vision.blocks[-1].index if self.vision else None, "contextual": self.contextual,
                "image_tokens_dominant": kept - contextual, "image_tokens_contextual": contextual}

    def prepare(self, gm: GraphModule, language_input: Node, removed: int) -> None:
        """Rewire the features' consumers (the projector) to [prefix; dominant; contextual; the rest]. A
        model that concatenates several vision layers' outputs (LLaVA's ``vision_feature_layer`` list,
        VipLLaVA) gets every such layer zipped by the one plan of the last: the same tokens and groups in
        every channel block."""
        kept = self.vision_images - removed
        if kept == 0:
            return  # no feature reaches the language model
        block = self.vision.blocks[-1]  # the layer the features come from (the last, with several)
        features = block_output(block, self.vision.tokens)
        feeding = ancestors(language_input)
        inside = {node for b in self.vision.blocks for node in b.nodes}
        taps = {b.index: [user for user in block_output(b, self.vision.tokens).users
                          if user in feeding and user not in inside] for b in self.vision.blocks}
        builder = GraphBuilder(gm, features, pseudo_module_stack(features, f"{block.name}.visionzip"))
        first = builder.call(aten.select.int, features, -1, 0)
        sizes = builder.call(aten.ones_like.default, first)
        site = SiteInputs(block=block.index, x=features, query=block.attention.query, keys=block.keys, valid=None,
                          sizes=sizes, num_prefix=self.prefix, protect_last_valid=False, n=self.vision.tokens,
                          depth=len(self.vision.blocks))
        zipper = FeatureVisionZip(contextual=self.contextual)
        plan = zipper.plan(builder, site, removed)
        # the paper's order: prefix and dominant tokens, then the contextual ones (each in original order);
        # the dominant ones are the plan's first selection, taken again (the plan does not return it)
        n_out = site.n - removed
        dominant = n_out - zipper.split(n_out, self.prefix)
        top = builder.call(tc.topk_plan.default, cls_attention(builder, site), None, dominant, self.prefix, False,
                           False)
        zeros = builder.call(aten.zeros_like.default, first, dtype=torch.int64)
        is_dominant = builder.call(aten.scatter.value, zeros, 1, builder.call(operator.getitem, top, 0), 1)
        contextual = builder.call(aten.rsub.Scalar, builder.call(aten.gather.default, is_dominant, 1, plan.rep), 1)
        key = builder.call(aten.add.Tensor, builder.call(aten.mul.Tensor, contextual, site.n), plan.rep)  # distinct
        order = builder.call(operator.getitem, builder.call(
            aten.topk.default, builder.call(aten.neg.default, builder.cast(key, torch.float32)), n_out), 1)
        for b in self.vision.blocks:
            if not taps[b.index]:
                continue
            output = block_output(b, self.vision.tokens)
            merged = builder.call(tc.merge_tokens.default, output, sizes, plan.rep, plan.src, plan.dst,
                                  name="visionzip_merge")                      # [B, n_out, C], original order
            unused = builder.call(aten.slice.Tensor, output, 1, n_out, None)
            zipped = builder.call(aten.cat.default, [rows(builder, merged, order), unused], 1,
                                  name="visionzip_features")
            for user in taps[b.index]:
                user.replace_input_with(output, zipped)

    def plan(self, builder: GraphBuilder, site: SiteInputs, r: int) -> Plan:
        """The first image placeholders, which the rewired features fill with the zipped tokens."""
        rank = builder.call(aten.neg.default, builder.cast(builder.positions(self.input_ids), torch.float32))
        return self.keep_best_images(builder, site, r, self.image_tokens(builder), rank, "visionzip")


def block_input(block: Block, tokens: int) -> Node:
    """The residual stream entering ``block``: its first node's [B, N, C] input from outside the block."""
    inside = set(block.nodes)
    for node in block.nodes:
        for arg in node.all_input_nodes:
            shape = shape_of(arg)
            if arg not in inside and shape is not None and len(shape) == 3 and shape[1] == tokens:
                return arg
    raise UnsupportedModelError(f"cannot find the input of block {block.name!r}", "report the model")


def block_output(block: Block, tokens: int) -> Node:
    """The residual stream leaving ``block``: its last [B, N, C] node read outside the block."""
    inside = set(block.nodes)
    for node in reversed(block.nodes):
        shape = shape_of(node)
        if shape is not None and len(shape) == 3 and shape[1] == tokens and any(u not in inside for u in node.users):
            return node
    raise UnsupportedModelError(f"cannot find the output of block {block.name!r}", "report the model")


def vision_analysis(gm: GraphModule, decoder: DecoderAnalysis) -> ModelAnalysis:
    """The blocks of the vision tower: the one stack besides the language model's."""
    language = decoder.base.blocks[0].name.rsplit(".", 1)[0]
    others = [name for name in block_stacks(gm) if name != language]
    if len(others) != 1:
        raise UnsupportedModelError(f"pruning before the language model needs one vision tower in the prefill "
                                    f"graph, found {len(others)} other stacks of blocks",
                                    "export the VLM with its vision tower (pixel inputs)")
    return analyse(gm, others[0])


def rewrite_before_language_model(gm: GraphModule, decoder: DecoderAnalysis, method: VisionMethod, removed: int,
                                  images_per_sample: int, positions: str = "keep") -> GraphModule:
    """Prune ``removed`` image tokens where the language model's first block reads its input; with
    ``positions="renumber"`` the kept tokens take positions 0..n-1 (the prompt is simply shorter)."""
    from .prefill import _renumber_positions, _shift_cached_keys, _unshiftable

    first = decoder.base.blocks[0]
    entry = Block(0, f"{first.name}.entry", first.attention, block_input(first, decoder.tokens), [])
    vision = vision_analysis(gm, decoder)
    feeding = ancestors(entry.site)  # vision layers after the one the features come from do not count
    method.vision = dataclasses.replace(vision, blocks=[b for b in vision.blocks if b.site in feeding])
    method.input_ids = decoder.input_ids
    method.vision_images = images_per_sample
    method.prepare(gm, entry.site, removed)
    analysis = dataclasses.replace(decoder.base, blocks=[entry])
    ctx = RewriteContext(analysis, method, [removed], proportional_attention=False)
    gm = run_passes(gm, ctx, REDUCTION_PASSES[:-1])
    if positions == "renumber":
        _renumber_positions(gm, decoder, ctx.sites)
        # padded prompts decode from each prompt's own length: its keys are rotated to continue from it
        if decoder.base.mask_input is not None and not _shift_cached_keys(gm, decoder, [removed] * decoder.layers):
            raise _unshiftable()
    return run_passes(gm, ctx, REDUCTION_PASSES[-1:])


def compile_before_language_model(model: torch.nn.Module, input_ids: torch.Tensor, *, budget: float | None,
                                  keep: float | None, span: Span, positions: str, method: str, layers: int | None,
                                  extra_inputs: dict | None, started: float, options: dict | None = None):
    """``compile_decoder`` for the methods that prune before the language model (``layers``: vision
    layers whose [CLS] attention is summed, vtc-cls only). ``budget``: prefill FLOPs ratio, vision tower
    included; the fewest image tokens removed that meet it (counted on the rewritten programs).
    ``options``: the method's own (visionzip: ``contextual``), values or CLI strings. An
    ``attention_mask`` among ``extra_inputs`` (left-padded prompts): each prompt removes the image
    tokens it removes alone, and its padding stays, masked."""
    from .prefill import (
        DecoderProgram,
        batched_example,
        export_with_batch_axis,
        mask_index,
        span_token_count,
        trace_prefill,
    )

    # budget / keep ranges and the position policy are checked by compile_decoder
    if isinstance(keep, (tuple, list)):
        raise TokenCompileError(f"{method} has one stage: keep={keep} gives several", "give one keep ratio")
    kind = VISION_METHODS[method]
    options = Method.parse_options(kind, options or {}, exclude=kind.state)
    if layers is not None and "layers" not in {field.name for field in dataclasses.fields(kind)}:
        raise TokenCompileError(f"{method} reads the vision layer the image features come from: layer={layers!r} "
                                "has no meaning", "give no layer")
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool)):
        raise TokenCompileError(f"{method}: layer={layers!r} is not a number of vision layers",
                                "give layer=N, the last N vision layers whose [CLS] attention is summed")
    if span.token_id is None:
        raise TokenCompileError(f"{method} prunes image tokens: it needs the image placeholder id",
                                "give span=Span(token_id=IMAGE_TOKEN_ID) (--image-token-id)")
    pruner = kind(span=span, **options, **({} if layers is None else {"layers": layers}))
    traced = trace_prefill(model, input_ids, extra_inputs)
    ep, extra, inputs, analysis = traced.program, traced.extra, traced.inputs, traced.analysis
    per_sample = (input_ids == span.token_id).sum(1)
    if len(set(per_sample.tolist())) != 1 or int(per_sample[0]) == 0:
        raise TokenCompileError(f"the samples hold {sorted(set(per_sample.tolist()))} image tokens",
                                "every prompt of a batch needs the same, non-zero number of image tokens")
    images = int(per_sample[0])
    original_flops = traced.flops

    def rewrite(removed: int) -> GraphModule:
        gm = ep.module()
        if removed:
            analysis = analyse_decoder(gm, input_ids, extra, mask_index(traced.extra_inputs))
            gm = rewrite_before_language_model(gm, analysis, pruner, removed, images, positions)
        return eliminate_dead_positions(gm)

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
    program = rebuild_program(ep, gm, lambda module: export_with_batch_axis(module, inputs))
    tokens = analysis.tokens - removed
    report = {
        "method": method, "budget": budget, "layer": 0 if removed else None, "stages": [], "positions": positions,
        **pruner.report(images - removed), "image_tokens": images, "span_tokens_removable": images,
        **span_token_count(span, input_ids),
        "span_tokens_kept": images - removed, "keep_ratio": (images - removed) / images,
        "prompt_tokens": analysis.tokens, "tokens_per_layer": [tokens] * analysis.layers,
        "flops_original": original_flops, "flops_prefill": flops, "flops_ratio": flops / original_flops,
        "analysis": analysis.summary(), "seconds": round(time.perf_counter() - started, 2),
    }
    return DecoderProgram(program, traced.lm, analysis.tokens, 0 if removed else None, positions, report,
                          [tokens] * analysis.layers, [(0, images - removed)] if removed else [],
                          tuple(traced.extra_inputs), batched_example(inputs))


VISION_METHODS = {"vtc-cls": VtcCls, "visionzip": VisionZipVLM}

__all__ = ["VISION_METHODS", "VisionMethod", "VisionZipVLM", "VtcCls", "block_input", "block_output",
           "compile_before_language_model", "rewrite_before_language_model",
           "vision_analysis"]
