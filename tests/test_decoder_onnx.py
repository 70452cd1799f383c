"""A reduced decoder as two ONNX graphs (prefill, decode): names, per-layer cache axes, parity with the
torch program in ONNX Runtime, greedy generation from the graphs, the CLI verbs and their errors."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

import models
from tokencompile.cli import main
from tokencompile.decoder import (
    compile_decoder,
    generate,
    prefill,
    teacher_forced_logits,
)
from tokencompile.decoder.onnx_export import OnnxRunner, export_decoder_onnx
from tokencompile.errors import TokenCompileError
from tokencompile.lowering.onnx_files import external_data_files

TOKENS = 24


@pytest.fixture(scope="module")
def prompts():
    return models.decoders.prompt_ids(3, TOKENS, seed=1)[0]


@pytest.fixture(scope="module")
def fastv_program(llama, prompts):
    return compile_decoder(llama, prompts[:2], keep=0.5, layer=2, span=(4, 16))


@pytest.fixture(scope="module")
def exported(fastv_program, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fastv")
    export_decoder_onnx(fastv_program, str(folder))
    return folder


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_names_and_axes(exported):
    prefill_graph = onnx.load(exported / "prefill.onnx").graph
    decode_graph = onnx.load(exported / "decode.onnx").graph
    assert [v.name for v in prefill_graph.input] == ["input_ids"]
    assert _dims(prefill_graph.input[0]) == ["batch", TOKENS]
    names = ["logits"] + [f"present.{i}.{r}" for i in range(4) for r in ("key", "value")]
    assert [v.name for v in prefill_graph.output] == names
    # layers 0-1 cache every prompt token, layers 2-3 the 8 + 8 kept
    assert [_dims(v)[2] for v in prefill_graph.output[1:]] == [24, 24, 24, 24, 16, 16, 16, 16]
    assert [v.name for v in decode_graph.input] == (
        ["input_ids", "position_ids"] + [f"past_key_values.{i}.{r}" for i in range(4) for r in ("key", "value")])
    assert [v.name for v in decode_graph.output] == names
    assert _dims(decode_graph.input[2]) == ["batch", 2, "past_sequence_length.0", 16]
    assert _dims(decode_graph.input[8])[2] == "past_sequence_length.3"
    manifest = json.loads((exported / "decoder.json").read_text())
    assert manifest["prompt_tokens"] == TOKENS and manifest["cache_tokens"] == [24, 24, 16, 16]


@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_and_decode_match_the_program(fastv_program, exported, prompts, batch):
    runner = OnnxRunner(str(exported))
    ids = prompts[:batch]
    expected_logits, expected_caches = prefill(fastv_program, ids)
    logits, caches = runner.prefill(ids)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    for (k, v), (k_ref, v_ref) in zip(caches, expected_caches):
        assert k.shape == k_ref.shape and torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)
    continuation = prompts[:batch, :6].flip(1)
    onnx_logits = teacher_forced_logits(runner, ids, continuation)
    torch_logits = teacher_forced_logits(fastv_program, ids, continuation)
    assert torch.allclose(onnx_logits, torch_logits, atol=1e-4)


def test_greedy_from_the_graphs_equals_torch(fastv_program, exported, prompts):
    runner = OnnxRunner(str(exported))
    assert torch.equal(generate(runner, prompts, 20), generate(fastv_program, prompts, 20))


@pytest.mark.slow
def test_graphs_with_weights_in_side_files_equal_single_files(fastv_program, exported, prompts, tmp_path):
    """Models past 2 GB write each graph's weights to NAME.onnx.data; the runner reads them back."""
    export_decoder_onnx(fastv_program, str(tmp_path), external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode.onnx", "decode.onnx.data", "decoder.json",
                                                          "prefill.onnx", "prefill.onnx.data"]
    for name in ("prefill.onnx", "decode.onnx"):
        assert external_data_files(str(tmp_path / name)) == {f"{name}.data"}
    side, single = OnnxRunner(str(tmp_path)), OnnxRunner(str(exported))
    assert torch.equal(side.prefill(prompts)[0], single.prefill(prompts)[0])
    assert torch.equal(generate(side, prompts, 8), generate(single, prompts, 8))


