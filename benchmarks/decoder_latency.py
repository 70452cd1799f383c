"""Decoder latency in ONNX Runtime (CPU): the reduced prefill against the original, and one decode step
on the reduced KV cache against the full one. SmolLM2-135M-Instruct (real weights), one process,
interleaved rounds, medians.

Prefill: both prefill programs (budget 1.0 and the reduced one) are exported with
`tokencompile.decoder.onnx_export` and timed A B A B ...; the FLOPs limit of the speed-up is
1 / (FLOPs ratio counted on the program). Decode: one decode.onnx (it does not depend on the
reduction) fed the caches of the full and of the reduced prefill; its FLOPs limit comes from the
FLOPs counted on the decode step at both cache sizes.

    .venv/bin/python benchmarks/decoder_latency.py [--tokens 1024] [--budget 0.5] [--layer K|auto]
        [--sinks N] [--pool W] [--lookup N] [--rounds 5] [--json F]

The original is the budget-1.0 program: both compute the last layer's queries, attention and MLP for the
last token alone, and the FLOPs ratio is between the two timed programs.

Measured here (2 cores, 2026-12-02; benchmarks/results/decoder_latency_cpu_1024.log): prefill 3214 ->
1553 ms, 2.07x at FLOPs ratio 0.516 (limit 1.94x); one decode step 64.5 -> 50.3 ms, 1.28x (FLOPs ratio
0.913, limit 1.10x). The machine ran about 2.8x slower than on 2026-11-30 (the decode step, untouched by
the change, took 23.2 ms then), when, before the dead positions were removed and against the model's
own prefill, it gave 1157 -> 504 ms, 2.30x at 0.499 (limit 2.00x), and 23.2 -> 20.0 ms, 1.16x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.decoder_fidelity import license_token_ids
from benchmarks.perf_table import machine
from models.decoders import smollm2, smollm2_tokenizer
from tokencompile.decoder import Span, compile_decoder
from tokencompile.decoder.onnx_export import DecodeStep, OnnxRunner, export_decoder_onnx
from tokencompile.flops import count_flops


def _median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def _interleaved(calls: dict, rounds: int) -> dict:
    times = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: _median_ms(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="prompt length")
    parser.add_argument("--budget", type=float, default=0.5, help="prefill FLOPs budget")
    parser.add_argument("--layer", default="2", help="FastV's K, or auto (the layer rule)")
    parser.add_argument("--sinks", type=int, default=0, help="the first prompt tokens never removed")
    parser.add_argument("--pool", type=int, default=1, help="average the score over this many neighbours (odd)")
    parser.add_argument("--lookup", type=int, default=0, help="prompt-lookup prior over the last N prompt tokens")
    parser.add_argument("--protected", type=int, default=64, help="last prompt tokens kept (outside the span)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    layer = args.layer if args.layer == "auto" else int(args.layer)
    scoring = {"sinks": args.sinks, "pool": args.pool, "lookup": args.lookup}
    tokenizer = smollm2_tokenizer()
    ids, sources = license_token_ids(tokenizer, ["torch", "transformers", "numpy", "scipy"], args.tokens)
    prompt = ids[:1]
    model = smollm2().model
    span = Span(0, args.tokens - args.protected)
    print(f"machine: {machine()}; {args.threads} threads; {args.rounds} interleaved rounds; median latency")
    print(f"prompt: the first {args.tokens} tokens of {sources[0]}; span: all but the last {args.protected}")

    with tempfile.TemporaryDirectory() as tmp:
        programs, runners = {}, {}
        for name, budget in (("original", 1.0), ("reduced", args.budget)):
            started = time.perf_counter()
            programs[name] = compile_decoder(model, prompt, budget=budget, layer=layer, span=span, **scoring)
            folder = os.path.join(tmp, name)
            export_decoder_onnx(programs[name], folder)
            runners[name] = OnnxRunner(folder, threads=args.threads)
            print(f"{name}: compiled and exported in {time.perf_counter() - started:.0f} s; tokens per layer "
                  f"{programs[name].report['tokens_per_layer']}")
        # both programs compute the last layer's queries, attention and MLP for the last token alone (exact), so
        # the baseline is the unreduced program as tokencompile compiles it, a little faster than the model's own
        ratio = programs["reduced"].report["flops_ratio"] / programs["original"].report["flops_ratio"]
        prefill_ms = _interleaved({name: (lambda r=runner: r.prefill(prompt)) for name, runner in runners.items()},
                                  args.rounds)

        states = {name: runner.prefill(prompt) for name, runner in runners.items()}
        step = DecodeStep(model).eval()
        decode_flops, calls = {}, {}
        for name, (logits, caches) in states.items():
            token = logits.argmax(-1, keepdim=True)
            position = torch.full_like(token, args.tokens)
            past = tuple(t for kv in caches for t in kv)
            decode_flops[name] = count_flops(step, (token, position, past))
            calls[name] = (lambda c=caches, t=token, p=position: runners["original"].decode(t, p, c))
        decode_ms = _interleaved(calls, args.rounds * 4)
        cache = {name: sum(int(k.shape[2]) for k, _ in caches) for name, (_, caches) in states.items()}

    prefill_speedup = prefill_ms["original"] / prefill_ms["reduced"]
    decode_speedup = decode_ms["original"] / decode_ms["reduced"]
    decode_ratio = decode_flops["reduced"] / decode_flops["original"]
    print("| step | FLOPs ratio | original ms | reduced ms | speed-up | FLOPs limit | speed-up / limit |")
    print("|---|---|---|---|---|---|---|")
    print(f"| prefill, {args.tokens} tokens, budget {args.budget:g} | {ratio:.3f} | {prefill_ms['original']:.0f} | "
          f"{prefill_ms['reduced']:.0f} | {prefill_speedup:.2f}x | {1 / ratio:.2f}x | {prefill_speedup * ratio:.2f} |")
    print(f"| decode step, cache {cache['original']} -> {cache['reduced']} token-layers | {decode_ratio:.3f} | "
          f"{decode_ms['original']:.1f} | {decode_ms['reduced']:.1f} | {decode_speedup:.2f}x | "
          f"{1 / decode_ratio:.2f}x | {decode_speedup * decode_ratio:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine(), "tokens": args.tokens, "budget": args.budget, "rounds": args.rounds,
                       "prefill_ms": prefill_ms, "prefill_flops_ratio": ratio, "decode_ms": decode_ms,
                       "decode_flops": decode_flops, "cache_token_layers": cache,
                       "report": programs["reduced"].report}, handle, indent=1)


if __name__ == "__main__":
    main()
