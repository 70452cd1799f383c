"""Command line: `tokencompile inspect | optimize | methods`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
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


# torch loggers that print tracebacks of errors torch (or tokencompile) recovers from
QUIET_LOGGERS = ("torch._subclasses.fake_tensor",)


@contextlib.contextmanager
def _quiet_torch_tracebacks(quiet: bool):
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS] if quiet else []
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _Command(click.Command):
    """Turns every exception into a one-line error with exit code 2 (traceback only with --debug)."""

    def invoke(self, ctx):
        debug = ctx.params.get("debug", False)
        try:
            with _quiet_torch_tracebacks(not debug):
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as error:  # noqa: BLE001 - the CLI boundary
            _fail(error, debug)


_model = click.argument("model")
_shape = click.option("--input-shape", help="Example input shape for tracing, e.g. 2,3,224,224 or 8,128.")
_pickle = click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled .pt module (runs its code).")
_debug = click.option("--debug", is_flag=True, help="Show tracebacks.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tokencompile")
def main():
    """tokencompile: make transformers faster by processing fewer tokens."""
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit a write fails (and is reported), not the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


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
    from .signature import describe

    program, inputs = load_model(model, input_shape, trust_pickle)
    info = {**inspect_program(program, inputs), "inputs": describe(program)}
    click.echo(json.dumps(info, indent=2) if as_json else f"inputs: {info['inputs']}\n{format_inspection(info)}")


def _write_json(path: str, data) -> None:
    from .outputs import write_json

    write_json(path, data)
    click.echo(f"wrote {path}")


def _write(path: str, write):
    """``write(temporary_path)`` made atomic (see tokencompile.outputs); returns what ``write`` returns."""
    from .outputs import write_atomically

    result = []
    write_atomically(path, lambda temporary: result.append(write(temporary)))
    return result[0]


def _at_least(option: str, value: int | None, low: int = 1) -> None:
    if value is not None and value < low:
        raise TokenCompileError(f"{option} {value} is out of range", f"give {option} {low} or more")


def _check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not 18 <= opset <= newest:
        raise TokenCompileError(f"--opset {opset} is out of range", f"give --opset 18..{newest} (TensorRT 10 reads "
                                "up to 20)")


def _file_inputs(*specs: str | None) -> list[str]:
    """The files among model specs and data paths (outputs must not overwrite them)."""
    return [spec.removeprefix("hf:") for spec in specs if spec and not spec.startswith("timm:")]


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
@click.option("--schedule", help="constant (default), decreasing, auto (needs --calib), r=8 or r=8,8,6,... "
                                  "(tokens removed per block).")
@click.option("--calib", "calib_path", help="Calibration data for --schedule auto: text file, sentence-pair TSV "
                                            "or image folder.")
@click.option("--calib-limit", type=int, default=128, show_default=True, help="Calibration samples to use (the first N).")
@click.option("--tokenizer", help="Local Hugging Face tokenizer directory (text calibration data).")
@click.option("--option", "method_options", multiple=True, help="Method option key=value (repeatable).")
@click.option("--no-prop-attn", is_flag=True, help="Turn off proportional attention (log size on attention logits).")
@click.option("-o", "--output", help="Write the optimized program (.pt2); default <input>.tc.pt2 next to the input.")
@click.option("--force", is_flag=True, help="Overwrite the default output file if it exists.")
@click.option("--report", "report_path", help="Write the report (JSON).")
@click.option("--onnx", "onnx_path", help="Also export the optimized program to ONNX (standard ops).")
@click.option("--dynamic-batch", is_flag=True, help="Re-export a program with a fixed batch with a symbolic one first.")
@_shape
@_pickle
@_debug
def optimize(model, budget, method, schedule, calib_path, calib_limit, tokenizer, method_options, no_prop_attn,
             output, force, report_path, onnx_path, dynamic_batch, input_shape, trust_pickle, debug):
    """Rewrite MODEL so it processes fewer tokens, within a FLOPs budget."""
    from .compiler import check_budget
    from .compiler import optimize as run_optimize
    from .load import load_model
    from .methods import get_method
    from .outputs import check_outputs, default_program_path, save_program
    from .schedule import parse_schedule

    check_budget(budget)
    get_method(method, _parse_options(method_options))  # validate before the slow part
    if budget is None and schedule is None:
        raise TokenCompileError("nothing to do: no --budget and no --schedule", "e.g. --budget 0.5")
    parse_schedule(schedule)
    if (schedule == "auto") != (calib_path is not None):
        raise TokenCompileError("--schedule auto and --calib go together",
                                "give both: --schedule auto --calib DATA (or neither)")
    _at_least("--calib-limit", calib_limit)
    if output is None:
        output = default_program_path(model)
        if os.path.exists(output) and not force:
            raise TokenCompileError(f"{output} exists", "pass --force to overwrite it, or -o PATH")
    output, report_path, onnx_path = check_outputs([("-o", output, (".pt2",), "for ONNX use --onnx NAME.onnx"),
                                                    ("--report", report_path, (".json",)),
                                                    ("--onnx", onnx_path, (".onnx",))], _file_inputs(model, calib_path))
    program, inputs = load_model(model, input_shape, trust_pickle)
    dynamic_note = None
    if dynamic_batch:
        from .batch import make_batch_dynamic
        from .signature import static_batch

        fixed = static_batch(program)
        if fixed is None:
            dynamic_note = "already symbolic"
        else:
            program = make_batch_dynamic(program, inputs, model)
            dynamic_note = f"re-exported with a symbolic batch (was fixed at {fixed})"
        click.echo(f"batch: {dynamic_note}")
    calib = None
    if calib_path is not None:
        from .evaluation.data import load_calibration_inputs, resolve_preprocess
        from .signature import static_batch

        calib = load_calibration_inputs(calib_path, program, tokenizer, resolve_preprocess(model), calib_limit,
                                        batch=static_batch(program) or 8)
        click.echo(f"calibrating on {sum(batch[0].shape[0] for batch in calib)} samples from {calib_path}")
    result = run_optimize(program, inputs, budget=budget, method=method, schedule=schedule,
                          options=_parse_options(method_options), proportional_attention=not no_prop_attn,
                          calib_inputs=calib, progress=lambda line: click.echo(f"  {line}"))
    report = result.report
    if report["calibration"]:
        chosen = report["calibration"]["chosen"]
        click.echo(f"calibrated schedule: {chosen} (cosine to original on the calibration set "
                   f"{report['calibration']['candidates'][chosen]['fidelity']:.4f}"
                   + ("; then raised where the counted FLOPs exceeded the budget)"
                      if report["calibration"]["adjusted_by_flops_count"] else ")"))
    click.echo(f"method {report['method']}, schedule r={','.join(map(str, report['schedule']))}")
    click.echo(f"tokens entering each block: {' '.join(map(str, report['tokens_entering_block']))}")
    click.echo(f"FLOPs: {report['flops_original'] / 1e9:.3f} G -> {report['flops_optimized'] / 1e9:.3f} G "
               f"(ratio {report['flops_ratio']:.3f}" + (f", budget {budget:g})" if budget else ")"))
    if dynamic_note:
        report["dynamic_batch"] = dynamic_note
    save_program(result.program, output)
    report["output"] = output
    click.echo(f"wrote {output} (load it after `import tokencompile`)")
    try:
        if onnx_path:
            from .lowering.onnx_export import export_onnx

            info = export_onnx(result.program, onnx_path, inputs)
            report["onnx"] = onnx_path
            click.echo(f"wrote {onnx_path} ({sum(info.op_counts.values())} nodes, {info.token_op_nodes} in token ops)")
    except TokenCompileError as error:
        report["onnx_error"] = str(error)
        raise
    finally:  # the report is written even when the ONNX export fails
        if report_path:
            _write_json(report_path, report)


@main.command(cls=_Command)
@_model
@click.option("-o", "--output", required=True, help="The .onnx (or, with --format trt, .engine) file to write.")
@click.option("--format", "output_format", type=click.Choice(["onnx", "trt"]), default="onnx", show_default=True,
              help="onnx, or a TensorRT engine (needs TensorRT and a GPU).")
@click.option("--plugins", is_flag=True, help="Write each token op as one TensorRT plugin node (plugin-form ONNX).")
@click.option("--plugin-dir", help="Precompiled kernels for the plugins (--format trt --plugins): DIR/sm_<arch> "
                                   "from python -m tokencompile.kernels.aot.")
@click.option("--fp16", is_flag=True, help="TensorRT: allow FP16 kernels.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="TensorRT: largest batch of the profile.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (TensorRT 10 reads 9..20).")
@click.option("--verify", is_flag=True, help="Compare ONNX Runtime with the program (atol 1e-4) at its fixed batch, "
                                            "or at batch 1 and 8 when the batch is symbolic.")
@click.option("--check", "check_target", type=click.Choice(["trt"]), help="Report ops TensorRT cannot build.")
@click.option("--external-data", is_flag=True, help="Weights in NAME.onnx.data beside the graph (automatic past "
              "2 GB, the limit of one ONNX file).")
@_shape
@_pickle
@_debug
def export(model, output, output_format, plugins, plugin_dir, fp16, max_batch, opset, verify, check_target,
           external_data, input_shape, trust_pickle, debug):
    """Lower a program to ONNX (standard ops or plugin nodes, dynamic batch axis) or a TensorRT engine."""
    from .bench import batch_inputs
    from .load import load_model
    from .lowering.onnx_export import export_onnx, verify_onnx
    from .outputs import check_output, check_outputs
    from .signature import verify_batches

    _at_least("--max-batch", max_batch)
    _check_opset(opset)
    if output_format == "trt":
        from .lowering.tensorrt_build import require_tensorrt

        check_output(output, "-o", (".engine", ".plan", ".trt"), _file_inputs(model))
        require_tensorrt()  # before the slow part
        engine_path, output = check_outputs([("-o", output, (".engine", ".plan", ".trt")),
                                             ("the ONNX file next to -o", os.path.splitext(output)[0] + ".onnx",
                                              (".onnx",))], _file_inputs(model))
    else:
        engine_path, output = None, check_output(output, "-o", (".onnx",), _file_inputs(model))
    program, inputs = load_model(model, input_shape, trust_pickle)
    if plugins:
        from .lowering.plugin_onnx import KERNEL_PLUGIN_OPS, export_plugin_onnx

        chosen = set(KERNEL_PLUGIN_OPS) if output_format == "trt" else None
        plugin_info = export_plugin_onnx(program, output, inputs, opset=opset, plugin_ops=chosen,
                                         external_data=external_data or None)
        counts = ", ".join(f"{count} {op}" for op, count in sorted(plugin_info.plugin_nodes.items()))
        click.echo(f"wrote {output}: {plugin_info.node_count} nodes, plugin nodes: {counts or 'none'}, "
                   f"opset {opset}, checker passed, {plugin_info.seconds:.0f} s")
    else:
        info = export_onnx(program, output, inputs, opset=opset, external_data=external_data or None)
        click.echo(f"wrote {output}: {sum(info.op_counts.values())} nodes ({info.token_op_nodes} in token ops), "
                   f"opset {opset}, checker passed, {info.seconds:.0f} s")
    failed = False
    if verify:
        if plugins:  # the plugin form runs in ONNX Runtime through Python ops (the reference implementation)
            from .lowering.plugin_onnx import verify_plugin_onnx as verify_onnx
        for row in verify_onnx(program, output, [batch_inputs(inputs, size) for size in verify_batches(program)]):
            click.echo(f"verify batch {row['batch']}: max abs error {row['max_abs_error']:.2e} "
                       f"({'ok' if row['ok'] else 'FAILED'}, atol 1e-4)")
            failed |= not row["ok"]
    if check_target == "trt":
        import onnx

        from .lowering.tensorrt_check import check_tensorrt

        findings = check_tensorrt(onnx.load(output, load_external_data=False))
        blocking = [f for f in findings if f.blocking]
        for finding in findings:
            click.echo(str(finding))
        click.echo(f"TensorRT check: {len(blocking)} blocking, {len(findings) - len(blocking)} notes")
        failed |= bool(blocking)
    if engine_path and not failed:
        from .lowering.tensorrt_build import build_engine

        build = _write(engine_path, lambda temporary: build_engine(output, temporary, fp16=fp16, max_batch=max_batch,
                                                                   plugin_dir=plugin_dir))
        click.echo(f"wrote {engine_path}: TensorRT engine, batch 1..{max_batch}{', fp16' if fp16 else ''}, "
                   f"plugins: {', '.join(build.plugin_ops) or 'none'}")
    if failed:
        sys.exit(1)


@main.command(cls=_Command)
@_debug
def doctor(debug):
    """Which back-ends are usable here: ONNX Runtime CPU/CUDA, TensorRT, GPU, Triton, nvcc."""
    from .lowering.tensorrt_build import doctor as run_doctor
    from .lowering.tensorrt_build import format_doctor

    click.echo(format_doctor(run_doctor()))


@main.command(cls=_Command)
@click.argument("original")
@click.argument("optimized")
@click.option("--runtime", type=click.Choice(["ort", "torch"]), default="ort", show_default=True)
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--rounds", type=int, default=20, show_default=True, help="Interleaved rounds (A B A B ...).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement (two extra processes).")
@click.option("--json", "json_path", help="Write the result as JSON.")
@_pickle
@_debug
def bench(original, optimized, runtime, batch, rounds, threads, no_memory, json_path, trust_pickle, debug):
    """Latency of ORIGINAL vs OPTIMIZED, in one process, interleaved."""
    from .bench import bench as run_bench
    from .bench import format_bench
    from .outputs import check_output

    for option, value in (("--batch", batch), ("--rounds", rounds), ("--threads", threads)):
        _at_least(option, value)
    if json_path:
        json_path = check_output(json_path, "--json", (".json",), [original, optimized])
    result = run_bench(original, optimized, runtime, batch, rounds, threads=threads, memory=not no_memory,
                       progress=lambda text: click.echo(text, err=True), trust_pickle=trust_pickle)
    click.echo(format_bench(result))
    if json_path:
        _write_json(json_path, result.to_dict())


@main.command(cls=_Command)
@_debug
def methods(debug):
    """List the reduction methods."""
    from .methods import METHODS

    for name, cls in sorted(METHODS.items()):
        click.echo(f"{name:<10} {cls.family:<6} {cls.summary}\n{'':<17} {cls.reference}")


def _data_options(command):
    """Options shared by `eval` and `sweep`: the data, the task and how samples become inputs."""
    options = [
        click.option("--data", "data_path", required=True,
                     help="Image folder, text file (one text per line) or .tsv of sentence pairs."),
        click.option("--task", type=click.Choice(["sts", "embed", "classify", "lm"]), required=True,
                     help="sts: pairs, Spearman + cosine; embed: cosine to original; classify: agreement, KL; "
                          "lm: a causal LM's next-token agreement and perplexity on a text file."),
        click.option("--tokenizer", help="Local Hugging Face directory with the tokenizer (text data)."),
        click.option("--batch", type=int, default=32, show_default=True, help="Samples per model call."),
        click.option("--limit", type=int, help="Use only the first N samples (pairs for .tsv)."),
        click.option("--json", "json_path", help="Write the results as JSON."),
        click.option("--timm-config", help="Take image preprocessing from this timm model's config."),
        click.option("--mean", help="Image normalization mean, e.g. 0.5,0.5,0.5 (default ImageNet)."),
        click.option("--std", help="Image normalization std, e.g. 0.5,0.5,0.5 (default ImageNet)."),
        click.option("--crop-pct", type=float, help="Center-crop fraction (default 0.875)."),
        click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest", "lanczos"])),
        click.option("--no-labels", is_flag=True, help="Ignore ImageNet synsets in image file names."),
        click.option("--gguf-file", help="--task lm: GGUF checkpoint inside the model folder."),
        click.option("--continuation", type=int, default=64, show_default=True,
                     help="--task lm: tokens teacher-forced after each prompt."),
        click.option("--prompt-tokens", type=int, default=512, show_default=True,
                     help="--task lm (sweep): prompt length; eval takes it from the exported decoder."),
        click.option("--protected", type=int, default=64, show_default=True,
                     help="--task lm (sweep): last prompt tokens kept (the span is the rest)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_eval_data(model_spec, program, data_path, tokenizer, limit, timm_config, mean, std, crop_pct,
                    interpolation, no_labels):
    from .evaluation.data import default_tokenizer, load_data, resolve_preprocess

    preprocess = resolve_preprocess(model_spec, timm_config, mean, std, crop_pct, interpolation)
    return load_data(data_path, program, default_tokenizer(model_spec, tokenizer), preprocess, limit,
                     labels=not no_labels)


def _check_data_options(batch, limit):
    _at_least("--batch", batch)
    _at_least("--limit", limit)


@main.command("eval", cls=_Command)
@click.argument("original")
@click.argument("optimized")
@_data_options
@_pickle
@_debug
def eval_command(original, optimized, data_path, task, tokenizer, batch, limit, json_path, timm_config, mean, std,
                 crop_pct, interpolation, no_labels, gguf_file, continuation, prompt_tokens, protected, trust_pickle,
                 debug):
    """Fidelity of OPTIMIZED to ORIGINAL on your data (agreement, KL, cosine, Spearman).

    With --task lm: ORIGINAL is a causal LM folder, OPTIMIZED a folder from `export-decoder`."""
    from .evaluation import evaluate, format_metrics
    from .load import load_model
    from .outputs import check_output
    from .signature import check_same_inputs

    _check_data_options(batch, limit)
    _at_least("--continuation", continuation)
    if json_path:
        json_path = check_output(json_path, "--json", (".json",), _file_inputs(original, optimized, data_path))
    if task == "lm":
        from .decoder.cli import eval_lm

        result = eval_lm(original, optimized, data_path, tokenizer, gguf_file, continuation, batch, limit,
                         progress=lambda text: click.echo(text, err=True))
        click.echo(format_metrics(result))
        if json_path:
            _write_json(json_path, result)
        return
    reference, _ = load_model(original, trust_pickle=trust_pickle)
    candidate, _ = load_model(optimized, trust_pickle=trust_pickle)
    check_same_inputs(reference, candidate, original, optimized)
    data = _load_eval_data(original, reference, data_path, tokenizer, limit, timm_config, mean, std, crop_pct,
                           interpolation, no_labels)
    result = evaluate(reference, candidate, data, task, batch, progress=lambda text: click.echo(text, err=True))
    click.echo(format_metrics(result))
    if json_path:
        _write_json(json_path, result)


@main.command(cls=_Command)
@_model
@_data_options
@click.option("--methods", "method_list", default="all", show_default=True,
              help="Comma-separated methods, or all (see `tokencompile methods`).")
@click.option("--budgets", default="0.75,0.5,0.25", show_default=True, help="Comma-separated FLOPs budgets.")
@click.option("--latency", is_flag=True, help="Also time ONNX Runtime, interleaved with the original.")
@click.option("--rounds", type=int, default=10, show_default=True, help="Timed rounds per model (--latency).")
@click.option("--plot", "plot_path", help="Write a Pareto plot (PNG): fidelity vs FLOPs (or latency) ratio.")
@_shape
@_pickle
@_debug
def sweep(model, data_path, task, tokenizer, batch, limit, json_path, timm_config, mean, std, crop_pct,
          interpolation, no_labels, gguf_file, continuation, prompt_tokens, protected, method_list, budgets, latency,
          rounds, plot_path, input_shape, trust_pickle, debug):
    """Optimize MODEL with every method at every budget and measure fidelity on your data."""
    from .compiler import check_budget
    from .evaluation import format_sweep, plot_pareto
    from .evaluation import sweep as run_sweep
    from .evaluation.sweep import parse_list, write_json
    from .load import load_model
    from .methods import METHODS, get_method
    from .outputs import check_outputs

    _check_data_options(batch, limit)
    _at_least("--rounds", rounds)
    if task == "lm":
        from .decoder.cli import sweep_lm

        ignored = [option for option, value in (("--plot", plot_path), ("--latency", latency),
                                                ("--input-shape", input_shape)) if value]
        if ignored:
            raise TokenCompileError(f"{', '.join(ignored)} cannot be used with --task lm",
                                    "drop them (the lm sweep reports agreement and perplexity per budget)")
        _at_least("--continuation", continuation)
        _at_least("--prompt-tokens", prompt_tokens, 2)
        _at_least("--protected", protected, 0)
        json_path = check_outputs([("--json", json_path, (".json",))], _file_inputs(model, data_path))[0]
        results = sweep_lm(model, data_path, tokenizer, gguf_file, method_list, parse_list(budgets, float, "budgets"),
                           prompt_tokens, protected, continuation, batch, limit,
                           progress=lambda text: click.echo(text, err=True))
        click.echo(format_sweep(results))
        if json_path:
            write_json(results, json_path)
            click.echo(f"wrote {json_path}")
        return
    names = sorted(METHODS) if method_list == "all" else parse_list(method_list, str, "methods")
    for name in names:
        get_method(name)  # validate before the slow part
    budget_values = parse_list(budgets, float, "budgets")
    for budget in budget_values:
        check_budget(budget)
    json_path, plot_path = check_outputs([("--json", json_path, (".json",)), ("--plot", plot_path, (".png",))],
                                         _file_inputs(model, data_path))
    program, inputs = load_model(model, input_shape, trust_pickle)
    data = _load_eval_data(model, program, data_path, tokenizer, limit, timm_config, mean, std, crop_pct,
                           interpolation, no_labels)
    results = run_sweep(program, inputs, data, task, names, budget_values, batch, latency, rounds=rounds,
                        progress=lambda text: click.echo(text, err=True))
    results["model"] = model
    click.echo(format_sweep(results))
    if json_path:
        write_json(results, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        if not any("error" not in run for run in results["runs"]):
            raise TokenCompileError("no run of the sweep succeeded: nothing to plot", "see the errors in the table")
        _write(plot_path, lambda temporary: plot_pareto(results, temporary))
        click.echo(f"wrote {plot_path}")


from .decoder.cli import export_decoder_command, generate_command  # noqa: E402  (decoder LLMs)

main.add_command(generate_command(_Command, _debug))
main.add_command(generate_command(_Command, _debug), name="run")  # an alias of generate
main.add_command(export_decoder_command(_Command, _debug))


if __name__ == "__main__":
    main()
