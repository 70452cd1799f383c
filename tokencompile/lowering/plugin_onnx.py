"""Plugin-form ONNX: one custom-domain node per token op, as TensorRT's ONNX parser reads plugins.

The standard-op export writes each token op as a subgraph of ONNX ops. Here the same program is
exported with a translation table that writes each op as a single node (``tokencompile::TcTomePlan``,
...) whose integer arguments are attributes with the op's argument names; onnx-graphsurgeon then adds
``plugin_namespace`` / ``plugin_version`` (the parser keys plugin creators by op type, version and
namespace, and ignores the domain) and writes an absent optional ``valid`` as an empty-name input.

``plugin_session`` runs such a graph in ONNX Runtime on the CPU: every plugin node becomes an
onnxruntime-extensions Python op backed by the reference implementation in ``tokencompile.ops``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch.export import ExportedProgram

from ..errors import TokenCompileError

DOMAIN = "tokencompile"
PLUGIN_NAMESPACE = "tokencompile"
PLUGIN_VERSION = "1"
INT64 = "int64"  # output dtype marker: the plan outputs are int64 whatever the inputs are
# ops a single precompiled kernel serves (a plan needs several kernels and sorts): the TensorRT plugin set
KERNEL_PLUGIN_OPS = frozenset({"merge_tokens", "sum_tokens", "gather_tokens"})


@dataclass(frozen=True)
class PluginOp:
    """How one tokencompile op appears as a plugin node."""

    name: str                      # the torch op: torch.ops.tokencompile.<name>
    op_type: str                   # the ONNX op type = the TensorRT plugin name
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[str, ...]         # integer / bool arguments, in call order, as int attributes
    output_dtypes: tuple[str, ...]  # INT64, or the name of the input whose dtype the output takes
    optional: tuple[str, ...] = ()

    @property
    def plugin_id(self) -> str:
        return f"{PLUGIN_NAMESPACE}::{self.op_type}"


PLUGIN_OPS: dict[str, PluginOp] = {op.op_type: op for op in [
    PluginOp("tome_plan", "TcTomePlan", ("metric", "valid"), ("rep", "src", "dst"),
             ("r", "num_prefix", "protect_last_valid", "ab_order"), (INT64,) * 3, optional=("valid",)),
    PluginOp("topk_plan", "TcTopkPlan", ("score", "valid"), ("rep", "src", "dst"),
             ("n_keep", "num_prefix", "protect_last_valid", "fuse"), (INT64,) * 3, optional=("valid",)),
    PluginOp("merge_tokens", "TcMergeTokens", ("x", "weight", "rep", "src", "dst"), ("out",), (), ("x",)),
    PluginOp("sum_tokens", "TcSumTokens", ("weight", "rep", "src", "dst"), ("out",), (), ("weight",)),
    PluginOp("gather_tokens", "TcGatherTokens", ("t", "rep"), ("out",), ("dim",), ("t",)),
]}


def plugin_output_shapes(op_type: str, input_shapes: list, attrs: dict) -> list[list]:
    """Output shapes of a plugin from its input shapes and attributes.

    Uses only indexing, ``dim + int`` and ``dim - int``, so the same code computes concrete shapes
    (ints, tested against the fake kernels) and TensorRT's symbolic ones (``trtp.ShapeExpr``)."""
    op = PLUGIN_OPS[op_type]
    if op.name == "tome_plan":
        batch, n = input_shapes[0][0], input_shapes[0][1]
        r = int(attrs["r"])
        return [[batch, n - r], [batch, r], [batch, r]]
    if op.name == "topk_plan":
        batch, n = input_shapes[0][0], input_shapes[0][1]
        kept = int(attrs["n_keep"]) + int(bool(attrs["fuse"]))
        return [[batch, kept], [batch, n - kept], [batch, n - kept]]
    rep = input_shapes[op.inputs.index("rep")]
    if op.name == "merge_tokens":
        x = input_shapes[0]
        return [[x[0], rep[1], x[2]]]
    if op.name == "sum_tokens":
        return [[input_shapes[0][0], rep[1]]]
    t, dim = list(input_shapes[0]), int(attrs["dim"])
    return [[rep[0], *t[1:dim], rep[1], *t[dim + 1:]]]


def plugin_output_dtypes(op_type: str, input_dtypes: list, int64) -> list:
    """Output dtypes of a plugin; ``int64`` is the caller's int64 dtype object (numpy, TensorRT, ...)."""
    op = PLUGIN_OPS[op_type]
    return [int64 if source == INT64 else input_dtypes[op.inputs.index(source)] for source in op.output_dtypes]


# ---------------------------------------------------------------------------------------------- export

