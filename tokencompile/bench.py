"""Original vs optimized latency, measured in one process and interleaved (A B A B ...)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from .errors import TokenCompileError

TOKEN_SCOPES = ("token_reduction", "proportional_attention")


@dataclass
class Timing:
    median_s: float
    p90_s: float
    throughput: float  # samples per second at the median
    peak_memory_mb: float | None = None


@dataclass
class BenchResult:
    runtime: str
    batch: int
    rounds: int
    original: Timing
    optimized: Timing
    speedup: float
    token_op_share: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _onnx_inputs(path: str, batch: int) -> tuple:
    import onnx

    model = onnx.load(path, load_external_data=False)
    inputs = []
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        elem = value.type.tensor_type.elem_type
        generator = torch.Generator().manual_seed(0)
        if elem == onnx.TensorProto.FLOAT:
            inputs.append(torch.randn(dims, generator=generator))
        elif "mask" in value.name:
            inputs.append(torch.ones(dims, dtype=torch.int64))
        else:
            inputs.append(torch.randint(1000, 2000, dims, generator=generator))
    return tuple(inputs)


def batch_inputs(example: tuple, batch: int) -> tuple:
    """Example inputs repeated (or cut) to ``batch`` samples."""
    result = []
    for x in example:
        reps = -(-batch // x.shape[0])
        result.append(torch.cat([x] * reps)[:batch].contiguous())
    return tuple(result)


def _runner(path: str, runtime: str, threads: int):
    if runtime == "ort":
        from .lowering.onnx_export import ort_feeds, ort_session

        session = ort_session(path, threads)
        return lambda inputs: session.run(None, ort_feeds(session, inputs))
    from .load import load_program

    module = load_program(path, trust_pickle=True).module()  # checked by bench() before

    def run(inputs):
        with torch.no_grad():
            return module(*inputs)
    return run


def _timing(times: list[float], batch: int) -> Timing:
    ordered = sorted(times)
    median = statistics.median(ordered)
    return Timing(median, ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))], batch / median)


def peak_memory_mb(path: str, runtime: str, batch: int, threads: int) -> float | None:
    """Peak resident memory of a fresh process that loads the model and runs one batch (None if it fails)."""
    script = (
        "import resource, sys, torch\n"
        "from tokencompile.bench import _runner, _inputs_for\n"
        f"run = _runner({path!r}, {runtime!r}, {threads})\n"
        f"run(_inputs_for({path!r}, {batch}))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def _inputs_for(path: str, batch: int) -> tuple:
    if path.endswith(".onnx"):
        return _onnx_inputs(path, batch)
    from .load import load_program

    program = load_program(path, trust_pickle=True)  # checked by bench() before
    if not program.example_inputs or program.example_inputs[1]:
        raise TokenCompileError(f"{path} stores no example inputs", "export it with example inputs")
    return batch_inputs(tuple(program.example_inputs[0]), batch)


def token_op_share(path: str, inputs: tuple, threads: int, runs: int = 5) -> float:
    """Share of ONNX Runtime's node time spent in nodes of the inserted token-reduction scopes."""
    from .lowering.onnx_export import ort_feeds, ort_session

    session = ort_session(path, threads, profile=True)
    feeds = ort_feeds(session, inputs)
    for _ in range(runs):
        session.run(None, feeds)
    profile = session.end_profiling()
    with open(profile) as handle:
        events = json.load(handle)
    os.remove(profile)
    total = token = 0
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            total += event["dur"]
            if any(scope in event["name"] for scope in TOKEN_SCOPES):
                token += event["dur"]
    return token / total if total else 0.0


def _programs(original: str, optimized: str, runtime: str, trust_pickle: bool) -> dict:
    """The .pt2 programs among the two models, checked and loaded; they must take the same inputs."""
    from .load import load_program
    from .signature import check_same_inputs

    programs = {}
    for path in (original, optimized):
        if not os.path.exists(path):
            raise TokenCompileError(f"no such file: {path}", "give .pt2 programs or .onnx files")
        if path.endswith(".pt2"):
            programs[path] = load_program(path, trust_pickle)
        elif runtime == "torch":
            raise TokenCompileError(f"--runtime torch needs .pt2 programs, got {path}", "use --runtime ort")
        elif not path.endswith(".onnx"):
            raise TokenCompileError(f"cannot bench {path}", "give .pt2 programs or .onnx files")
    if len(programs) == 2:
        check_same_inputs(programs[original], programs[optimized], original, optimized)
    return programs


