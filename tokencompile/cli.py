"""Command line: `tokencompile inspect | optimize | methods`."""

from __future__ import annotations

import json
import sys
import traceback

import click

from .errors import TokenCompileError


def _fail(error: Exception, debug: bool) -> None:
    if debug:
        traceback.print_exception(error)
    if isinstance(error, TokenCompileError):
        click.echo(f"error: {error}", err=True)
    else:
        click.echo(f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                   "(this looks like a bug in tokencompile; rerun with --debug and report it)", err=True)
    sys.exit(2)


class _Command(click.Command):
    """Turns every exception into a one-line error with exit code 2 (traceback only with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as error:  # noqa: BLE001 - the CLI boundary
            _fail(error, ctx.params.get("debug", False))


_model = click.argument("model")
_shape = click.option("--input-shape", help="Example input shape for tracing, e.g. 2,3,224,224 or 8,128.")
_pickle = click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled .pt module (runs its code).")
_debug = click.option("--debug", is_flag=True, help="Show tracebacks.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tokencompile")
def main():
    """tokencompile: make transformers faster by processing fewer tokens."""


@main.command(cls=_Command)
@_model
@_shape
@_pickle
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_debug
def inspect(model, input_shape, trust_pickle, as_json, debug):
    """Show blocks, token axis, protected tokens, attention and FLOPs per block."""
    from .inspection import format_inspection, inspect_program
    from .load import load_model

    program, inputs = load_model(model, input_shape, trust_pickle)
    info = inspect_program(program, inputs)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


def _parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TokenCompileError(f"cannot read option {pair!r}", "give --option key=value")
        options[key] = value
    return options


@main.command(cls=_Command)
@_model
@click.option("--budget", type=float, help="Keep at most this fraction of the original FLOPs (0 < B <= 1).")
@click.option("--method", default="tome", show_default=True, help="Reduction method (see `tokencompile methods`).")
@click.option("--schedule", help="constant (default), decreasing, r=8 or r=8,8,6,... (tokens removed per block).")
@click.option("--option", "method_options", multiple=True, help="Method option key=value (repeatable).")
@click.option("--no-prop-attn", is_flag=True, help="Turn off proportional attention (log size on attention logits).")
@click.option("-o", "--output", help="Write the optimized program (.pt2).")
@click.option("--report", "report_path", help="Write the report (JSON).")
@click.option("--onnx", "onnx_path", help="Also export the optimized program to ONNX (standard ops).")
@_shape
@_pickle
@_debug
def optimize(model, budget, method, schedule, method_options, no_prop_attn, output, report_path, onnx_path,
             input_shape, trust_pickle, debug):
    """Rewrite MODEL so it processes fewer tokens, within a FLOPs budget."""
    import torch

    from .compiler import check_budget
    from .compiler import optimize as run_optimize
    from .load import load_model
    from .methods import get_method

    check_budget(budget)
    get_method(method, _parse_options(method_options))  # validate before the slow part
    if budget is None and schedule is None:
        raise TokenCompileError("nothing to do: no --budget and no --schedule", "e.g. --budget 0.5")
    program, inputs = load_model(model, input_shape, trust_pickle)
    result = run_optimize(program, inputs, budget=budget, method=method, schedule=schedule,
                          options=_parse_options(method_options), proportional_attention=not no_prop_attn)
    report = result.report
    click.echo(f"method {report['method']}, schedule r={','.join(map(str, report['schedule']))}")
    click.echo(f"tokens entering each block: {' '.join(map(str, report['tokens_entering_block']))}")
    click.echo(f"FLOPs: {report['flops_original'] / 1e9:.3f} G -> {report['flops_optimized'] / 1e9:.3f} G "
               f"(ratio {report['flops_ratio']:.3f}" + (f", budget {budget:g})" if budget else ")"))
    if output:
        torch.export.save(result.program, output)
        report["output"] = output
        click.echo(f"wrote {output} (load it after `import tokencompile`)")
    if onnx_path:
        from .lowering.onnx_export import export_onnx

        info = export_onnx(result.program, onnx_path, inputs)
        report["onnx"] = onnx_path
        click.echo(f"wrote {onnx_path} ({sum(info.op_counts.values())} nodes, {info.token_op_nodes} in token ops)")
    if report_path:
        with open(report_path, "w") as handle:
            json.dump(report, handle, indent=2)
        click.echo(f"wrote {report_path}")


@main.command(cls=_Command)
@_model
@click.option("-o", "--output", required=True, help="The .onnx file to write.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (TensorRT 10 reads 9..20).")
@click.option("--verify", is_flag=True, help="Compare ONNX Runtime with the program at batch 1 and 8 (atol 1e-4).")
@click.option("--check", "check_target", type=click.Choice(["trt"]), help="Report ops TensorRT cannot build.")
@_shape
@_pickle
@_debug
def export(model, output, opset, verify, check_target, input_shape, trust_pickle, debug):
    """Lower a program to ONNX (standard ops, dynamic batch axis)."""
    from .bench import batch_inputs
    from .lowering.onnx_export import export_onnx, verify_onnx
    from .load import load_model

    program, inputs = load_model(model, input_shape, trust_pickle)
    info = export_onnx(program, output, inputs, opset=opset)
    click.echo(f"wrote {output}: {sum(info.op_counts.values())} nodes ({info.token_op_nodes} in token ops), "
               f"opset {opset}, checker passed, {info.seconds:.0f} s")
    failed = False
    if verify:
        for row in verify_onnx(program, output, [batch_inputs(inputs, 1), batch_inputs(inputs, 8)]):
            click.echo(f"verify batch {row['batch']}: max abs error {row['max_abs_error']:.2e} "
                       f"({'ok' if row['ok'] else 'FAILED'}, atol 1e-4)")
            failed |= not row["ok"]
    if check_target == "trt":
        import onnx

        from .lowering.tensorrt_check import check_tensorrt

        findings = check_tensorrt(onnx.load(output))
        blocking = [f for f in findings if f.blocking]
        for finding in findings:
            click.echo(str(finding))
        click.echo(f"TensorRT check: {len(blocking)} blocking, {len(findings) - len(blocking)} notes")
        failed |= bool(blocking)
    if failed:
        sys.exit(1)


@main.command(cls=_Command)
@click.argument("original")
@click.argument("optimized")
@click.option("--runtime", type=click.Choice(["ort", "torch"]), default="ort", show_default=True)
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--rounds", type=int, default=20, show_default=True, help="Interleaved rounds (A B A B ...).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement (two extra processes).")
@click.option("--json", "json_path", help="Write the result as JSON.")
@_debug
def bench(original, optimized, runtime, batch, rounds, threads, no_memory, json_path, debug):
    """Latency of ORIGINAL vs OPTIMIZED, in one process, interleaved."""
    from .bench import bench as run_bench
    from .bench import format_bench

    result = run_bench(original, optimized, runtime, batch, rounds, threads=threads, memory=not no_memory,
                       progress=lambda text: click.echo(text, err=True))
    click.echo(format_bench(result))
    if json_path:
        with open(json_path, "w") as handle:
            handle.write(result.to_json())


@main.command(cls=_Command)
@_debug
def methods(debug):
    """List the reduction methods."""
    from .methods import METHODS

    for name, cls in sorted(METHODS.items()):
        click.echo(f"{name:<10} {cls.family:<6} {cls.summary}\n{'':<17} {cls.reference}")


if __name__ == "__main__":
    main()