def _schema(op: PluginOp) -> onnx.defs.OpSchema:
    """An OpSchema for the custom node (not registered globally: onnxscript only needs it to build)."""
    schema = onnx.defs.OpSchema
    any_tensor = [f"tensor({t})" for t in ("float", "float16", "bfloat16", "double", "int64", "int32", "bool")]
    inputs = [schema.FormalParameter(name, f"T_{name}", param_option=schema.FormalParameterOption.Optional
                                     if name in op.optional else schema.FormalParameterOption.Single)
              for name in op.inputs]
    outputs = [schema.FormalParameter(name, "tensor(int64)" if source == INT64 else f"T_{source}")
               for name, source in zip(op.outputs, op.output_dtypes)]
    return schema(op.op_type, DOMAIN, 1, inputs=inputs, outputs=outputs,
                  type_constraints=[(f"T_{name}", any_tensor, "") for name in op.inputs],
                  attributes=[schema.Attribute(name, schema.AttrType.INT, "") for name in op.attrs])


def _node_emitter(op: PluginOp):
    from onnxscript.values import Op, Opset

    onnx_op = Op(Opset(DOMAIN, 1), op.op_type, _schema(op))

    def emit(tensors, attr_values):
        return onnx_op(*tensors, **{name: int(value) for name, value in zip(op.attrs, attr_values)})
    return emit


def plugin_translation_table(plugin_ops: set[str] | None = None) -> dict:
    """torch op -> function writing one plugin node (the exporter reads the parameter names); ops not
    in ``plugin_ops`` (op names like "merge_tokens"; default all) keep their standard-op form."""
    import tokencompile.ops  # noqa: F401

    from . import onnx_ops

    emit = {op.name: _node_emitter(op) for op in PLUGIN_OPS.values()}

    def tome_plan(metric, valid, r: int, num_prefix: int, protect_last_valid: bool, ab_order: bool = False):
        return emit["tome_plan"]([metric, valid], [r, num_prefix, protect_last_valid, ab_order])

    def topk_plan(score, valid, n_keep: int, num_prefix: int, protect_last_valid: bool, fuse: bool):
        return emit["topk_plan"]([score, valid], [n_keep, num_prefix, protect_last_valid, fuse])

    def merge_tokens(x, weight, rep, src, dst):
        return emit["merge_tokens"]([x, weight, rep, src, dst], [])

    def sum_tokens(weight, rep, src, dst):
        return emit["sum_tokens"]([weight, rep, src, dst], [])

    def gather_tokens(t, rep, dim: int):
        return emit["gather_tokens"]([t, rep], [dim])

    plugin = {"tome_plan": tome_plan, "topk_plan": topk_plan, "merge_tokens": merge_tokens,
              "sum_tokens": sum_tokens, "gather_tokens": gather_tokens}
    chosen = set(plugin) if plugin_ops is None else set(plugin_ops)
    unknown = chosen - set(plugin)
    if unknown:
        raise TokenCompileError(f"unknown plugin ops: {', '.join(sorted(unknown))}", f"choose from {', '.join(plugin)}")
    table = onnx_ops.translation_table()  # ops without a plugin (e.g. route_plan) stay in standard ops
    table.update({getattr(torch.ops.tokencompile, name).default: plugin[name] for name in chosen})
    return table


def mark_plugin_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Plugin attributes, empty-name inputs for absent optional ones, then cleanup and toposort."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    for node in graph.nodes:
        op = PLUGIN_OPS.get(node.op) if node.domain == DOMAIN else None
        if op is None:
            continue
        while len(node.inputs) < len(op.inputs):  # the exporter drops trailing absent inputs
            node.inputs.append(gs.Variable.empty())
        node.attrs["plugin_namespace"] = PLUGIN_NAMESPACE
        node.attrs["plugin_version"] = PLUGIN_VERSION
    graph.cleanup().toposort()
    marked = gs.export_onnx(graph)
    marked.ir_version = model.ir_version
    del marked.opset_import[:]
    marked.opset_import.extend(model.opset_import)
    marked.metadata_props.extend(model.metadata_props)
    return marked


@dataclass
class PluginExport:
    path: str
    seconds: float
    plugin_nodes: dict[str, int]   # op type -> count
    node_count: int


def plugin_node_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def export_plugin_onnx(program: ExportedProgram, path: str, example_inputs: tuple, opset: int = 18,
                       plugin_ops: set[str] | None = None, external_data: bool | None = None) -> PluginExport:
    """Export ``program`` with one plugin node per token op (dynamic batch axis, readable names);
    ``plugin_ops`` limits which ops become plugins (the others are written in standard ops)."""
    from .onnx_export import run_torch_onnx_export
    from .onnx_files import save_onnx

    started = time.perf_counter()
    exported, _ = run_torch_onnx_export(program, example_inputs, opset, plugin_translation_table(plugin_ops),
                                        "plugin ONNX export")
    model = mark_plugin_nodes(exported.model_proto)
    onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_onnx(model, path, external_data, check=False)
    return PluginExport(path, time.perf_counter() - started, plugin_node_counts(model), len(model.graph.node))


# ------------------------------------------------------------------------------- ONNX Runtime (CPU)

def _pyop_dtypes():
    from onnxruntime_extensions import PyCustomOpDef as D

    t = onnx.TensorProto
    return {t.FLOAT: D.dt_float, t.FLOAT16: D.dt_float16, t.DOUBLE: D.dt_double, t.INT64: D.dt_int64,
            t.INT32: D.dt_int32, t.BOOL: D.dt_bool}


