"""Run an original and an optimized program on the same data and measure how closely they agree."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.export import ExportedProgram

from ..calibrate import first_output
from ..errors import TokenCompileError
from ..signature import pad_to_batch, static_batch
from . import metrics
from .data import EvalData

TASKS = ("sts", "embed", "classify")
# the metric a sweep plots for each task (sts falls back to cosine when there are no gold scores)
PRIMARY = {"sts": "spearman_optimized", "embed": "cosine_to_original", "classify": "top1_agreement"}

Progress = Callable[[str], None] | None


def check_task(task: str, data: EvalData) -> None:
    if task not in TASKS:
        raise TokenCompileError(f"unknown task {task!r}", f"choose one of: {', '.join(TASKS)}")
    if task == "sts" and data.kind != "pairs":
        raise TokenCompileError(f"--task sts needs sentence pairs, got {data.kind}",
                                "give a .tsv of pairs, or use --task embed for single texts")
    if len(data) == 0:
        raise TokenCompileError("no samples to evaluate", "check --data and --limit")


def _callable(program):
    return program.module() if isinstance(program, ExportedProgram) else program


@torch.no_grad()
def run_model(program, inputs: tuple[torch.Tensor, ...], batch: int = 32, progress: Progress = None,
              label: str = "model") -> torch.Tensor:
    """The model's (first) output for every sample, computed in batches of ``batch``.

    The last batch is padded to full size by repeating its last sample (a fixed-batch program accepts
    nothing else, and it keeps every call at one shape)."""
    batch = static_batch(program) or batch
    module = _callable(program)
    total = int(inputs[0].shape[0])
    outputs = []
    for start in range(0, total, batch):
        chunk = tuple(x[start:start + batch] for x in inputs)
        size = int(chunk[0].shape[0])
        outputs.append(first_output(module(*pad_to_batch(chunk, batch)))[:size].float())
        if progress:
            progress(f"{label}: {min(start + batch, total)}/{total} samples")
    result = torch.cat(outputs)
    if not torch.isfinite(result).all():
        raise TokenCompileError(f"the {label}'s outputs contain NaN or Inf on this data",
                                "check the data and its preprocessing (--mean / --std)")
    return result


def check_finite(result: dict, what: str = "") -> None:
    """Every metric must be a number: a NaN metric is an error with its likely reason, never a result."""
    for name, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            reason = {"spearman_original": "the gold scores or the similarities are constant",
                      "spearman_optimized": "the gold scores or the similarities are constant"}.get(
                name, "the outputs are degenerate")
            raise TokenCompileError(f"{what}{name} is {value} ({reason})", "check the data and the models")


def _halves(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = outputs.shape[0] // 2
    return outputs[:pairs], outputs[pairs:]


def reference_metrics(outputs: torch.Tensor, data: EvalData, task: str) -> dict:
    """What can be measured on the original alone: accuracy, STS Spearman."""
    result: dict = {}
    # labels beyond the model's classes mean the model was not trained on ImageNet-1k's label set
    labelled = data.labels is not None and bool((data.labels >= 0).any())
    if task == "classify" and labelled and outputs.dim() == 2 and outputs.shape[-1] > int(data.labels.max()):
        result["accuracy_original"] = metrics.accuracy(outputs, data.labels)
        result["accuracy5_original"] = metrics.accuracy(outputs, data.labels, k=5)
    if task == "sts" and data.gold is not None:
        result["spearman_original"] = metrics.sts_spearman(*_halves(outputs), data.gold)
    return result


def fidelity(reference: torch.Tensor, outputs: torch.Tensor, data: EvalData, task: str) -> dict:
    """Metrics of the optimized outputs against the original's (and against labels / gold scores)."""
    if reference.shape != outputs.shape:
        raise TokenCompileError(f"the models' outputs differ in shape ({tuple(reference.shape)} vs "
                                f"{tuple(outputs.shape)})", "compare a program with its own optimized version")
    result: dict = {"samples": len(data)}
    if data.kind == "pairs":
        result["pairs"] = len(data) // 2
    if task == "classify":
        if reference.dim() != 2:
            raise TokenCompileError(f"--task classify needs (batch, classes) logits, the model returns "
                                    f"{tuple(reference.shape)}", "use --task embed for embedding models")
        result["top1_agreement"] = metrics.top1_agreement(reference, outputs)
        result["top5_agreement"] = metrics.top5_agreement(reference, outputs)
        result["kl_divergence"] = metrics.kl_divergence(reference, outputs)
        if "accuracy_original" in reference_metrics(reference, data, task):
            result["accuracy_optimized"] = metrics.accuracy(outputs, data.labels)
            result["accuracy5_optimized"] = metrics.accuracy(outputs, data.labels, k=5)
    else:
        result["cosine_to_original"] = metrics.cosine_to_original(reference, outputs)
        if task == "sts" and data.gold is not None:
            result["spearman_optimized"] = metrics.sts_spearman(*_halves(outputs), data.gold)
    return result


def primary_metric(task: str, result: dict) -> str:
    """The name of the headline fidelity metric present in ``result``."""
    name = PRIMARY[task]
    return name if name in result else "cosine_to_original"


def evaluate(original_program, optimized_program, data: EvalData, task: str, batch: int = 32,
             progress: Progress = None) -> dict:
    """Fidelity of ``optimized_program`` to ``original_program`` on ``data`` for ``task`` (sts, embed, classify).

    Programs can be ExportedPrograms or callables. Returns a flat dict of metrics."""
    check_task(task, data)
    reference = run_model(original_program, data.inputs, batch, progress, "original")
    outputs = run_model(optimized_program, data.inputs, batch, progress, "optimized")
    result = {"task": task, **fidelity(reference, outputs, data, task), **reference_metrics(reference, data, task)}
    if data.truncated:
        result["truncated_texts"] = data.truncated
    check_finite(result)
    return result


def format_metrics(result: dict) -> str:
    """A two-column table of a result dict."""
    rows = []
    for key, value in result.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        rows.append(f"{key:<22} {shown:>10}")
    return "\n".join(rows)
