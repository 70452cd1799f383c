"""A LLaVA-style VLM (random weights): the decoder analysis finds the language model among two stacks of
blocks, FastV prunes the image span (text kept) and matches an eager reference on the Llama layers,
batch independence, greedy decoding equal to Hugging Face at budget 1.0, ONNX prefill + decode."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_decoder import reference_forward, reference_staged

import models
from models.decoders import LLAVA_IMAGE_TOKEN
from tokencompile.decoder import (
    Span,
    analyse_decoder,
    compile_decoder,
    export_prefill,
    generate,
    prefill,
    teacher_forced_logits,
)
from tokencompile.decoder.onnx_export import OnnxRunner, export_decoder_onnx
from tokencompile.errors import TokenCompileError

IMAGE = Span(token_id=LLAVA_IMAGE_TOKEN)


@pytest.fixture(scope="module")
def vlm():
    """The recipe's prefill wrapper (its image features keep the batch symbolic); .model is the HF VLM."""
    return models.build("llava_tiny")[0]


@pytest.fixture(scope="module")
def llava(vlm):
    return vlm.model


@pytest.fixture(scope="module")
def inputs():
    return models.decoders.llava_inputs(3, seed=1)


@pytest.fixture(scope="module")
def fastv_image(vlm, inputs):
    ids, pixels = inputs
    return compile_decoder(vlm, ids[:2], keep=0.25, layer=2, span=IMAGE, extra_inputs={"pixel_values": pixels[:2]})


def language_model_view(llava, ids, pixels):
    """The Llama part of the VLM as reference_staged expects it, its embeddings being the VLM's merged
    text + image embeddings (captured at the language model's input)."""
    captured = {}

    def keep_embeddings(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = llava.model.language_model.register_forward_pre_hook(keep_embeddings, with_kwargs=True)
    try:
        llava(input_ids=ids, pixel_values=pixels)
    finally:
        handle.remove()
    language = llava.model.language_model
    model = SimpleNamespace(embed_tokens=lambda _: captured["embeds"], layers=language.layers,
                            rotary_emb=language.rotary_emb, norm=language.norm)
    return SimpleNamespace(model=model, lm_head=llava.lm_head)


def test_analysis_picks_the_language_model(vlm, inputs):
    ids, pixels = inputs
    program = export_prefill(vlm, ids[:2], {"pixel_values": pixels[:2]})
    analysis = analyse_decoder(program.module(), ids[:2], (pixels[:2],))
    assert analysis.summary() == {"tokens": 80, "layers": 4, "attention": "sdpa", "causal": True, "rope": True,
                                  "kv_cache_outputs": 8}
    assert all("language_model" in block.name for block in analysis.base.blocks)


def test_fastv_on_the_image_span_matches_the_reference(llava, inputs, fastv_image):
    ids, pixels = inputs[0][:2], inputs[1][:2]
    assert fastv_image.report["tokens_per_layer"] == [80, 80, 32, 32]
    assert fastv_image.report["span_tokens_removable"] == 64 and fastv_image.report["span_tokens_kept"] == 16
    logits, caches = prefill(fastv_image, ids, {"pixel_values": pixels})
    with torch.no_grad():
        removable = (ids == LLAVA_IMAGE_TOKEN) & (torch.arange(80) < 79)
        expected, expected_caches, kept = reference_staged(language_model_view(llava, ids, pixels), ids, [(2, 16)],
                                                           removable)
    assert (kept[0] >= 68).sum(1).eq(12).all() and (kept[0] < 4).sum(1).eq(4).all()  # every text token stays
    assert torch.allclose(logits, expected[:, -1], atol=1e-5)
    for (k, v), (k_ref, v_ref) in zip(caches, expected_caches):
        assert k.shape == k_ref.shape and torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)


def test_samples_do_not_affect_each_other(fastv_image, inputs):
    ids, pixels = inputs
    logits, _ = prefill(fastv_image, ids, {"pixel_values": pixels})
    for i in range(3):
        alone, _ = prefill(fastv_image, ids[i:i + 1], {"pixel_values": pixels[i:i + 1]})
        assert torch.allclose(alone[0], logits[i], atol=1e-5)


