"""Fidelity on real weights: all-MiniLM-L6-v2 on the STS-benchmark dev split.

Embeds both sentences of every pair with masked mean pooling, scores pairs by cosine similarity and
reports Spearman's rank correlation with the gold scores, for the original program and for ToMe at
each budget, plus the mean cosine between optimized and original embeddings. Sentences are padded
(or truncated) to a fixed token count, since a program has static token counts.

    python benchmarks/stsb_fidelity.py                      # README table (ToMe)
    python benchmarks/stsb_fidelity.py --tokens 32 --methods all --budgets 0.75,0.5,0.25   # README method table
    python benchmarks/stsb_fidelity.py --tokens 32 --budgets 1.0,0.5 --limit 200
    python benchmarks/stsb_fidelity.py --tokens 32 --budgets 0.75,0.5 --option order=keep   # ToMe order
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models
import tokencompile

DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "stsb", "sts-dev.csv")


def read_pairs(path: str, limit: int | None = None) -> tuple[list[str], list[str], list[float]]:
    first, second, gold = [], [], []
    with open(path, encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 7:
                continue
            gold.append(float(row[4]))
            first.append(row[5])
            second.append(row[6])
    if not gold:
        raise SystemExit(f"no sentence pairs in {path}")
    return first[:limit], second[:limit], gold[:limit]


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@torch.no_grad()
def embed(module, tokenizer, sentences: list[str], tokens: int, batch: int = 64) -> torch.Tensor:
    out = []
    for start in range(0, len(sentences), batch):
        enc = tokenizer(sentences[start:start + batch], padding="max_length", truncation=True, max_length=tokens,
                        return_tensors="pt")
        out.append(module(enc["input_ids"], enc["attention_mask"]))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--tokens", default="32,64", help="padded token counts to evaluate")
    parser.add_argument("--budgets", default="0.75,0.5,0.25")
    parser.add_argument("--methods", default="tome",
                        help="comma-separated methods (see `tokencompile methods`), or `all`")
    parser.add_argument("--limit", type=int, help="use only the first N pairs")
    parser.add_argument("--option", action="append", default=[], help="method option key=value (repeatable)")
    args = parser.parse_args()
    options = dict(option.split("=", 1) for option in args.option)
    torch.set_num_threads(os.cpu_count() or 1)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.minilm_dir())
    first, second, gold = read_pairs(args.data, args.limit)
    module, _ = models.build("minilm")
    lengths = [len(tokenizer(s)["input_ids"]) for s in first + second]
    print(f"STS-benchmark dev: {len(gold)} pairs; model all-MiniLM-L6-v2 (real weights)")
    print("| tokens (padded) | truncated sentences | method | budget | FLOPs ratio | tokens entering blocks | "
          "Spearman x100 | cosine to original |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in [int(t) for t in args.tokens.split(",")]:
        truncated = sum(n > tokens for n in lengths)
        program = tokencompile.compiler.export_module(module, models.text_inputs(2, tokens))
        reference = (embed(module, tokenizer, first, tokens), embed(module, tokenizer, second, tokens))
        original = spearman(torch.nn.functional.cosine_similarity(*reference).tolist(), gold)
        print(f"| {tokens} | {truncated} | original | 1 | 1.000 | {tokens} | {100 * original:.2f} | 1.0000 |")
        methods = sorted(tokencompile.methods.METHODS) if args.methods == "all" else args.methods.split(",")
        for method in methods:
            for budget in [float(b) for b in args.budgets.split(",")]:
                started = time.perf_counter()
                try:
                    result = tokencompile.optimize(program, budget=budget, method=method, options=options)
                except tokencompile.TokenCompileError as error:
                    print(f"| {tokens} | {truncated} | {method} | {budget:g} | not reachable: {error.problem} "
                          "| | | |", flush=True)
                    continue
                optimized = result.program.module()
                a, b = embed(optimized, tokenizer, first, tokens), embed(optimized, tokenizer, second, tokens)
                score = spearman(torch.nn.functional.cosine_similarity(a, b).tolist(), gold)
                fidelity = torch.nn.functional.cosine_similarity(torch.cat([a, b]), torch.cat(reference)).mean()
                report = result.report
                print(f"| {tokens} | {truncated} | {method} | {budget:g} | {report['flops_ratio']:.3f} | "
                      f"{' '.join(map(str, report['tokens_entering_block']))} | {100 * score:.2f} | "
                      f"{fidelity:.4f} |", flush=True)
                print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
