"""What `tokencompile inspect` reports: the structure the compiler found and the FLOPs it models."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from .analysis import analyse
from .flops import build_cost_model, count_flops


def inspect_program(program: ExportedProgram, example_inputs: tuple) -> dict:
    module = program.module()
    analysis = analyse(module)
    cost = build_cost_model(module, analysis, example_inputs)
    n = analysis.tokens
    blocks = []
    for block, c in zip(analysis.blocks, cost.blocks):
        blocks.append({
            "index": block.index,
            "name": block.name,
            "tokens": n,
            "attention": block.attention.kind,
            "attention_node": block.attention.node.name,
            "reduction_site": block.site.name,
            "flops": c.before_linear + c.before_quadratic + c.after_linear + c.after_quadratic,
            # flops(n) = per_token * n + per_token_pair * n^2 (per sample)
            "flops_per_token": (c.before_linear + c.after_linear) / n,
            "flops_per_token_pair": (c.before_quadratic + c.after_quadratic) / (n * n),
        })
    batch = next(x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor))
    fused = sum(1 for block in analysis.blocks if block.attention.kind == "sdpa")
    return {
        **analysis.summary(),
        "fused_attention_nodes": fused,
        "flops_per_sample": count_flops(module, example_inputs) // batch,
        "flops_outside_blocks": cost.outside,
        "block_table": blocks,
    }


def format_inspection(info: dict) -> str:
    lines = [
        f"tokens: {info['tokens']} (token axis {info['token_axis']}), hidden size {info['hidden']}, "
        f"{info['blocks']} blocks, attention: {info['attention']} ({info['fused_attention_nodes']} fused nodes)",
        f"protected: {info['protected_prefix_tokens']} prefix token(s)"
        + (", last valid token ([SEP])" if info["protect_last_valid_token"] else "")
        + (f"; padding from input {info['attention_mask_input']!r}" if info["attention_mask_input"] else ""),
        f"FLOPs per sample: {info['flops_per_sample'] / 1e9:.3f} G "
        f"({info['flops_outside_blocks'] / 1e9:.3f} G outside the blocks)",
        "",
        f"{'block':>5}  {'name':<28} {'tokens':>6} {'GFLOPs':>8} {'attn share':>10}  reduction site",
    ]
    for b in info["block_table"]:
        share = b["flops_per_token_pair"] * b["tokens"] ** 2 / b["flops"] if b["flops"] else 0.0
        lines.append(f"{b['index']:>5}  {b['name']:<28} {b['tokens']:>6} {b['flops'] / 1e9:>8.3f} {share:>10.1%}  "
                     f"{b['reduction_site']}")
    return "\n".join(lines)