def test_budget_one_greedy_equals_hugging_face(vlm, llava, inputs):
    ids, pixels = inputs[0][:2], inputs[1][:2]
    program = compile_decoder(vlm, ids, budget=1.0, span=IMAGE, extra_inputs={"pixel_values": pixels})
    expected = llava.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                              max_new_tokens=8, do_sample=False)
    assert torch.equal(generate(program, ids, 8, extra={"pixel_values": pixels}), expected)


def test_onnx_graphs_match_and_generate(fastv_image, inputs, tmp_path):
    ids, pixels = inputs
    export_decoder_onnx(fastv_image, str(tmp_path))
    runner = OnnxRunner(str(tmp_path))
    extra = {"pixel_values": pixels}
    logits, caches = runner.prefill(ids, extra)
    expected, expected_caches = prefill(fastv_image, ids, extra)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert [k.shape[2] for k, _ in caches] == [80, 80, 32, 32]
    assert torch.equal(generate(runner, ids, 6, extra=extra), generate(fastv_image, ids, 6, extra=extra))


# ---------------------------------------------------------------- vtc-cls: pruned before the language model

def reference_vision_scores(llava, pixels, layers: list[int]) -> torch.Tensor:
    """[B, 64]: the vision tower's [CLS] attention row (head mean) summed over ``layers``, CLS dropped."""
    tower = llava.model.vision_tower
    hidden = tower(pixels, output_hidden_states=True).hidden_states
    total = 0
    for index in layers:
        layer = tower.encoder.layers[index]
        x = layer.layer_norm1(hidden[index])
        heads = layer.self_attn.num_heads
        q = layer.self_attn.q_proj(x).view(*x.shape[:2], heads, -1).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(*x.shape[:2], heads, -1).transpose(1, 2)
        total = total + (q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1).mean(1)[:, 0]
    return total[:, 1:]