def _check_onnx_inputs(paths: list[str], inputs: tuple, names: tuple[str, str]) -> None:
    """Both ONNX models must accept ``inputs`` (same count, and sizes matching where fixed)."""
    import onnx

    for path, name in zip(paths, names):
        model = onnx.load(path, load_external_data=False)
        declared = [[d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
                    for value in model.graph.input]
        fits = len(declared) == len(inputs) and all(
            len(dims) == x.dim() and all(d is None or d == s for d, s in zip(dims, x.shape))
            for dims, x in zip(declared, inputs))
        if not fits:
            raise TokenCompileError(f"{name} does not take the inputs of the other model ({declared} vs "
                                    f"{[list(x.shape) for x in inputs]})",
                                    "compare a model with its own optimized version")


def bench(original: str, optimized: str, runtime: str = "ort", batch: int = 8, rounds: int = 20, warmup: int = 3,
          threads: int = 2, memory: bool = True, progress=None, trust_pickle: bool = False) -> BenchResult:
    """Interleaved latency of two models given as .pt2 (torch, or exported to ONNX for ort) or .onnx.

    A program with a fixed batch is timed at that batch (``batch`` is then ignored, with a note)."""
    from .signature import fixed_batch_of

    if runtime not in ("ort", "torch"):
        raise TokenCompileError(f"unknown runtime {runtime!r}", "use --runtime ort or --runtime torch")
    programs = _programs(original, optimized, runtime, trust_pickle)
    fixed = fixed_batch_of(*programs.values())
    if fixed is not None and fixed != batch:
        if progress:
            progress(f"the programs have a fixed batch of {fixed}: timing batches of {fixed}")
        batch = fixed
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for label, path in (("original", original), ("optimized", optimized)):
            if runtime == "ort" and path.endswith(".pt2"):
                from .lowering.onnx_export import export_onnx

                if progress:
                    progress(f"exporting {label} {path} to ONNX")
                program = programs[path]
                target = os.path.join(tmp, f"{label}.onnx")
                export_onnx(program, target, tuple(program.example_inputs[0]))
                path = target
            paths.append(path)
        inputs = _inputs_for(original if runtime == "torch" or original.endswith(".onnx") else optimized, batch)
        if runtime == "ort":
            _check_onnx_inputs(paths, inputs, (original, optimized))
        runners = [_runner(path, runtime, threads) for path in paths]
        torch.set_num_threads(threads)
        for _ in range(warmup):
            for run in runners:
                run(inputs)
        times: list[list[float]] = [[], []]
        for index in range(rounds):
            for which, run in enumerate(runners):
                start = time.perf_counter()
                run(inputs)
                times[which].append(time.perf_counter() - start)
            if progress:
                progress(f"round {index + 1}/{rounds}: {times[0][-1] * 1e3:.0f} ms vs {times[1][-1] * 1e3:.0f} ms")
        result = BenchResult(runtime, batch, rounds, _timing(times[0], batch), _timing(times[1], batch), 0.0)
        result.speedup = result.original.median_s / result.optimized.median_s
        if runtime == "ort":
            result.token_op_share = token_op_share(paths[1], inputs, threads)
        if memory:
            result.original.peak_memory_mb = peak_memory_mb(paths[0], runtime, batch, threads)
            result.optimized.peak_memory_mb = peak_memory_mb(paths[1], runtime, batch, threads)
    return result


def format_bench(result: BenchResult) -> str:
    # peak MB: peak resident memory of a fresh process that loads the model and runs one batch
    rows = [f"{'':<10} {'median ms':>10} {'p90 ms':>9} {'samples/s':>10} {'peak MB':>9}"]
    for label, t in (("original", result.original), ("optimized", result.optimized)):
        memory = f"{t.peak_memory_mb:>9.0f}" if t.peak_memory_mb is not None else f"{'-':>9}"
        rows.append(f"{label:<10} {t.median_s * 1e3:>10.1f} {t.p90_s * 1e3:>9.1f} {t.throughput:>10.1f} {memory}")
    rows.append(f"speed-up {result.speedup:.2f}x ({result.runtime}, batch {result.batch}, {result.rounds} interleaved "
                "rounds)")
    if result.token_op_share is not None:
        rows.append(f"token ops: {result.token_op_share:.1%} of the optimized model's node time (ORT profile)")
    return "\n".join(rows)
