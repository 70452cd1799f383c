"""`--schedule auto`: the allocation under the cost model, the budget guarantee, determinism, errors."""

import math

import pytest
import torch
from test_passes import Tiny

import tokencompile
from tokencompile.calibrate import allocate
from tokencompile.compiler import export_module
from tokencompile.flops import BlockCost, CostModel
from tokencompile.methods import get_method


def _uniform_cost(blocks=4, tokens=32):
    # every block: 100 FLOPs per token-fraction before and after the site, nothing quadratic
    return CostModel(tokens, 0, [BlockCost(before_linear=100, after_linear=100) for _ in range(blocks)], 8)


def test_allocation_meets_the_budget_and_spares_sensitive_blocks():
    cost, method = _uniform_cost(), get_method("random")
    # block 1 is 100x more sensitive than the others: it should remove (almost) nothing
    schedule = allocate(cost, 0.6, [0.01, 1.0, 0.01, 0.01], [8, 8, 8, 8], 1, method)
    assert cost.flops(schedule, method) <= 0.6 * cost.original
    assert schedule[1] == 0 and sum(schedule) > 0


def test_allocation_with_equal_sensitivity_prefers_early_blocks():
    # removing tokens early saves FLOPs in every later block too
    cost, method = _uniform_cost(), get_method("random")
    schedule = allocate(cost, 0.7, [0.1] * 4, [8] * 4, 1, method)
    assert schedule[0] >= schedule[-1] and cost.flops(schedule, method) <= 0.7 * cost.original


def test_allocation_reports_an_unreachable_budget():
    cost, method = _uniform_cost(), get_method("tome")
    with pytest.raises(tokencompile.TokenCompileError, match="cannot be met by the calibrated schedule"):
        allocate(cost, 0.05, [0.1] * 4, [8] * 4, 1, method)


@pytest.fixture(scope="module")
def tiny_program():
    torch.manual_seed(0)
    return export_module(Tiny().eval(), (torch.randn(2, 15, 32),))


def _calib(count=3, batch=4):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 15, 32, generator=g),) for _ in range(count)]


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_auto_schedule_is_deterministic_within_budget_and_no_worse_than_fixed_shapes(tiny_program, method):
    first = tokencompile.optimize(tiny_program, budget=0.6, method=method, schedule="auto", calib_inputs=_calib())
    again = tokencompile.optimize(tiny_program, budget=0.6, method=method, schedule="auto", calib_inputs=_calib())
    report = first.report
    assert report["schedule"] == again.report["schedule"]
    assert report["flops_ratio"] <= 0.6
    calibration = report["calibration"]
    assert calibration["samples"] == 12 and len(calibration["sensitivity"]) == 3
    assert all(0 <= s < 1 or math.isinf(s) for s in calibration["sensitivity"])
    scores = {name: c["fidelity"] for name, c in calibration["candidates"].items()}
    assert {"allocated", "constant"} <= set(scores)
    assert scores[calibration["chosen"]] == max(scores.values())
    # the final FLOPs count may add a token where the cost model was optimistic, never remove one
    chosen = calibration["candidates"][calibration["chosen"]]["schedule"]
    assert all(final >= r for final, r in zip(report["schedule"], chosen))
    assert calibration["adjusted_by_flops_count"] == (report["schedule"] != chosen)


def test_auto_schedule_needs_data_and_a_budget(tiny_program):
    with pytest.raises(tokencompile.TokenCompileError, match="needs calibration data.*--calib"):
        tokencompile.optimize(tiny_program, budget=0.5, schedule="auto")
    with pytest.raises(tokencompile.TokenCompileError, match="needs a budget"):
        tokencompile.optimize(tiny_program, schedule="auto", calib_inputs=_calib(1))


@pytest.mark.slow  # about 35 s: the default run keeps its 15-minute margin
def test_cli_auto_schedule_from_a_text_file(recipe, tmp_path):
    import json

    from click.testing import CliRunner

    from models import minilm_dir
    from tokencompile.cli import main

    model = tmp_path / "bert.pt2"
    torch.export.save(recipe("hf_bert")[1], str(model))
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(["A man is playing a guitar.", "Two dogs run across the grass in the park.",
                                "The stock market fell sharply on Monday after the announcement.",
                                "A woman is slicing onions."] * 3) + "\n")
    report = tmp_path / "report.json"
    out = CliRunner().invoke(main, ["optimize", str(model), "--budget", "0.5", "--schedule", "auto", "--calib",
                                    str(texts), "--tokenizer", minilm_dir(), "--report", str(report)])
    assert out.exit_code == 0, out.output
    assert "calibrating on 12 samples" in out.output and "calibrated schedule:" in out.output
    written = json.loads(report.read_text())
    assert written["flops_ratio"] <= 0.5 and written["calibration"]["samples"] == 12
    missing = CliRunner().invoke(main, ["optimize", str(model), "--budget", "0.5", "--schedule", "auto"])
    assert missing.exit_code == 2 and "--schedule auto and --calib go together" in missing.output
