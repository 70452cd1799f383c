"""`--schedule auto` vs the constant schedule on held-out data (MiniLM real weights, STS-benchmark dev).

Calibrates on the sentences of the first --calib-pairs pairs, then evaluates Spearman and cosine to the
original on the remaining pairs (held out), for each method and budget.

    python benchmarks/calibrated_schedule.py                          # README table (tome, 0.75 and 0.5)
    python benchmarks/calibrated_schedule.py --methods tome,evit --budgets 0.75,0.5 --tokens 32
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import models  # noqa: E402
import tokencompile  # noqa: E402
from stsb_fidelity import DEFAULT_DATA, embed, read_pairs, spearman  # noqa: E402


def encode(tokenizer, sentences, tokens, batch=64):
    batches = []
    for start in range(0, len(sentences), batch):
        enc = tokenizer(sentences[start:start + batch], padding="max_length", truncation=True, max_length=tokens,
                        return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"]))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--methods", default="tome")
    parser.add_argument("--budgets", default="0.75,0.5")
    parser.add_argument("--calib-pairs", type=int, default=300, help="pairs whose sentences calibrate")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.minilm_dir())
    first, second, gold = read_pairs(args.data)
    calib = encode(tokenizer, first[:args.calib_pairs] + second[:args.calib_pairs], args.tokens)
    first, second, gold = first[args.calib_pairs:], second[args.calib_pairs:], gold[args.calib_pairs:]
    module, _ = models.build("minilm")
    program = tokencompile.compiler.export_module(module, models.text_inputs(2, args.tokens))
    reference = (embed(module, tokenizer, first, args.tokens), embed(module, tokenizer, second, args.tokens))
    original = spearman(torch.nn.functional.cosine_similarity(*reference).tolist(), gold)
    print(f"MiniLM, {args.tokens} tokens; calibration: sentences of {args.calib_pairs} pairs; "
          f"held out: {len(gold)} pairs; original Spearman x100 {100 * original:.2f}")
    print("| method | budget | schedule | r per block | FLOPs ratio | Spearman x100 (held out) | cosine to original |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for budget in [float(b) for b in args.budgets.split(",")]:
            for schedule in ("constant", "auto"):
                result = tokencompile.optimize(program, budget=budget, method=method, schedule=schedule,
                                               calib_inputs=calib if schedule == "auto" else None)
                optimized = result.program.module()
                a = embed(optimized, tokenizer, first, args.tokens)
                b = embed(optimized, tokenizer, second, args.tokens)
                score = spearman(torch.nn.functional.cosine_similarity(a, b).tolist(), gold)
                cosine = torch.nn.functional.cosine_similarity(torch.cat([a, b]), torch.cat(reference)).mean()
                report = result.report
                label = schedule if schedule == "constant" else f"auto ({report['calibration']['chosen']})"
                print(f"| {method} | {budget:g} | {label} | {','.join(map(str, report['schedule']))} | "
                      f"{report['flops_ratio']:.3f} | {100 * score:.2f} | {cosine:.4f} |", flush=True)


if __name__ == "__main__":
    main()
