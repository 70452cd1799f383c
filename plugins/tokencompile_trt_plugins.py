"""TensorRT plugins for the tokencompile ops (``tensorrt.plugin``, TensorRT >= 10.8), loaded at engine build.

Thin glue: shapes, dtypes, kernel choice, launch grids and scalar arguments all come from functions in
the tokencompile package that are tested on the CPU (plugin_onnx.plugin_output_shapes /
plugin_output_dtypes, tensorrt_build.kernel_dims / kernel_name / evaluate_launch / abi_problems).
Only the trtp calls below need TensorRT and a GPU; see README.md for what that leaves untested.

    import tokencompile_trt_plugins; tokencompile_trt_plugins.register_plugins("kernels/sm_90")
"""

# No `from __future__ import annotations`: tensorrt.plugin inspects the annotations as classes.
from pathlib import Path

import tensorrt as trt
import tensorrt.plugin as trtp

from tokencompile.errors import TokenCompileError
from tokencompile.lowering import tensorrt_build as build
from tokencompile.lowering.plugin_onnx import (
    PLUGIN_OPS,
    plugin_output_dtypes,
    plugin_output_shapes,
)

TRT_TO_ONNX_NAME = {trt.float32: "float", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int64: "int64",
                    trt.int32: "int32", trt.bool: "bool"}
_REGISTERED: set[str] = set()
# what an aot_impl returns: kernel name, PTX, launch parameters, extra scalar arguments
AOT_RESULT = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]


def _describe(op_type: str, inputs: list, attrs: dict):
    """Output TensorDescs from the tested shape / dtype functions."""
    shapes = plugin_output_shapes(op_type, [list(desc.shape_expr) for desc in inputs], attrs)
    dtypes = plugin_output_dtypes(op_type, [desc.dtype for desc in inputs], trt.int64)
    outputs = []
    for shape, dtype in zip(shapes, dtypes):
        desc = inputs[0].like()
        desc.dtype = dtype
        exprs = trtp.ShapeExprs(len(shape))
        for index, dim in enumerate(shape):
            exprs[index] = trtp.ShapeExpr(dim) if isinstance(dim, int) else dim
        desc.shape_expr = exprs
        outputs.append(desc)
    return tuple(outputs)


def _aot(op_type: str, manifest: dict, kernel_dir: Path, inputs: list, attrs: dict):
    """(kernel name, PTX, launch params, scalar args) for one plugin instance."""
    op = PLUGIN_OPS[op_type]
    shapes = [list(desc.shape_expr) for desc in inputs]
    name = build.kernel_name(op_type, TRT_TO_ONNX_NAME[inputs[0].dtype], shapes, attrs)
    entry = next((k for k in manifest["kernels"] if k["name"] == name), None)
    if entry is None:
        raise TokenCompileError(f"kernel {name} is not in {kernel_dir}/manifest.json", "recompile the kernels")
    problems = build.abi_problems(entry, len(op.inputs), len(op.outputs))
    if problems:
        raise TokenCompileError(f"kernel {name} cannot be a TensorRT AOT kernel: {'; '.join(problems)}",
                                "export this op in standard ops")
    dims = build.kernel_dims(op_type, shapes, attrs)
    grid = [build.evaluate_launch(str(g), dims, trtp.cdiv) for g in entry["grid"]]
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = grid
    launch.block_x = entry["threads_per_block"]
    launch.shared_mem = entry["shared_bytes"]
    scalars = trtp.SymIntExprs(len(build.scalar_params(entry)))
    for index, param in enumerate(build.scalar_params(entry)):
        scalars[index] = trtp.SymInt32(dims[param])
    ptx = (kernel_dir / entry.get("ptx_no_scratch", entry["ptx"])).read_text()
    return entry["entry"], ptx, launch, scalars


