"""Compile time with the rewritten module rebuilt into a program (``tokencompile.rebuild``) against exported again.

``optimize`` and ``compile_decoder`` rewrite ``program.module()`` and turn it back into an ExportedProgram.
Until 2026-12-02 that was a second ``torch.export.export``; now ``rebuild_program`` lifts the module back
without tracing it. This script times both ways in one process, alternating (export again, rebuild) per
repeat after a warm-up compile, and checks that both give the same report (less its timing) and equal
outputs. Cases: ViT-S (tome, evit) and an 8-layer BERT (tome) at budget 0.5, random weights, batch 2; with
``--decoder``, SmolLM2-135M-Instruct (real weights) with fastv at prefill FLOPs 0.6 on a 512-token prompt.

    .venv/bin/python benchmarks/compile_time.py [--repeats 2] [--decoder]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
import tokencompile  # noqa: E402
from tokencompile.compiler import export_module  # noqa: E402

# modules by name: ``tokencompile.decoder.prefill`` is also the name of a function
REBUILDING = [importlib.import_module(f"tokencompile.{name}") for name in ("compiler", "decoder.prefill",
                                                                           "decoder.vision")]

ENCODER_CASES = [("vit_small", "tome"), ("vit_small", "evit"), ("hf_bert", "tome")]


@contextlib.contextmanager
def export_again():
    """Programs made the way before ``rebuild_program``: the rewritten module exported again."""
    saved = [module.rebuild_program for module in REBUILDING]
    for module in REBUILDING:
        module.rebuild_program = lambda original, rewritten, retrace: retrace(rewritten)
    try:
        yield
    finally:
        for module, function in zip(REBUILDING, saved):
            module.rebuild_program = function


def timed(compile_once, repeats: int):
    """Seconds of each way per repeat, and the last result of each way."""
    seconds, results = {"export again": [], "rebuild": []}, {}
    for _ in range(repeats):
        for way in seconds:
            with export_again() if way == "export again" else contextlib.nullcontext():
                started = time.perf_counter()
                results[way] = compile_once()
                seconds[way].append(time.perf_counter() - started)
    return seconds, results


def same_report(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decoder", action="store_true", help="also SmolLM2-135M-Instruct (about 3 minutes more)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []

    warm_module, warm_inputs = models.build("vit_small", batch=2)
    tokencompile.optimize(export_module(warm_module, warm_inputs), budget=0.5)
    for name, method in ENCODER_CASES:
        module, inputs = models.build(name, batch=2)
        program = export_module(module, inputs)
        seconds, results = timed(lambda: tokencompile.optimize(program, budget=0.5, method=method), args.repeats)
        a, b = results["export again"], results["rebuild"]
        assert same_report(a.report, b.report), name
        with torch.no_grad():
            assert torch.equal(a.program.module()(*inputs), b.program.module()(*inputs)), name
        rows.append((f"{name} {method} 0.5", seconds))

    if args.decoder:
        from models.decoders import smollm2
        from tokencompile.decoder import Span, compile_decoder, prefill
        from tokencompile.decoder.cli import TEXT_SETTINGS

        model = smollm2().model
        prompt = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
        seconds, results = timed(lambda: compile_decoder(model, prompt, budget=0.6, span=Span(0, 512 - 64),
                                                         **TEXT_SETTINGS["fastv"]), args.repeats)
        a, b = results["export again"], results["rebuild"]
        assert same_report(a.report, b.report)
        assert torch.equal(prefill(a, prompt)[0], prefill(b, prompt)[0])
        rows.append(("SmolLM2 fastv 0.6, 512 tokens", seconds))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats (median)")
    print("| case | exported again (s) | rebuilt (s) | ratio |")
    print("|---|---|---|---|")
    for case, seconds in rows:
        again, rebuilt = statistics.median(seconds["export again"]), statistics.median(seconds["rebuild"])
        print(f"| {case} | {again:.1f} | {rebuilt:.1f} | {again / rebuilt:.2f}x |")


if __name__ == "__main__":
    main()
