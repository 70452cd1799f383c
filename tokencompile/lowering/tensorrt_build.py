"""TensorRT engines from ONNX, the plugin kernels' launch recipes, and which back-ends this machine has.

Everything that needs TensorRT or a GPU is behind ``require_tensorrt``, which raises a one-line
TokenCompileError naming what is missing. What does not (which kernel serves a plugin, the launch
grid and scalar arguments from the input shapes, whether a kernel's parameters fit TensorRT's AOT
calling convention, the graph edits before parsing) is plain Python and tested on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from ..errors import TokenCompileError
from .plugin_onnx import DOMAIN, PLUGIN_OPS

PLUGINS_MODULE = Path(__file__).resolve().parents[2] / "plugins" / "tokencompile_trt_plugins.py"
SCRATCH_PARAMS = ("global_scratch", "profile_scratch")
NO_TENSORRT = "TensorRT is not installed (cannot import tensorrt)"
NO_GPU = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
FIX = "build engines on a machine with an NVIDIA GPU and TensorRT 10 (pip install tensorrt); here use --format onnx"


# ---------------------------------------------------------------------------------------------- doctor

def _probe(check) -> tuple[bool, str]:
    try:
        return check()
    except Exception as error:  # noqa: BLE001 - a probe reports, it never fails
        return False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _ort_cpu():
    import onnxruntime as ort

    return "CPUExecutionProvider" in ort.get_available_providers(), f"onnxruntime {ort.__version__}"


def _ort_cuda():
    import onnxruntime as ort

    usable = "CUDAExecutionProvider" in ort.get_available_providers()
    return usable, "CUDAExecutionProvider available" if usable else "no CUDAExecutionProvider (install onnxruntime-gpu)"


def _tensorrt():
    import tensorrt as trt

    return True, f"tensorrt {trt.__version__}"


def _gpu():
    import torch

    if not torch.cuda.is_available():
        return False, NO_GPU
    return True, f"{torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})"


def _triton():
    import triton

    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    return True, f"triton {triton.__version__} ({'interpreter on' if interpreter else 'set TRITON_INTERPRET=1 to run kernels on the CPU'})"


def _nvcc():
    path = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    return (True, path) if path else (False, "nvcc not found on PATH")


def _ort_extensions():
    import onnxruntime_extensions

    return True, f"onnxruntime-extensions {onnxruntime_extensions.__version__} (plugin-form ONNX on the CPU)"


BACKENDS = [("ONNX Runtime CPU", _ort_cpu), ("ONNX Runtime CUDA", _ort_cuda), ("TensorRT", _tensorrt),
            ("GPU", _gpu), ("Triton", _triton), ("nvcc", _nvcc), ("onnxruntime-extensions", _ort_extensions)]


def doctor() -> list[tuple[str, bool, str]]:
    """(back-end, usable, detail) for each back-end tokencompile can use."""
    return [(name, *_probe(check)) for name, check in BACKENDS]


def format_doctor(rows: list[tuple[str, bool, str]]) -> str:
    return "\n".join(f"{'ok ' if usable else 'no '} {name:<24} {detail}" for name, usable, detail in rows)


def require_tensorrt():
    """Import tensorrt, or raise one error naming everything missing (TensorRT, GPU)."""
    missing = []
    trt = None
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - ImportError, or a broken install raising OSError
        missing.append(NO_TENSORRT)
    usable, _ = _probe(_gpu)
    if not usable:
        missing.append(NO_GPU)
    if missing:
        raise TokenCompileError(f"a TensorRT engine needs TensorRT and a GPU: {'; '.join(missing)}", FIX)
    return trt


# ------------------------------------------------------------------------------- kernels and launches

def load_manifest(kernel_dir: str | Path) -> dict:
    """The manifest written by tokencompile.kernels.aot.compile_kernels (``kernel_dir`` = its sm_<arch>)."""
    path = Path(kernel_dir) / "manifest.json"
    if not path.exists():
        raise TokenCompileError(f"no manifest.json in {kernel_dir}",
                                "compile the kernels: python -m tokencompile.kernels.aot --arch 90 -o DIR, "
                                "and pass DIR/sm_90")
    return json.loads(path.read_text())


def _product(dims, start: int, stop: int):
    """Product of dims[start:stop], 1 if empty. TensorRT's ShapeExpr has no __rmul__: keep it on the left."""
    total = None
    for dim in list(dims)[start:stop]:
        total = dim if total is None else total * dim
    return 1 if total is None else total


