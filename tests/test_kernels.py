"""Tests of the fused Triton kernels (``tokencompile.kernels``) against the PyTorch reference ops.

Kernel runs use the Triton interpreter on CPU tensors. Triton reads ``TRITON_INTERPRET`` when it is
imported (triton.language's own helpers such as ``tl.max`` are jit functions decorated at import) and
again at each ``@triton.jit``; a process that imported Triton without it cannot interpret kernels, and
setting it in this process would both depend on test order and leak into other test modules. So the
interpreter checks run in one child process: this file run as a script with ``TRITON_INTERPRET=1``,
started once by a module fixture; each check comes back as its own parametrised test.

The ahead-of-time tests compile in this process (no interpreter needed): PTX and cubin for sm_80 and
sm_90 for every kernel; the slow test compiles every shipped specialisation through the CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from tokencompile import ops
from tokencompile.lowering.plugin_onnx import PLUGIN_OPS
from tokencompile.lowering.tensorrt_build import abi_problems

CHECKS = {}
FP32_TOL = {"atol": 1e-6, "rtol": 1e-6}
# kernels accumulate in fp32 and round once; compared with the reference run in fp32 on the same inputs
HALF_TOL = {torch.float16: {"atol": 1e-3, "rtol": 1e-3}, torch.bfloat16: {"atol": 8e-3, "rtol": 8e-3}}


def interpreter_check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def _kernels():
    from tokencompile.kernels import triton_kernels
    return triton_kernels


def _valid(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def _tome_cap(valid, batch: int, n: int, num_prefix: int, protect_last_valid: bool) -> int:
    """Largest r: every A token that is not protected merges."""
    protect = ops.protected_mask(valid, (batch, n), num_prefix, protect_last_valid, "cpu")
    return (n + 1) // 2 - int(protect[:, 0::2].sum(1).max())


def _assert_same_plan(got, want, context: str) -> None:
    for name, g, w in zip(("rep", "src", "dst"), got, want):
        assert torch.equal(g, w), f"{context}: {name} differs\nkernel    {g.tolist()}\nreference {w.tolist()}"


def _check_tome(metric, valid, num_prefix, protect_last_valid, rs, context):
    batch, n, _ = metric.shape
    cap = _tome_cap(valid, batch, n, num_prefix, protect_last_valid)
    for r in sorted({0, *(r for r in rs if r <= cap), cap}):
        for ab_order in (False, True):
            args = (metric, valid, r, num_prefix, protect_last_valid, ab_order)
            _assert_same_plan(_kernels().tome_plan(*args), ops.tome_plan(*args), f"{context}, r={r}, ab={ab_order}")


# ---------------------------------------------------------------- tome_plan (match kernel + ranking)

@interpreter_check
def tome_plan_shapes():
    torch.manual_seed(0)
    # (B, N, D): odd N, several D tiles (D > 32), several A and B tiles (N > 64)
    for batch, n, dim in [(1, 2, 4), (1, 9, 16), (3, 13, 40), (2, 70, 8)]:
        metric = torch.randn(batch, n, dim)
        for num_prefix in (0, 1, 2):
            _check_tome(metric, None, num_prefix, False, (1, 3), f"B={batch} N={n} D={dim} prefix={num_prefix}")


@interpreter_check
def tome_plan_padding():
    torch.manual_seed(1)
    metric = torch.randn(3, 15, 12)
    valid = _valid([15, 9, 4], 15)
    for protect_last_valid in (True, False):
        _check_tome(metric, valid, 1, protect_last_valid, (3, 6), f"padding, protect_last_valid={protect_last_valid}")


@interpreter_check
def tome_plan_ties():
    torch.manual_seed(2)
    # one-hot rows: similarities are exactly 0 or 1, so equal scores are exact in kernel and reference
    prototypes = torch.randint(0, 3, (2, 70))
    metric = torch.nn.functional.one_hot(prototypes, 6).float()
    valid = _valid([70, 51], 70)
    _check_tome(metric, None, 1, False, (5, 20), "one-hot ties")
    _check_tome(metric, valid, 1, True, (5, 20), "one-hot ties with padding")

    identical = torch.ones(2, 70, 4)
    _check_tome(identical, None, 0, False, (2, 17), "identical tokens")
    _, src, dst = _kernels().tome_plan(identical, None, 2, 0, False)
    # every A token ties with every B token: the lowest A tokens merge, into the lowest B token (slot 0)
    assert src.tolist() == [[0, 2]] * 2 and dst.tolist() == [[0, 0]] * 2


@interpreter_check
def tome_plan_half_precision():
    torch.manual_seed(3)
    valid = _valid([40, 29], 40)
    for dtype in (torch.float16, torch.bfloat16):
        for seed in range(3):
            metric = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(seed)).to(dtype)
            _check_tome(metric, valid, 1, True, (7,), f"{dtype}, seed {seed}")


# ---------------------------------------------------------------- merge_tokens / sum_tokens

def _plans(batch: int, n: int):
    """A mix of plans: ToMe (r = 0, some, cap), top-k fused (many removed tokens into one slot) and
    top-k without fuse (dst = n_out: dropped)."""
    metric = torch.randn(batch, n, 8)
    valid = _valid([n] + [n - 3 - i for i in range(batch - 1)], n)
    cap = _tome_cap(valid, batch, n, 1, True)
    plans = {f"tome r={r}": ops.tome_plan(metric, valid, r, 1, True) for r in (0, 5, cap)}
    score = torch.rand(batch, n)
    for fuse in (True, False):
        plans[f"topk fuse={fuse}"] = ops.topk_plan(score, valid, n // 4, 1, True, fuse)
    return plans


@interpreter_check
def merge_tokens_fp32():
    torch.manual_seed(4)
    batch, n = 2, 70
    for channels in (5, 300):  # one and several channel blocks; topk plans have > 32 removed tokens
        x = torch.randn(batch, n, channels)
        size = torch.rand(batch, n) * 3 + 0.5
        for name, plan in _plans(batch, n).items():
            got = _kernels().merge_tokens(x, size, *plan)
            want = ops.merge_tokens(x, size, *plan)
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")


@interpreter_check
def merge_tokens_half_precision():
    torch.manual_seed(5)
    batch, n, channels = 2, 40, 48
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(batch, n, channels).to(dtype)
        size = (torch.rand(batch, n) * 3 + 0.5).to(dtype)
        for name, plan in _plans(batch, n).items():
            got = _kernels().merge_tokens(x, size, *plan)
            assert got.dtype == dtype
            want = ops.merge_tokens(x.float(), size.float(), *plan)
            torch.testing.assert_close(got.float(), want, **HALF_TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@interpreter_check
def sum_tokens_all_dtypes():
    torch.manual_seed(6)
    batch, n = 3, 150  # more than one block of 64 slots
    for name, plan in _plans(batch, n).items():
        size = torch.rand(batch, n) * 3 + 0.5
        torch.testing.assert_close(_kernels().sum_tokens(size, *plan), ops.sum_tokens(size, *plan), **FP32_TOL)
        for dtype in (torch.float16, torch.bfloat16):
            got = _kernels().sum_tokens(size.to(dtype), *plan)
            assert got.dtype == dtype
            want = ops.sum_tokens(size.to(dtype).float(), *plan)
            torch.testing.assert_close(got.float(), want, **HALF_TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- gather_tokens

@interpreter_check
def gather_tokens_layouts_and_dtypes():
    torch.manual_seed(7)
    batch, n = 2, 150
    rep = ops.topk_plan(torch.rand(batch, n), None, 100, 1, False, True)[0]  # 101 slots: two slot blocks
    cases = {
        "features fp32": (torch.randn(batch, n, 300), 1),
        "heads bf16": (torch.randn(batch, 3, n, 5).to(torch.bfloat16), 2),
        "valid bool": (torch.rand(batch, n) > 0.3, 1),
        "position ids int64, broadcast batch": (torch.arange(n)[None, :], 1),
        "attention mask fp16, last axis": (torch.randn(batch, 1, n, n).to(torch.float16), -1),
        "attention mask fp16, query axis": (torch.randn(1, 1, n, n).to(torch.float16), 2),
    }
    for name, (t, dim) in cases.items():
        got = _kernels().gather_tokens(t, rep, dim)
        want = ops.gather_tokens(t, rep, dim)
        assert got.dtype == want.dtype and torch.equal(got, want), name


@interpreter_check
def gather_tokens_unmerge():
    torch.manual_seed(8)
    batch, n = 2, 33
    metric = torch.randn(batch, n, 8)
    rep, src, dst = ops.tome_plan(metric, None, 10, 1, False)
    merged = torch.randn(batch, rep.shape[1], 16)
    # the slot every original token ended in: un-merging gathers each token's slot back
    slot_of = torch.empty(batch, n, dtype=torch.int64)
    slot_of.scatter_(1, rep, torch.arange(rep.shape[1]).expand_as(rep).contiguous())
    slot_of.scatter_(1, src, dst)
    got = _kernels().gather_tokens(merged, slot_of, 1)
    assert got.shape == (batch, n, 16)
    assert torch.equal(got, ops.gather_tokens(merged, slot_of, 1))
    assert torch.equal(got[0, src[0, 0]], merged[0, dst[0, 0]])


# ---------------------------------------------------------------- probe scores + top-k plan

def _cls_attention(query, keys, valid):
    """methods.evit.cls_attention in eager PyTorch: head mean of the probe row's softmax."""
    logits = query[:, :, 0:1] @ keys.transpose(-2, -1) * query.shape[-1] ** -0.5
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return logits.softmax(-1).squeeze(2).mean(1)


