"""Compile time of a decoder sweep with and without ``reuse_traces()`` (SmolLM2-135M-Instruct, real weights).

A sweep compiles the same model on the same prompt once per method and budget. Each compile exports the
prefill, analyses it and counts its FLOPs; inside ``tokencompile.decoder.reuse_traces()`` the first
compile's trace is reused by the others. This script compiles fastv (the text settings of the CLI's sweep)
at each budget twice in one process: each with its own trace, then all inside one ``reuse_traces()``
block. The programs must be the same (equal reports but the timing, equal prefill logits).

    .venv/bin/python benchmarks/decoder_compile_time.py [--budgets 0.8,0.6,0.4] [--tokens 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.decoders import smollm2  # noqa: E402
from tokencompile.decoder import Span, compile_decoder, prefill, reuse_traces  # noqa: E402
from tokencompile.decoder.cli import TEXT_SETTINGS  # noqa: E402


def compile_all(model, prompt, budgets, protected):
    programs, seconds = [], []
    for budget in budgets:
        started = time.perf_counter()
        programs.append(compile_decoder(model, prompt, budget=budget, span=Span(0, prompt.shape[1] - protected),
                                        **TEXT_SETTINGS["fastv"]))
        seconds.append(time.perf_counter() - started)
    return programs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.8,0.6,0.4")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--protected", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    budgets = [float(b) for b in args.budgets.split(",")]
    model = smollm2().model
    prompt = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    fresh, fresh_seconds = compile_all(model, prompt, budgets, args.protected)
    with reuse_traces():
        reused, reused_seconds = compile_all(model, prompt, budgets, args.protected)
    for a, b in zip(fresh, reused):
        assert {k: v for k, v in a.report.items() if k != "seconds"} == \
            {k: v for k, v in b.report.items() if k != "seconds"}
        assert torch.equal(prefill(a, prompt)[0], prefill(b, prompt)[0])

    print(f"SmolLM2-135M-Instruct, {args.tokens}-token prompt, fastv {TEXT_SETTINGS['fastv']}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print("| budget | own trace (s) | reuse_traces (s) |")
    print("|---|---|---|")
    for budget, a, b in zip(budgets, fresh_seconds, reused_seconds):
        print(f"| {budget:g} | {a:.1f} | {b:.1f} |")
    total, total_reused = sum(fresh_seconds), sum(reused_seconds)
    print(f"| all | {total:.1f} | {total_reused:.1f} |")
    print(f"compile time ratio (own trace / reuse_traces): {total / total_reused:.2f}x")


if __name__ == "__main__":
    main()
