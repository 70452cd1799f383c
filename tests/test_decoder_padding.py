"""Batches of prompts of different lengths, padded on the left: a padded prompt gives what the same prompt
gives alone (padding removed first, never attended to, positions and sinks counted per prompt, every
layer's cache with its key mask), budget 1.0 equals Hugging Face's generate with the attention mask, and
the two ONNX graphs carry the masks."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch

import models
from tokencompile.decoder import (
    CausalLMPrefill,
    compile_decoder,
    generate,
    prefill,
    teacher_forced_logits,
)
from tokencompile.decoder.onnx_export import OnnxRunner, export_decoder_onnx
from tokencompile.errors import TokenCompileError

pytestmark = pytest.mark.usefixtures("one_trace_per_prompt")

TOKENS, PAD_ID = 24, 0
PADS = (0, 4, 10, 16) * 3   # padding per prompt
SPAN, SINKS, KEPT = (0, 20), 2, 3   # 18 removable columns (2..19) of which 3 stay


@pytest.fixture(scope="module")
def batch():
    """Twelve prompts of 24, 20, 14 and 8 tokens, left-padded to 24, and a 5-token continuation."""
    ids = models.decoders.prompt_ids(len(PADS), TOKENS, seed=4)[0].clone()
    mask = torch.ones_like(ids)
    for row, pads in enumerate(PADS):
        ids[row, :pads], mask[row, :pads] = PAD_ID, 0
    return ids, mask, models.decoders.prompt_ids(len(PADS), 5, seed=5)[0]


@pytest.fixture(scope="module")
def loud_padding(llama):
    """The tiny Llama with the padding id's embedding scaled up: its keys would swamp any score that
    attended to padding, and nothing may change where padding is masked."""
    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.model.embed_tokens.weight[PAD_ID] *= 30
    return model


@pytest.fixture(scope="module")
def padded(loud_padding, batch):
    return compile_decoder(loud_padding, batch[0], keep=KEPT / 18, layer=2, span=SPAN, sinks=SINKS, padding=True)


def alone(llama, batch, pads: int, lookup: int = 0, positions: str = "keep", layers=(2,), kept=(KEPT,)):
    """The prompts with ``pads`` padding, without it, compiled to keep the same tokens: the span is the
    real part of the padded span, and at each stage what the padded program keeps of it (padding goes
    first, so all of it while padding fills the removed slots)."""
    rows = [row for row, count in enumerate(PADS) if count == pads]
    ids = batch[0][rows, pads:]
    span = (0, SPAN[1] - pads)
    removable = span[1] - SINKS
    ratios = tuple(min(count, removable) / removable for count in kept)
    options = {"lookup": lookup, "ahead": 3} if lookup else {}
    stages = {"keep": 1.0} if min(ratios) == 1 else {"keep": ratios, "layer": layers} if len(layers) > 1 else \
        {"keep": ratios[0], "layer": layers[0]}
    return rows, ids, compile_decoder(llama, ids, span=span, sinks=SINKS, positions=positions, **stages, **options)


@pytest.mark.parametrize("lookup, positions, layers, kept", [
    (0, "keep", (2,), (KEPT,)),
    (0, "renumber", (1, 2), (8, KEPT)),   # two stages: 8 of 18 slots, then 3
    pytest.param(4, "keep", (2,), (KEPT,), marks=pytest.mark.slow),
])
def test_a_padded_prompt_gives_what_it_gives_alone(loud_padding, batch, padded, lookup, positions, layers, kept):
    """With lookup, every prompt ends in the padding id: the looked-up token must not match the padding
    (a match there would favour the first tokens after it). With positions=renumber each prompt's kept
    tokens take its own first positions, and each layer's keys are rotated to decode from the prompt's
    own length (what the prompt alone caches)."""
    ids, mask, continuation = batch
    if lookup:
        ids = ids.clone()
        ids[:, -1] = PAD_ID
        batch = (ids, mask, continuation)
    if lookup or positions != "keep":
        stages = {"keep": tuple(k / 18 for k in kept), "layer": layers} if len(layers) > 1 else \
            {"keep": kept[0] / 18, "layer": layers[0]}
        padded = compile_decoder(loud_padding, ids, span=SPAN, sinks=SINKS, padding=True, positions=positions,
                                 **stages, **({"lookup": lookup, "ahead": 3} if lookup else {}))
    assert padded.extra_inputs == ("attention_mask",)
    logits, caches = prefill(padded, ids, {"attention_mask": mask})
    lengths = [24] * layers[0] + [kept[0] + 6] * (layers[-1] - layers[0]) + [KEPT + 6] * (4 - layers[-1])
    assert [layer[0].shape[2] for layer in caches] == lengths   # 4 sinks or text tokens outside the span, 2 sinks
    forced = teacher_forced_logits(padded, ids, continuation, attention_mask=mask)
    for pads in sorted(set(PADS)):
        rows, own_ids, own = alone(loud_padding, batch, pads, lookup, positions, layers, kept)
        own_logits, own_caches = prefill(own, own_ids)
        torch.testing.assert_close(logits[rows], own_logits, atol=1e-5, rtol=1e-4)
        for (key, value, key_mask), (own_key, own_value) in zip(caches, own_caches):
            for at, row in enumerate(rows):
                real = key_mask[row].bool()
                assert int(real.sum()) == own_key.shape[2]                # padding kept only where masked
                torch.testing.assert_close(key[row][:, real], own_key[at], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(value[row][:, real], own_value[at], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(forced[rows], teacher_forced_logits(own, own_ids, continuation[rows]),
                                   atol=1e-5, rtol=1e-4)
    # 16 padding tokens fill the 15 removed slots: one stays, masked; 4 or 10 are all removed
    assert caches[-1][2][3].tolist() == [0] + [1] * 8
    assert caches[-1][2][:3].tolist() == [[1] * 9] * 3


def test_budget_one_equals_hugging_face_with_the_mask(llama, batch):
    ids, mask, _ = batch
    program = compile_decoder(llama, ids, budget=1.0, padding=True)
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD_ID)
    assert torch.equal(generate(program, ids, 10, attention_mask=mask), expected)
    assert torch.equal(generate(llama, ids, 10, attention_mask=mask), expected)


@pytest.mark.slow
def test_onnx_graphs_carry_the_masks(padded, batch, tmp_path):
    ids, mask, continuation = batch
    export_decoder_onnx(padded, str(tmp_path))
    prefill_graph, decode_graph = (onnx.load(tmp_path / name).graph for name in ("prefill.onnx", "decode.onnx"))
    assert [v.name for v in prefill_graph.input] == ["input_ids", "attention_mask"]
    assert [v.name for v in prefill_graph.output][-4:] == [f"present.{i}.mask" for i in range(4)]
    assert [v.name for v in decode_graph.input][-4:] == [f"past_key_values.{i}.mask" for i in range(4)]
    assert [d.dim_param for d in decode_graph.input[-1].type.tensor_type.shape.dim] == ["batch",
                                                                                       "past_sequence_length.3"]
    assert json.loads((tmp_path / "decoder.json").read_text())["padding"] is True
    runner = OnnxRunner(str(tmp_path))
    torch.testing.assert_close(teacher_forced_logits(runner, ids, continuation, attention_mask=mask),
                               teacher_forced_logits(padded, ids, continuation, attention_mask=mask),
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(generate(runner, ids, 8, attention_mask=mask), generate(padded, ids, 8, attention_mask=mask))


@pytest.mark.slow
def test_onnx_renumbered_padded_stages(llama, batch, tmp_path):
    """positions=renumber with padding and two stages: the per-prompt position gathers and key rotations
    export, and ONNX Runtime gives the torch program's logits and greedy tokens."""
    ids, mask, continuation = batch
    program = compile_decoder(llama, ids, keep=(8 / 18, KEPT / 18), layer=(1, 2), span=SPAN, sinks=SINKS,
                              padding=True, positions="renumber")
    export_decoder_onnx(program, str(tmp_path))
    runner = OnnxRunner(str(tmp_path))
    torch.testing.assert_close(teacher_forced_logits(runner, ids, continuation, attention_mask=mask),
                               teacher_forced_logits(program, ids, continuation, attention_mask=mask),
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(generate(runner, ids, 8, attention_mask=mask), generate(program, ids, 8, attention_mask=mask))


@pytest.mark.slow
def test_span_scores_drop_padding_first(llama, batch):
    ids, mask, _ = batch
    program = compile_decoder(llama, ids, keep=KEPT / 18, layer=2, span=SPAN, sinks=SINKS, padding=True,
                              method="dart")
    _, caches = prefill(program, ids, {"attention_mask": mask})
    assert caches[2][2][:3].tolist() == [[1] * 9] * 3 and caches[2][2][3].sum() == 8
    single, _ = prefill(program, ids[1:2], {"attention_mask": mask[1:2]})
    torch.testing.assert_close(single[0], prefill(program, ids, {"attention_mask": mask})[0][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change, message", [
    (lambda ids, mask: (ids, mask.flip(1)), "attention_mask pads on the right"),
    (lambda ids, mask: (ids, mask * 2), "attention_mask holds values other than 0 and 1"),
    (lambda ids, mask: (ids, mask[:, 1:]), "attention_mask must be a tensor shaped like the prompt ids"),
])
def test_bad_masks_are_one_line_errors(padded, batch, change, message):
    ids, mask = change(*batch[:2])
    with pytest.raises(TokenCompileError, match=message):
        generate(padded, ids, 2, attention_mask=mask)


def test_padding_errors(llama, batch):
    ids, mask, _ = batch
    unpadded = compile_decoder(llama, ids, keep=0.5, layer=2)
    with pytest.raises(TokenCompileError, match="compiled for prompts without padding.*padding=True"):
        generate(unpadded, ids, 2, attention_mask=mask)
    with pytest.raises(TokenCompileError, match="^a 16-token prompt is as long as an attention head"):
        compile_decoder(llama, ids[:, :16], keep=0.5, layer=2)

    class SharedPositions(CausalLMPrefill):  # a wrapper that drops the per-prompt position_ids
        def model_inputs(self, named):
            return {name: value for name, value in named.items() if name != "position_ids"}

    with pytest.raises(TokenCompileError, match="^padded prompts renumber their positions in each prompt's row of "
                                                "the rotary tables, but the tables are shared by the batch"):
        compile_decoder(SharedPositions(llama, ("attention_mask",)), ids, keep=0.5, layer=2, padding=True,
                        positions="renumber")


@pytest.mark.parametrize("probes", [1, 3])
def test_probe_rows_never_attend_to_padding(probes):
    """FastV's score nodes, in a small graph: the last rows' softmax over the prompt's own keys only."""
    from tokencompile.decoder import FastV
    from tokencompile.graph_utils import GraphBuilder
    from tokencompile.methods.base import SiteInputs

    class Inputs(torch.nn.Module):
        def forward(self, x, query, keys, valid):
            return x + query.sum() + keys.sum() + valid.sum()

    generator = torch.Generator().manual_seed(0)
    query, keys = torch.randn(2, 3, 10, 4, generator=generator) * 3, torch.randn(2, 3, 10, 4, generator=generator)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :6] = False
    x = torch.zeros(2, 10, 8)
    gm = torch.export.export(Inputs(), (x, query, keys, valid)).module()
    nodes = [node for node in gm.graph.nodes if node.op == "placeholder"]
    site = SiteInputs(block=0, x=nodes[0], query=nodes[1], keys=nodes[2], valid=nodes[3], sizes=None, num_prefix=0,
                      protect_last_valid=False, n=10, depth=2)
    method = FastV(probes=probes, scale=0.5)
    score = method.last_token_attention(GraphBuilder(gm, nodes[3]), site)
    next(node for node in gm.graph.nodes if node.op == "output").args = ((score,),)
    gm.recompile()
    logits = (query[:, :, -probes:] @ keys.transpose(-2, -1)) * 0.5
    future = torch.arange(10)[None, :] > torch.arange(10 - probes, 10)[:, None]
    logits = logits.masked_fill(future | ~valid[:, None, None, :], float("-inf"))
    expected = logits.softmax(-1).mean((1, 2))
    torch.testing.assert_close(gm(x, query, keys, valid), expected)
    assert float(expected[1, :6].abs().max()) == 0.0