def _query_keys(batch, heads, n, dim, dtype=torch.float32):
    # [B, N, H, D] transposed, as attention modules produce them: non-contiguous
    query = torch.randn(batch, n, heads, dim).to(dtype).transpose(1, 2)
    keys = torch.randn(batch, n, heads, dim).to(dtype).transpose(1, 2)
    return query, keys


@interpreter_check
def probe_scores_fp32():
    torch.manual_seed(9)
    # the second shape has three key blocks (the last fully padded in sample 1) and two D chunks
    for batch, heads, n, dim, lengths in [(1, 1, 5, 8, [3]), (2, 4, 300, 100, [300, 140])]:
        query, keys = _query_keys(batch, heads, n, dim)
        valid = _valid(lengths, n)
        for mask in (None, valid):
            got = _kernels().probe_scores(query, keys, mask)
            torch.testing.assert_close(got, _cls_attention(query, keys, mask), **FP32_TOL)


@interpreter_check
def probe_scores_half_precision():
    torch.manual_seed(10)
    for dtype in (torch.float16, torch.bfloat16):
        query, keys = _query_keys(2, 3, 20, 16, dtype)
        valid = _valid([20, 13], 20)
        got = _kernels().probe_scores(query, keys, valid)
        assert got.dtype == dtype
        want = _cls_attention(query.float(), keys.float(), valid)
        torch.testing.assert_close(got.float(), want, **HALF_TOL[dtype])