@pytest.mark.slow  # about 12 s: the default run keeps its 15-minute margin
def test_renumbered_graphs_decode_like_torch(llama, prompts, tmp_path):
    renumbered = compile_decoder(llama, prompts[:1], keep=0.5, layer=(1, 3), span=(4, 16), positions="renumber")
    export_decoder_onnx(renumbered, str(tmp_path))
    runner = OnnxRunner(str(tmp_path))
    continuation = prompts[:, :6].flip(1)
    torch.testing.assert_close(teacher_forced_logits(runner, prompts, continuation),
                               teacher_forced_logits(renumbered, prompts, continuation), atol=1e-4, rtol=1e-4)
    assert torch.equal(generate(runner, prompts, 10), generate(renumbered, prompts, 10))


def test_budget_one_graphs_equal_hugging_face(llama, prompts, tmp_path):
    export_decoder_onnx(compile_decoder(llama, prompts[:1], budget=1.0), str(tmp_path))
    expected = llama.generate(prompts[:2], max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(OnnxRunner(str(tmp_path)), prompts[:2], 12), expected)


def test_runner_errors(exported, tmp_path, llama, prompts):
    with pytest.raises(TokenCompileError, match="exported for 24-token prompts, got 10"):
        OnnxRunner(str(exported)).prefill(torch.ones(1, 10, dtype=torch.long))
    with pytest.raises(TokenCompileError, match="is not an exported decoder: prefill.onnx, decode.onnx"):
        OnnxRunner(str(tmp_path))


