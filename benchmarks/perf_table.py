"""The README's performance table: ONNX Runtime latency of original vs optimized, one process, interleaved.

For each model and budget: optimize, export both programs to ONNX, time them A B A B ... with
ONNX Runtime on the CPU, and profile the optimized model to get the share of node time spent in the
inserted token ops.

    .venv/bin/python benchmarks/perf_table.py                   # ViT-S b8, ViT-B b4, MiniLM b32 x 128
    .venv/bin/python benchmarks/perf_table.py --models vit_small --budgets 0.5 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models
import tokencompile
from tokencompile.bench import bench
from tokencompile.lowering.onnx_export import export_onnx

SETUPS = {"vit_small": ("ViT-S/16", 8), "vit_base": ("ViT-B/16", 4), "minilm": ("MiniLM (128 tokens)", 32)}


def machine() -> str:
    import onnxruntime

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, onnxruntime {onnxruntime.__version__} (CPU EP)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small,vit_base,minilm")
    parser.add_argument("--budgets", default="0.75,0.5,0.25")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args()

    print(f"machine: {machine()}; {args.threads} threads; {args.rounds} interleaved rounds; median latency")
    print("| model | batch | budget | FLOPs ratio | ORT original ms | ORT optimized ms | speed-up | "
          "speed-up / (1 / ratio) | token ops share |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            label, batch = SETUPS[name]
            program = models.export(name)
            inputs = tuple(program.example_inputs[0])
            original = os.path.join(tmp, f"{name}.onnx")
            export_onnx(program, original, inputs)
            for budget in [float(b) for b in args.budgets.split(",")]:
                started = time.perf_counter()
                try:
                    result = tokencompile.optimize(program, budget=budget)
                except tokencompile.TokenCompileError as error:
                    print(f"| {label} | {batch} | {budget:g} | not reachable: {error.problem} | | | | | |")
                    continue
                optimized = os.path.join(tmp, f"{name}_{budget}.onnx")
                export_onnx(result.program, optimized, inputs)
                timing = bench(original, optimized, "ort", batch, args.rounds, threads=args.threads, memory=False)
                ratio = result.report["flops_ratio"]
                row = {"model": label, "batch": batch, "budget": budget, "flops_ratio": ratio,
                       "original_ms": timing.original.median_s * 1e3, "optimized_ms": timing.optimized.median_s * 1e3,
                       "speedup": timing.speedup, "speedup_of_limit": timing.speedup * ratio,
                       "token_op_share": timing.token_op_share}
                rows.append(row)
                print(f"| {label} | {batch} | {budget:g} | {ratio:.3f} | {row['original_ms']:.0f} | "
                      f"{row['optimized_ms']:.0f} | {row['speedup']:.2f}x | {row['speedup_of_limit']:.2f} | "
                      f"{row['token_op_share']:.1%} |", flush=True)
                print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
