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
@_shape
@_pickle
@_debug
def optimize(model, budget, method, schedule, method_options, no_prop_attn, output, report_path, input_shape,
             trust_pickle, debug):
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
    if report_path:
        with open(report_path, "w") as handle:
            json.dump(report, handle, indent=2)
        click.echo(f"wrote {report_path}")


@main.command(cls=_Command)
@_debug
def methods(debug):
    """List the reduction methods."""
    from .methods import METHODS

    for name, cls in sorted(METHODS.items()):
        click.echo(f"{name:<10} {cls.family:<6} {cls.summary}\n{'':<17} {cls.reference}")


if __name__ == "__main__":
    main()
