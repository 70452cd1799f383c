"""ONNX export time: tokencompile's graph clean-up (tokencompile/lowering/onnx_optimize.py: onnxscript's
optimizer less its multi-output pattern rules) against onnxscript's whole optimizer (what
``torch.onnx.export(optimize=True)`` runs), on the same programs in one process. The graphs must come out
identical (op types, names, inputs, outputs, attributes of every node, and the initializers).

    .venv/bin/python benchmarks/onnx_export_time.py [--model minilm|vit_small|...|smollm2] [--budget 0.5]

An encoder recipe is optimized at the budget (one program). ``smollm2`` (real weights): FastV at the
budget (prefill FLOPs) on a 512-token prompt from torch's license, two programs, the prefill and the decode
step, as ``tokencompile export-decoder`` writes them. Each program is translated once without
optimization and once with the whole optimizer; ours is the first plus optimize_onnx on its graph (so the
first translation of the process, with its warm-up, counts against ours).

Measured here (2 shared CPU cores, 2026-12-01; benchmarks/results/onnx_export_time.log):

| model | program (nodes) | translate | translate + optimize_onnx | export, whole optimizer | ratio |
|---|---|---|---|---|---|
| minilm, budget 0.5 | encoder (977) | 10.9 s | 14.0 s | 17.6 s | 1.26x |
| smollm2, budget 0.6 | prefill (2329) | 36.5 s | 44.5 s | 116.5 s | 2.62x |
| smollm2, budget 0.6 | decode step (2362) | 48.7 s | 55.7 s | 105.3 s | 1.89x |

The graphs were identical in each row. The left-out rule costs time roughly in proportion to the square of
the node count, so the gain grows with the model's depth: a 6-layer encoder gains little, and a 30-layer
decoder's export takes about half as long.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import onnx
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models
import tokencompile
from benchmarks.perf_table import machine
from tokencompile.lowering.onnx_ops import translation_table
from tokencompile.lowering.onnx_optimize import optimize_onnx


def graph_signature(model: onnx.ModelProto) -> tuple:
    nodes = [(n.op_type, n.name, tuple(n.input), tuple(n.output), tuple(str(a) for a in n.attribute))
             for n in model.graph.node]
    return tuple(nodes), tuple(i.name for i in model.graph.initializer)


def programs(name: str, budget: float) -> list[tuple[str, torch.export.ExportedProgram, tuple]]:
    if name != "smollm2":
        from tokencompile.compiler import export_module

        module, inputs = models.build(name, batch=2)
        return [("encoder", tokencompile.optimize(export_module(module, inputs), budget=budget).program, inputs)]
    from benchmarks.decoder_fidelity import license_token_ids
    from models.decoders import smollm2_tokenizer
    from tokencompile.decoder import compile_decoder
    from tokencompile.decoder.generate import TorchRunner
    from tokencompile.decoder.onnx_export import decode_example, export_decode_step

    ids, _ = license_token_ids(smollm2_tokenizer(), ["torch"], 512)
    program = compile_decoder(models.build("smollm2")[0], ids, budget=budget, span=(0, 448), sinks=4, pool=15,
                              lookup=16)
    example = program.example_inputs  # as export_decoder_onnx traces them
    _, caches = TorchRunner(program).prefill(example[0], {})
    step = decode_example(caches)
    return [("prefill", program.prefill, example), ("decode step", export_decode_step(program.model, step), step)]


def export(program, inputs, optimize: bool):
    return torch.onnx.export(program, tuple(inputs), dynamo=True, opset_version=18, optimize=optimize,
                             custom_translation_table=translation_table(), verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--budget", type=float, default=None, help="default: 0.5 (encoders), 0.6 (smollm2)")
    args = parser.parse_args()
    budget = args.budget or (0.6 if args.model == "smollm2" else 0.5)
    import tokencompile.ops  # noqa: F401

    torch.set_num_threads(2)
    print(machine())
    print("| model | program (nodes) | translate | translate + optimize_onnx | export, whole optimizer | ratio |")
    print("|---|---|---|---|---|---|")
    for what, program, inputs in programs(args.model, budget):
        started = time.perf_counter()
        ours = export(program, inputs, optimize=False)
        translated = time.perf_counter()
        optimize_onnx(ours)
        optimized = time.perf_counter()
        whole = export(program, inputs, optimize=True)
        done = time.perf_counter()
        if graph_signature(ours.model_proto) != graph_signature(whole.model_proto):
            raise SystemExit(f"{what}: optimize_onnx's graph differs from the whole optimizer's")
        ours_s, whole_s = optimized - started, done - optimized
        print(f"| {args.model}, budget {budget} | {what} ({len(ours.model_proto.graph.node)}, identical) "
              f"| {translated - started:.1f} s | {ours_s:.1f} s | {whole_s:.1f} s | {whole_s / ours_s:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
