"""What a program takes: per user input its shape (fixed sizes, or None where symbolic), dtype and, for a
symbolic batch, the range of batch sizes it accepts. Programs exported the default way fix the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import ExportedProgram

from .errors import TokenCompileError


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | None, ...]  # None: symbolic
    dtype: torch.dtype
    batch_range: tuple[int, int | None]  # (low, high or None for unbounded); (B, B) for a static batch B


def _range(program: ExportedProgram, size) -> tuple[int, int | None]:
    bounds = program.range_constraints.get(size.node.expr)
    if bounds is None:
        return 0, None
    try:
        upper = int(bounds.upper)
    except (TypeError, ValueError, AttributeError, OverflowError):  # unbounded (sympy's infinity)
        upper = None
    # torch.export gives a free batch the lower bound 2 (it specialises sizes 0 and 1), yet runs batch 1
    return (1 if int(bounds.lower) == 2 else int(bounds.lower)), upper


def input_specs(program: ExportedProgram) -> list[InputSpec]:
    """One InputSpec per user input tensor, in call order."""
    specs = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in program.graph_signature.user_inputs:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        shape = tuple(size if isinstance(size, int) else None for size in value.shape)
        if not shape:
            batch_range = (0, None)
        elif shape[0] is None:
            batch_range = _range(program, value.shape[0])
        else:
            batch_range = (shape[0], shape[0])
        specs.append(InputSpec(node.name, shape, value.dtype, batch_range))
    return specs


def static_batch(program) -> int | None:
    """The batch size the program was exported with if it is fixed, else None (symbolic, or not a program)."""
    if not isinstance(program, ExportedProgram):
        return None
    specs = input_specs(program)
    return specs[0].shape[0] if specs and specs[0].shape else None


def batch_range(program: ExportedProgram) -> tuple[int, int | None]:
    specs = input_specs(program)
    return specs[0].batch_range if specs else (0, None)


def describe(program: ExportedProgram) -> str:
    """e.g. 'x: 2,3,224,224' or 'input_ids: B,64 (B in 1..any); attention_mask: B,64'."""
    parts = []
    for spec in input_specs(program):
        text = ",".join("B" if size is None else str(size) for size in spec.shape)
        if spec.shape and spec.shape[0] is None and not parts:
            low, high = spec.batch_range
            text += f" (B in {low}..{high if high is not None else 'any'})"
        parts.append(f"{spec.name}: {text}")
    return "; ".join(parts)


def verify_batches(program: ExportedProgram) -> list[int]:
    """Batches to verify a lowering at: the fixed batch, or 1 and 8 (inside the range) when it is symbolic."""
    fixed = static_batch(program)
    if fixed is not None:
        return [fixed]
    low, high = batch_range(program)
    low = max(low, 1)
    return sorted({min(max(size, low), high or max(size, low)) for size in (1, 8)})


def check_same_inputs(first: ExportedProgram, second: ExportedProgram, first_name: str, second_name: str) -> None:
    """Two programs compared on one set of inputs must take the same inputs (sizes fixed in both must agree)."""
    a, b = input_specs(first), input_specs(second)
    same = len(a) == len(b) and all(
        x.dtype == y.dtype and len(x.shape) == len(y.shape)
        and all(p is None or q is None or p == q for p, q in zip(x.shape[1:], y.shape[1:]))
        for x, y in zip(a, b))
    if not same:
        raise TokenCompileError(f"{first_name} and {second_name} take different inputs ({describe(first)} vs "
                                f"{describe(second)})", "compare a program with its own optimized version")


def fixed_batch_of(*programs) -> int | None:
    """The one fixed batch among programs (None if all are symbolic); an error if two fix different ones."""
    fixed = {batch for batch in (static_batch(program) for program in programs) if batch is not None}
    if len(fixed) > 1:
        raise TokenCompileError(f"the programs are exported for different fixed batches ({sorted(fixed)})",
                                "export both with the same batch, or re-export with optimize --dynamic-batch")
    return fixed.pop() if fixed else None


def pad_to_batch(inputs: tuple, batch: int) -> tuple:
    """Inputs of fewer than ``batch`` samples filled up by repeating the last sample."""
    size = int(inputs[0].shape[0])
    if size >= batch:
        return inputs
    return tuple(torch.cat([x, x[-1:].expand(batch - size, *x.shape[1:])]) for x in inputs)


class FixedBatch:
    """Calls ``module`` on chunks of exactly ``batch`` samples (the last one padded) and returns the first
    output of every real sample: how inputs of any size run through a program with a fixed batch."""

    def __init__(self, module, batch: int):
        self.module, self.batch = module, batch

    def __call__(self, *inputs):
        from .calibrate import first_output

        total, outputs = int(inputs[0].shape[0]), []
        for start in range(0, total, self.batch):
            chunk = tuple(x[start:start + self.batch] for x in inputs)
            size = int(chunk[0].shape[0])
            outputs.append(first_output(self.module(*pad_to_batch(chunk, self.batch)))[:size])
        return torch.cat(outputs)

