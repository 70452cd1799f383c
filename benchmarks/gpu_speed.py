"""GPU speed of optimized ViTs: original vs optimized vs the zero-overhead limit, eager and torch.compile.

On a machine with an NVIDIA GPU (run from the repository root; writes JSON and prints a table):

    python benchmarks/gpu_speed.py --json gpu_speed.json
    python benchmarks/gpu_speed.py --models vit_base:256 --configs budget=0.5,r=8 --compile budget=0.5

For each model (timm, random weights) and configuration (a FLOPs budget or a constant ToMe r) it
optimizes on the CPU in fp32, moves the program to CUDA (``move_to_device_pass``) and casts it to fp16,
then times, interleaved in rounds with CUDA events (median ms per forward):

- ``original``: the exported original program;
- ``optimized``: the tokencompile program (ToMe, proportional attention);
- ``limit``: the zero-overhead limit, the same tokens per block obtained by a free slice of the residual
  stream at the same place (no scoring, no merging);
- ``official``: for ``r=`` configurations, ToMe as the official code computes it (written here from the
  paper's algorithm: bipartite matching on the fly, merge by scatter_reduce, attention un-fused to add
  log sizes), as a reference point for the throughput of existing implementations.

It also reports the share of GPU time spent in the inserted ``tokencompile::`` ops (PyTorch profiler)
and a parity column: the CUDA fp32 program (TF32 off) against the CPU fp32 program on the same
images. ``--compile`` repeats original / optimized / limit under ``torch.compile`` for the configs named.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
import tokencompile  # noqa: E402
from tokencompile.compiler import export_module  # noqa: E402

# ------------------------------------------------------------------------------------------ baselines

class SlicedViT(torch.nn.Module):
    """A timm ViT that keeps the first n_out tokens after each block's attention: the tokens per block
    of an optimized program at no cost of scoring or merging (the zero-overhead limit)."""

    def __init__(self, model, kept: list[int]):
        super().__init__()
        self.model, self.kept = model, kept

    def forward(self, images):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        for block, n_out in zip(m.blocks, self.kept):
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            x = x[:, :n_out]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return m.forward_head(m.norm(x))


class OfficialToMeViT(torch.nn.Module):
    """ToMe as the official code computes it (from the algorithm's description): eager attention with
    log(size) added to the logits, bipartite matching of alternate tokens on head-mean keys, the
    official r cap and output order [unmerged A, B], merge by scatter_reduce."""

    def __init__(self, model, r: int):
        super().__init__()
        self.model, self.r = model, r
        self.protected = model.num_prefix_tokens

    def forward(self, images):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        for block in m.blocks:
            attn = block.attn
            b, n, c = x.shape
            qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            logits = (q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]
            out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
            x = x + block.drop_path1(block.ls1(attn.proj(getattr(attn, "norm", torch.nn.Identity())(out))))
            r = min(self.r, (n - self.protected) // 2)
            if r > 0:
                x, size = self._merge(x, size, k.mean(1), r)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return m.forward_head(m.norm(x))

    def _merge(self, x, size, metric, r):
        with torch.no_grad():
            metric = metric / metric.norm(dim=-1, keepdim=True)
            a, b = metric[:, ::2], metric[:, 1::2]
            scores = a @ b.transpose(-1, -2)
            if self.protected:
                scores[:, 0, :] = -float("inf")
            node_max, node_idx = scores.max(dim=-1)
            edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
            unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
            dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
            if self.protected:
                unm_idx = unm_idx.sort(dim=1)[0]

        def merge(t):
            src, dst = t[:, ::2], t[:, 1::2]
            n, t1, c = src.shape
            unm = src.gather(dim=1, index=unm_idx.expand(n, t1 - r, c))
            src = src.gather(dim=1, index=src_idx.expand(n, r, c))
            dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, reduce="sum")
            return torch.cat([unm, dst], dim=1)

        x = merge(x * size)
        size = merge(size)
        return x / size, size


# ------------------------------------------------------------------------------------------- timing

def time_variants(variants: dict, images, rounds: int, iters: int) -> dict:
    """Median ms per forward of each variant, interleaved A B C A B C ... over rounds."""
    samples = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up (and compilation)
            for _ in range(3):
                fn(images)
        torch.cuda.synchronize()
        for _ in range(rounds):
            for name, fn in variants.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn(images)
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end) / iters)
    return {name: statistics.median(values) for name, values in samples.items()}


def inserted_share(fn, images) -> float:
    """Share of GPU time in tokencompile:: ops (their own kernels and the torch kernels they call)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn(images)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fn(images)
            torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: an aten op's row repeats the device time of the kernels it launched
    total = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    inserted = sum(e.device_time_total for e in events if e.key.startswith("tokencompile::"))
    return inserted / total if total else 0.0


def parity(program, images_cpu) -> float:
    """Max abs difference of the CUDA fp32 program (TF32 off) to the CPU program, relative to max |out|."""
    from torch.export.passes import move_to_device_pass

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        want = program.module()(images_cpu)
        got = move_to_device_pass(copy.deepcopy(program), "cuda").module()(images_cpu.cuda()).cpu()
    return float((got - want).abs().max() / want.abs().max())


def parse_config(text: str) -> dict:
    kind, _, value = text.partition("=")
    return {"budget": float(value)} if kind == "budget" else {"budget": None, "schedule": f"r={value}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_base:256,vit_large:128", help="recipe:batch,...")
    parser.add_argument("--configs", default="budget=0.5,budget=0.25,r=8,r=16")
    parser.add_argument("--compile", default="budget=0.5", help="configs also timed under torch.compile ('' for none)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--time-limit", type=float, default=1e9, help="skip what would start after this many s")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU: this benchmark measures GPU speed (run it on a GPU machine)")
    from torch.export.passes import move_to_device_pass

    started = time.time()
    results = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "dtype": "fp16", "rows": []}
    compiled = [c for c in args.compile.split(",") if c]

    def save():
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)

    for spec in args.models.split(","):
        name, batch = spec.split(":")
        module, example = models.build(name, batch=2)
        program = export_module(module, example)
        images = torch.randn(int(batch), 3, 224, 224, device="cuda", dtype=torch.float16)
        half_module = copy.deepcopy(module).cuda().half().eval()
        original = move_to_device_pass(copy.deepcopy(program), "cuda").module()
        original = copy.deepcopy(original).half()
        for config in args.configs.split(","):
            if time.time() - started > args.time_limit:
                print(f"skipped {name} {config}: time limit", flush=True)
                continue
            t0 = time.time()
            try:
                result = tokencompile.optimize(program, method="tome", **parse_config(config))
            except tokencompile.TokenCompileError as error:
                results["rows"].append({"model": name, "config": config, "error": str(error)})
                print(f"{name} {config}: {error}", flush=True)
                continue
            report = result.report
            kept = report["tokens_after_reduction"]
            optimized = copy.deepcopy(move_to_device_pass(copy.deepcopy(result.program), "cuda").module()).half()
            variants = {"original": original, "optimized": optimized, "limit": SlicedViT(half_module, kept)}
            if config.startswith("r="):
                variants["official"] = OfficialToMeViT(half_module, int(config[2:]))
            if config in compiled:  # what proportional attention costs (SDPA with a mask vs without)
                plain = tokencompile.optimize(program, method="tome", proportional_attention=False,
                                              **parse_config(config))
                variants["optimized_no_prop_attn"] = copy.deepcopy(
                    move_to_device_pass(copy.deepcopy(plain.program), "cuda").module()).half()
            ms = time_variants(variants, images, args.rounds, args.iters)
            row = {"model": name, "batch": int(batch), "config": config, "schedule": report["schedule"],
                   "flops_ratio": report["flops_ratio"], "ms": ms,
                   "speedup": {k: ms["original"] / v for k, v in ms.items()},
                   "inserted_share": inserted_share(optimized, images),
                   "parity_cuda_vs_cpu": parity(result.program, torch.randn(4, 3, 224, 224)),
                   "optimize_s": round(time.time() - t0, 1)}
            if config in compiled and time.time() - started < args.time_limit:
                compiled_ms = time_variants({k: torch.compile(variants[k]) for k in ("original", "optimized", "limit")},
                                            images, args.rounds, args.iters)
                row["compiled_ms"] = compiled_ms
                row["compiled_speedup"] = {k: compiled_ms["original"] / v for k, v in compiled_ms.items()}
            results["rows"].append(row)
            save()
            speed = ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items() if k != "original")
            line = (f"{name} b{batch} {config}: original {ms['original']:.2f} ms; {speed}; optimized / limit "
                    f"{row['speedup']['optimized'] / row['speedup']['limit']:.2f}; inserted ops "
                    f"{100 * row['inserted_share']:.1f}% of GPU time; parity {row['parity_cuda_vs_cpu']:.1e}")
            if "compiled_speedup" in row:
                cs = row["compiled_speedup"]
                line += (f"; compiled: original {compiled_ms['original']:.2f} ms, optimized {cs['optimized']:.2f}x, "
                         f"limit {cs['limit']:.2f}x")
            print(line, flush=True)
    save()


if __name__ == "__main__":
    main()
