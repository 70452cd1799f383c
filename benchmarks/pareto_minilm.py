"""Fidelity vs cost for every reduction method: all-MiniLM-L6-v2 (real weights) on the STS-benchmark dev split.

Sentences are padded (or truncated) to 32 tokens. Every registered method (random pruning included, as the
floor any method should beat) is compiled at each budget; the plot shows STS Spearman against the FLOPs
ratio (or, with --latency, the ONNX Runtime latency ratio), one line per method, the original as a star.

    python benchmarks/pareto_minilm.py                        # docs/pareto_minilm.png + .json (README figure)
    python benchmarks/pareto_minilm.py --limit 300 --latency  # quicker, x axis = measured ORT latency
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models
from tokencompile.compiler import export_module
from tokencompile.evaluation import format_sweep, load_data, plot_pareto, sweep
from tokencompile.evaluation.sweep import write_json
from tokencompile.methods import METHODS

DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "stsb", "sts-dev.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--tokens", type=int, default=32, help="padded token count")
    parser.add_argument("--methods", default=",".join(sorted(METHODS)))
    parser.add_argument("--budgets", default="0.75,0.5,0.25")
    parser.add_argument("--limit", type=int, help="use only the first N pairs")
    parser.add_argument("--latency", action="store_true", help="also time ONNX Runtime (x axis = latency ratio)")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "pareto_minilm.png"))
    parser.add_argument("--json", default=os.path.join(ROOT, "docs", "pareto_minilm.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()

    module, _ = models.build("minilm")
    example = models.text_inputs(2, args.tokens)
    program = export_module(module, example)
    data = load_data(args.data, program, tokenizer=models.minilm_dir(), limit=args.limit)
    pairs = len(data) // 2
    print(f"STS-benchmark dev: {pairs} pairs ({data.truncated} of {len(data)} sentences truncated to "
          f"{args.tokens} tokens); all-MiniLM-L6-v2, real weights", flush=True)
    results = sweep(program, example, data, "sts", args.methods.split(","),
                    [float(b) for b in args.budgets.split(",")], latency=args.latency,
                    progress=lambda text: print(text, file=sys.stderr, flush=True))
    results.update(model="all-MiniLM-L6-v2", tokens=args.tokens, pairs=pairs, data=os.path.basename(args.data))
    print(format_sweep(results))
    write_json(results, args.json)
    plot_pareto(results, args.plot, title=f"all-MiniLM-L6-v2, STS-b dev ({pairs} pairs, {args.tokens} tokens): "
                                          "labels = budget")
    print(f"wrote {args.plot} and {args.json} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
