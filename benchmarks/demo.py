"""The demo: optimize, save, reload and run two models, and print speed-up and fidelity.

1. ViT-S/16 (timm, random weights: no pretrained ViT can be downloaded here) at budget 0.5 on the
   ImageNet sample photos: optimize, save and reload the program, export both programs to ONNX, and
   print the FLOPs ratio, the latency of original vs optimized in PyTorch and in ONNX Runtime
   (interleaved, one process), and the agreement of the optimized logits with the original.
2. all-MiniLM-L6-v2 (real weights) at budget 0.75 on STS-benchmark dev pairs: Spearman x100 of the
   original and of the optimized program.

    bash .ci/setup && .venv/bin/python benchmarks/demo.py
"""

from __future__ import annotations

import glob
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from stsb_fidelity import DEFAULT_DATA, embed, read_pairs, spearman

import models
import tokencompile
from tokencompile.lowering.onnx_export import export_onnx, ort_feeds, ort_session

IMAGES = os.path.join(os.path.dirname(ROOT), "shared", "data", "images")
ARTIFACTS = os.path.join(ROOT, "artifacts")


def load_images(count: int) -> torch.Tensor:
    from PIL import Image

    mean, std = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5])  # timm ViT-S/16 preprocessing
    batch = []
    for path in sorted(glob.glob(os.path.join(IMAGES, "*.JPEG")))[:count]:
        image = Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255
        batch.append(((pixels - mean) / std).permute(2, 0, 1))
    return torch.stack(batch)


@torch.no_grad()
def interleaved_latency(first, second, inputs, rounds: int = 6) -> tuple[float, float]:
    first(*inputs), second(*inputs)  # warm-up
    a, b = [], []
    for _ in range(rounds):
        for module, times in ((first, a), (second, b)):
            start = time.perf_counter()
            module(*inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def vit_demo() -> None:
    print("== ViT-S/16, budget 0.5 ==", flush=True)
    program = models.export("vit_small")
    result = tokencompile.optimize(program, budget=0.5)
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, "vit_small.tc.pt2")
    torch.export.save(result.program, path)
    optimized = torch.export.load(path).module()
    original = program.module()
    images = load_images(8)
    before, after = interleaved_latency(original, optimized, (images,))
    with torch.no_grad():
        want, got = original(images), optimized(images)
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean()
    cosine = torch.nn.functional.cosine_similarity(want, got).mean()
    r = result.report
    print(f"schedule r={','.join(map(str, r['schedule']))}; tokens entering blocks: "
          f"{' '.join(map(str, r['tokens_entering_block']))}")
    print(f"FLOPs ratio {r['flops_ratio']:.3f}; saved {path}")
    print(f"PyTorch eager, batch 8: {before * 1e3:.0f} ms -> {after * 1e3:.0f} ms = {before / after:.2f}x speed-up")
    onnx_original, onnx_optimized = os.path.join(ARTIFACTS, "vit_small.onnx"), os.path.join(ARTIFACTS, "vit_small.tc.onnx")
    export_onnx(program, onnx_original, (images,))
    export_onnx(result.program, onnx_optimized, (images,))
    sessions = [ort_session(p) for p in (onnx_original, onnx_optimized)]
    runners = [lambda x, s=s: s.run(None, ort_feeds(s, (x,))) for s in sessions]
    before, after = interleaved_latency(runners[0], runners[1], (images,))
    error = float(np.abs(runners[1](images)[0] - got.numpy()).max())
    print(f"ONNX Runtime, batch 8: {before * 1e3:.0f} ms -> {after * 1e3:.0f} ms = {before / after:.2f}x speed-up "
          f"(ONNX vs PyTorch max abs error {error:.1e}); wrote {onnx_optimized}")
    print(f"fidelity (random weights, 8 photos): top-1 agreement {agree:.0%}, logit cosine {cosine:.3f}")


def minilm_demo(pairs: int = 300, tokens: int = 32) -> None:
    print(f"== all-MiniLM-L6-v2 (real weights), budget 0.75, STS-b dev first {pairs} pairs ==", flush=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.minilm_dir())
    first, second, gold = read_pairs(DEFAULT_DATA, pairs)
    module, _ = models.build("minilm")
    program = tokencompile.compiler.export_module(module, models.text_inputs(2, tokens))
    result = tokencompile.optimize(program, budget=0.75)
    scores = {}
    for label, model in (("original", program.module()), ("optimized", result.program.module())):
        a, b = embed(model, tokenizer, first, tokens), embed(model, tokenizer, second, tokens)
        scores[label] = 100 * spearman(torch.nn.functional.cosine_similarity(a, b).tolist(), gold)
    print(f"FLOPs ratio {result.report['flops_ratio']:.3f}; Spearman x100: original {scores['original']:.2f}, "
          f"optimized {scores['optimized']:.2f}")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    vit_demo()
    minilm_demo()
