"""An ExportedProgram from a rewritten copy of a program's own module, without tracing it again.

The passes rewrite ``program.module()`` (parameters as ``get_attr``, user inputs as placeholders) and
keep every node's fake value current. Exporting that module again would trace every op once more with a
symbolic batch: on ViT-S at budget 0.5 about 5 s, more than half of ``optimize``, because each block's
new token count misses FakeTensor's cache. Lifting the module back instead takes milliseconds: the
weights, constants, shape constraints and call signature are the original program's; parameters,
buffers and constants become placeholders again, named as the original signature names them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ConstantArgument,
    ExportGraphSignature,
    InputKind,
    OutputKind,
    OutputSpec,
    SymIntArgument,
    TensorArgument,
)
from torch.fx import Graph, GraphModule, Node

from .errors import TokenCompileError


def _output_spec(value) -> OutputSpec:
    if not isinstance(value, Node):
        return OutputSpec(OutputKind.USER_OUTPUT, ConstantArgument(name="", value=value), None)
    argument = SymIntArgument if isinstance(value.meta.get("val"), torch.SymInt) else TensorArgument
    return OutputSpec(OutputKind.USER_OUTPUT, argument(name=value.name), None)


def rebuild_program(original: ExportedProgram, module: GraphModule,
                    retrace: Callable[[GraphModule], ExportedProgram]) -> ExportedProgram:
    """The program of ``module``, a rewritten ``original.module()`` with the same inputs and as many
    outputs. ``retrace(module)`` exports it again where lifting back cannot be trusted: a program that
    mutates its buffers or inputs (unlifting turned its mutations into ``copy_`` nodes), or one whose
    fake values were computed under a new guard on its input sizes."""
    signature = original.graph_signature
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in signature.output_specs):
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
    root = torch.nn.Module()
    for target in attributes:  # what is left: subgraphs of higher-order ops
        root.add_module(target, module.get_submodule(target))
    outputs = graph.graph_copy(module.graph, replaced)
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    graph.output(outputs)
    new_signature = ExportGraphSignature(copy.deepcopy(signature.input_specs), [_output_spec(v) for v in outputs])
    program = ExportedProgram(root, graph, new_signature, original.state_dict, original.range_constraints,
                              copy.deepcopy(original.module_call_graph), original.example_inputs, original.constants,
                              verifiers=original.verifiers)
    guards = getattr(program, "_guards_code", None)  # torch's input guards, from the shape env
    if guards is None or set(guards) - set(original._guards_code):
        # An op's kernel guarded on an input size while the rewrite computed fake values (the shape env is
        # the original's): values computed after it may hold that size as a constant. A trace starts afresh.
        return retrace(module)
    return program
