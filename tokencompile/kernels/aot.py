"""Ahead-of-time compilation of the Triton kernels to PTX and cubin, for GPUs absent from this machine.

``compile_kernels(arch, out_dir)`` writes ``out_dir/sm_<arch>/<name>.ptx``, ``<name>.cubin`` and a
``manifest.json`` that a loader (e.g. a TensorRT plugin) reads:

    {"format": "tokencompile-kernels/1", "arch": 90, "triton": "3.x", "kernels": [
      {"name": "merge_tokens_fp16",          # stable artifact name: <kernel>_<variant>
       "entry": "merge_tokens_kernel",       # function name inside the PTX/cubin
       "ptx": "merge_tokens_fp16.ptx", "cubin": "merge_tokens_fp16.cubin",
       "ptx_no_scratch": "merge_tokens_fp16.noscratch.ptx",    # the same without the scratch params
       "cubin_no_scratch": "merge_tokens_fp16.noscratch.cubin",
       "params": [{"name": "x_ptr", "type": "*fp16"}, ...,
                  {"name": "global_scratch", "type": "*i8"}, {"name": "profile_scratch", "type": "*i8"}],
       "constexprs": {"BLOCK_C": 128, "BLOCK_M": 32},
       "grid": ["B", "n_out", "cdiv(C, 128)"],   # B = batch; other names are the integer params
       "num_warps": 4, "threads_per_block": 128, "num_stages": 3, "shared_bytes": 0,
       "requires": "..."}]}                      # launch precondition, if any

Every launch passes the params in order: inputs, scalars, outputs, then Triton's two scratch pointers,
which may be null (the kernels use no scratch memory; compilation fails if one ever does). The
``*_no_scratch`` files drop those two parameters (they are never read) for loaders that pass only the
kernel's own arguments, such as TensorRT's AOT plugins. Tensors are contiguous unless the kernel takes
strides. Run ``python -m tokencompile.kernels.aot --arch 80 --arch 90 -o DIR``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from . import triton_kernels as kernels

MANIFEST_FORMAT = "tokencompile-kernels/1"
FLOAT_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
SCRATCH_PARAMS = [{"name": "global_scratch", "type": "*i8"}, {"name": "profile_scratch", "type": "*i8"}]


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation to compile: runtime argument types, constexpr values and the launch recipe."""
    name: str
    kernel: object
    types: dict[str, str]
    constexprs: dict[str, object]
    grid: tuple[str, str, str]
    num_warps: int = 4
    requires: str = ""


class CompiledKernel(NamedTuple):
    """One artifact: its stable name, file paths and manifest entry (launch metadata)."""
    name: str
    ptx: Path
    cubin: Path
    metadata: dict


def _tome_match(dtype: str) -> KernelSpec:
    block = kernels.MATCH_BLOCK
    types = {"metric_ptr": FLOAT_TYPES[dtype], "valid_ptr": "*i8", "best_ptr": "*fp32", "best_index_ptr": "*i64",
             "N": "i32", "D": "i32", "num_prefix": "i32", "protect_last_valid": "i32"}
    constexprs = {"PAD_BONUS": kernels.ops.PAD_PAIR_BONUS, "BLOCK_A": block, "BLOCK_B": block, "BLOCK_D": block}
    return KernelSpec(f"tome_match_{dtype}", kernels.tome_match_kernel, types, constexprs,
                      ("B", f"cdiv((N + 1) // 2, {block})", "1"),
                      requires="metric L2-normalised per token; valid int8 [B, N]")


def _tome_rank() -> KernelSpec:
    types = {"best_ptr": "*fp32", "best_index_ptr": "*i64", "valid_ptr": "*i8", "N": "i32", "r": "i32",
             "num_prefix": "i32", "protect_last_valid": "i32", "ab_order": "i32", "rep_ptr": "*i64",
             "src_ptr": "*i64", "dst_ptr": "*i64", "key_ptr": "*i64", "slot_ptr": "*i64"}
    return KernelSpec("tome_rank", kernels.tome_rank_kernel, types, {"BLOCK": kernels.RANK_BLOCK}, ("B", "1", "1"),
                      requires="best/best_index from tome_match; key_ptr and slot_ptr are [B, N] int64 scratch")