def reference_kept_positions(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Text positions 0-3 and 68-79 and the top ``keep`` image tokens (placeholders 4-67), sorted."""
    top = scores.topk(keep, dim=1).indices + 4
    text = torch.cat([torch.arange(4), torch.arange(68, 80)]).expand(scores.shape[0], -1)
    return torch.cat([text, top], dim=1).sort(dim=1).values


@pytest.mark.parametrize("positions", ["keep", "renumber"])
def test_vtc_cls_matches_the_reference(vlm, llava, inputs, positions):
    ids, pixels = inputs[0][:2], inputs[1][:2]
    program = compile_decoder(vlm, ids, keep=0.25, span=IMAGE, method="vtc-cls", positions=positions,
                              extra_inputs={"pixel_values": pixels})
    # the tiny tower has 3 layers; features come from the second to last, so 2 layers are scored
    assert program.report["vision_layers_scored"] == 2 and program.report["tokens_per_layer"] == [32] * 4
    logits, caches = prefill(program, ids, {"pixel_values": pixels})
    with torch.no_grad():
        kept = reference_kept_positions(reference_vision_scores(llava, pixels, [0, 1]), 16)
        expected, expected_caches = reference_forward(language_model_view(llava, ids, pixels), ids, 0, kept,
                                                      renumber=positions == "renumber")
    assert torch.allclose(logits, expected[:, -1], atol=1e-5)
    for (k, v), (k_ref, v_ref) in zip(caches, expected_caches):
        assert k.shape == k_ref.shape and torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)


def test_vtc_cls_renumbered_decodes_like_a_shorter_prompt(vlm, llava, inputs):
    """With positions=renumber, pruning before the language model is the same as giving it the kept
    embeddings as a shorter prompt: teacher-forced decoding must match the HF language model on them."""
    ids, pixels = inputs[0][:2], inputs[1][:2]
    program = compile_decoder(vlm, ids, keep=0.25, span=IMAGE, method="vtc-cls", positions="renumber",
                              extra_inputs={"pixel_values": pixels})
    continuation = ids[:, :5].flip(1)
    got = teacher_forced_logits(program, ids, continuation, {"pixel_values": pixels})
    with torch.no_grad():
        kept = reference_kept_positions(reference_vision_scores(llava, pixels, [0, 1]), 16)
        view = language_model_view(llava, ids, pixels)
        embeds = view.model.embed_tokens(ids).gather(1, kept[..., None].expand(-1, -1, 64))
        embeds = torch.cat([embeds, llava.get_input_embeddings()(continuation[:, :-1])], dim=1)
        hidden = llava.model.language_model(inputs_embeds=embeds).last_hidden_state
        expected = llava.lm_head(hidden[:, 31:])
    assert torch.allclose(got, expected, atol=1e-4)


def test_vtc_cls_budget_and_onnx(vlm, inputs, tmp_path):
    ids, pixels = inputs
    program = compile_decoder(vlm, ids[:2], budget=0.7, span=IMAGE, method="vtc-cls", positions="renumber",
                              extra_inputs={"pixel_values": pixels[:2]})
    assert program.report["flops_ratio"] <= 0.7
    removed_one_less = program.report["span_tokens_kept"] + 1
    looser = compile_decoder(vlm, ids[:2], keep=removed_one_less / 64, span=IMAGE, method="vtc-cls",
                             extra_inputs={"pixel_values": pixels[:2]})
    assert looser.report["flops_ratio"] > 0.7  # the fewest tokens removed that meet the budget
    export_decoder_onnx(program, str(tmp_path))
    extra = {"pixel_values": pixels}
    assert torch.equal(generate(OnnxRunner(str(tmp_path)), ids, 6, extra=extra), generate(program, ids, 6, extra=extra))


def test_vtc_cls_errors(vlm, inputs):
    ids, pixels = inputs[0][:2], inputs[1][:2]
    with pytest.raises(TokenCompileError, match="needs the image placeholder id"):
        compile_decoder(vlm, ids, keep=0.5, method="vtc-cls", extra_inputs={"pixel_values": pixels})
    with pytest.raises(TokenCompileError, match=r"layers=3 is not a number of vision layers \(give 1 <= layers <= 2"):
        compile_decoder(vlm, ids, keep=0.5, span=IMAGE, layer=3, method="vtc-cls", extra_inputs={"pixel_values": pixels})
    with pytest.raises(TokenCompileError, match="cannot be met by removing image tokens"):
        compile_decoder(vlm, ids, budget=0.1, span=IMAGE, method="vtc-cls", extra_inputs={"pixel_values": pixels})


def test_prompts_must_hold_the_compiled_number_of_image_tokens(fastv_image, inputs):
    ids, pixels = inputs[0][:2].clone(), inputs[1][:2]
    ids[:, 4:8] = 7  # 60 image tokens instead of 64: the program would remove text
    with pytest.raises(TokenCompileError, match="the prompts hold 60 tokens of id 255; the program was compiled "
                                                "for 64"):
        prefill(fastv_image, ids, {"pixel_values": pixels})


def test_vtc_cls_budget_one_removes_nothing_and_bad_options(vlm, inputs):
    ids, pixels = inputs[0][:2], inputs[1][:2]
    extra = {"pixel_values": pixels}
    program = compile_decoder(vlm, ids, budget=1.0, span=IMAGE, method="vtc-cls", extra_inputs=extra)
    assert program.report["span_tokens_kept"] == 64 and program.report["layer"] is None
    with pytest.raises(TokenCompileError, match="positions='renumbr' is not a position policy"):
        compile_decoder(vlm, ids, keep=0.5, span=IMAGE, method="vtc-cls", positions="renumbr", extra_inputs=extra)
    with pytest.raises(TokenCompileError, match=r"layer=\(1, 2\) is not a number of vision layers"):
        compile_decoder(vlm, ids, keep=0.5, span=IMAGE, method="vtc-cls", layer=(1, 2), extra_inputs=extra)
