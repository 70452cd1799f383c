"""Methods x budgets: optimize, measure fidelity (and optionally ONNX Runtime latency), plot the trade-off."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from ..errors import TokenCompileError
from ..signature import static_batch
from .data import EvalData
from .runner import (
    Progress,
    check_finite,
    check_task,
    fidelity,
    primary_metric,
    reference_metrics,
    run_model,
)


def parse_list(text: str, convert, what: str) -> list:
    """'a,b,c' -> [convert(a), ...] with a clear error."""
    try:
        values = [convert(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        raise TokenCompileError(f"cannot read {what} {text!r}", f"give a comma-separated list of {what}")
    return values


class LatencyMeter:
    """Median ONNX Runtime latency of optimized programs, each timed interleaved with the original."""

    def __init__(self, program, example_inputs: tuple, timing_inputs: tuple, rounds: int = 10, threads: int = 2):
        from ..lowering.onnx_export import export_onnx, ort_session

        self.directory = tempfile.TemporaryDirectory()
        self.example_inputs, self.timing_inputs = example_inputs, timing_inputs
        self.rounds, self.threads = rounds, threads
        path = os.path.join(self.directory.name, "original.onnx")
        export_onnx(program, path, example_inputs)
        self.original = ort_session(path, threads)

    def _run(self, session):
        from ..lowering.onnx_export import ort_feeds

        feeds = ort_feeds(session, self.timing_inputs)
        started = time.perf_counter()
        session.run(None, feeds)
        return time.perf_counter() - started

    def measure(self, program, name: str) -> dict:
        """{latency_ms, original_latency_ms, latency_ratio} from interleaved rounds after one warm-up."""
        from ..lowering.onnx_export import export_onnx, ort_session

        path = os.path.join(self.directory.name, f"{name}.onnx")
        export_onnx(program, path, self.example_inputs)
        optimized = ort_session(path, self.threads)
        times: tuple[list, list] = ([], [])
        for round_ in range(self.rounds + 1):
            for which, session in enumerate((self.original, optimized)):
                elapsed = self._run(session)
                if round_:
                    times[which].append(elapsed)
        original_ms, optimized_ms = (statistics.median(t) * 1e3 for t in times)
        return {"latency_ms": optimized_ms, "original_latency_ms": original_ms,
                "latency_ratio": optimized_ms / original_ms}

    def close(self) -> None:
        self.directory.cleanup()


def _timing_inputs(data: EvalData, batch: int) -> tuple:
    from ..bench import batch_inputs

    return batch_inputs(tuple(x[:batch] for x in data.inputs), batch)


def sweep(program, example_inputs: tuple, data: EvalData, task: str, methods: list[str], budgets: list[float],
          batch: int = 32, latency: bool = False, latency_batch: int = 8, rounds: int = 10, threads: int = 2,
          progress: Progress = None) -> dict:
    """Optimize ``program`` with every method at every budget and measure each result's fidelity.

    Returns {task, samples, primary, original, runs}; a run that cannot be built records its error."""
    check_task(task, data)
    say = progress or (lambda text: None)
    from ..compiler import optimize

    say(f"original: running {len(data)} samples")
    reference = run_model(program, data.inputs, batch, label="original")
    original = {"flops_ratio": 1.0, **reference_metrics(reference, data, task),
                **fidelity(reference, reference, data, task)}
    check_finite(original, "original: ")
    meter = None
    if latency:
        say("original: exporting to ONNX for latency")
        timing_batch = static_batch(program) or latency_batch  # a fixed-batch program is timed at its batch
        meter = LatencyMeter(program, example_inputs, _timing_inputs(data, timing_batch), rounds, threads)
        original["latency_ratio"] = 1.0
    runs = []
    total = len(methods) * len(budgets)
    try:
        for method in methods:
            for budget in budgets:
                started = time.perf_counter()
                prefix = f"[{len(runs) + 1}/{total}] {method} budget {budget:g}"
                run = {"method": method, "budget": budget}
                try:
                    result = optimize(program, example_inputs, budget=budget, method=method)
                except TokenCompileError as error:
                    kind = "not reachable" if "cannot be met" in error.problem else "failed"
                    run["error"] = f"{kind}: {error.problem}"
                    runs.append(run)
                    say(f"{prefix}: skipped ({error.problem})")
                    continue
                except Exception as error:  # noqa: BLE001 - one broken method must not lose the whole sweep
                    run["error"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    runs.append(run)
                    say(f"{prefix}: {run['error']}")
                    continue
                report = result.report
                run.update(flops_ratio=report["flops_ratio"], schedule=report["schedule"],
                           tokens_entering_block=report["tokens_entering_block"])
                try:
                    scores = fidelity(reference, run_model(result.program, data.inputs, batch, label="optimized"),
                                      data, task)
                    check_finite(scores)
                except TokenCompileError as error:  # NaN outputs or metrics: a failed run, not a result
                    run = {"method": method, "budget": budget, "error": f"failed: {error.problem}"}
                    runs.append(run)
                    say(f"{prefix}: {run['error']}")
                    continue
                run.update(scores)
                if meter:
                    try:
                        run.update(meter.measure(result.program, f"{method}_{budget:g}"))
                    except Exception as error:  # noqa: BLE001 - a failed export loses the latency, not the run
                        run["latency_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                run["seconds"] = round(time.perf_counter() - started, 1)
                runs.append(run)
                key = primary_metric(task, run)
                say(f"{prefix}: FLOPs ratio {run['flops_ratio']:.3f}, {key} {run[key]:.4f} ({run['seconds']:.0f} s)")
    finally:
        if meter:
            meter.close()
    return {"task": task, "samples": len(data), "primary": primary_metric(task, original), "original": original,
            "runs": runs}


def format_sweep(results: dict) -> str:
    """A markdown table: one row per run, the original first."""
    primary = results["primary"]
    latency = "latency_ratio" in results["original"]
    extra = [key for key in ("cosine_to_original", "top5_agreement", "kl_divergence", "accuracy_optimized",
                            "perplexity", "perplexity_change")
             if key != primary and any(key in run for run in results["runs"])]
    header = ["method", "budget", "FLOPs ratio"] + (["latency ms", "latency ratio"] if latency else []) \
        + [primary] + extra
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    original = results["original"]
    first_latency = next((run["original_latency_ms"] for run in results["runs"] if "original_latency_ms" in run),
                         None)
    rows = [("original", "1", original, first_latency)]
    rows += [(run["method"], f"{run['budget']:g}", run, run.get("latency_ms")) for run in results["runs"]]
    for method, budget, values, latency_ms in rows:
        if "error" in values:
            lines.append(f"| {method} | {budget} | {values['error']} |")
            continue
        cells = [method, budget, f"{values['flops_ratio']:.3f}"]
        if latency:
            cells += [f"{latency_ms:.2f}" if latency_ms is not None else "-", f"{values['latency_ratio']:.3f}"]
        primary_key = primary if primary in values else "cosine_to_original"
        cells += [f"{values[primary_key]:.4f}"] + [f"{values[key]:.4f}" if key in values else "-" for key in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(results: dict, path: str) -> None:
    """Strict JSON (no NaN), written atomically."""
    from ..outputs import write_json as write_strict_json

    write_strict_json(path, results)


METRIC_LABELS = {"spearman_optimized": "STS Spearman (cosine of the pair vs gold score)",
                 "cosine_to_original": "cosine to the original's embedding",
                 "top1_agreement": "top-1 agreement with the original"}


def plot_pareto(results: dict, path: str, title: str | None = None, x_axis: str | None = None) -> None:
    """Fidelity vs cost: one line per method, the original as a star. ``x_axis``: flops_ratio or latency_ratio
    (default: latency when it was measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TokenCompileError("matplotlib is not installed (needed for --plot)",
                                "pip install 'tokencompile[eval]' matplotlib") from None
    x_axis = x_axis or ("latency_ratio" if "latency_ratio" in results["original"] else "flops_ratio")
    primary = results["primary"]
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    methods = list(dict.fromkeys(run["method"] for run in results["runs"]))
    for method in methods:
        points = sorted((run[x_axis], run[primary], run["budget"]) for run in results["runs"]
                        if run["method"] == method and "error" not in run and primary in run)
        if not points:
            continue
        xs, ys, _ = zip(*points)
        line, = axes.plot(xs, ys, marker="o", label=method)
        for x, y, budget in points:
            axes.annotate(f"{budget:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                          color=line.get_color())
    original = results["original"]
    axes.plot([original[x_axis]], [original[primary]], marker="*", markersize=14, color="black", linestyle="none",
              label="original")
    axes.set_xlabel({"flops_ratio": "FLOPs ratio (optimized / original)",
                     "latency_ratio": "ONNX Runtime latency ratio (optimized / original)"}[x_axis])
    axes.set_ylabel(METRIC_LABELS.get(primary, primary.replace("_", " ")))
    axes.set_title(title or f"{results['task']}: {results['samples']} samples (labels: budget)", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