@interpreter_check
def probe_topk_plan_matches_reference():
    torch.manual_seed(11)
    batch, heads, n, dim = 2, 3, 30, 16
    query, keys = _query_keys(batch, heads, n, dim)
    valid = _valid([30, 22], n)
    for n_keep, fuse in [(10, True), (10, False), (n - 1, True)]:
        score, *plan = _kernels().probe_topk_plan(query, keys, valid, n_keep, 1, True, fuse)
        reference_score = _cls_attention(query, keys, valid)
        torch.testing.assert_close(score, reference_score, **FP32_TOL)
        want = ops.topk_plan(reference_score, valid, n_keep, 1, True, fuse)
        _assert_same_plan(plan, want, f"n_keep={n_keep} fuse={fuse}")


@interpreter_check
def lazy_cuda_launchers_reach_the_kernels():
    from tokencompile.kernels import CUDA_LAUNCHERS, _lazy_launcher

    x = torch.randn(2, 9, 4)
    size = torch.ones(2, 9)
    plan = ops.tome_plan(x, None, 3, 1, False)
    launch = _lazy_launcher(CUDA_LAUNCHERS["tokencompile::merge_tokens"])
    torch.testing.assert_close(launch(x, size, *plan), ops.merge_tokens(x, size, *plan), **FP32_TOL)


# ---------------------------------------------------------------- running the checks