def kernel_dims(op_type: str, input_shapes: list, attrs: dict) -> dict:
    """The size names a kernel's grid and scalar arguments use, from the plugin's input shapes
    (ints here, trtp.ShapeExpr in TensorRT)."""
    op = PLUGIN_OPS[op_type]
    rep = input_shapes[op.inputs.index("rep")]
    dims = {"B": rep[0], "n_out": rep[1]}
    if op.name in ("merge_tokens", "sum_tokens"):
        weight = input_shapes[op.inputs.index("weight")]
        dims.update(N=weight[1], m=input_shapes[op.inputs.index("src")][1])
        if op.name == "merge_tokens":
            dims["C"] = input_shapes[0][2]
    elif op.name == "gather_tokens":
        t, dim = input_shapes[0], int(attrs["dim"])
        dims.update(outer=_product(t, 1, dim), N=t[dim], inner=_product(t, dim + 1, len(t)))
        dims["t_batch_stride"] = 0 if _is_one(t[0]) else _product(t, 1, len(t))
    return dims


def _is_one(dim) -> bool:
    if isinstance(dim, int):
        return dim == 1
    # trtp.ShapeExpr: is_constant raises on fake (shape-inference-only) expressions; constant_value() is a method
    return not dim.is_fake and dim.is_constant and dim.constant_value() == 1