_REGISTERED: set[str] = set()
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
_INTS = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
# dtypes each input may have; None = the optional input is absent
_INPUT_DTYPES = {"metric": _FLOATS, "score": _FLOATS, "valid": (None, onnx.TensorProto.BOOL), "x": _FLOATS,
                 "weight": _FLOATS + _INTS, "t": _FLOATS + _INTS + (onnx.TensorProto.BOOL,),
                 "rep": (onnx.TensorProto.INT64,), "src": (onnx.TensorProto.INT64,), "dst": (onnx.TensorProto.INT64,)}


def _variant_name(op: PluginOp, present: tuple[str, ...], input_types: list[int]) -> str:
    return "_".join([op.op_type, *(f"{name}{dtype}" for name, dtype in zip(present, input_types))])


def _reference(op: PluginOp, present: tuple[str, ...]):
    """A Python op body: numpy in, the tokencompile.ops reference, numpy out."""
    function = getattr(torch.ops.tokencompile, op.name)

    def run(*arrays, **attrs):
        given = dict(zip(present, (torch.from_numpy(np.array(a)) for a in arrays)))
        tensors = [given.get(name) for name in op.inputs]
        values = [bool(attrs[name]) if name in ("protect_last_valid", "fuse") else int(attrs[name])
                  for name in op.attrs]
        with torch.no_grad():
            out = function(*tensors, *values)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.numpy() for o in out) if len(out) > 1 else out[0].numpy()
    return run


def _register_python_ops() -> None:
    """Register one Python op per (op, present inputs, input dtypes) signature, all at once:
    onnxruntime-extensions ops have fixed input counts and dtypes and one domain (ai.onnx.contrib),
    and ops added after the extensions library was first loaded into a session are not seen (ONNX
    Runtime then crashes when it meets them)."""
    if _REGISTERED:
        return
    import itertools

    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    dtypes = _pyop_dtypes()
    for op in PLUGIN_OPS.values():
        for combination in itertools.product(*(_INPUT_DTYPES[name] for name in op.inputs)):
            present = tuple(name for name, dtype in zip(op.inputs, combination) if dtype is not None)
            input_types = [dtype for dtype in combination if dtype is not None]
            outputs = plugin_output_dtypes(op.op_type, list(combination), onnx.TensorProto.INT64)
            variant = _variant_name(op, present, input_types)
            onnx_op(op_type=variant, inputs=[dtypes[t] for t in input_types], outputs=[dtypes[t] for t in outputs],
                    attrs={name: PyCustomOpDef.dt_int64 for name in op.attrs})(_reference(op, present))
            _REGISTERED.add(variant)


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {init.name: init.data_type for init in model.graph.initializer}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def to_python_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a plugin-form model whose plugin nodes are onnxruntime-extensions Python ops."""
    from onnxruntime_extensions._ocos import default_opset_domain

    contrib = default_opset_domain()
    _register_python_ops()
    model = onnx.ModelProto.FromString(model.SerializeToString())
    types = _value_types(model)
    for node in model.graph.node:
        op = PLUGIN_OPS.get(node.op_type) if node.domain == DOMAIN else None
        if op is None:
            continue
        present = tuple(name for name, value in zip(op.inputs, node.input) if value)
        values = [value for value in node.input if value]
        missing = [value for value in values if value not in types]
        if missing:
            raise TokenCompileError(f"no dtype recorded for {missing[0]!r}, input of {node.name}",
                                    "export the model again with export_plugin_onnx")
        input_types = [types[value] for value in values]
        variant = _variant_name(op, present, input_types)
        if variant not in _REGISTERED:
            names = ", ".join(f"{n}: {onnx.TensorProto.DataType.Name(t).lower()}" for n, t in zip(present, input_types))
            raise TokenCompileError(f"{node.name}: no reference Python op for {op.op_type}({names})",
                                    "run this model in its standard-op form (export without --plugins)")
        del node.input[:]
        node.input.extend(values)
        attributes = [a for a in node.attribute if a.name in op.attrs]
        del node.attribute[:]
        node.attribute.extend(attributes)
        node.op_type, node.domain = variant, contrib
    if not any(o.domain == contrib for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(contrib, 1))
    return model


def plugin_session(path_or_model, threads: int = 2):
    """ONNX Runtime (CPU) session for a plugin-form model, plugins run by the reference ops."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    import tokencompile.ops  # noqa: F401

    model = onnx.load(path_or_model) if isinstance(path_or_model, str) else path_or_model
    converted = to_python_ops(model)  # registers the Python ops: must come before the library is loaded
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(converted.SerializeToString(), options, providers=["CPUExecutionProvider"])


def verify_plugin_onnx(program: ExportedProgram, path: str, inputs_by_batch: list[tuple],
                       atol: float = 1e-4) -> list[dict]:
    """Max abs error of the plugin-form model (ONNX Runtime + Python ops) against the program."""
    from .onnx_export import verify_onnx

    return verify_onnx(program, path, inputs_by_batch, atol, session=plugin_session(path))