@pytest.mark.slow
def test_cli_generates_a_padded_batch(llama, tmp_path):
    """Several --prompt options: one batch padded on the left, from a model folder and from an export made
    with --padding; each line equals the Python API's result for that row."""
    from click.testing import CliRunner

    from tokencompile.cli import main
    from tokencompile.decoder.cli import _padded_prompts

    tokenizer = models.decoders.byte_tokenizer()
    model_dir, tokenizer_dir = tmp_path / "model", tmp_path / "tokenizer"
    llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(tokenizer_dir)
    texts = ["a prompt long enough to be reduced", "a short one"]
    flags = [item for text in texts for item in ("--prompt", text)]
    options = ["--keep", "0.5", "--layer", "2", "--sinks", "1", "--max-new-tokens", "5", "--tokenizer",
               str(tokenizer_dir)]
    ids, mask = _padded_prompts(tokenizer, tuple(texts), "test")
    assert mask.sum(1).tolist() == [34, 11] and ids.shape == (2, 34)
    program = compile_decoder(llama, ids, keep=0.5, layer=2, sinks=1, padding=True)
    expected = [tokenizer.decode(row, skip_special_tokens=True)
                for row in generate(program, ids, 5, attention_mask=mask)[:, 34:]]
    result = CliRunner().invoke(main, ["generate", str(model_dir), *flags, *options])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == expected

    export = tmp_path / "onnx"
    result = CliRunner().invoke(main, ["export-decoder", str(model_dir), "-o", str(export), "--prompt-tokens", "40",
                                       "--keep", "0.5", "--layer", "2", "--sinks", "1", "--padding", "--verify",
                                       "--external-data"])
    assert result.exit_code == 0 and "8 greedy tokens identical" in result.output, result.output
    assert (export / "prefill.onnx.data").is_file() and (export / "decode.onnx.data").is_file()
    result = CliRunner().invoke(main, ["generate", str(export), *flags, "--max-new-tokens", "5", "--tokenizer",
                                       str(tokenizer_dir)])
    assert result.exit_code == 0, result.output
    ids, mask = _padded_prompts(tokenizer, tuple(texts), "test", 40)
    runner = OnnxRunner(str(export))
    assert result.stdout.splitlines() == [tokenizer.decode(row, skip_special_tokens=True) for row in
                                          generate(runner, ids, 5, attention_mask=mask)[:, 40:]]


