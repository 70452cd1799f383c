"""optimize(): analyse, schedule, rewrite and rebuild a program."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.export import Dim, ExportedProgram

from .analysis import ModelAnalysis, analyse
from .attention import find_attention
from .calibrate import calibrate
from .errors import TokenCompileError
from .flops import CostModel, build_cost_model, count_flops
from .methods import Method, get_method
from .passes import REDUCTION_PASSES, RewriteContext, run_passes
from .rebuild import rebuild_program
from .schedule import (
    Protected,
    capped,
    capped_blocks,
    check_explicit,
    check_r_list,
    expand_explicit,
    parse_schedule,
    schedule_for_budget,
)
from .signature import FixedBatch, static_batch


@dataclass
class OptimizeResult:
    program: ExportedProgram
    report: dict = field(default_factory=dict)


def dynamic_shapes_of(ep: ExportedProgram) -> tuple:
    """Per user input, the dims the program keeps symbolic (re-exports keep the same ones dynamic)."""
    specs = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.user_inputs:
            value = node.meta.get("val")
            shape = getattr(value, "shape", ())
            specs.append({d: Dim.AUTO for d, size in enumerate(shape) if isinstance(size, torch.SymInt)} or None)
    return tuple(specs)


def example_inputs_of(ep: ExportedProgram, given: tuple | None) -> tuple:
    if given is not None:
        return tuple(given)
    stored = getattr(ep, "example_inputs", None)
    if stored:
        args, kwargs = stored
        if not kwargs:
            return tuple(args)
    raise TokenCompileError("the program carries no example inputs",
                            "pass example inputs (Python) or --input-shape (CLI)")


def _retrace_inputs(inputs: tuple, dynamic: tuple) -> tuple:
    """torch.export specialises a dynamic size seen as 1; give it batch 2 instead."""
    result = []
    for x, spec in zip(inputs, dynamic):
        if isinstance(x, torch.Tensor) and spec and 0 in spec and x.shape[0] == 1:
            x = torch.cat([x, x])
        result.append(x)
    return tuple(result)


def _export(module: torch.nn.Module, inputs: tuple, dynamic: tuple) -> ExportedProgram:
    with torch.no_grad():
        return torch.export.export(module, _retrace_inputs(inputs, dynamic), dynamic_shapes=dynamic)


def export_module(module: torch.nn.Module, example_inputs: tuple, dynamic_batch: bool = True) -> ExportedProgram:
    """Export with the batch axis of every tensor input symbolic."""
    dynamic = tuple({0: Dim.AUTO} if isinstance(x, torch.Tensor) and dynamic_batch else None for x in example_inputs)
    return _export(module, example_inputs, dynamic)


def attention_token_counts(module: torch.fx.GraphModule) -> list[int]:
    """Query length of every attention in graph order: the tokens each block actually processes."""
    return [attention.tokens for attention in find_attention(module)]


def _output_shapes(ep: ExportedProgram) -> list:
    output = next(node for node in ep.graph.nodes if node.op == "output")
    return [tuple(arg.meta["val"].shape) if hasattr(arg, "meta") and hasattr(arg.meta.get("val"), "shape") else None
            for arg in output.args[0]]


def _check_outputs_keep_shape(original: ExportedProgram, optimized: ExportedProgram) -> None:
    """A drop-in replacement must return what the original returns: per-token outputs would shrink."""
    for index, (before, after) in enumerate(zip(_output_shapes(original), _output_shapes(optimized))):
        if before != after:
            raise TokenCompileError(
                f"output {index} of the model is per-token ({before} would become {after})",
                "return pooled outputs (e.g. the [CLS] state or a mean); un-merging dense outputs is not supported yet")


def resolve_schedule(cost: CostModel, analysis: ModelAnalysis, method: Method, budget: float | None,
                     schedule) -> list[int]:
    blocks = len(analysis.blocks)
    protected = Protected(analysis.num_prefix, analysis.protect_last_valid)
    kind = parse_schedule(schedule) if isinstance(schedule, str) or schedule is None else check_r_list(schedule)
    if isinstance(kind, list):
        values = expand_explicit(kind, blocks)
        if len(kind) == 1:  # a constant r=K is capped per block, as ToMe does
            return capped(values, analysis.tokens, protected, method)
        check_explicit(values, analysis.tokens, protected, method)
        return values
    if kind == "auto":
        raise TokenCompileError("--schedule auto needs calibration data", "pass --calib DATA (calib_inputs=...)")
    if budget is None:
        raise TokenCompileError("no budget and no explicit schedule given", "pass --budget B or --schedule r=...")
    return schedule_for_budget(cost, budget, kind, protected, method)


def _constant_r(schedule, blocks: int) -> list[int] | None:
    """The per-block request of a constant ``r=K`` schedule (capped per block, so reported), else None."""
    kind = parse_schedule(schedule) if isinstance(schedule, str) else schedule
    return kind * blocks if isinstance(kind, list) and len(kind) == 1 else None


def check_budget(budget: float | None) -> None:
    if budget is not None and not 0 < budget <= 1:
        raise TokenCompileError(f"budget {budget:g} is out of range",
                                "give 0 < budget <= 1: the fraction of the original FLOPs to keep")


def optimize(model: ExportedProgram | torch.nn.Module, example_inputs: tuple | None = None, *,
             budget: float | None = None, method: str = "tome", schedule=None,
             options: dict[str, str] | None = None, proportional_attention: bool = True,
             calib_inputs: list[tuple] | None = None, progress=None) -> OptimizeResult:
    """Rewrite a transformer so it processes fewer tokens; returns the new ExportedProgram and a report.

    ``schedule``: None / "constant" / "decreasing" (derived from ``budget``), "auto" (calibrated on
    ``calib_inputs``, a list of input batches; see tokencompile.calibrate), or a list of tokens removed
    per block (ToMe's r-list). The FLOPs ratio is counted on the final program."""
    check_budget(budget)
    started = time.perf_counter()
    if isinstance(model, ExportedProgram):
        ep = model
        inputs = example_inputs_of(ep, example_inputs)
    else:
        if example_inputs is None:
            raise TokenCompileError("an nn.Module needs example inputs to be traced", "pass example_inputs")
        inputs = tuple(example_inputs)
        ep = export_module(model, inputs)
    reducer = get_method(method, options)
    dynamic = dynamic_shapes_of(ep)

    original = ep.module()
    analysis = analyse(original)
    cost = build_cost_model(original, analysis, inputs)
    batch = next(x.shape[0] for x in inputs if isinstance(x, torch.Tensor))
    original_flops = cost.original * batch  # the per-node counts the model is built from, summed
    protected = Protected(analysis.num_prefix, analysis.protect_last_valid)

    def rewrite(plan: list[int]):
        gm = ep.module()
        return run_passes(gm, RewriteContext(analyse(gm), reducer, plan, proportional_attention), REDUCTION_PASSES)

    calibration = None
    if schedule == "auto" and calib_inputs:
        fixed = static_batch(ep)  # a fixed-batch program runs the calibration set in chunks of its batch
        runnable = (lambda module: FixedBatch(module, fixed)) if fixed else (lambda module: module)
        calibration = calibrate(cost, budget, reducer, protected, lambda plan: runnable(rewrite(plan)),
                                runnable(original), list(calib_inputs), progress)
        plan = calibration.schedule
    else:
        plan = resolve_schedule(cost, analysis, reducer, budget, schedule)
    derived = not isinstance(schedule, list) and (schedule is None or not str(schedule).startswith("r="))
    requested = _constant_r(schedule, len(analysis.blocks))

    for _ in range(8):
        new_ep = rebuild_program(ep, rewrite(plan), lambda gm: _export(gm, inputs, dynamic))
        flops = count_flops(new_ep.module(), inputs)
        ratio = flops / original_flops
        if budget is None or ratio <= budget + 1e-9:
            break
        if not derived:
            raise TokenCompileError(f"schedule r={','.join(map(str, plan))} gives a FLOPs ratio of {ratio:.3f}, "
                                    f"above the budget {budget:g}", "remove --schedule or raise the budget")
        # The cost model was optimistic: remove one more token in the earliest block that can still take one.
        bumped = list(plan)
        for index in range(len(bumped)):
            trial = capped([r + (1 if i <= index else 0) for i, r in enumerate(bumped)], analysis.tokens,
                           protected, reducer)
            if trial != bumped:
                bumped = trial
                break
        else:
            raise TokenCompileError(f"budget {budget:g} cannot be met: the best reachable FLOPs ratio is {ratio:.3f}",
                                    f"use --budget {ratio + 0.005:.2f} or more")
        plan = bumped
    else:
        raise TokenCompileError(f"budget {budget:g} was not met after 8 schedules (last FLOPs ratio {ratio:.3f})",
                                "give an explicit --schedule or a larger budget")

    _check_outputs_keep_shape(ep, new_ep)
    tokens = cost.tokens_per_block(plan)
    report = {
        "method": reducer.name,
        "options": {k: v for k, v in vars(reducer).items()},
        "budget": budget,
        "schedule": plan,
        "capped_blocks": capped_blocks(requested, plan) if requested else [],
        "tokens_entering_block": tokens,
        "tokens_after_reduction": [n - r for n, r in zip(tokens, plan)],
        "attention_tokens": attention_token_counts(new_ep.module()),
        "proportional_attention": proportional_attention and reducer.merges,
        "flops_original": original_flops,
        "flops_optimized": flops,
        "flops_ratio": flops / original_flops,
        "flops_ratio_modelled": cost.flops(plan, reducer) / cost.original,
        "example_batch": int(batch),
        "analysis": analysis.summary(),
        "calibration": None if calibration is None else {
            **calibration.summary(),
            # the FLOPs count of the final program added tokens where the cost model was optimistic
            "adjusted_by_flops_count": plan != calibration.schedule},
        "seconds": round(time.perf_counter() - started, 2),
    }
    return OptimizeResult(new_ep, report)
