"""Where an optimized program spends its time on the GPU: host syncs, the kernel table, CPU launch cost.

    python benchmarks/gpu_profile.py --model vit_base --batch 256 --budget 0.5

Prints the operations that synchronise with the host during one forward (torch.cuda sync debug
mode), the top kernels by GPU time and the top ops by CPU time (PyTorch profiler, fp16), the GPU busy
share of the wall time, and the wall time of the token ops one by one (triton.testing.do_bench).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
import tokencompile  # noqa: E402
from tokencompile.compiler import export_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU: this profile needs one (run it on a GPU machine)")
    from torch.export.passes import move_to_device_pass
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    module, example = models.build(args.model, batch=2)
    result = tokencompile.optimize(export_module(module, example), budget=args.budget)
    program = copy.deepcopy(move_to_device_pass(copy.deepcopy(result.program), "cuda").module()).half()
    images = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        for _ in range(3):
            program(images)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            program(images)
        torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        print(f"host syncs in one forward: {len(syncs)}", *sorted(set(syncs))[:10], sep="\n  ", flush=True)

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(3):
                program(images)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / 3
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 3 / 1e3
    print(f"wall {wall * 1e3:.2f} ms per forward, GPU busy {gpu:.2f} ms ({100 * gpu / (wall * 1e3):.0f}%)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))

    from tokencompile.kernels import triton_kernels as kernels

    tc = torch.ops.tokencompile
    n, channels = result.report["tokens_entering_block"][1], images.shape[1]
    x = torch.randn(args.batch, n, 768, device="cuda", dtype=torch.float16)
    metric = torch.randn(args.batch, n, 64, device="cuda", dtype=torch.float16)
    sizes = torch.ones(args.batch, n, device="cuda", dtype=torch.float16)
    r = result.report["schedule"][1]
    rep, src, dst = tc.tome_plan(metric, None, r, 1, False, True)
    best, best_b = kernels.tome_matches(metric, None, 1, False)
    for label, fn in [("tome_plan (op)", lambda: tc.tome_plan(metric, None, r, 1, False, True)),
                      ("tome_matches (kernel launcher)", lambda: kernels.tome_matches(metric, None, 1, False)),
                      ("plan_from_matches (torch ops)",
                       lambda: tokencompile.ops.plan_from_matches(best, best_b, n, r, True, None, 1, False)),
                      ("merge_tokens (op)", lambda: tc.merge_tokens(x, sizes, rep, src, dst)),
                      ("sum_tokens (op)", lambda: tc.sum_tokens(sizes, rep, src, dst)),
                      ("torch.sort [B, N/2] stable", lambda: torch.sort(best, dim=1, descending=True, stable=True))]:
        print(f"{label}: {do_bench(fn) * 1e3:.0f} us (wall, do_bench)", flush=True)


if __name__ == "__main__":
    main()