def run_checks(names: list[str]) -> dict[str, str]:
    """Run checks in this process (which must interpret Triton); name -> "ok" or the traceback."""
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_kernels().merge_tokens_kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not in effect"
    torch.set_num_threads(1)
    results = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001  (reported to the parent test)
            results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("interpreter") / "results.json"
    root = Path(__file__).resolve().parents[1]
    python_path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": python_path}
    child = subprocess.run([sys.executable, __file__, str(out)], check=False, env=env, capture_output=True, text=True,
                           timeout=600, cwd=root)
    if not out.exists():
        pytest.fail(f"interpreter run failed (exit {child.returncode}):\n{child.stdout}\n{child.stderr}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_under_interpreter(name, interpreter_results):
    outcome = interpreter_results[name]
    if outcome != "ok":
        pytest.fail(outcome, pytrace=False)


# ---------------------------------------------------------------- registration and AOT (this process)

def test_import_is_cheap_and_registers_cuda_kernels():
    code = ("import sys, torch, tokencompile.kernels as k\n"
            "assert 'tokencompile.kernels.triton_kernels' not in sys.modules\n"
            "for op in k.CUDA_LAUNCHERS:\n"
            "    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CUDA'), op\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _representatives():
    """One specialisation per jit kernel (bf16 where it exists: it exercises the rounding helper)."""
    from tokencompile.kernels import aot

    wanted = ["tome_match_bf16", "merge_tokens_fp16", "sum_tokens_fp32", "probe_scores_bf16",
              "gather_tokens_b1_flat", "tome_rank"]
    specs = {spec.name: spec for spec in aot.kernel_specs()}
    return [specs[name] for name in wanted]


def test_every_kernel_is_compiled_ahead_of_time():
    from triton.runtime.jit import JITFunction

    from tokencompile.kernels import aot, triton_kernels

    launched = {name for name, value in vars(triton_kernels).items()
                if isinstance(value, JITFunction) and name.endswith("_kernel")}
    assert {spec.kernel.__name__ for spec in aot.kernel_specs()} == launched
    assert {spec.kernel.__name__ for spec in _representatives()} == launched
    names = [spec.name for spec in aot.kernel_specs()]
    assert len(names) == len(set(names))


def _declared_params(ptx: str, entry: str) -> int:
    return ptx.split(f".entry {entry}(", 1)[1].split(")", 1)[0].count(f"{entry}_param_")


def _inputs_scalars_outputs(is_pointer: list[bool]) -> bool:
    """Pointers, then scalars, then pointers: TensorRT's AOT plugin calling convention."""
    text = "".join("p" if pointer else "s" for pointer in is_pointer)
    return re.fullmatch("p+s+p+", text) is not None


PLUGIN_FOR_KERNEL = {"merge_tokens": "TcMergeTokens", "sum_tokens": "TcSumTokens", "gather_tokens": "TcGatherTokens"}


def _check_artifacts(compiled, arch: int, out_dir: Path) -> None:
    target = {80: ".target sm_80", 90: ".target sm_90a"}[arch]
    manifest = json.loads((out_dir / f"sm_{arch}" / "manifest.json").read_text())
    assert manifest["arch"] == arch and manifest["format"] == "tokencompile-kernels/1"
    assert [entry["name"] for entry in manifest["kernels"]] == [kernel.name for kernel in compiled]
    for kernel, entry in zip(compiled, manifest["kernels"]):
        ptx = kernel.ptx.read_text()
        assert f".entry {entry['entry']}(" in ptx and target in ptx.splitlines(), kernel.name
        cubin = kernel.cubin.read_bytes()
        assert len(cubin) > 0 and cubin[:4] == b"\x7fELF", kernel.name
        assert entry["threads_per_block"] == 32 * entry["num_warps"]
        assert entry["params"][-2:] == [{"name": "global_scratch", "type": "*i8"},
                                        {"name": "profile_scratch", "type": "*i8"}]
        # one .param per launch argument listed in the manifest; two fewer without the scratch pointers
        assert _declared_params(ptx, entry["entry"]) == len(entry["params"]), kernel.name
        no_scratch = (out_dir / f"sm_{arch}" / entry["ptx_no_scratch"]).read_text()
        assert _declared_params(no_scratch, entry["entry"]) == len(entry["params"]) - 2, kernel.name
        assert (out_dir / f"sm_{arch}" / entry["cubin_no_scratch"]).read_bytes()[:4] == b"\x7fELF"
        pointers = [param["type"].startswith("*") for param in entry["params"][:-2]]
        assert _inputs_scalars_outputs(pointers), kernel.name
        plugin = PLUGIN_FOR_KERNEL.get(entry["name"].split("_fp")[0].split("_b")[0])
        if plugin is not None:  # what the TensorRT plugin checks before it loads the kernel
            op = PLUGIN_OPS[plugin]
            assert abi_problems(entry, len(op.inputs), len(op.outputs)) == [], kernel.name


@pytest.mark.parametrize("arch", [80, 90])
def test_aot_ptx_and_cubin(arch, tmp_path):
    from tokencompile.kernels import aot

    compiled = aot.compile_kernels(arch, tmp_path, specs=_representatives())
    _check_artifacts(compiled, arch, tmp_path)


@pytest.mark.slow
def test_aot_cli_compiles_every_specialisation(tmp_path):
    from tokencompile.kernels import aot

    aot.main(["--arch", "80", "--arch", "90", "-o", str(tmp_path)])
    for arch in (80, 90):
        manifest = json.loads((tmp_path / f"sm_{arch}" / "manifest.json").read_text())
        assert [entry["name"] for entry in manifest["kernels"]] == [spec.name for spec in aot.kernel_specs()]
        for entry in manifest["kernels"]:
            assert (tmp_path / f"sm_{arch}" / entry["cubin"]).read_bytes()[:4] == b"\x7fELF"


if __name__ == "__main__":
    # child mode (see the module docstring): python tests/test_kernels.py RESULTS.json [CHECK ...]
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    Path(sys.argv[1]).write_text(json.dumps(run_checks(sys.argv[2:] or list(CHECKS))))
