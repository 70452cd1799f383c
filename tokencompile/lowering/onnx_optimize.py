"""Clean up a graph fresh from torch.onnx's translation: torch's own ``ONNXProgram.optimize()`` (onnxscript's
optimizer: constant folding, pattern rewrites, dead code, shared initializers, common subexpressions, then
onnxscript's fusions), as ``torch.onnx.export(optimize=True)`` runs it, less the rewrite rules whose pattern
has several output nodes.

onnxscript matches such a pattern by trying its first node against every node of the graph and the others
against every node of their op type, so the time grows with the square of the graph's size. The only
default one (two Slices of a tensor into one Split) rewrote nothing in the graphs checked (MiniLM and tiny
BERT with token reduction, SmolLM2's prefill and decode step), and on SmolLM2's 30-layer graphs it took
about half of the whole export (benchmarks/onnx_export_time.py)."""

from __future__ import annotations

import contextlib
import logging

import onnxscript.rewriter


def single_output_rules() -> tuple | None:
    """onnxscript's default rewrite rules whose pattern ends in one node (None where this onnxscript does
    not expose them as the tested versions do)."""
    try:
        return tuple(rule for rule in onnxscript.rewriter._DEFAULT_REWRITE_RULES
                     if rule._target_pattern.has_single_output_node)
    except AttributeError:
        return None


@contextlib.contextmanager
def _default_rules(rules: tuple | None):
    # onnxscript's optimize_ir reads this module global when it runs and takes no rule list: setting it for
    # the call keeps the rest of the pipeline exactly torch's, in this and later onnxscript versions
    if rules is None:
        yield
        return
    saved = onnxscript.rewriter._DEFAULT_REWRITE_RULES
    onnxscript.rewriter._DEFAULT_REWRITE_RULES = rules
    try:
        yield
    finally:
        onnxscript.rewriter._DEFAULT_REWRITE_RULES = saved


def optimize_onnx(onnx_program) -> None:
    """Optimize a ``torch.onnx.ONNXProgram`` exported with ``optimize=False``, in place (see the module's
    docstring). Where this onnxscript does not expose its rules as expected, its whole optimizer runs."""
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)  # "Evaluation failed" warnings: a constant it could not fold stays a node
    try:
        with _default_rules(single_output_rules()):
            onnx_program.optimize()
    finally:
        folding.setLevel(level)