def evaluate_launch(expression: str, dims: dict, cdiv=None):
    """A manifest grid expression such as ``cdiv(C, 128)`` or ``B * outer`` over the size names."""
    cdiv = cdiv or (lambda a, b: (a + b - 1) // b)
    return eval(expression, {"__builtins__": {}}, {**dims, "cdiv": cdiv})  # the manifest is our own output


GATHER_WIDTH = {"float": "b4", "float16": "b2", "bfloat16": "b2", "int64": "b8", "int32": "b4", "bool": "b1"}
FLOAT_NAME = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def kernel_name(op_type: str, dtype: str, input_shapes: list | None = None, attrs: dict | None = None) -> str:
    """Manifest entry serving a plugin; dtype is the ONNX name of the data input's type ("float", ...)."""
    op = PLUGIN_OPS[op_type]
    if op.name in ("merge_tokens", "sum_tokens"):
        if dtype not in FLOAT_NAME:
            raise TokenCompileError(f"{op_type}: no kernel for {dtype}", "export this op in standard ops")
        return f"{op.name}_{FLOAT_NAME[dtype]}"
    if op.name == "gather_tokens":
        flat = input_shapes is not None and len(input_shapes[0]) == int(attrs["dim"]) + 1
        return f"gather_tokens_{GATHER_WIDTH[dtype]}_{'flat' if flat else 'rows'}"
    raise TokenCompileError(f"{op_type}: the plan is computed by several kernels and sorts, not one kernel",
                            "keep the plans in standard ops: export with plugin ops merge_tokens,sum_tokens,"
                            "gather_tokens")


def abi_problems(entry: dict, n_inputs: int, n_outputs: int) -> list[str]:
    """Why a kernel cannot be a TensorRT AOT plugin kernel, which is called as
    kernel(input pointers..., int32 scalars..., output pointers...) and nothing else."""
    params = entry["params"]
    problems = []
    if "ptx_no_scratch" in entry:  # a variant compiled without them: the one the plugins load
        params = [p for p in params if p["name"] not in SCRATCH_PARAMS]
    if any(p["name"] in SCRATCH_PARAMS for p in params):
        problems.append("has Triton scratch pointer parameters that TensorRT does not pass")
        params = [p for p in params if p["name"] not in SCRATCH_PARAMS]
    pointers = [p["type"].startswith("*") for p in params]
    expected = [True] * n_inputs + [False] * (len(params) - n_inputs - n_outputs) + [True] * n_outputs
    if pointers != expected:
        problems.append("parameters are not ordered inputs, scalars, outputs")
    wide = [p["name"] for p in params if not p["type"].startswith("*") and p["type"] != "i32"]
    if wide:
        problems.append(f"scalar parameters other than i32: {', '.join(wide)}")
    return problems


def scalar_params(entry: dict) -> list[str]:
    return [p["name"] for p in entry["params"] if not p["type"].startswith("*")]


# ---------------------------------------------------------------------------------------- engine build

def plugin_ops_in(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node if node.domain == DOMAIN}


def prepare_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """The parser gives plugins every input, so an absent ``valid`` becomes an all-true mask shaped
    like the first input's [B, N] (same plan: padding terms vanish; protect_last_valid needs a mask,
    so it is turned off, as the reference ignores it without one)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    added = []
    for index, node in enumerate(model.graph.node):
        op = PLUGIN_OPS.get(node.op_type) if node.domain == DOMAIN else None
        if op is None or "valid" not in op.inputs:
            continue
        slot = op.inputs.index("valid")
        if len(node.input) > slot and node.input[slot]:
            continue
        base = f"{node.name or node.op_type}_{index}/all_valid"
        shape, mask = f"{base}/shape", f"{base}/mask"
        added += [
            helper.make_node("Shape", [node.input[0]], [shape], name=f"{base}/Shape", start=0, end=2),
            helper.make_node("ConstantOfShape", [shape], [mask], name=f"{base}/ConstantOfShape",
                             value=helper.make_tensor("true", onnx.TensorProto.BOOL, [1], [True])),
        ]
        model.graph.value_info.append(helper.make_tensor_value_info(mask, onnx.TensorProto.BOOL, None))
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = mask
        for attribute in node.attribute:
            if attribute.name == "protect_last_valid":
                attribute.i = 0
    model.graph.node.extend(added)
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    prepared = gs.export_onnx(graph)
    del prepared.opset_import[:]
    prepared.opset_import.extend(model.opset_import)
    prepared.ir_version = model.ir_version
    return prepared


def load_plugins(kernel_dir: str | Path, module_path: str | Path | None = None):
    """Import plugins/tokencompile_trt_plugins.py (outside the package) and register the plugins."""
    path = Path(module_path or os.environ.get("TOKENCOMPILE_TRT_PLUGINS", PLUGINS_MODULE))
    if not path.exists():
        raise TokenCompileError(f"TensorRT plugin module not found at {path}",
                                "run from a source checkout or set TOKENCOMPILE_TRT_PLUGINS")
    spec = importlib.util.spec_from_file_location("tokencompile_trt_plugins", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.register_plugins(kernel_dir)
    return module


def check_engine_plugins(op_types) -> None:
    """Plugin nodes an engine can hold: those one precompiled kernel serves."""
    from .plugin_onnx import KERNEL_PLUGIN_OPS

    plans = sorted(t for t in op_types if PLUGIN_OPS[t].name not in KERNEL_PLUGIN_OPS)
    if plans:
        raise TokenCompileError(f"plugin nodes {', '.join(plans)} have no TensorRT kernel (a plan needs several "
                                "kernels and sorts)", "export with plans in standard ops (tokencompile export "
                                "--format trt --plugins does this)")


@dataclass
class EngineBuild:
    path: str
    plugin_ops: list[str]
    fp16: bool
    max_batch: int


def build_engine(onnx_path: str, engine_path: str, fp16: bool = False, max_batch: int = 8,
                 plugin_dir: str | None = None, opt_batch: int | None = None) -> EngineBuild:
    """Parse ONNX (plugin nodes included) and build a serialized engine, batch 1..max_batch."""
    trt = require_tensorrt()
    model = onnx.load(onnx_path, load_external_data=False)  # the parser reads NAME.onnx.data from the path
    used = sorted(plugin_ops_in(model))
    check_engine_plugins(used)
    if used:
        if plugin_dir is None:
            raise TokenCompileError(f"{onnx_path} has plugin nodes ({', '.join(used)}) but no kernel directory",
                                    "pass --plugin-dir DIR/sm_<arch> from python -m tokencompile.kernels.aot")
        load_plugins(plugin_dir)
        model = prepare_for_tensorrt(model)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString(), os.path.abspath(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TokenCompileError(f"TensorRT's ONNX parser failed: {errors[0] if errors else 'unknown error'}",
                                "run `tokencompile export --check trt` on the ONNX file")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = list(tensor.shape)
        rest = shape[1:]
        if any(d < 0 for d in rest):
            raise TokenCompileError(f"input {tensor.name} has dynamic axes beyond the batch: {shape}",
                                    "export with a fixed --input-shape")
        opt = opt_batch or max_batch
        profile.set_shape(tensor.name, [1, *rest], [opt, *rest], [max_batch, *rest])
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TokenCompileError("TensorRT could not build the engine (see the log above)",
                                "rerun with --debug, or try without --fp16")
    os.makedirs(os.path.dirname(os.path.abspath(engine_path)), exist_ok=True)
    with open(engine_path, "wb") as handle:
        handle.write(serialized)
    return EngineBuild(engine_path, used, fp16, max_batch)