def _merge_tokens(dtype: str) -> KernelSpec:
    ptr = FLOAT_TYPES[dtype]
    types = {"x_ptr": ptr, "weight_ptr": ptr, "rep_ptr": "*i64", "src_ptr": "*i64", "dst_ptr": "*i64",
             "out_ptr": ptr, "N": "i32", "C": "i32", "n_out": "i32", "m": "i32"}
    block_c, block_s = 128, kernels.MERGE_BLOCK_S
    return KernelSpec(f"merge_tokens_{dtype}", kernels.merge_tokens_kernel, types,
                      {"BLOCK_S": block_s, "BLOCK_C": block_c, "BLOCK_M": kernels.MERGE_BLOCK_M},
                      ("B", f"cdiv(n_out, {block_s})", f"cdiv(C, {block_c})"))


def _sum_tokens(dtype: str) -> KernelSpec:
    ptr = FLOAT_TYPES[dtype]
    types = {"weight_ptr": ptr, "rep_ptr": "*i64", "src_ptr": "*i64", "dst_ptr": "*i64", "out_ptr": ptr,
             "N": "i32", "n_out": "i32", "m": "i32"}
    block_s = 64
    return KernelSpec(f"sum_tokens_{dtype}", kernels.sum_tokens_kernel, types,
                      {"BLOCK_S": block_s, "BLOCK_M": kernels.MERGE_BLOCK_M}, ("B", f"cdiv(n_out, {block_s})", "1"))


def _probe_scores(dtype: str) -> KernelSpec:
    ptr = FLOAT_TYPES[dtype]
    strides = ["q_stride_b", "q_stride_h", "q_stride_d", "k_stride_b", "k_stride_h", "k_stride_n", "k_stride_d"]
    types = {"q_ptr": ptr, "k_ptr": ptr, "valid_ptr": "*i8", "out_ptr": ptr, "H": "i32", "N": "i32", "D": "i32",
             "scale": "fp32", **dict.fromkeys(strides, "i32")}
    max_heads = 32
    return KernelSpec(f"probe_scores_{dtype}", kernels.probe_scores_kernel, types,
                      {"BLOCK_N": kernels.PROBE_BLOCK_N, "BLOCK_D": kernels.PROBE_BLOCK_D, "BLOCK_H": max_heads}, ("B", "1", "1"),
                      requires=f"H <= {max_heads}; strides in elements; scale = D ** -0.5")


GATHER_WIDTHS = {"b1": "*u8", "b2": "*i16", "b4": "*i32", "b8": "*i64"}
# rows: per-token feature rows (long inner axis); flat: one value per token ([B, N] masks, ids)
GATHER_TILES = {"rows": (16, 128), "flat": (128, 1)}


def _gather_tokens(width: str, tile: str) -> KernelSpec:
    block_s, block_i = GATHER_TILES[tile]
    types = {"t_ptr": GATHER_WIDTHS[width], "rep_ptr": "*i64", "out_ptr": GATHER_WIDTHS[width],
             "t_batch_stride": "i32", "outer": "i32", "N": "i32", "inner": "i32", "n_out": "i32"}
    grid = f"B * outer * cdiv(n_out, {block_s}) * cdiv(inner, {block_i})"
    return KernelSpec(f"gather_tokens_{width}_{tile}", kernels.gather_tokens_kernel, types,
                      {"BLOCK_S": block_s, "BLOCK_I": block_i}, (grid, "1", "1"),
                      requires="element width in bytes as the name says (bN); t viewed as [Bt, outer, N, inner]")


def kernel_specs() -> list[KernelSpec]:
    """Every specialisation shipped: float kernels in fp32/fp16/bf16, gathers by element width."""
    specs = []
    for dtype in FLOAT_TYPES:
        specs += [_tome_match(dtype), _merge_tokens(dtype), _sum_tokens(dtype), _probe_scores(dtype)]
    specs += [_gather_tokens(width, tile) for width in GATHER_WIDTHS for tile in GATHER_TILES]
    specs.append(_tome_rank())
    return specs


def _jit_function(kernel) -> JITFunction:
    if not isinstance(kernel, JITFunction):
        raise TypeError("cannot compile ahead of time with TRITON_INTERPRET=1 set: the kernels are interpreted")
    return kernel


