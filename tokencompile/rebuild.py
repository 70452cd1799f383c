"""An ExportedProgram from a rewritten copy of a program's own module, without tracing it again.

The passes rewrite ``program.module()`` (parameters as ``get_attr``, user inputs as placeholders) and
keep every node's fake value current. Exporting that module again would trace every op once more with a
symbolic batch, and each block's new token count misses FakeTensor's cache: ViT-S at budget 0.5 optimizes
in 10.6 s that way, 2.6 s rebuilt (``benchmarks/compile_time.py``). Lifting the module back takes
milliseconds: the weights, constants, shape constraints and call signature are the original program's;
parameters, buffers and constants become placeholders again, named as the original signature names them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ConstantArgument,
    ExportGraphSignature,
    InputKind,
    OutputKind,
    OutputSpec,
    SymBoolArgument,
    SymFloatArgument,
    SymIntArgument,
    TensorArgument,
)
from torch.fx import Graph, GraphModule, Node

from .errors import TokenCompileError

_ARGUMENTS = {torch.Tensor: TensorArgument, torch.SymInt: SymIntArgument, torch.SymFloat: SymFloatArgument,
              torch.SymBool: SymBoolArgument}


def _output_spec(value) -> OutputSpec | None:
    """The user-output spec of an output value; None for a node whose value has no argument kind here."""
    if not isinstance(value, Node):
        return OutputSpec(OutputKind.USER_OUTPUT, ConstantArgument(name="", value=value), None)
    kind = next((argument for cls, argument in _ARGUMENTS.items() if isinstance(value.meta.get("val"), cls)), None)
    return None if kind is None else OutputSpec(OutputKind.USER_OUTPUT, kind(name=value.name), None)


def _input_sizes_constrained(original: ExportedProgram) -> bool:
    """Whether the shape env the rewrite computed its fake values in now holds more about the program's
    input sizes than the program's constraints: a size fixed (a replacement) or a range narrowed. A
    kernel's guard on a size does this (a shape env of a loaded ``.pt2`` has no guard sources, so the
    printed guards do not show it)."""
    fake_mode = detect_fake_mode([node.meta.get("val") for node in original.graph.nodes if node.op == "placeholder"])
    if fake_mode is None or fake_mode.shape_env is None:
        return False
    shape_env = fake_mode.shape_env
    for symbol, bounds in original.range_constraints.items():
        now = shape_env.var_to_range.get(symbol, bounds)
        # export reports a lower bound of 1 where tracing assumed 2 (it specialises sizes 0 and 1)
        if shape_env.replacements.get(symbol, symbol) != symbol or now.lower > max(bounds.lower, 2) or \
                now.upper < bounds.upper:
            return True
    return False


def rebuild_program(original: ExportedProgram, module: GraphModule,
                    retrace: Callable[[GraphModule], ExportedProgram]) -> ExportedProgram:
    """The program of ``module``, a rewritten ``original.module()`` with the same inputs and as many
    outputs. ``retrace(module)`` exports it again where lifting back cannot be trusted: a program not in
    torch.export's training IR (after ``run_decompositions``: its verifier rejects inserted ops, and
    unlifting turned its mutation outputs into ``copy_`` nodes), or one whose fake values were computed
    under a new constraint on its input sizes."""
    signature = original.graph_signature
    mutates = any(spec.kind != OutputKind.USER_OUTPUT for spec in signature.output_specs)
    if original.dialect != "TRAINING" or mutates or _input_sizes_constrained(original):
        # (an op's kernel guarded on an input size while the rewrite computed fake values in the original's
        # shape env: values computed after it may hold that size as a constant; a trace starts afresh)
        return retrace(module)
    lifted = {node.name: node for node in original.graph.nodes if node.op == "placeholder"}
    user_inputs = [node for node in module.graph.nodes if node.op == "placeholder"]
    attributes: dict[str, list[Node]] = {}
    replaced: dict[Node, Node | None] = {}
    for node in module.graph.nodes:
        if node.op == "get_attr":
            attributes.setdefault(node.target, []).append(node)
        elif node.op == "call_module" and node.target == "_guards_fn":  # the input checks of the unlifted module
            replaced[node] = None
        elif node.op == "call_function" and node.users and "val" not in node.meta:
            raise TokenCompileError(f"internal error: node {node.name!r} ({node.target}) has no fake value",
                                    "report this model and command as a tokencompile bug")
    graph = Graph()
    for spec in signature.input_specs:
        placeholder = graph.placeholder(spec.arg.name)
        placeholder.name = spec.arg.name  # fx would rename a builtin's name (``input``) that export keeps
        placeholder.meta = copy.copy(lifted[spec.arg.name].meta)
        if spec.kind == InputKind.USER_INPUT:
            replaced[user_inputs.pop(0)] = placeholder
        else:
            for node in attributes.pop(spec.target, []):
                replaced[node] = placeholder
    outputs = graph.graph_copy(module.graph, replaced)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    graph.output(outputs)
    output_specs = [_output_spec(value) for value in outputs]
    if None in output_specs:
        return retrace(module)
    # ``module`` as the root: the graph module takes the attributes its get_attr nodes still read (the
    # subgraphs of higher-order ops), and nothing else
    program = ExportedProgram(module, graph, ExportGraphSignature(copy.deepcopy(signature.input_specs), output_specs),
                              dict(original.state_dict), dict(original.range_constraints),
                              copy.deepcopy(original.module_call_graph), original.example_inputs,
                              dict(original.constants), verifiers=original.verifiers)
    guards = getattr(program, "_guards_code", None)  # torch's input guards, printed from the shape env
    if guards is None or set(guards) - set(original._guards_code):
        return retrace(module)
    return program
