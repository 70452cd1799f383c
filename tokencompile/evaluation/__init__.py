"""Fidelity evaluation on the user's own data: loaders, metrics, an evaluate() runner and a methods x budgets sweep.

    from tokencompile.evaluation import load_data, evaluate
    data = load_data("pairs.tsv", program, tokenizer="path/to/hf-dir")
    evaluate(program, optimized.program, data, task="sts")
"""

from .data import (
    EvalData,
    Preprocess,
    load_calibration_inputs,
    load_data,
    load_tokenizer,
)
from .runner import TASKS, evaluate, format_metrics
from .sweep import format_sweep, plot_pareto, sweep

__all__ = ["TASKS", "EvalData", "Preprocess", "evaluate", "format_metrics", "format_sweep", "load_calibration_inputs",
           "load_data", "load_tokenizer", "plot_pareto", "sweep"]