def compile_spec(spec: KernelSpec, arch: int):
    """triton.compile one specialisation for sm_<arch>; returns the CompiledKernel object of Triton."""
    fn = _jit_function(spec.kernel)
    signature = {name: spec.types.get(name, "constexpr") for name in fn.arg_names}
    missing = [name for name, ty in signature.items() if ty == "constexpr" and name not in spec.constexprs]
    if missing:
        raise ValueError(f"{spec.name}: no type or value for {missing}")
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    if compiled.metadata.global_scratch_size or compiled.metadata.profile_scratch_size:
        raise RuntimeError(f"{spec.name} needs scratch memory, which the manifest cannot describe")
    return compiled


def strip_scratch_params(ptx: str, entry: str, n_params: int) -> str:
    """The PTX without Triton's two trailing scratch-pointer parameters (after the ``n_params`` own
    ones); refuses if the kernel body reads them."""
    scratch = [f"{entry}_param_{index}" for index in (n_params, n_params + 1)]
    if any(ptx.count(name) != 1 for name in scratch):
        raise ValueError(f"{entry}: scratch parameters are used or missing; cannot drop them")
    pattern = rf",\s*\n\s*\.param [^\n]*\b{scratch[0]},\s*\n\s*\.param [^\n]*\b{scratch[1]}\s*\n\)"
    stripped, count = re.subn(pattern, "\n)", ptx)
    if count != 1:
        raise ValueError(f"{entry}: unexpected parameter list layout in the PTX")
    return stripped


def assemble(ptx_path: Path, arch: int, cubin_path: Path) -> None:
    """PTX -> cubin with the ptxas that Triton uses."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    subprocess.run([triton.knobs.nvidia.ptxas.path, f"--gpu-name={gpu}", str(ptx_path), "-o", str(cubin_path)],
                   check=True, capture_output=True)


def _manifest_entry(spec: KernelSpec, compiled, fn: JITFunction) -> dict:
    meta = compiled.metadata
    params = [{"name": name, "type": spec.types[name]} for name in fn.arg_names if name in spec.types]
    return {
        "name": spec.name,
        "entry": meta.name,
        "ptx": f"{spec.name}.ptx",
        "cubin": f"{spec.name}.cubin",
        "ptx_no_scratch": f"{spec.name}.noscratch.ptx",
        "cubin_no_scratch": f"{spec.name}.noscratch.cubin",
        "params": params + SCRATCH_PARAMS,
        "constexprs": dict(spec.constexprs),
        "grid": list(spec.grid),
        "num_warps": meta.num_warps,
        "threads_per_block": meta.num_warps * meta.warp_size,
        "num_stages": meta.num_stages,
        "shared_bytes": meta.shared,
        "requires": spec.requires,
    }


def compile_kernels(arch: int, out_dir: str | Path, specs: list[KernelSpec] | None = None) -> list[CompiledKernel]:
    """Compile every kernel (or ``specs``) for sm_<arch> into ``out_dir/sm_<arch>`` with a manifest."""
    if arch not in (80, 90):
        raise ValueError(f"arch must be 80 or 90, got {arch}")
    target_dir = Path(out_dir) / f"sm_{arch}"
    target_dir.mkdir(parents=True, exist_ok=True)
    results, entries = [], []
    for spec in specs if specs is not None else kernel_specs():
        compiled = compile_spec(spec, arch)
        entry = _manifest_entry(spec, compiled, _jit_function(spec.kernel))
        ptx, cubin = target_dir / entry["ptx"], target_dir / entry["cubin"]
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        no_scratch = target_dir / entry["ptx_no_scratch"]
        no_scratch.write_text(strip_scratch_params(compiled.asm["ptx"], entry["entry"], len(spec.types)))
        assemble(no_scratch, arch, target_dir / entry["cubin_no_scratch"])
        entries.append(entry)
        results.append(CompiledKernel(spec.name, ptx, cubin, entry))
    manifest = {"format": MANIFEST_FORMAT, "arch": arch, "triton": triton.__version__, "kernels": entries}
    (target_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokencompile.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=(80, 90),
                        help="SM architecture (repeatable; default: 80 and 90)")
    parser.add_argument("-o", "--out-dir", required=True, help="output directory (one sm_<arch> folder per arch)")
    args = parser.parse_args(argv)
    for arch in args.arch or [80, 90]:
        compiled = compile_kernels(arch, args.out_dir)
        print(f"sm_{arch}: {len(compiled)} kernels -> {Path(args.out_dir) / f'sm_{arch}'}")


if __name__ == "__main__":
    main()
