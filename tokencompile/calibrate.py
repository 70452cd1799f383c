"""`--schedule auto`: choose the tokens removed per block from a small calibration set.

Training-free and deterministic. (1) Sensitivity: remove a probe amount of tokens in one block at a
time and measure how far the output moves from the original's (1 - cosine). (2) Allocation: model
each block's loss as growing with the square of the tokens it removes, scaled to the probe, and add
tokens greedily where the modelled loss per FLOP saved is smallest until the cost model meets the
budget. (3) The allocated schedule competes with the constant and decreasing schedules of the same
budget on the calibration set; the most faithful one wins, so `auto` never does worse there than the
fixed shapes. Every candidate and its score go into the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import TokenCompileError
from .flops import CostModel
from .schedule import capped, schedule_for_budget

PROBE_FRACTION = 0.25  # of the tokens, removed in one block to measure its sensitivity


@dataclass
class Calibration:
    schedule: list[int]
    chosen: str
    sensitivity: list[float]
    candidates: dict[str, dict] = field(default_factory=dict)
    samples: int = 0

    def summary(self) -> dict:
        return {"chosen": self.chosen, "samples": self.samples, "sensitivity": self.sensitivity,
                "candidates": self.candidates}


def first_output(out) -> torch.Tensor:
    """The output compared with the original's (models such as ClsPooled return several tensors)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def run_batches(module: Callable, batches: list[tuple]) -> torch.Tensor:
    return torch.cat([first_output(module(*batch)).flatten(1).float() for batch in batches])


def fidelity(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity to the original's outputs (1.0 = unchanged)."""
    if outputs.shape != reference.shape:
        raise TokenCompileError(f"the model's first output changes shape with fewer tokens ({tuple(reference.shape)} "
                                f"-> {tuple(outputs.shape)}): it is per-token",
                                "export a model that pools its output (e.g. [CLS] or mean pooling)")
    return float(torch.nn.functional.cosine_similarity(outputs, reference, dim=1).mean())


def allocate(cost: CostModel, budget: float, sensitivity: list[float], probe: list[int], protected: int,
             method) -> list[int]:
    """Greedy allocation under the modelled FLOPs: loss_i(r) = sensitivity_i * (r / probe_i)^2."""
    blocks, n = len(cost.blocks), cost.tokens
    step = max(1, n // 32)
    target = budget * cost.original
    schedule = [0] * blocks

    def loss(i, r):
        return sensitivity[i] * (r / probe[i]) ** 2 if probe[i] else math.inf

    while cost.flops(schedule, method) > target:
        best, best_value = None, math.inf
        current = cost.flops(schedule, method)
        for i in range(blocks):
            trial = capped([r + (step if j == i else 0) for j, r in enumerate(schedule)], n, protected, method)
            saved = current - cost.flops(trial, method)
            if trial == schedule or saved <= 0:
                continue
            value = (loss(i, trial[i]) - loss(i, schedule[i]) + 1e-12) / saved
            if value < best_value:
                best, best_value = trial, value
        if best is None:
            ratio = current / cost.original
            raise TokenCompileError(f"budget {budget:g} cannot be met by the calibrated schedule "
                                    f"(best reachable FLOPs ratio {ratio:.3f})", f"use --budget {ratio + 0.005:.2f}")
        schedule = best
    return schedule


def calibrate(cost: CostModel, budget: float, method, protected: int, rewrite: Callable[[list[int]], Callable],
              original: Callable, batches: list[tuple], progress: Callable[[str], None] | None = None) -> Calibration:
    """``rewrite(schedule)`` returns a runnable optimized module; ``batches`` are calibration inputs."""
    if budget is None:
        raise TokenCompileError("--schedule auto needs a budget", "pass --budget B")
    if not batches:
        raise TokenCompileError("--schedule auto needs calibration data", "pass --calib DATA (or calib_inputs=...)")
    say = progress or (lambda message: None)
    reference = run_batches(original, batches)
    blocks, n = len(cost.blocks), cost.tokens
    probe_r = max(1, round(PROBE_FRACTION * n))
    sensitivity, probe = [], []
    for i in range(blocks):
        trial = capped([probe_r if j == i else 0 for j in range(blocks)], n, protected, method)
        probe.append(trial[i])
        if trial[i] == 0:
            sensitivity.append(math.inf)
            continue
        sensitivity.append(max(0.0, 1.0 - fidelity(run_batches(rewrite(trial), batches), reference)))
        say(f"sensitivity of block {i}: removing {trial[i]} tokens costs {sensitivity[-1]:.5f} cosine")

    candidates = {"allocated": allocate(cost, budget, sensitivity, probe, protected, method)}
    for kind in ("constant", "decreasing"):
        try:
            candidates[kind] = schedule_for_budget(cost, budget, kind, protected, method)
        except TokenCompileError:
            continue
    scored = {}
    for name, schedule in candidates.items():
        score = fidelity(run_batches(rewrite(schedule), batches), reference)
        scored[name] = {"schedule": schedule, "fidelity": score,
                        "flops_ratio_modelled": cost.flops(schedule, method) / cost.original}
        say(f"candidate {name} r={','.join(map(str, schedule))}: cosine to original {score:.5f}")
    # ties go to the allocated schedule, then constant (dict order)
    chosen = max(scored, key=lambda name: scored[name]["fidelity"])
    return Calibration(scored[chosen]["schedule"], chosen, sensitivity, scored,
                       samples=sum(batch[0].shape[0] for batch in batches))
