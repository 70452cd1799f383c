"""Export an (optimized) program to ONNX with standard ops, a dynamic batch axis and readable names."""

from __future__ import annotations

import ast
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.export import ExportedProgram

from ..errors import TokenCompileError
from .onnx_files import save_onnx
from .onnx_ops import translation_table
from .onnx_optimize import optimize_onnx

DEFAULT_OPSET = 18


@dataclass
class OnnxExport:
    path: str
    seconds: float
    op_counts: dict[str, int]
    token_op_nodes: int


def _readable_names(model) -> int:
    """Name nodes after their module and fx node, e.g. blocks.3.token_reduction/tome_plan/TopK.
    Returns how many nodes belong to inserted token-reduction scopes."""
    used: dict[str, int] = {}
    token_nodes = 0
    for node in model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if not scopes:
            continue
        parts = [part for part in ast.literal_eval(scopes) if part]
        if not parts:
            continue
        # scopes: the enclosing modules' fqns, outermost first, then the fx node: keep the innermost
        prefix = "/".join(parts[-2:]) if len(parts) > 1 else parts[0]
        count = used.get(prefix + node.op_type, 0)
        used[prefix + node.op_type] = count + 1
        node.name = f"{prefix}/{node.op_type}" + (f"_{count}" if count else "")
        if "token_reduction" in prefix or "proportional_attention" in prefix:
            token_nodes += 1
    return token_nodes


def _untranslated_op(error: BaseException) -> str | None:
    """The op torch.onnx found no translation for, from the chain of causes of its error (None: another error)."""
    while error is not None:
        found = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", str(error))
        if found:
            return f"{found[1]}.{found[2]}"
        error = error.__cause__ or error.__context__
    return None


def run_torch_onnx_export(program: ExportedProgram, example_inputs: tuple, opset: int, table: dict,
                          what: str = "ONNX export"):
    """torch.onnx's dynamo export with ``table`` for the tokencompile ops, optimized by optimize_onnx; the batch
    axis named "batch" and readable node names. Returns the ONNXProgram and the number of nodes in token ops."""
    try:
        exported = torch.onnx.export(program, tuple(example_inputs), dynamo=True, opset_version=opset,
                                     custom_translation_table=table, verbose=False, optimize=False)
        optimize_onnx(exported)
    except Exception as error:
        missing = _untranslated_op(error)
        if missing is not None:
            raise TokenCompileError(f"{what} failed: torch.onnx has no ONNX translation for the model's op {missing}",
                                    "export a model without it, or add a translation of it to "
                                    "tokencompile.lowering.onnx_ops.translation_table (the torch program itself "
                                    "runs)") from error
        raise TokenCompileError(f"{what} failed: {str(error).splitlines()[0]}",
                                "rerun with --debug and report the model") from error
    model = exported.model
    batch = model.graph.inputs[0].shape[0] if model.graph.inputs[0].shape else None
    if batch is not None and not isinstance(batch, int):
        exported.rename_axes({str(batch): "batch"})
    return exported, _readable_names(model)


def export_onnx(program: ExportedProgram, path: str, example_inputs: tuple, opset: int = DEFAULT_OPSET,
                check: bool = True, external_data: bool | None = None) -> OnnxExport:
    """torch.onnx (dynamo) export with the tokencompile ops lowered to standard ONNX ops, written atomically
    (weights over 2 GB, or with ``external_data=True``, go to ``PATH.data``: see onnx_files)."""
    import tokencompile.ops  # noqa: F401

    started = time.perf_counter()
    exported, token_nodes = run_torch_onnx_export(program, example_inputs, opset, translation_table())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_onnx(exported.model, path, external_data, check)
    counts: dict[str, int] = {}
    for node in exported.model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return OnnxExport(path, time.perf_counter() - started, counts, token_nodes)


def ort_session(path: str, threads: int = 2, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = profile
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_feeds(session, inputs: tuple) -> dict:
    return {meta.name: np.ascontiguousarray(x.detach().cpu().numpy()) for meta, x in zip(session.get_inputs(), inputs)}


def verify_onnx(program: ExportedProgram, path: str, inputs_by_batch: list[tuple], atol: float = 1e-4,
                session=None) -> list[dict]:
    """Max abs error of ONNX Runtime (``session``, default a plain one for ``path``) against the program,
    for each set of inputs."""
    session = session or ort_session(path)
    module = program.module()
    results = []
    for inputs in inputs_by_batch:
        with torch.no_grad():
            expected = module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, ort_feeds(session, inputs))
        error = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
        results.append({"batch": int(inputs[0].shape[0]), "max_abs_error": error, "ok": error <= atol})
    return results
