"""What `tokencompile inspect` reports: the structure the compiler found and the FLOPs it models."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from .analysis import _block_name, analyse
from .attention import find_attention
from .flops import build_cost_model, count_flops


def _token_ops(module) -> list:
    return [node for node in module.graph.nodes
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "tokencompile"]


def inspect_optimized(module, example_inputs: tuple) -> dict:
    """An optimized program: per block, the tokens its attention sees, the attention node (still one
    fused SDPA when the original had it) and the reduction ops inserted there."""
    ops_by_block: dict[str, list[str]] = {}
    for node in _token_ops(module):
        name = _block_name(node) or "(outside blocks)"
        op = node.target.name().split("::")[-1].split(".")[0]
        if op.endswith("_plan") or op in ("farthest_point_rank",):
            ops_by_block.setdefault(name, []).append(op)
    blocks = []
    for index, attention in enumerate(find_attention(module)):
        name = _block_name(attention.node) or f"attention {index}"
        blocks.append({"index": index, "name": name, "tokens": attention.tokens, "attention": attention.kind,
                       "attention_node": attention.node.name, "reductions": ops_by_block.get(name, [])})
    batch = next(x.shape[0] for x in example_inputs if isinstance(x, torch.Tensor))
    return {"optimized": True, "blocks": len(blocks),
            "fused_attention_nodes": sum(1 for b in blocks if b["attention"] == "sdpa"),
            "token_ops": len(_token_ops(module)),
            "flops_per_sample": count_flops(module, example_inputs) // batch, "block_table": blocks}


def inspect_program(program: ExportedProgram, example_inputs: tuple) -> dict:
    module = program.module()
    if _token_ops(module):
        return inspect_optimized(module, example_inputs)
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


def format_optimized(info: dict) -> str:
    lines = [f"optimized program: {info['blocks']} blocks, {info['fused_attention_nodes']} fused attention "
             f"(SDPA) nodes, {info['token_ops']} tokencompile ops; FLOPs per sample: "
             f"{info['flops_per_sample'] / 1e9:.3f} G", "",
             f"{'block':>5}  {'name':<28} {'tokens':>6}  {'attention':<34} reduction after attention"]
    for b in info["block_table"]:
        attention = f"{b['attention']} ({b['attention_node']})"
        lines.append(f"{b['index']:>5}  {b['name']:<28} {b['tokens']:>6}  {attention:<34} "
                     f"{', '.join(b['reductions']) or '-'}")
    return "\n".join(lines)


def format_inspection(info: dict) -> str:
    if info.get("optimized"):
        return format_optimized(info)
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
