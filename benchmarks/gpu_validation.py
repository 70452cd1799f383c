"""GPU validation kit: TensorRT engines of the benchmark models, checked against ONNX Runtime and timed.

On a machine with an NVIDIA GPU and TensorRT 10 (run from the repository root):

    .venv/bin/python benchmarks/gpu_validation.py                        # ViT-S, ViT-B, MiniLM x 1.0/0.5/0.25
    .venv/bin/python benchmarks/gpu_validation.py --models vit_small --budgets 0.5 --fp16

For each model and budget it optimizes the model, exports the standard-op ONNX and the plugin-form
ONNX (merge / sum / gather as plugins with the precompiled Triton kernels, plans in standard ops),
builds one engine per form, compares each engine's outputs with ONNX Runtime (CPU, standard ops) and
prints the latency table: original vs optimized, fused plugins vs standard ops. Without TensorRT or
a GPU it stops at once with a one-line error (exit code 2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models
import tokencompile
from tokencompile.errors import TokenCompileError

SETUPS = {"vit_small": ("ViT-S/16", 8), "vit_base": ("ViT-B/16", 4), "minilm": ("MiniLM (128 tokens)", 32)}
ATOL = {False: 1e-3, True: 5e-2}  # fp32 / fp16 engines against ONNX Runtime fp32


@dataclass
class Case:
    """One model at one budget, ready to export: the program, example inputs, what the optimizer did."""
    model: str
    budget: float
    program: object | None
    inputs: tuple
    flops_ratio: float | None = None
    skipped: str | None = None   # why there is nothing to build (e.g. the budget is not reachable)


@dataclass
class Row:
    model: str
    batch: int
    budget: float
    flops_ratio: float | None = None
    latency_ms: dict = field(default_factory=dict)   # form -> median ms
    max_error: dict = field(default_factory=dict)    # form -> max abs error against ONNX Runtime
    note: str = ""


# ------------------------------------------------------------------------------------------ CPU parts

def prepare_case(name: str, budget: float, program=None) -> Case:
    """Optimize the recipe ``name`` at ``budget`` (1.0 = the original program)."""
    inputs = models.RECIPES[name].example_inputs(2)
    program = program if program is not None else models.export(name)
    if budget >= 1.0:
        return Case(name, budget, program, inputs, 1.0)
    try:
        result = tokencompile.optimize(program, budget=budget)
    except TokenCompileError as error:
        return Case(name, budget, None, inputs, skipped=str(error))
    return Case(name, budget, result.program, inputs, result.report["flops_ratio"])


def export_forms(case: Case, out_dir: str) -> dict[str, str]:
    """ONNX files to build: {"standard": ..., "plugins": ...} (only "standard" for the original)."""
    from tokencompile.lowering.onnx_export import export_onnx
    from tokencompile.lowering.plugin_onnx import KERNEL_PLUGIN_OPS, export_plugin_onnx

    stem = os.path.join(out_dir, f"{case.model}_{case.budget:g}")
    paths = {"standard": f"{stem}.onnx"}
    export_onnx(case.program, paths["standard"], case.inputs)
    if case.budget < 1.0:
        paths["plugins"] = f"{stem}.plugins.onnx"
        export_plugin_onnx(case.program, paths["plugins"], case.inputs, plugin_ops=set(KERNEL_PLUGIN_OPS))
    return paths


def max_abs_error(got: list, expected: list) -> float:
    return max(float(np.abs(np.asarray(g, dtype=np.float64) - np.asarray(e, dtype=np.float64)).max())
               for g, e in zip(got, expected))


def batch_inputs(name: str, batch: int) -> tuple:
    return models.RECIPES[name].example_inputs(batch)


def _ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def format_table(rows: list[Row]) -> str:
    """Markdown: latency of the original and of both optimized forms, speed-ups, errors against ORT."""
    header = ("| model | batch | budget | FLOPs ratio | original ms | optimized std ops ms | optimized plugins ms | "
              "speed-up std | speed-up plugins | max err std | max err plugins | note |")
    lines = [header,
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        original = row.latency_ms.get("original")
        cells = [SETUPS.get(row.model, (row.model,))[0], str(row.batch), f"{row.budget:g}",
                 f"{row.flops_ratio:.3f}" if row.flops_ratio is not None else "-", _ms(original)]
        for form in ("standard", "plugins"):
            cells.append(_ms(row.latency_ms.get(form)))
        for form in ("standard", "plugins"):
            value = row.latency_ms.get(form)
            cells.append(f"{original / value:.2f}x" if original and value else "-")
        for form in ("standard", "plugins"):
            error = row.max_error.get(form)
            cells.append(f"{error:.1e}" if error is not None else "-")
        cells.append(row.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ GPU parts

def run_engine(engine_path: str, inputs: tuple, rounds: int = 0) -> tuple[list[np.ndarray], float | None]:
    """Outputs of a TensorRT engine for ``inputs`` and, with rounds, the median latency in ms."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(engine_path, "rb") as handle:
        engine = runtime.deserialize_cuda_engine(handle.read())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    feeds = iter(inputs)
    buffers = {}
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            tensor = next(feeds).cuda().contiguous()
            context.set_input_shape(name, tuple(tensor.shape))
            buffers[name] = tensor
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()

    def once():
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
    once()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        once()
        times.append((time.perf_counter() - started) * 1e3)
    outputs = [buffers[n].float().cpu().numpy() for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    return outputs, statistics.median(times) if times else None


def kernel_directory(explicit: str | None, out_dir: str) -> str:
    """Precompiled kernels for this GPU: --kernel-dir, or compiled now for its architecture."""
    if explicit:
        return explicit
    from tokencompile.kernels.aot import compile_kernels

    arch = 90 if torch.cuda.get_device_capability(0)[0] >= 9 else 80
    compile_kernels(arch, out_dir)
    return os.path.join(out_dir, f"sm_{arch}")


def validate(case: Case, batch: int, out_dir: str, kernel_dir: str, fp16: bool, rounds: int) -> Row:
    from tokencompile.lowering.onnx_export import ort_feeds, ort_session
    from tokencompile.lowering.tensorrt_build import build_engine

    row = Row(case.model, batch, case.budget, case.flops_ratio)
    if case.skipped:
        row.note = case.skipped
        return row
    inputs = batch_inputs(case.model, batch)
    paths = export_forms(case, out_dir)
    session = ort_session(paths["standard"])
    expected = session.run(None, ort_feeds(session, inputs))
    for form, path in paths.items():
        label = "original" if case.budget >= 1.0 else form
        engine = path.replace(".onnx", ".engine")
        try:
            build_engine(path, engine, fp16=fp16, max_batch=batch,
                         plugin_dir=kernel_dir if form == "plugins" else None)
        except TokenCompileError as error:
            row.note += f"{form}: {error}; "
            continue
        got, row.latency_ms[label] = run_engine(engine, inputs, rounds)
        row.max_error[form] = max_abs_error(got, expected)
        if row.max_error[form] > ATOL[fp16]:
            row.note += f"{form} differs from ORT; "
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small,vit_base,minilm")
    parser.add_argument("--budgets", default="1.0,0.5,0.25")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--kernel-dir", help="precompiled kernels (DIR/sm_<arch>); default: compile now")
    parser.add_argument("--out-dir", help="keep ONNX files and engines here (default: a temporary directory)")
    args = parser.parse_args(argv)
    try:
        from tokencompile.lowering.tensorrt_build import require_tensorrt

        require_tensorrt()
        with tempfile.TemporaryDirectory() as tmp:
            out_dir = args.out_dir or tmp
            kernel_dir = kernel_directory(args.kernel_dir, os.path.join(out_dir, "kernels"))
            rows = []
            for name in args.models.split(","):
                program = models.export(name)
                budgets = [float(b) for b in args.budgets.split(",")]
                original_row = None
                for budget in sorted(budgets, reverse=True):
                    row = validate(prepare_case(name, budget, program), SETUPS[name][1], out_dir, kernel_dir,
                                   args.fp16, args.rounds)
                    if budget >= 1.0:
                        original_row = row
                    elif original_row is not None:
                        row.latency_ms["original"] = original_row.latency_ms.get("original")
                    rows.append(row)
                    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
            print(format_table(rows))
    except TokenCompileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
