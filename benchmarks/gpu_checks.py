"""GPU checks that only a GPU can run: CUDA parity of every method, programs exported on CUDA,
torch.compile (default and CUDA graphs), fp16 / bf16 casts, and the token ops' speed against their
memory traffic.

    python benchmarks/gpu_checks.py --json gpu_checks.json

Each check prints one line (PASS / FAIL with the number); the exit code is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import models  # noqa: E402
import tokencompile  # noqa: E402
from tokencompile.compiler import export_module  # noqa: E402

METHODS = ["tome", "pitome", "tofu", "visionzip", "evit", "dart", "divprune", "zipcache", "random"]
results: list[dict] = []


def check(name: str, ok: bool, value, detail: str = "") -> None:
    results.append({"check": name, "ok": bool(ok), "value": value, "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'} {name}: {value} {detail}", flush=True)


def relative_error(got, want) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def method_parity(name: str, budget: float, methods: list[str] = METHODS) -> None:
    """Program built on the CPU, moved to CUDA: fp32 (TF32 off) equals the CPU; fp16 / bf16 casts run."""
    from torch.export.passes import move_to_device_pass

    module, inputs = models.build(name, batch=8)
    program = export_module(module, models.build(name, batch=2)[1])
    with torch.no_grad():  # what a cast costs the original model: the scale for the optimized programs
        original = move_to_device_pass(copy.deepcopy(program), "cuda").module()
        want = first(original(*[x.cuda() for x in inputs]))
        own_error = {dtype: relative_error(first(copy.deepcopy(original).to(dtype)(
            *[x.cuda().to(dtype) if x.is_floating_point() else x.cuda() for x in inputs])), want)
            for dtype in (torch.float16, torch.bfloat16)}
    for method in methods:
        try:
            result = tokencompile.optimize(program, budget=budget, method=method)
        except tokencompile.TokenCompileError as error:
            check(f"{name} {method} optimize", False, str(error))
            continue
        with torch.no_grad():
            want = first(result.program.module()(*inputs))
            try:
                cuda = move_to_device_pass(copy.deepcopy(result.program), "cuda")
                got = first(cuda.module()(*[x.cuda() for x in inputs]))
                check(f"{name} {method} CUDA fp32 vs CPU", relative_error(got, want) < 1e-4, relative_error(got, want))
                for dtype in (torch.float16, torch.bfloat16):
                    cast = copy.deepcopy(cuda.module()).to(dtype)
                    args = [x.cuda().to(dtype) if x.is_floating_point() else x.cuda() for x in inputs]
                    out = first(cast(*args))
                    error = relative_error(out, want)
                    check(f"{name} {method} CUDA {str(dtype)[6:]} cast runs", bool(torch.isfinite(out).all()), error,
                          f"(max error relative to the fp32 output; the original model's own cast: "
                          f"{own_error[dtype]:.3g}; reduced tokens may differ near ties)")
            except Exception as error:  # noqa: BLE001 - report and go on
                check(f"{name} {method} on CUDA", False, f"{type(error).__name__}: {str(error).splitlines()[0]}")


def exported_on_cuda() -> None:
    """Export and optimize on the GPU (no CPU program at all), for the methods that build tensors."""
    module, inputs = models.build("vit_small", batch=8)
    module = module.cuda()
    inputs = tuple(x.cuda() for x in inputs)
    program = export_module(module, inputs)
    for method in ("tome", "pitome", "random", "evit"):
        try:
            result = tokencompile.optimize(program, budget=0.5, method=method)
            with torch.no_grad():
                out = first(result.program.module()(*inputs))
            check(f"vit_small {method} exported and optimized on CUDA", out.is_cuda and torch.isfinite(out).all(),
                  tuple(out.shape))
        except Exception as error:  # noqa: BLE001
            check(f"vit_small {method} exported and optimized on CUDA", False,
                  f"{type(error).__name__}: {str(error).splitlines()[0]}")


def compiled(name: str, method: str) -> None:
    from torch.export.passes import move_to_device_pass

    module, inputs = models.build(name, batch=8)
    program = export_module(module, models.build(name, batch=2)[1])
    result = tokencompile.optimize(program, budget=0.5, method=method)
    gm = move_to_device_pass(copy.deepcopy(result.program), "cuda").module()
    args = [x.cuda() for x in inputs]
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        want = first(gm(*args))
        for mode in ("default", "reduce-overhead"):
            try:
                fn = torch.compile(copy.deepcopy(gm), mode=mode)
                for _ in range(3):
                    got = first(fn(*args)).clone()
                error = relative_error(got, want)
                check(f"{name} {method} torch.compile(mode={mode!r}) vs eager", error < 1e-4, error)
            except Exception as error:  # noqa: BLE001
                check(f"{name} {method} torch.compile(mode={mode!r})", False,
                      f"{type(error).__name__}: {str(error).splitlines()[0]}")


def op_speed() -> None:
    """Each token op's time against its own memory traffic, at ViT-B / batch 256 sizes, fp16."""
    from triton.testing import do_bench

    tc = torch.ops.tokencompile
    batch, n, channels = 256, 197, 768
    x = torch.randn(batch, n, channels, device="cuda", dtype=torch.float16)
    sizes = torch.ones(batch, n, device="cuda", dtype=torch.float16)
    metric = torch.randn(batch, n, 64, device="cuda", dtype=torch.float16)
    bandwidth = 4.0e12  # bytes/s, about what a device-to-device copy reaches on an H100/H200
    for r in (8, 48, 98):
        rep, src, dst = tc.tome_plan(metric, None, r, 1, False, True)
        n_out = n - r
        moved = (batch * n * channels + batch * n_out * channels) * 2
        ms = do_bench(lambda: tc.merge_tokens(x, sizes, rep, src, dst))
        ideal = moved / bandwidth * 1e3
        check(f"merge_tokens r={r}", ms < 4 * ideal + 0.01, f"{ms * 1e3:.0f} us", f"(memory traffic {ideal * 1e3:.0f} us)")
        ms = do_bench(lambda: tc.gather_tokens(x, rep, 1))
        check(f"gather_tokens r={r}", ms < 4 * ideal + 0.01, f"{ms * 1e3:.0f} us", f"(memory traffic {ideal * 1e3:.0f} us)")
        ms = do_bench(lambda: tc.tome_plan(metric, None, r, 1, False, True))
        check(f"tome_plan r={r}", True, f"{ms * 1e3:.0f} us")
    # reference merge in torch ops (what the CPU runs), on the GPU, for scale
    from tokencompile import ops

    rep, src, dst = tc.tome_plan(metric, None, 8, 1, False, True)
    ms = do_bench(lambda: ops._fold(ops._rows(x, rep), ops._rows(x, src), dst))
    check("torch scatter-add merge r=8 (for scale)", True, f"{ms * 1e3:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU: these checks need one (run them on a GPU machine)")
    started = time.time()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    op_speed()
    compiled("vit_small", "tome")  # first: CUDA graphs (reduce-overhead) were cut off by a time limit once
    method_parity("vit_small", 0.5)
    method_parity("hf_bert", 0.5, ["tome", "pitome", "evit", "random"])
    exported_on_cuda()
    print(f"{sum(r['ok'] for r in results)} passed, {sum(not r['ok'] for r in results)} failed "
          f"in {time.time() - started:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "torch": torch.__version__, "checks": results}, handle, indent=2)
    sys.exit(1 if any(not r["ok"] for r in results) else 0)


if __name__ == "__main__":
    main()