@pytest.mark.slow
def test_smollm2_padded_batch(smollm2):
    """Real weights: budget 1.0 on a padded batch generates Hugging Face's 32 tokens with the attention mask,
    and a reduced padded prompt gives its logits alone (relative to the largest logit)."""
    model = smollm2.model
    tokenizer = models.decoders.smollm2_tokenizer()
    tokenizer.padding_side = "left"
    texts = ["The Apache License grants every contributor's users a perpetual, worldwide, non-exclusive, "
             "no-charge, royalty-free, irrevocable copyright license to reproduce, prepare derivative works of, "
             "and distribute the Work", "Permission is hereby granted, free of charge, to any person obtaining"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    tokens, pads = ids.shape[1], int((mask[1] == 0).sum())
    assert pads > 10
    full = compile_decoder(model, ids, budget=1.0, padding=True)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(generate(full, ids, 32, attention_mask=mask), expected)

    span, kept = (0, tokens - 4), 6   # sinks 2: the span's first two tokens of each prompt stay
    reduced = compile_decoder(model, ids, keep=kept / (span[1] - 2), layer=3, span=span, sinks=2, padding=True)
    logits, _ = prefill(reduced, ids, {"attention_mask": mask})
    for row, count in enumerate((0, pads)):
        own_ids = ids[row:row + 1, count:]
        own = compile_decoder(model, own_ids, keep=kept / (span[1] - count - 2), layer=3, span=(0, span[1] - count),
                              sinks=2)
        own_logits, _ = prefill(own, own_ids)
        assert float((logits[row] - own_logits[0]).abs().max() / own_logits.abs().max()) < 1e-4


def test_a_padded_program_takes_prompts_without_a_mask(loud_padding, padded, batch):
    """No attention_mask: every token counts (all ones), as in the program compiled without padding."""
    rows = batch[0][[row for row, pads in enumerate(PADS) if pads == 0]]
    plain = compile_decoder(loud_padding, rows, keep=KEPT / 18, layer=2, span=SPAN, sinks=SINKS)
    assert torch.equal(generate(padded, rows, 6), generate(plain, rows, 6))
    assert torch.equal(prefill(padded, rows)[0], prefill(plain, rows)[0])


def test_decode_masks_go_to_the_language_model_layers():
    """A VLM's vision tower may be as deep as its language model: the per-layer decode masks must hook
    the language model's layers."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from tokencompile.decoder.generate import decoder_layers

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)
    vlm = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=63))
    assert decoder_layers(vlm, 2) is vlm.model.language_model.layers
