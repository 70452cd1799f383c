"""`tokencompile generate`: reduce a causal LM's prompt in prefill (FastV) and decode greedily."""

from __future__ import annotations

import click

from ..errors import TokenCompileError


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise TokenCompileError(f"cannot read {option} {text!r}", f"give {option} as comma-separated integers") from None


def load_causal_lm(model_dir: str, gguf_file: str | None):
    """A local Hugging Face causal LM (fp32, SDPA) and its tokenizer (None if the directory has none)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(model_dir):
        raise TokenCompileError(f"{model_dir} is not a directory", "give a local Hugging Face model directory")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32,
                                                 **extra).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **extra)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def generate_command(command_class, debug_option):
    @click.command("generate", cls=command_class)
    @click.argument("model_dir")
    @click.option("--gguf-file", help="GGUF checkpoint inside MODEL_DIR (dequantised to fp32).")
    @click.option("--prompt", help="Prompt text (needs a tokenizer in MODEL_DIR).")
    @click.option("--prompt-ids", help="Prompt as comma-separated token ids (instead of --prompt).")
    @click.option("--budget", type=float, help="Prefill FLOPs ratio to meet (0 < B <= 1).")
    @click.option("--keep", type=float, help="Fraction of the span kept (instead of --budget).")
    @click.option("--layer", type=int, default=2, show_default=True, help="First layer that sees the kept tokens.")
    @click.option("--span", help="START,LENGTH of the prompt tokens that may go (default: all but the last).")
    @click.option("--image-token-id", type=int, help="The span is every token with this id (VLM image tokens).")
    @click.option("--positions", type=click.Choice(["keep", "renumber"]), default="keep", show_default=True)
    @click.option("--probes", type=int, default=1, show_default=True, help="Score by the mean attention row of the "
                  "last P prompt tokens (1: FastV's last token).")
    @click.option("--max-new-tokens", type=int, default=32, show_default=True)
    @click.option("--report", "report_path", help="Write the report (JSON).")
    @debug_option
    def generate(model_dir, gguf_file, prompt, prompt_ids, budget, keep, layer, span, image_token_id, positions,
                 probes, max_new_tokens, report_path, debug):
        """Greedy generation with the prompt reduced in prefill; prints the continuation and tokens per layer."""
        import torch

        from . import Span, compile_decoder
        from . import generate as greedy

        if (prompt is None) == (prompt_ids is None):
            raise TokenCompileError("give exactly one of --prompt and --prompt-ids")
        if max_new_tokens < 1:
            raise TokenCompileError(f"--max-new-tokens {max_new_tokens} is below 1", "give --max-new-tokens >= 1")
        if budget is None and keep is None:
            budget = 1.0
        if report_path:  # checked before the model loads (see tokencompile.outputs)
            from ..outputs import check_output

            report_path = check_output(report_path, "--report", (".json",), [model_dir])
        model, tokenizer = load_causal_lm(model_dir, gguf_file)
        if prompt is not None:
            if tokenizer is None:
                raise TokenCompileError(f"{model_dir} has no tokenizer", "give --prompt-ids instead of --prompt")
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        else:
            ids = torch.tensor([_int_list(prompt_ids, "--prompt-ids")])
        if image_token_id is not None:
            region = Span(token_id=image_token_id)
        elif span is not None:
            values = _int_list(span, "--span")
            if len(values) != 2:
                raise TokenCompileError(f"--span {span!r} is not START,LENGTH", "give --span START,LENGTH")
            region = Span(*values)
        else:
            region = Span()
        program = compile_decoder(model, ids, budget=budget if keep is None else None, keep=keep, layer=layer,
                                  span=region, positions=positions, probes=probes)
        out = greedy(program, ids, max_new_tokens, eos_token_id=getattr(model.config, "eos_token_id", None))
        new = out[0, ids.shape[1]:].tolist()
        click.echo(tokenizer.decode(new) if tokenizer is not None else ",".join(map(str, new)))
        report = {**program.report, "generated_ids": new}
        click.echo(f"prefill FLOPs ratio {report['flops_ratio']:.3f}, layer {report['layer']}, span kept "
                   f"{report['span_tokens_kept']}/{report['span_tokens_removable']}, tokens per layer "
                   f"{report['tokens_per_layer']}", err=True)
        if report_path:
            from ..outputs import write_json

            write_json(report_path, report)

    return generate


__all__ = ["generate_command", "load_causal_lm"]