def _register_merge_tokens(manifest, kernel_dir):
    @trtp.register("tokencompile::TcMergeTokens")
    def describe(x: trtp.TensorDesc, weight: trtp.TensorDesc, rep: trtp.TensorDesc, src: trtp.TensorDesc,
                 dst: trtp.TensorDesc) -> tuple[trtp.TensorDesc]:
        return _describe("TcMergeTokens", [x, weight, rep, src, dst], {})

    @trtp.aot_impl("tokencompile::TcMergeTokens")
    def compile_(x: trtp.TensorDesc, weight: trtp.TensorDesc, rep: trtp.TensorDesc, src: trtp.TensorDesc,
                 dst: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc], tactic: int) -> AOT_RESULT:
        return _aot("TcMergeTokens", manifest, kernel_dir, [x, weight, rep, src, dst], {})


def _register_sum_tokens(manifest, kernel_dir):
    @trtp.register("tokencompile::TcSumTokens")
    def describe(weight: trtp.TensorDesc, rep: trtp.TensorDesc, src: trtp.TensorDesc,
                 dst: trtp.TensorDesc) -> tuple[trtp.TensorDesc]:
        return _describe("TcSumTokens", [weight, rep, src, dst], {})

    @trtp.aot_impl("tokencompile::TcSumTokens")
    def compile_(weight: trtp.TensorDesc, rep: trtp.TensorDesc, src: trtp.TensorDesc, dst: trtp.TensorDesc,
                 outputs: tuple[trtp.TensorDesc], tactic: int) -> AOT_RESULT:
        return _aot("TcSumTokens", manifest, kernel_dir, [weight, rep, src, dst], {})


def _register_gather_tokens(manifest, kernel_dir):
    @trtp.register("tokencompile::TcGatherTokens")
    def describe(t: trtp.TensorDesc, rep: trtp.TensorDesc, dim: int) -> tuple[trtp.TensorDesc]:
        return _describe("TcGatherTokens", [t, rep], {"dim": int(dim)})

    @trtp.aot_impl("tokencompile::TcGatherTokens")
    def compile_(t: trtp.TensorDesc, rep: trtp.TensorDesc, dim: int, outputs: tuple[trtp.TensorDesc],
                 tactic: int) -> AOT_RESULT:
        return _aot("TcGatherTokens", manifest, kernel_dir, [t, rep], {"dim": int(dim)})


def _register_plan(op_type: str):
    """Shape descriptors only: a plan has no single kernel, so building an engine that contains one
    fails with the error from tensorrt_build.kernel_name (export plans in standard ops instead)."""
    attrs = PLUGIN_OPS[op_type].attrs

    if op_type == "TcTomePlan":
        @trtp.register("tokencompile::TcTomePlan")
        def describe(metric: trtp.TensorDesc, valid: trtp.TensorDesc, r: int, num_prefix: int,
                     protect_last_valid: int,
                     ab_order: int) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
            return _describe(op_type, [metric, valid], dict(zip(attrs, (r, num_prefix, protect_last_valid, ab_order))))
    else:
        @trtp.register("tokencompile::TcTopkPlan")
        def describe(score: trtp.TensorDesc, valid: trtp.TensorDesc, n_keep: int, num_prefix: int,
                     protect_last_valid: int,
                     fuse: int) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
            return _describe(op_type, [score, valid], dict(zip(attrs, (n_keep, num_prefix, protect_last_valid, fuse))))


def register_plugins(kernel_dir: str | Path) -> None:
    """Register the five plugins once per process; kernels come from ``kernel_dir/manifest.json``."""
    if _REGISTERED:
        return
    kernel_dir = Path(kernel_dir)
    manifest = build.load_manifest(kernel_dir)
    _register_merge_tokens(manifest, kernel_dir)
    _register_sum_tokens(manifest, kernel_dir)
    _register_gather_tokens(manifest, kernel_dir)
    _register_plan("TcTomePlan")
    _register_plan("TcTopkPlan")
    _REGISTERED.update(PLUGIN_OPS)
