"""Re-export a program with a fixed batch so that its batch is symbolic (`optimize --dynamic-batch`).

torch.export records sizes computed from the batch as literals (``reshape(x, [2, 197, 384])``). Each
literal that is the batch (or the batch times the sizes after it, ``[2 * 197, 384]``) in the leading
position of a size argument becomes ``sym_size(input, 0)`` (times that factor); the module is then
exported with a symbolic batch and checked against the original at its batch and at another one.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.export import Dim, ExportedProgram

from .errors import TokenCompileError
from .signature import FixedBatch, static_batch

aten = torch.ops.aten
# ops whose size list is argument 1 (the tensor viewed or expanded is argument 0)
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
# ops creating a tensor from a size list given as argument 0 (new_*: argument 1)
FACTORIES = {aten.zeros.default: 0, aten.ones.default: 0, aten.empty.memory_format: 0, aten.full.default: 0,
             aten.new_zeros.default: 1, aten.new_ones.default: 1, aten.new_empty.default: 1,
             aten.new_full.default: 1}


def _batch_factor(size: int, batch: int, source_shape) -> int | None:
    """k when ``size`` is batch * k with k the product of the sizes after the source's batch axis, else None."""
    if size == batch:
        return 1
    if source_shape is None or not source_shape or source_shape[0] != batch:
        return None
    for end in range(2, len(source_shape) + 1):
        k = math.prod(source_shape[1:end])
        if size == batch * k:
            return k
    return None


def symbolic_batch_sizes(gm: torch.fx.GraphModule, batch: int) -> int:
    """Replace batch-derived leading literals of size arguments by nodes of the first input's batch size;
    returns how many were replaced."""
    graph = gm.graph
    first = next(node for node in graph.nodes if node.op == "placeholder")
    replaced = 0
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":  # checks the input shapes, batch included
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        if node.target == aten.arange.default and node.args[0] == batch:  # arange(batch): masks built per sample
            with graph.inserting_before(node):
                node.args = (graph.call_function(aten.sym_size.int, (first, 0)), *node.args[1:])
            replaced += 1
            continue
        if node.target in RESHAPES:
            index, source = 1, node.args[0].meta.get("val")
        elif node.target in FACTORIES:
            index, source = FACTORIES[node.target], None
        else:
            continue
        sizes = list(node.args[index]) if len(node.args) > index else []
        if not sizes or not isinstance(sizes[0], int):
            continue
        factor = _batch_factor(sizes[0], batch, tuple(source.shape) if source is not None else None)
        if factor is None:
            continue
        with graph.inserting_before(node):
            size = graph.call_function(aten.sym_size.int, (first, 0))
            if factor != 1:
                size = graph.call_function(operator.mul, (size, factor))
        sizes[0] = size
        node.args = (*node.args[:index], sizes, *node.args[index + 1:])
        replaced += 1
    graph.lint()
    gm.recompile()
    return replaced


def _agrees(new: ExportedProgram, original: ExportedProgram, inputs: tuple, batch: int) -> bool:
    from .bench import batch_inputs

    fixed = FixedBatch(original.module(), batch)
    with torch.no_grad():
        for size in (batch, batch + 1):
            sample = batch_inputs(inputs, size)
            if not torch.allclose(FixedBatch(new.module(), size)(*sample), fixed(*sample), atol=1e-5, rtol=1e-4):
                return False
    return True


def make_batch_dynamic(program: ExportedProgram, inputs: tuple, source: str = "the program") -> ExportedProgram:
    """``program`` (fixed batch) exported again with a symbolic batch axis on every input, checked to give the
    same outputs at its batch and at batch + 1; a clear error when the graph does not allow it."""
    batch = static_batch(program)
    if batch is None:
        return program
    if batch < 2:
        raise TokenCompileError(f"cannot make the batch of {source} symbolic: it was exported at batch 1 "
                                "(torch.export treats size 1 as a constant)", "export the model at batch 2 or more")
    gm = program.module()
    symbolic_batch_sizes(gm, batch)
    dynamic = tuple({0: Dim("batch")} if isinstance(x, torch.Tensor) else None for x in inputs)
    try:
        with torch.no_grad():
            new = torch.export.export(gm, tuple(inputs), dynamic_shapes=dynamic)
    except Exception as error:  # noqa: BLE001 - torch reports a fixed batch in several ways
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TokenCompileError(f"cannot make the batch of {source} symbolic: its graph fixes the batch in a "
                                f"way tokencompile cannot undo ({reason[:120]})",
                                "export the model itself with dynamic_shapes={0: Dim('batch')} on its inputs") \
            from None
    if not _agrees(new, program, inputs, batch):
        raise TokenCompileError(f"cannot make the batch of {source} symbolic: the re-exported program disagrees "
                                f"with it at batch {batch + 1}",
                                "export the model itself with dynamic_shapes={0: Dim('batch')} on its inputs")
    return new