@pytest.fixture(scope="module")
def saved_llama(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    llama.save_pretrained(folder)
    return folder


def test_cli_export_verify_check_and_generate(saved_llama, fastv_program, prompts, tmp_path):
    out = tmp_path / "onnx"
    ids = ",".join(map(str, prompts[0].tolist()))
    result = CliRunner().invoke(main, ["export-decoder", str(saved_llama), "-o", str(out), "--prompt-ids", ids,
                                       "--keep", "0.5", "--span", "4,16", "--verify", "--check", "trt"])
    assert result.exit_code == 0, result.output
    assert "tokens per layer [24, 24, 16, 16]" in result.output
    assert "8 greedy tokens identical" in result.output
    assert "TensorRT check of prefill.onnx: 0 blocking" in result.output
    assert "TensorRT check of decode.onnx: 0 blocking" in result.output
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt-ids", ids, "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    expected = generate(fastv_program, prompts[:1], 6)[0, TOKENS:].tolist()
    assert result.stdout.strip().splitlines()[0] == ",".join(map(str, expected))


@pytest.mark.parametrize("args, message", [
    (["--prompt-tokens", "24"], "already holds prefill.onnx"),
    (["--prompt-tokens", "1", "--force"], "--prompt-tokens 1 is below 2"),
    ([], "give exactly one of --prompt, --prompt-ids and --prompt-tokens"),
    (["--prompt-tokens", "24", "--opset", "21", "--force"], "--opset 21 is out of range"),
])
def test_cli_export_errors(saved_llama, tmp_path, args, message):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "prefill.onnx").write_bytes(b"old")
    result = CliRunner().invoke(main, ["export-decoder", str(saved_llama), "-o", str(out), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert (out / "prefill.onnx").read_bytes() == b"old"


def test_cli_generate_from_graphs_refuses_a_budget(exported):
    result = CliRunner().invoke(main, ["generate", str(exported), "--prompt-ids", "1,2", "--budget", "0.5"])
    assert result.exit_code == 2 and "its reduction was chosen at export, --budget cannot change it" in result.output


@pytest.mark.slow
def test_smollm2_reduced_graphs_generate_like_torch(smollm2, tmp_path):
    """Real weights: FastV at prefill FLOPs 0.6 with the recommended text settings (sinks, pooling, the
    prompt-lookup prior) exported; ONNX Runtime's greedy tokens equal torch's."""
    model = smollm2
    tokenizer = models.decoders.smollm2_tokenizer()
    text = ("Licensed under the Apache License, Version 2.0 (the License); you may not use this file except in "
            "compliance with the License. You may obtain a copy of the License at the Apache web site. Unless "
            "required by applicable law or agreed to in writing, software distributed under the License is "
            "distributed on an AS IS BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or")
    ids = tokenizer(text, return_tensors="pt").input_ids
    program = compile_decoder(model, ids, budget=0.6, span=(0, ids.shape[1] - 16), sinks=4, pool=15, lookup=16)
    export_decoder_onnx(program, str(tmp_path))
    runner = OnnxRunner(str(tmp_path))
    logits, _ = runner.prefill(ids)
    expected, _ = prefill(program, ids)
    assert torch.allclose(logits, expected, atol=1e-3)
    assert torch.equal(generate(runner, ids, 16), generate(program, ids, 16))


@pytest.mark.slow  # tiny model, but several compiles and exports: the default run stays under 15 min
def test_cli_export_pyramiddrop_stages(saved_llama, llama, prompts, tmp_path):
    ids = ",".join(map(str, prompts[0].tolist()))
    out = tmp_path / "onnx"
    result = CliRunner().invoke(main, ["export-decoder", str(saved_llama), "-o", str(out), "--prompt-ids", ids,
                                       "--method", "pyramiddrop", "--layer", "1,2", "--keep", "0.5,0.25", "--span",
                                       "4,16", "--verify"])
    assert result.exit_code == 0, result.output
    assert "tokens per layer [24, 16, 12, 12]" in result.output and "8 greedy tokens identical" in result.output
    expected = compile_decoder(llama, prompts[:1], method="pyramiddrop", layer=(1, 2), keep=(0.5, 0.25), span=(4, 16))
    assert torch.equal(generate(OnnxRunner(str(out)), prompts[:1], 6), generate(expected, prompts[:1], 6))
    bad = CliRunner().invoke(main, ["export-decoder", str(saved_llama), "-o", str(tmp_path / "x"), "--prompt-ids",
                                    ids, "--layer", "1,x"])
    assert bad.exit_code == 2 and "cannot read --layer '1,x'" in bad.output


@pytest.mark.slow
def test_layers_caching_one_token_export_and_decode(llama, prompts, tmp_path):
    """keep=0 over the whole prompt: layers from K on cache only the last token (a past length of 1, which
    torch.export would fix if the decode step were traced on it)."""
    program = compile_decoder(llama, prompts[:2], keep=0.0, layer=2)
    assert program.report["tokens_per_layer"] == [24, 24, 1, 1]
    export_decoder_onnx(program, str(tmp_path))
    assert torch.equal(generate(OnnxRunner(str(tmp_path)), prompts, 8), generate(program, prompts, 8))


def test_greedy_stops_at_any_of_several_eos_ids(fastv_program, prompts):
    free = generate(fastv_program, prompts[:1], 6)[0, TOKENS:].tolist()
    stopped = generate(fastv_program, prompts[:1], 6, eos_token_id=[999, free[2]])
    assert stopped[0, TOKENS:].tolist() == free[:3]


def test_cli_refuses_outputs_over_input_files_and_ignored_options(saved_llama, exported, prompts):
    ids = ",".join(map(str, prompts[0].tolist()))
    config = (saved_llama / "config.json").read_bytes()
    result = CliRunner().invoke(main, ["generate", str(saved_llama), "--prompt-ids", ids, "--keep", "0.5",
                                       "--report", str(saved_llama / "config.json")])
    assert result.exit_code == 2 and "is a file of the input folder" in result.output
    assert (saved_llama / "config.json").read_bytes() == config
    result = CliRunner().invoke(main, ["generate", str(exported), "--prompt-ids", ids, "--method", "pyramiddrop",
                                       "--pool", "3"])
    assert result.exit_code == 2 and "--method, --pool cannot change it" in result.output
