"""`eval --task lm` and `sweep --task lm`: next-token agreement and continuation perplexity of a reduced
causal LM against the full model, on windows of a text file (tiny random Llama, byte tokenizer)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import models
from tokencompile.cli import main
from tokencompile.decoder import Span, compile_decoder
from tokencompile.decoder.onnx_export import export_decoder_onnx
from tokencompile.errors import TokenCompileError
from tokencompile.evaluation.lm import evaluate_lm, lm_windows

PROMPT, CONTINUATION = 24, 8
TEXT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
        "associated documentation files, to deal in the Software without restriction, including without "
        "limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies.")


@pytest.fixture(scope="module")
def folder(llama, tmp_path_factory):
    """The tiny Llama saved with its byte tokenizer, and a text file."""
    path = tmp_path_factory.mktemp("tiny_llama")
    llama.save_pretrained(path)
    models.decoders.byte_tokenizer().save_pretrained(path)
    (path / "text.txt").write_text(TEXT + "\n")
    return path


@pytest.fixture(scope="module")
def windows(folder):
    return lm_windows(models.decoders.byte_tokenizer(), str(folder / "text.txt"), PROMPT, CONTINUATION, limit=4)


def test_windows_are_consecutive_slices_of_the_text(windows):
    assert windows.shape == (4, PROMPT + CONTINUATION)
    ids = models.decoders.byte_tokenizer()(TEXT).input_ids
    assert windows.flatten().tolist() == ids[:4 * (PROMPT + CONTINUATION)]


def test_unreduced_loop_agrees_with_the_full_forward(llama, windows):
    result = evaluate_lm(llama, llama, windows, PROMPT, batch=3)
    assert result["next_token_agreement"] == 1.0
    assert abs(result["perplexity_change"]) < 1e-5


def test_reduced_prefill_changes_predictions(llama, windows):
    program = compile_decoder(llama, windows[:1, :PROMPT], keep=0.25, layer=1, span=Span(0, PROMPT - 4))
    result = evaluate_lm(llama, program, windows, PROMPT, batch=4)
    assert result["next_token_agreement"] < 1.0 and result["perplexity"] != result["perplexity_original"]
    assert result["continuation_tokens"] == CONTINUATION and result["windows"] == 4


def test_short_text_is_refused(folder):
    with pytest.raises(TokenCompileError, match="fewer than one window of 500 prompt"):
        lm_windows(models.decoders.byte_tokenizer(), str(folder / "text.txt"), 500, CONTINUATION)


def test_cli_eval_lm_on_an_exported_decoder(llama, folder, windows, tmp_path):
    program = compile_decoder(llama, windows[:1, :PROMPT], keep=0.5, span=Span(0, PROMPT - 4))
    export_decoder_onnx(program, str(tmp_path / "onnx"))
    result = CliRunner().invoke(main, ["eval", str(folder), str(tmp_path / "onnx"), "--task", "lm", "--data",
                                       str(folder / "text.txt"), "--continuation", str(CONTINUATION), "--limit", "4",
                                       "--json", str(tmp_path / "lm.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "lm.json").read_text())
    expected = evaluate_lm(llama, program, windows, PROMPT)
    assert written["next_token_agreement"] == pytest.approx(expected["next_token_agreement"])
    assert written["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert written["flops_ratio"] == pytest.approx(program.report["flops_ratio"])


def test_cli_sweep_lm(folder, tmp_path):
    result = CliRunner().invoke(main, ["sweep", str(folder), "--task", "lm", "--data", str(folder / "text.txt"),
                                       "--prompt-tokens", str(PROMPT), "--protected", "4", "--continuation",
                                       str(CONTINUATION), "--budgets", "1.0,0.6,0.1", "--methods", "fastv",
                                       "--json", str(tmp_path / "sweep.json")])
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    # budget 1.0 removes no token; the last layer computes the last token's query, attention and MLP alone
    # (test_decoder.py::test_budget_one_greedy_equals_hugging_face counts the FLOPs of this 24-token prompt)
    assert runs[0]["next_token_agreement"] == 1.0 and runs[0]["flops_ratio"] == pytest.approx(6051840 / 7700480)
    assert runs[1]["flops_ratio"] <= 0.6 and runs[1]["tokens_per_layer"][-1] < PROMPT
    assert runs[1]["settings"] == {"sinks": 4, "pool": 15, "lookup": 16}
    assert "cannot be met" in runs[2]["error"]
    assert "| fastv | 0.6 |" in result.output


@pytest.mark.parametrize("args, message", [
    (["--methods", "tome"], "tome: not a decoder method"),
    (["--protected", "30"], "--protected 30 leaves no span"),
    (["--continuation", "0"], "--continuation 0 is out of range"),
])
def test_cli_sweep_lm_errors(folder, args, message):
    result = CliRunner().invoke(main, ["sweep", str(folder), "--task", "lm", "--data", str(folder / "text.txt"),
                                       "--prompt-tokens", str(PROMPT), *args])
    assert result.exit_code == 2 and message in result.output, result.output
