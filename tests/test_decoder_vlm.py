"""A LLaVA-style VLM (random weights): the decoder analysis finds the language model among two stacks of
blocks, FastV prunes the image span (text kept) and matches an eager reference on the Llama layers,
batch independence, greedy decoding equal to Hugging Face at budget 1.0, ONNX prefill + decode; vtc-cls
and visionzip (before the language model) against eager references written from the HF modules."""

from __future__ import annotations

import copy
import os
import re
from types import SimpleNamespace

import pytest
import torch
from test_decoder import reference_forward, reference_staged

import models
from models.decoders import LLAVA_IMAGE_TOKEN, LLAVA_TEXT_BEFORE
from tokencompile.decoder import (
    Span,
    analyse_decoder,
    compile_decoder,
    export_prefill,
    generate,
    prefill,
    teacher_forced_logits,
)
from tokencompile.decoder.generate import pair_caches
from tokencompile.decoder.onnx_export import OnnxRunner, export_decoder_onnx
from tokencompile.decoder.prefill import cache_tensors, returned_cache
from tokencompile.decoder.vlm import language_model_inputs, language_model_of
from tokencompile.errors import TokenCompileError

pytestmark = pytest.mark.usefixtures("one_trace_per_prompt")

IMAGE = Span(token_id=LLAVA_IMAGE_TOKEN)


@pytest.fixture(scope="module")
def vlm():
    """The recipe: the package's LlavaPrefill (its image features keep the batch symbolic); .model is the HF VLM."""
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
                                  "kv_cache_outputs": 8, "padding_mask_input": False}
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


@pytest.mark.parametrize("compiled", ["fastv_image", "visionzip_renumbered"])
def test_samples_do_not_affect_each_other(compiled, inputs, request):
    program = request.getfixturevalue(compiled)
    ids, pixels = inputs
    logits, caches = prefill(program, ids, {"pixel_values": pixels})
    for i in range(3):
        alone, alone_caches = prefill(program, ids[i:i + 1], {"pixel_values": pixels[i:i + 1]})
        assert torch.allclose(alone[0], logits[i], atol=1e-5)
        assert torch.allclose(alone_caches[-1][0][0], caches[-1][0][i], atol=1e-5)


@pytest.mark.parametrize("given", ["the Hugging Face model", "a LlavaPrefill"])
def test_budget_one_greedy_equals_hugging_face(vlm, llava, inputs, given):
    """A plain LlavaForConditionalGeneration compiles as it is (wrapped in a LlavaPrefill, whose export
    keeps the batch symbolic)."""
    ids, pixels = inputs[0][:2], inputs[1][:2]
    source = llava if given == "the Hugging Face model" else vlm
    program = compile_decoder(source, ids, budget=1.0, span=IMAGE, extra_inputs={"pixel_values": pixels})
    expected = llava.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                              max_new_tokens=8, do_sample=False)
    assert torch.equal(generate(program, ids, 8, extra={"pixel_values": pixels}), expected)


@pytest.mark.slow  # two compiles per method: about 30 s
@pytest.mark.parametrize("method", ["fastv", "vtc-cls"])
def test_eager_attention_gives_what_sdpa_gives(vlm, llava, inputs, method):
    """The same LLaVA with eager attention in both towers (FastV reads the language model's softmax row,
    vtc-cls the vision tower's CLS row from q / k) keeps the same tokens and generates the same text."""
    from models.decoders import LlavaPrefill

    ids, pixels = inputs[0][:2], inputs[1][:2]
    eager_llava = copy.deepcopy(llava)
    for config in (eager_llava.config, eager_llava.config.text_config, eager_llava.config.vision_config):
        config._attn_implementation = "eager"
    continuation = ids[:, -5:]
    results = []
    for source in (vlm, LlavaPrefill(eager_llava).eval()):
        extra = {"pixel_values": pixels}
        program = compile_decoder(source, ids, keep=0.25, span=IMAGE, method=method, extra_inputs=extra)
        results.append((program.report["analysis"]["attention"], teacher_forced_logits(program, ids, continuation,
                                                                                      extra=extra),
                        generate(program, ids, 6, extra=extra)))
    (sdpa_kind, sdpa_logits, sdpa_ids), (eager_kind, eager_logits, eager_ids) = results
    assert (sdpa_kind, eager_kind) == ("sdpa", "eager")
    torch.testing.assert_close(eager_logits, sdpa_logits, atol=1e-5, rtol=1e-4)
    assert torch.equal(eager_ids, sdpa_ids)


def test_a_prefill_that_fixes_the_batch_is_a_clear_error(llava, inputs):
    """Hugging Face's own LLaVA forward splits the image features per image in a Python loop: exported
    as it is, the batch becomes a constant; the error names the model and the way out."""
    from tokencompile.decoder import CausalLMPrefill
    from tokencompile.errors import UnsupportedModelError

    ids, pixels = inputs[0][:2], inputs[1][:2]
    with pytest.raises(UnsupportedModelError) as error:
        export_prefill(CausalLMPrefill(llava, ("pixel_values",)), ids, {"pixel_values": pixels})
    assert str(error.value) == (
        "torch.export cannot trace the prefill of LlavaForConditionalGeneration with inputs input_ids, pixel_values "
        "and a symbolic batch (You marked batch as dynamic but your code specialized it to be a constant (2)) (wrap "
        "the model in a CausalLMPrefill subclass whose model_inputs computes what does not export (see "
        "tokencompile.decoder.vlm.LlavaPrefill); a vision-language model: give extra_inputs="
        "tokencompile.decoder.vlm.language_model_inputs(model, input_ids, **processor_outputs))")


def check_onnx_parity(program, inputs, folder, cache_lengths: list[int]) -> None:
    """The exported graphs' prefill equals the program's, with these cache lengths, and both generate
    the same tokens."""
    ids, pixels = inputs
    export_decoder_onnx(program, str(folder))
    runner = OnnxRunner(str(folder))
    extra = {"pixel_values": pixels}
    logits, caches = runner.prefill(ids, extra)
    expected, _ = prefill(program, ids, extra)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert [k.shape[2] for k, _ in caches] == cache_lengths
    assert torch.equal(generate(runner, ids, 6, extra=extra), generate(program, ids, 6, extra=extra))


def test_onnx_graphs_match_and_generate(fastv_image, inputs, tmp_path):
    check_onnx_parity(fastv_image, inputs, tmp_path, [80, 80, 32, 32])


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


@pytest.mark.slow  # tiny model, but several compiles and exports: the default run stays under 15 min
@pytest.mark.parametrize("method, budget", [("vtc-cls", 0.7), ("visionzip", 0.6)])
def test_budget_is_met_by_the_fewest_removed_and_onnx(vlm, inputs, tmp_path, method, budget):
    ids, pixels = inputs
    program = compile_decoder(vlm, ids[:2], budget=budget, span=IMAGE, method=method, positions="renumber",
                              extra_inputs={"pixel_values": pixels[:2]})
    kept = program.report["span_tokens_kept"]
    assert program.report["flops_ratio"] <= budget and 0 < kept < 64
    assert program.report["tokens_per_layer"] == [16 + kept] * 4
    looser = compile_decoder(vlm, ids[:2], keep=(kept + 1) / 64, span=IMAGE, method=method,
                             extra_inputs={"pixel_values": pixels[:2]})
    assert looser.report["flops_ratio"] > budget  # the fewest tokens removed that meet the budget
    check_onnx_parity(program, inputs, tmp_path, [16 + kept] * 4)


def test_vtc_cls_errors(vlm, inputs):
    ids, pixels = inputs[0][:2], inputs[1][:2]
    with pytest.raises(TokenCompileError, match="needs the image placeholder id"):
        compile_decoder(vlm, ids, keep=0.5, method="vtc-cls", extra_inputs={"pixel_values": pixels})
    with pytest.raises(TokenCompileError, match=r"layers=3 is not a number of vision layers \(give 1 <= layers <= 2"):
        compile_decoder(vlm, ids, keep=0.5, span=IMAGE, layer=3, method="vtc-cls",
                        extra_inputs={"pixel_values": pixels})
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


# ---------------------------------------------------------------- visionzip: features zipped before the projector

def reference_visionzip_features(llava, pixels, kept: int, contextual: float = 0.15, layers=(-2,)) -> torch.Tensor:
    """[B, kept, C]: the projected image features of VisionZip written from the HF modules: at the feature
    layer (the second to last; CLS dropped after), dominant = top [CLS] attention (original order), then
    contextual = strided targets among the rest, each the mean of its group by head-mean key cosine.
    ``layers``: the hidden states whose features are concatenated (the plan is the second to last's)."""
    tower = llava.model.vision_tower
    hidden = tower(pixels, output_hidden_states=True).hidden_states
    layer = tower.encoder.layers[1]  # its output, hidden[2] = hidden_states[-2], holds the features
    x = layer.layer_norm1(hidden[1])
    heads = layer.self_attn.num_heads
    q = layer.self_attn.q_proj(x).view(*x.shape[:2], heads, -1).transpose(1, 2)
    k = layer.self_attn.k_proj(x).view(*x.shape[:2], heads, -1).transpose(1, 2)
    attention = (q[:, :, :1] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1).mean(1)[:, 0, 1:]
    keys = torch.nn.functional.normalize(k.mean(1)[:, 1:], dim=-1)
    features = torch.cat([hidden[index][:, 1:] for index in layers], -1)
    n_contextual = max(1, min(round(contextual * kept), kept))
    n_dominant = kept - n_contextual
    out = []
    for b in range(features.shape[0]):
        dominant = attention[b].topk(n_dominant).indices.sort().values
        rest = torch.tensor([i for i in range(64) if i not in set(dominant.tolist())])
        targets = rest[::len(rest) // n_contextual][:n_contextual]
        others = torch.tensor([i for i in rest.tolist() if i not in set(targets.tolist())])
        group = (keys[b, others] @ keys[b, targets].T).argmax(1)
        merged = torch.stack([torch.cat([features[b, t:t + 1], features[b, others[group == j]]]).mean(0)
                              for j, t in enumerate(targets.tolist())])
        out.append(torch.cat([features[b, dominant], merged]))
    return llava.model.multi_modal_projector(torch.stack(out))


def reference_shorter_prompt(llava, ids, image_features, positions: str, continuation=None):
    """Logits of the last prompt token (or of every continuation step) and caches of the HF language model
    given text + ``image_features`` in place of the 64 placeholders (4-67): the prompt of kept image tokens,
    at positions 0.. (renumber) or at the first placeholders' positions (keep)."""
    kept = image_features.shape[1]
    embed = llava.get_input_embeddings()
    embeds = torch.cat([embed(ids[:, :4]), image_features, embed(ids[:, 68:])], dim=1)
    position_ids = torch.arange(embeds.shape[1])
    if positions == "keep":
        position_ids = torch.cat([torch.arange(4 + kept), torch.arange(68, 80)])
    prompt_tokens = embeds.shape[1]
    if continuation is not None:
        embeds = torch.cat([embeds, embed(continuation[:, :-1])], dim=1)
        position_ids = torch.cat([position_ids, position_ids[-1] + 1 + torch.arange(continuation.shape[1] - 1)])
    out = llava.model.language_model(inputs_embeds=embeds, position_ids=position_ids[None].expand(ids.shape[0], -1),
                                     use_cache=True)
    logits = llava.lm_head(out.last_hidden_state[:, prompt_tokens - 1:])
    return logits, pair_caches(cache_tensors(returned_cache(out)))


@pytest.fixture(scope="module")
def visionzip_renumbered(vlm, inputs):
    ids, pixels = inputs[0][:2], inputs[1][:2]
    return compile_decoder(vlm, ids, keep=0.25, span=IMAGE, method="visionzip", positions="renumber",
                           extra_inputs={"pixel_values": pixels})


def check_visionzip(llava, program, ids, pixels, positions, layers=(-2,)):
    assert program.report["tokens_per_layer"] == [32] * 4 and program.report["span_tokens_kept"] == 16
    assert program.report["image_tokens_dominant"] == 14 and program.report["image_tokens_contextual"] == 2
    assert program.report["vision_layer"] == 1
    logits, caches = prefill(program, ids, {"pixel_values": pixels})
    with torch.no_grad():
        expected, expected_caches = reference_shorter_prompt(
            llava, ids, reference_visionzip_features(llava, pixels, 16, layers=layers), positions)
    assert torch.allclose(logits, expected[:, -1], atol=1e-5)
    assert len(caches) == 4
    for (k, v), (k_ref, v_ref) in zip(caches, expected_caches):
        assert k.shape[2] == 32 and k.shape == k_ref.shape
        assert torch.allclose(k, k_ref, atol=1e-5) and torch.allclose(v, v_ref, atol=1e-5)


def test_visionzip_renumbered_matches_the_reference_and_decodes(llava, inputs, visionzip_renumbered):
    """Renumbered, the language model sees exactly a prompt of 14 dominant + 2 contextual image tokens:
    prefill and teacher-forced decoding match the HF language model on it."""
    ids, pixels = inputs[0][:2], inputs[1][:2]
    check_visionzip(llava, visionzip_renumbered, ids, pixels, "renumber")
    continuation = ids[:, :5].flip(1)
    got = teacher_forced_logits(visionzip_renumbered, ids, continuation, {"pixel_values": pixels})
    with torch.no_grad():
        expected, _ = reference_shorter_prompt(llava, ids, reference_visionzip_features(llava, pixels, 16),
                                               "renumber", continuation)
    assert torch.allclose(got, expected, atol=1e-4)


def test_visionzip_kept_positions_match_the_reference(vlm, llava, inputs):
    ids, pixels = inputs[0][:2], inputs[1][:2]
    program = compile_decoder(vlm, ids, keep=0.25, span=IMAGE, method="visionzip", positions="keep",
                              extra_inputs={"pixel_values": pixels})
    check_visionzip(llava, program, ids, pixels, "keep")


def test_visionzip_options_and_errors(vlm, llava, inputs):
    ids, pixels = inputs[0][:2], inputs[1][:2]
    extra = {"pixel_values": pixels}

    def compile_zip(**options):
        return compile_decoder(vlm, ids, keep=0.25, span=IMAGE, positions="renumber", method="visionzip",
                               extra_inputs=extra, options=options)

    program = compile_zip(contextual="0.5")  # a CLI string: 8 dominant + 8 contextual
    assert program.report["image_tokens_dominant"] == 8 and program.report["image_tokens_contextual"] == 8
    logits, _ = prefill(program, ids, extra)
    with torch.no_grad():
        expected, _ = reference_shorter_prompt(llava, ids, reference_visionzip_features(llava, pixels, 16, 0.5),
                                               "renumber")
    assert torch.allclose(logits, expected[:, -1], atol=1e-4)
    with pytest.raises(TokenCompileError, match=r"option contextual=1.5 of method 'visionzip' is out of range \(give "
                                                r"0 <= contextual <= 1"):
        compile_zip(contextual=1.5)
    with pytest.raises(TokenCompileError,
                       match="method 'visionzip' has no option 'ratio' .its options are: contextual"):
        compile_zip(ratio=0.5)
    with pytest.raises(TokenCompileError, match="needs the image placeholder id"):
        compile_decoder(vlm, ids, keep=0.5, method="visionzip", extra_inputs=extra)
    with pytest.raises(TokenCompileError, match="pool=5, lookup=8 shape the score of a language-model layer"):
        compile_decoder(vlm, ids, keep=0.5, span=IMAGE, method="visionzip", pool=5, lookup=8, extra_inputs=extra)
    with pytest.raises(TokenCompileError, match="method 'vtc-cls' has no option 'layers'"):
        compile_decoder(vlm, ids, keep=0.5, span=IMAGE, method="vtc-cls", options={"layers": "2"},
                        extra_inputs=extra)
    with pytest.raises(TokenCompileError, match="layer=2 has no meaning"):
        compile_decoder(vlm, ids, keep=0.5, span=IMAGE, layer=2, method="visionzip", extra_inputs=extra)
    with pytest.raises(TokenCompileError, match="cannot be met by removing image tokens"):
        compile_decoder(vlm, ids, budget=0.1, span=IMAGE, method="visionzip", extra_inputs=extra)


def test_merged_embeddings_give_what_pixel_values_give(llava, inputs, fastv_image):
    """The same FastV on LLaVA through the model's merged embeddings (its vision code run eagerly, the
    program taking inputs_embeds) equals the program that runs the vision tower itself."""
    ids, pixels = inputs[0][:2], inputs[1][:2]
    merged = language_model_inputs(llava, ids, pixel_values=pixels)
    assert list(merged) == ["inputs_embeds"]
    program = compile_decoder(llava, ids, keep=0.25, layer=2, span=IMAGE, extra_inputs=merged)
    assert program.report["tokens_per_layer"] == [80, 80, 32, 32]
    logits, caches = prefill(program, ids, merged)
    expected, expected_caches = prefill(fastv_image, ids, {"pixel_values": pixels})
    assert torch.allclose(logits, expected, atol=1e-5)
    for layer, expected_layer in zip(caches, expected_caches):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(layer, expected_layer))
    assert torch.equal(generate(program, ids, 6, extra=merged),
                       generate(fastv_image, ids, 6, extra={"pixel_values": pixels}))
    with pytest.raises(TokenCompileError, match="^vtc-cls reads the vision tower, which merged embeddings"):
        compile_decoder(llava, ids, keep=0.25, method="vtc-cls", span=IMAGE, extra_inputs=merged)


QWEN_IMAGE = 299


def set_attention(config, attention: str) -> None:
    """The attention implementation of a VLM config and of its text and vision configs."""
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attention


def tiny_qwen2_vl(attention: str = "sdpa", image: int = QWEN_IMAGE, start: int = 298, end: int = 297):
    """Qwen2-VL, random weights: multimodal RoPE (each image token has a time, row and column position);
    ``image``, ``start``, ``end``: the ids of the image placeholder and of the tokens around an image."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    vision = dict(depth=1, embed_dim=16, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image, vision_start_token_id=start,
                           vision_end_token_id=end)
    set_attention(config, attention)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


def rows_from_layer(model, layer: int, rows: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Logits of the model's own forward where the language model's layers >= ``layer`` see only ``rows``
    [B, n] (pre-hooks gather the hidden states, the rotary tables and the positions)."""
    def gather(name, value):
        if name == "hidden_states" or name == "position_embeddings":
            if isinstance(value, tuple):
                return tuple(gather(name, v) for v in value)
            value = value.expand(*value.shape[:-3], len(rows), *value.shape[-2:])  # Llama's rotary tables: batch 1
            return value.gather(-2, rows[..., None].expand(*value.shape[:-2], -1, value.shape[-1]))
        if name == "position_ids" and value is not None:
            value = value.expand(*value.shape[:-2], len(rows), value.shape[-1])
            return value.gather(-1, rows.expand(*value.shape[:-2], -1, -1))
        assert name != "attention_mask" or value is None  # causal SDPA without a mask
        return value

    def hook(module, args, kwargs, first):
        if first:
            args = (gather("hidden_states", args[0]), *args[1:]) if args else args
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = gather("hidden_states", kwargs["hidden_states"])
        return args, {k: v if k == "hidden_states" else gather(k, v) for k, v in kwargs.items()}

    handles = [block.register_forward_pre_hook(lambda m, a, k, first=index == layer: hook(m, a, k, first),
                                                with_kwargs=True)
               for index, block in enumerate(language_model_of(model).layers) if index >= layer]
    try:
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def check_budget_one_equals_the_model(model, ids, continuation, extra, span, model_inputs) -> None:
    """Budget 1.0 through ``extra`` (language_model_inputs) equals the model fed ``model_inputs(tokens)``:
    teacher-forced logits of ``continuation``, and six greedy tokens."""
    program = compile_decoder(model, ids, budget=1.0, span=span, extra_inputs=extra)
    with torch.no_grad():
        expected = model(**model_inputs(torch.cat([ids, continuation], 1))).logits[:, -continuation.shape[1] - 1:-1]
    torch.testing.assert_close(teacher_forced_logits(program, ids, continuation, extra), expected, atol=1e-5,
                               rtol=1e-4)
    assert torch.equal(generate(program, ids, 6, extra=extra),
                       model.generate(**model_inputs(ids), max_new_tokens=6, do_sample=False))


def test_multimodal_rope_through_language_model_inputs():
    """Qwen2-VL (its image grid does not export): the language model's inputs hold each token's three
    rotary positions. Budget 1.0 equals the model (teacher-forced logits, so decoding continues at its
    rope deltas; greedy tokens); FastV on the image span equals the model's own forward with layers >= K
    on the kept rows, chosen by its eager attention; renumbering is refused."""
    from test_decoder import reference_kept

    model, layer, kept = tiny_qwen2_vl(), 2, 6
    generator = torch.Generator().manual_seed(2)
    ids = torch.tensor([[1, 2, 298] + [QWEN_IMAGE] * 16 + [297, 5, 6, 7, 8]] * 2)
    continuation = torch.randint(0, 290, (2, 4), generator=generator)
    images = dict(pixel_values=torch.randn(128, 96, generator=generator), image_grid_thw=torch.tensor([[1, 8, 8]] * 2))

    def model_inputs(tokens):
        return dict(input_ids=tokens, mm_token_type_ids=(tokens == QWEN_IMAGE).long(), **images)

    extra = language_model_inputs(model, ids, **{k: v for k, v in model_inputs(ids).items() if k != "input_ids"})
    assert {name: tuple(t.shape) for name, t in extra.items()} == {"inputs_embeds": (2, 24, 64),
                                                                    "position_ids": (2, 3, 24)}
    assert extra["position_ids"][0, :, -1].tolist() == [11, 11, 11]  # the 16 image tokens span 4 positions
    assert model.model.rope_deltas is None  # the call's own state was undone
    whole = torch.cat([ids, continuation], 1)
    span, tail = Span(token_id=QWEN_IMAGE), slice(-continuation.shape[1] - 1, -1)
    check_budget_one_equals_the_model(model, ids, continuation, extra, span, model_inputs)

    eager = tiny_qwen2_vl("eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        scores = eager(**model_inputs(ids), output_attentions=True).attentions[layer - 1][:, :, -1].mean(1)
    rows = reference_kept(scores, span.removable(ids), kept)
    rows = torch.cat([rows, torch.arange(ids.shape[1], whole.shape[1]).expand(2, -1)], 1)
    program = compile_decoder(model, ids, keep=kept / 16, layer=layer, span=span, extra_inputs=extra)
    assert program.report["tokens_per_layer"] == [24, 24, 14]
    torch.testing.assert_close(teacher_forced_logits(program, ids, continuation, extra),
                               rows_from_layer(model, layer, rows, model_inputs(whole))[:, tail], atol=1e-5,
                               rtol=1e-4)
    with pytest.raises(TokenCompileError, match="^positions=renumber gives kept tokens consecutive positions; "
                       "with multimodal RoPE"):
        compile_decoder(model, ids, keep=0.5, layer=layer, span=span, extra_inputs=extra, positions="renumber")


IDEFICS_IMAGE = 257


def tiny_idefics3(family: str = "idefics3", attention: str = "sdpa"):
    """Idefics3 / SmolVLM, random weights: a SigLIP-style tower, pixel shuffle and projector (4 tokens per
    32x32 image), and a Llama that is the model's ``text_model``; image placeholder id 257."""
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[family]
    text = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision, scale_factor=2,
                                                      image_token_id=IDEFICS_IMAGE)
    set_attention(config, attention)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    with torch.no_grad():  # attention far from uniform: scores not tied within float noise
        for block in model.model.text_model.layers:
            block.self_attn.q_proj.weight.mul_(4)
            block.self_attn.k_proj.weight.mul_(4)
    return model


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_text_model_vlms_through_language_model_inputs(family):
    """Idefics3 / SmolVLM keep their language model as ``text_model`` (found by Hugging Face's get_decoder):
    budget 1.0 equals the model (teacher-forced logits, greedy tokens); FastV on the two images' span equals
    the model's own forward whose layers >= K see the rows its eager attention keeps."""
    from test_decoder import reference_kept

    model, layer, kept = tiny_idefics3(family), 2, 3
    assert language_model_of(model) is model.model.text_model
    generator = torch.Generator().manual_seed(3)
    ids = torch.tensor([[1, 2] + [IDEFICS_IMAGE] * 4 + [3] + [IDEFICS_IMAGE] * 4 + [5, 6, 7]] * 2)
    pixels = torch.randn(2, 2, 3, 32, 32, generator=generator)  # two images per prompt
    continuation = torch.randint(0, 250, (2, 4), generator=generator)
    whole, span, tail = torch.cat([ids, continuation], 1), Span(token_id=IDEFICS_IMAGE), slice(-5, -1)
    extra = language_model_inputs(model, ids, pixel_values=pixels)
    assert list(extra) == ["inputs_embeds"] and extra["inputs_embeds"].shape == (2, 14, 32)

    check_budget_one_equals_the_model(model, ids, continuation, extra, span,
                                      lambda tokens: dict(input_ids=tokens, pixel_values=pixels))

    eager = tiny_idefics3(family, "eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        scores = eager(input_ids=ids, pixel_values=pixels, output_attentions=True).attentions[layer - 1]
    rows = reference_kept(scores[:, :, -1].mean(1), span.removable(ids), kept)
    rows = torch.cat([rows, torch.arange(ids.shape[1], whole.shape[1]).expand(2, -1)], 1)
    program = compile_decoder(model, ids, keep=kept / 8, layer=layer, span=span, extra_inputs=extra)
    assert program.report["tokens_per_layer"] == [14, 14, 9]
    torch.testing.assert_close(teacher_forced_logits(program, ids, continuation, extra),
                               rows_from_layer(model, layer, rows, dict(input_ids=whole, pixel_values=pixels))[:, tail],
                               atol=1e-5, rtol=1e-4)


def tiny_llava_onevision():
    """LLaVA-OneVision, random weights: SigLIP tower, any-resolution tiles with newline tokens, Qwen2 (which its
    forward hands ``logits_to_keep``); a 32x64 image: a base view and two tiles, 52 image tokens."""
    import transformers as hf

    text = hf.Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1)
    vision = hf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8)
    config = hf.LlavaOnevisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=299,
                                     image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], vision_feature_layer=-1,
                                     vision_feature_select_strategy="full")
    torch.manual_seed(0)
    model = hf.LlavaOnevisionForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(2)
    ids = torch.tensor([[1, 2] + [299] * 52 + [5, 6, 7, 8]] * 2)
    return model, ids, dict(pixel_values=torch.randn(2, 3, 3, 32, 32, generator=generator),
                            image_sizes=torch.tensor([[32, 64]] * 2))


def tiny_mistral3():
    """Mistral 3, random weights: Pixtral tower, patch merger (a 32x64 image: 8 image tokens), Mistral."""
    import transformers as hf

    text = hf.MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    vision = hf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=64, patch_size=8, head_dim=16)
    config = hf.Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=299,
                               spatial_merge_size=2, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = hf.Mistral3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(2)
    ids = torch.tensor([[1, 2] + [299] * 8 + [5, 6, 7, 8], [1, 9] + [299] * 8 + [4, 6, 7, 3]])
    return model, ids, dict(pixel_values=torch.randn(2, 3, 32, 64, generator=generator),
                            image_sizes=torch.tensor([[32, 64]] * 2))


@pytest.mark.parametrize("family", [tiny_llava_onevision, tiny_mistral3])
def test_any_resolution_vlms_at_budget_one_equal_the_model(family):
    """LLaVA-OneVision and Mistral 3 (their image token counts follow each image's size): through
    language_model_inputs, budget 1.0 equals the model (teacher-forced logits, greedy tokens) and FastV on
    the image span removes what it was asked to."""
    model, ids, images = family()
    set_attention(model.config, "sdpa")
    model.generation_config.eos_token_id = None  # six tokens on both sides
    continuation = torch.randint(3, 250, (2, 4), generator=torch.Generator().manual_seed(5))
    span = Span(token_id=299)
    extra = language_model_inputs(model, ids, **images)
    check_budget_one_equals_the_model(model, ids, continuation, extra, span,
                                      lambda tokens: dict(input_ids=tokens, **images))
    images_kept = int((ids[0] == 299).sum()) // 2
    fastv = compile_decoder(model, ids, keep=0.5, layer=2, span=span, extra_inputs=extra)
    assert fastv.report["tokens_per_layer"][2] == ids.shape[1] - images_kept


def tiny_paligemma():
    """PaliGemma, random weights (SigLIP tower, Gemma with use_bidirectional_attention): 16 image tokens."""
    import transformers as hf

    text = hf.GemmaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    vision = hf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=8)
    config = hf.PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=299,
                                projection_dim=32, hidden_size=32)
    set_attention(config, "sdpa")
    return hf.PaliGemmaForConditionalGeneration(config).eval()


def test_language_model_inputs_refuse_what_a_causal_prefill_cannot_reproduce(llama):
    """Gemma 3 lets an image's tokens see each other both ways (its own mask for the language model): refused,
    not compiled as a causal prefill; so is PaliGemma, whose prompt attends both ways even without its
    token_type_ids; a model that rejects the processor outputs is a one-line error; a text-only model has
    no language model inside to hand embeddings to."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from tokencompile.errors import UnsupportedModelError

    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                        image_token_index=299, boi_token_index=298,
                                                        eoi_token_index=297)).eval()
    ids = torch.tensor([[2, 298, 299, 299, 299, 299, 297, 5, 6]])
    with pytest.raises(UnsupportedModelError, match="^Gemma3ForConditionalGeneration hands its language model more "
                       "than embeddings and positions \\(an attention mask of its own"):
        language_model_inputs(model, ids, pixel_values=torch.randn(1, 3, 32, 32), token_type_ids=(ids == 299).long())
    with pytest.raises(TokenCompileError, match="^Qwen2VLForConditionalGeneration did not take the prompt and its "
                       "processor outputs \\(pixel_values, image_grid_thw\\)"):
        language_model_inputs(tiny_qwen2_vl(), ids, pixel_values=torch.randn(16, 96),
                              image_grid_thw=torch.tensor([[1, 4, 4]]))
    paligemma = tiny_paligemma()
    with pytest.raises(UnsupportedModelError, match="^PaliGemmaForConditionalGeneration's language model lets the "
                       "prompt's tokens attend both ways"):
        ids = torch.tensor([[299] * 16 + [2, 5, 6, 1]])
        compile_decoder(paligemma, ids, budget=1.0, extra_inputs=language_model_inputs(
            paligemma, ids, pixel_values=torch.randn(1, 3, 32, 32)))
    with pytest.raises(UnsupportedModelError, match="^LlamaForCausalLM has no language model of its own to hand "
                       "embeddings to \\(give a Hugging Face image-text-to-text model\\)$"):
        language_model_inputs(llama, ids)


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    """A tiny LLaVA saved with its processor, as a user's model folder, and two photos of shared/data."""
    from conftest import SHARED

    folder = tmp_path_factory.mktemp("llava")
    models.decoders.save_llava_tiny(str(folder))
    photos = sorted(os.path.join(SHARED, "data", "images", name)
                    for name in os.listdir(os.path.join(SHARED, "data", "images")) if name.endswith(".JPEG"))
    return folder, photos[:2]


def test_visionzip_zips_every_concatenated_feature_layer(inputs):
    """A LLaVA whose features concatenate two vision layers (vision_feature_layer=[-3, -2]): the plan of the
    last is applied to both, so every channel block holds the same tokens and groups (the reference
    zips the concatenated features)."""
    vlm = models.build("llava_tiny")[0]
    llava = vlm.model
    llava.config.vision_feature_layer = [-3, -2]
    projector = llava.model.multi_modal_projector
    torch.manual_seed(1)
    projector.linear_1 = torch.nn.Linear(2 * projector.linear_1.in_features, projector.linear_1.out_features)
    ids, pixels = inputs[0][:2], inputs[1][:2]
    program = compile_decoder(vlm, ids, keep=0.25, span=IMAGE, method="visionzip", positions="keep",
                              extra_inputs={"pixel_values": pixels})
    check_visionzip(llava, program, ids, pixels, "keep", layers=(-3, -2))


def tiny_vlm(family: str):
    """A tiny random VLM of another family (image token 299; 16 CLIP patches for VipLLaVA, 4 tokens from 16
    patches by pixel shuffle for Aya Vision and InternVL)."""
    import transformers as hf

    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if family == "vipllava":
        config = hf.VipLlavaConfig(vision_config=hf.CLIPVisionConfig(**vision, image_size=32, patch_size=8).to_dict(),
                                   text_config=hf.LlamaConfig(**text).to_dict(), image_token_id=299,
                                   vision_feature_layers=[-2, -1])
    elif family == "aya_vision":
        siglip = hf.SiglipVisionConfig(**vision, image_size=32, patch_size=8)
        config = hf.AyaVisionConfig(vision_config=siglip.to_dict(), text_config=hf.CohereConfig(**text).to_dict(),
                                    image_token_id=299, downsample_factor=2)
    else:
        config = hf.InternVLConfig(vision_config=hf.InternVLVisionConfig(**vision, image_size=[32, 32],
                                                                         patch_size=[8, 8]).to_dict(),
                                   text_config=hf.Qwen2Config(**text).to_dict(), image_token_id=299,
                                   downsample_ratio=0.5)
    torch.manual_seed(0)
    return hf.AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.slow
@pytest.mark.parametrize("family, images", [("vipllava", 16), ("aya_vision", 4), ("internvl", 4)])
def test_other_vlm_families_compile_as_they_are(family, images):
    """Families whose own forward exports with a symbolic batch need no wrapper: budget 1.0 generates what
    their generate gives, and fastv prunes the image span."""
    model = tiny_vlm(family)
    ids = torch.randint(3, 290, (2, images + 10), generator=torch.Generator().manual_seed(0))
    ids[:, 2:2 + images] = 299
    extra = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    full = compile_decoder(model, ids, budget=1.0, extra_inputs=extra)
    expected = model.generate(input_ids=ids, pixel_values=extra["pixel_values"], max_new_tokens=6, do_sample=False,
                              pad_token_id=0)
    assert torch.equal(generate(full, ids, 6, extra=extra), expected)
    program = compile_decoder(model, ids, keep=0.5, layer=2, span=Span(token_id=299), extra_inputs=extra)
    assert program.report["span_tokens_kept"] == images // 2
    assert generate(program, ids, 4, extra=extra).shape == (2, images + 14)


@pytest.mark.parametrize("method", ["vtc-cls", "visionzip"])
def test_vision_methods_refuse_pooled_patches(method):
    """Aya Vision shuffles 2x2 patches into one token (16 SigLIP patches, 4 placeholders): vision-tower scores
    do not map to placeholders, so the methods before the language model refuse (fastv on the span works:
    test_other_vlm_families_compile_as_they_are)."""
    model = tiny_vlm("aya_vision")
    ids = torch.randint(3, 290, (2, 12))
    ids[:, 2:6] = 299
    extra = {"pixel_values": torch.randn(2, 3, 32, 32)}
    with pytest.raises(TokenCompileError, match=f"^{method} maps vision-tower tokens to image placeholders one for "
                                                "one, but the language model gets 4 image tokens per image from 16 "
                                                r"vision tokens \(0 of them prefix"):
        compile_decoder(model, ids, keep=0.5, span=Span(token_id=299), method=method, extra_inputs=extra)


def padded_image_batch(vlm, inputs) -> tuple:
    """(the VLM with a loud padding embedding (id 0, x30: attention to padding would show), ids [2, 80] whose
    second prompt has 6 text tokens fewer, left-padded, pixels, that shorter prompt, the mask, a 4-token
    continuation)."""
    import copy

    loud = copy.deepcopy(vlm)
    with torch.no_grad():
        loud.model.get_input_embeddings().weight[0] *= 30
    ids, pixels = inputs[0][:2].clone(), inputs[1][:2]
    short = torch.cat([ids[1, :LLAVA_TEXT_BEFORE + 64], ids[1, -6:]])   # 6 text tokens fewer
    ids[1] = torch.cat([torch.zeros(ids.shape[1] - len(short), dtype=ids.dtype), short])
    mask = (torch.arange(ids.shape[1]) >= ids.shape[1] - len(short)).long().expand(2, -1).clone()
    mask[0] = 1
    continuation = torch.randint(3, LLAVA_IMAGE_TOKEN, (2, 4), generator=torch.Generator().manual_seed(5))
    return loud, ids, pixels, short, mask, continuation


@pytest.mark.parametrize("method, positions", [pytest.param("vtc-cls", "keep", marks=pytest.mark.slow),
                                              ("visionzip", "renumber")])
def test_padded_image_prompts_reduced_before_the_language_model(vlm, inputs, method, positions):
    """vtc-cls / visionzip on image prompts of different lengths padded on the left: each prompt removes the
    image tokens it removes alone and keeps its padding, masked, so each row gives what the prompt gives
    alone (logits, the real cache slots, a teacher-forced continuation). With positions=renumber the
    padded row's keys are rotated to decode from its own length (alone it decodes from the kept count),
    so keys are compared under keep only."""
    loud, ids, pixels, short, mask, continuation = padded_image_batch(vlm, inputs)
    extra = {"pixel_values": pixels}
    padded = compile_decoder(loud, ids, keep=0.25, span=IMAGE, method=method, positions=positions, padding=True,
                             extra_inputs=extra)
    assert padded.extra_inputs == ("attention_mask", "pixel_values")
    logits, caches = prefill(padded, ids, {**extra, "attention_mask": mask})
    forced = teacher_forced_logits(padded, ids, continuation, extra, attention_mask=mask)
    for row, own_ids in [(0, ids[:1]), (1, short[None])]:
        own_extra = {"pixel_values": pixels[row:row + 1]}
        own = compile_decoder(loud, own_ids, keep=0.25, span=IMAGE, method=method, positions=positions,
                              extra_inputs=own_extra)
        own_logits, own_caches = prefill(own, own_ids, own_extra)
        torch.testing.assert_close(logits[row:row + 1], own_logits, atol=1e-5, rtol=1e-4)
        for (key, value, key_mask), (own_key, own_value) in zip(caches, own_caches):
            real = key_mask[row].bool()
            torch.testing.assert_close(value[row][:, real], own_value[0], atol=1e-5, rtol=1e-4)
            if positions == "keep":
                torch.testing.assert_close(key[row][:, real], own_key[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(forced[row:row + 1], teacher_forced_logits(own, own_ids, continuation[row:row + 1],
                                                                              own_extra), atol=1e-5, rtol=1e-4)
    assert [m.sum(1).tolist() for *_, m in caches] == [[32, 26]] * 4    # 16 text + 16 of 64 image tokens
    assert [m.shape[1] for *_, m in caches] == [32] * 4                  # the padding slots stay, masked


def _cli(*args):
    from click.testing import CliRunner

    from tokencompile.cli import main

    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.mark.parametrize("method, flags, prompts", [
    ("vtc-cls", ["--keep", "0.25"], ["what?", "name the thing you see"]),  # padded on the left
    pytest.param("fastv", ["--keep", "0.5", "--chat"], ["what is it?", "name it now"], marks=pytest.mark.slow),
    ("fastv", ["--keep", "0.5"], ["what?", "name the thing you see"]),  # padded on the left
])
def test_cli_generates_from_images(vlm_folder, method, flags, prompts):
    """--image with each --prompt: the processor's placeholders and pixels, the image span by default, and
    the lines the Python API gives for the same batch."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, photos = vlm_folder
    result = _cli("generate", folder, "--prompt", prompts[0], "--image", photos[0], "--prompt", prompts[1],
                  "--image", photos[1], "--method", method, *flags, "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    if "--chat" in flags:
        texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": p}]}],
                                               add_generation_prompt=True) for p in prompts]
        assert texts[0] == "user: <image>\nwhat is it?\nassistant:"
    else:
        texts = [f"<image>\n{p}" for p in prompts]
    processor.tokenizer.padding_side = "left"
    processor.tokenizer.pad_token = processor.tokenizer.convert_ids_to_tokens(0)  # what the CLI pads with
    batch = processor(images=[Image.open(p).convert("RGB") for p in photos], text=texts, padding=True,
                      return_tensors="pt")
    assert int((batch.input_ids == 256).sum()) == 2 * 64
    padded = not bool(batch.attention_mask.all())
    assert padded == (len(prompts[0]) != len(prompts[1]))
    extra = {"pixel_values": batch.pixel_values}
    program = compile_decoder(model, batch.input_ids, keep=float(flags[1]), method=method, padding=padded,
                              span=Span(token_id=256), extra_inputs=extra)
    out = generate(program, batch.input_ids, 5, extra=extra, attention_mask=batch.attention_mask if padded else None)
    out = out[:, batch.input_ids.shape[1]:]
    # (random bytes: split lines at control characters)
    assert result.stdout == "".join(processor.tokenizer.decode(row, skip_special_tokens=True) + "\n" for row in out)
    assert "span kept 16/64" in result.output if method == "vtc-cls" else "span kept 32/64" in result.output


def test_generation_stops_at_the_language_model_end_of_sequence(llava):
    """A LLaVA config holds no eos_token_id: generation (and an export's manifest) reads it from the
    generation config or the language model's config."""
    from tokencompile.decoder.prefill import eos_token_id

    assert getattr(llava.config, "eos_token_id", None) is None
    assert eos_token_id(llava) == llava.config.text_config.eos_token_id == 2


@pytest.mark.slow
def test_cli_text_prompts_on_a_llava_folder(vlm_folder):
    """Without --image a LLaVA folder generates from text alone (its language model), tokenized by its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, _ = vlm_folder
    result = _cli("generate", folder, "--prompt", "a short text prompt", "--keep", "0.5", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    ids = tokenizer("a short text prompt", return_tensors="pt").input_ids
    out = generate(compile_decoder(model, ids, keep=0.5), ids, 4)[0, ids.shape[1]:]
    assert result.stdout == tokenizer.decode(out, skip_special_tokens=True) + "\n"


def llava_next_folder(folder) -> None:
    """A tiny LLaVA-NeXT with its processor, which gives image_sizes besides pixel_values."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = models.decoders.byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(vision_config=vision, text_config=text,
                                                              image_token_id=256, image_grid_pinpoints=[[32, 32]]))
    with torch.no_grad():  # attention far from uniform: scores not tied within float noise
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    model.save_pretrained(folder)
    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=[[32, 32]])
    LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, image_token="<image>",
                       num_additional_image_tokens=1,
                       vision_feature_select_strategy="default").save_pretrained(folder)


def two_image_prompts(folder, layer: str) -> tuple:
    """(prompts, photos, full, reduced): two prompts of different lengths with two photos through `generate`
    on ``folder`` at budget 1.0 and with FastV keeping half the image from ``layer`` on (CLI results)."""
    from conftest import SHARED

    photos = [os.path.join(SHARED, "data", "images", name) for name in ("n01440764_tench.JPEG",
                                                                         "n01601694_water_ouzel.JPEG")]
    prompts = ["what?", "name the thing you see"]
    args = ["generate", folder, "--prompt", prompts[0], "--image", photos[0], "--prompt", prompts[1], "--image",
            photos[1], "--max-new-tokens", 5]
    full, reduced = _cli(*args), _cli(*args, "--keep", "0.5", "--layer", layer)
    assert full.exit_code == 0 and reduced.exit_code == 0, full.output + reduced.output
    return prompts, photos, full, reduced


def idefics3_folder(folder) -> None:
    """The tiny Idefics3 with its processor (byte tokenizer with Idefics3's image tokens, 256..259; each image
    resized to 32x32 pixels, not split into tiles: 4 image tokens), which gives pixel_attention_mask besides
    pixel_values."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    tokenizer = models.decoders.byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                                "<end_of_utterance>", "<global-img>"]})
    tiny_idefics3().save_pretrained(folder)
    images = Idefics3ImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                    do_image_splitting=False)
    Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4).save_pretrained(folder)


@pytest.mark.parametrize("make_folder, image, layer, kept", [  # Idefics3's language-model path runs by default above
    (llava_next_folder, 256, 1, "18/36"),
    pytest.param(idefics3_folder, IDEFICS_IMAGE, 2, "2/4", marks=pytest.mark.slow)])
def test_cli_generates_from_folders_whose_processor_gives_more(tmp_path, make_folder, image, layer, kept):
    """LLaVA-NeXT (tiles chosen by each image's size: its vision path does not export) and Idefics3 (its
    pixel_attention_mask; the language model is its text_model) through the CLI: each prompt's merged
    embeddings, padded on the left; budget 1.0 gives Hugging Face's tokens for each prompt alone, and FastV
    the lines of the Python API."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    make_folder(tmp_path)
    prompts, photos, full, reduced = two_image_prompts(tmp_path, str(layer))
    assert f"span kept {kept}" in reduced.output

    processor = AutoProcessor.from_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    encoded = [processor(images=Image.open(photo).convert("RGB"), text=f"<image>\n{prompt}", return_tensors="pt")
               for prompt, photo in zip(prompts, photos)]
    expected = [model.generate(**e, max_new_tokens=5, do_sample=False)[0, e.input_ids.shape[1]:] for e in encoded]
    assert full.stdout == "".join(processor.tokenizer.decode(row, skip_special_tokens=True) + "\n" for row in expected)
    length = max(e.input_ids.shape[1] for e in encoded)
    ids, mask = torch.zeros(2, length, dtype=torch.long), torch.zeros(2, length, dtype=torch.long)
    embeds = torch.zeros(2, length, model.config.text_config.hidden_size)
    for row, e in enumerate(encoded):
        n = e.input_ids.shape[1]
        ids[row, -n:], mask[row, -n:] = e.input_ids[0], 1
        outputs = {name: value for name, value in e.items() if name != "input_ids"}
        embeds[row, -n:] = language_model_inputs(model, e.input_ids, **outputs)["inputs_embeds"][0]
    program = compile_decoder(model, ids, keep=0.5, layer=layer, span=Span(token_id=image), padding=True,
                              extra_inputs={"inputs_embeds": embeds})
    out = generate(program, ids, 5, attention_mask=mask, extra={"inputs_embeds": embeds})[:, length:]
    assert reduced.stdout == "".join(processor.tokenizer.decode(row, skip_special_tokens=True) + "\n" for row in out)


def qwen2_vl_folder(folder) -> tuple:
    """The tiny Qwen2-VL saved with its processor (byte tokenizer with Qwen's image tokens, 256..258; each
    image resized to 32x32 pixels: 12 image tokens); returns (model, processor)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = models.decoders.byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image_pad|>", "<|vision_start|>",
                                                                "<|vision_end|>"]})
    model = tiny_qwen2_vl(image=256, start=257, end=258)
    model.save_pretrained(folder)
    grid = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32, **grid),
                                 tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(**grid))
    processor.save_pretrained(folder)
    return model, processor


def test_cli_generates_from_a_qwen2_vl_folder(tmp_path):
    """Qwen2-VL through the CLI: prompts of different lengths padded on the left with their rotary positions;
    at budget 1.0 each line is what Hugging Face generates for the prompt alone."""
    from PIL import Image

    model, processor = qwen2_vl_folder(tmp_path)
    tokenizer = processor.tokenizer
    prompts, photos, full, reduced = two_image_prompts(tmp_path, "2")
    assert "span kept 6/12" in reduced.output
    expected = []
    for prompt, photo in zip(prompts, photos):
        encoded = processor(images=Image.open(photo).convert("RGB"), text=f"<|image_pad|>\n{prompt}",
                            return_tensors="pt")
        expected.append(model.generate(**encoded, max_new_tokens=5, do_sample=False)[0, encoded.input_ids.shape[1]:])
    assert full.stdout == "".join(tokenizer.decode(row, skip_special_tokens=True) + "\n" for row in expected)
    # the CLI's batch (positions padded with the embeddings) against each prompt alone, logits
    from tokencompile.decoder.cli import _image_prompts

    ids, mask, extra = _image_prompts(processor, tuple(prompts), tuple(photos), False, model=model)
    assert mask[0].tolist().count(0) == 17 and list(extra) == ["inputs_embeds", "position_ids"]
    program = compile_decoder(model, ids, budget=1.0, padding=True, span=Span(token_id=256), extra_inputs=extra)
    logits, _ = prefill(program, ids, {**extra, "attention_mask": mask})
    fastv = compile_decoder(model, ids, keep=0.5, layer=2, padding=True, span=Span(token_id=256), extra_inputs=extra)
    out = generate(fastv, ids, 5, attention_mask=mask, extra=extra)[:, ids.shape[1]:]
    assert reduced.stdout == "".join(tokenizer.decode(row, skip_special_tokens=True) + "\n" for row in out)
    for row, (prompt, photo) in enumerate(zip(prompts, photos)):
        encoded = processor(images=Image.open(photo).convert("RGB"), text=f"<|image_pad|>\n{prompt}",
                            return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(logits[row], model(**encoded).logits[0, -1], atol=1e-5, rtol=1e-4)


def test_cli_image_errors(vlm_folder, llama, tmp_path):
    import shutil

    folder, photos = vlm_folder
    llama.save_pretrained(tmp_path / "text")
    llava_next_folder(tmp_path / "next")
    shutil.copytree(folder, tmp_path / "unweighted")
    (tmp_path / "unweighted" / "model.safetensors").unlink()
    (tmp_path / "broken.jpg").write_text("not an image")
    for args, message in [
        ([tmp_path / "next", "--prompt", "a", "--image", photos[0], "--method", "visionzip"],
         "error: visionzip reads the vision tower, which merged embeddings"),
        ([tmp_path / "unweighted", "--prompt", "a", "--image", photos[0]], "error: cannot load the llava model in"),
        ([folder, "--prompt", "a", "--image", tmp_path / "broken.jpg"], "cannot read the image .*broken.jpg"),
        ([folder, "--prompt", "a", "--prompt", "b", "--image", photos[0]], "2 --prompt and 1 --image options"),
        ([tmp_path / "text", "--prompt-ids", "1,2,3", "--image", photos[0]], "is not a vision-language model"),
        ([tmp_path / "text", "--prompt-ids", "1,2,3", "--method", "vtc-cls"], "--method vtc-cls reduces a VLM's"),
    ]:
        result = _cli("generate", *args)
        assert result.exit_code == 2 and re.search(message, result.output), result.output


@pytest.mark.slow
def test_cli_generates_from_a_vipllava_folder(tmp_path):
    """Another family through the CLI: VipLLaVA (its projector reads two vision layers) with visionzip gives the
    lines of the Python API (the plain Hugging Face model, whose forward exports as it is)."""
    from conftest import SHARED
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    models.decoders.save_llava_tiny(str(tmp_path), family="vipllava")
    photos = [os.path.join(SHARED, "data", "images", name) for name in ("n01440764_tench.JPEG",
                                                                         "n01601694_water_ouzel.JPEG")]
    prompts = ["what?", "name the thing you see"]
    result = _cli("generate", tmp_path, "--prompt", prompts[0], "--image", photos[0], "--prompt", prompts[1],
                  "--image", photos[1], "--method", "visionzip", "--keep", "0.25", "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert type(model).__name__ == "VipLlavaForConditionalGeneration"
    processor.tokenizer.padding_side = "left"
    processor.tokenizer.pad_token = processor.tokenizer.convert_ids_to_tokens(0)
    batch = processor(images=[Image.open(p).convert("RGB") for p in photos], text=[f"<image>\n{p}" for p in prompts],
                      padding=True, return_tensors="pt")
    extra = {"pixel_values": batch.pixel_values}
    program = compile_decoder(model, batch.input_ids, keep=0.25, method="visionzip", padding=True,
                              span=Span(token_id=256), extra_inputs=extra)
    out = generate(program, batch.input_ids, 5, extra=extra, attention_mask=batch.attention_mask)
    assert result.stdout == "".join(processor.tokenizer.decode(row, skip_special_tokens=True) + "\n"
                                    for row in out[:, batch.input_ids.shape[1]:])
    assert "span kept 16/64" in result.output

    # without --image: text through the whole model (no causal-LM class is registered for VipLLaVA)
    result = _cli("generate", tmp_path, "--prompt", "a short text prompt", "--keep", "0.5", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    ids = processor.tokenizer("a short text prompt", return_tensors="pt").input_ids
    out = generate(compile_decoder(model, ids, keep=0.5), ids, 4)[0, ids.shape[1]:]
    assert result.stdout == processor.tokenizer.decode(out, skip_special_tokens=True) + "\n"


@pytest.mark.slow
def test_cli_exports_a_vlm_and_generates_from_the_export(vlm_folder, tmp_path):
    folder, photos = vlm_folder
    export = tmp_path / "onnx"
    result = _cli("export-decoder", folder, "--prompt", "what is it?", "--image", photos[0], "--method", "vtc-cls",
                  "--keep", "0.25", "-o", export, "--verify")
    assert result.exit_code == 0 and "8 greedy tokens identical" in result.output, result.output
    in_torch = _cli("generate", folder, "--prompt", "what is it?", "--image", photos[1], "--method", "vtc-cls",
                    "--keep", "0.25", "--max-new-tokens", 6)
    from_onnx = _cli("generate", export, "--prompt", "what is it?", "--image", photos[1], "--tokenizer", folder,
                     "--max-new-tokens", 6)
    assert from_onnx.exit_code == 0 and in_torch.exit_code == 0, from_onnx.output + in_torch.output
    assert from_onnx.stdout == in_torch.stdout
    missing = _cli("generate", export, "--prompt", "what is it?", "--tokenizer", folder)
    assert missing.exit_code == 2 and "is an exported vision-language model" in missing.output
    two = ["--prompt", "what?", "--image", photos[0], "--prompt", "what is it?", "--image", photos[1]]
    unpadded = _cli("generate", export, *two, "--tokenizer", folder)
    assert unpadded.exit_code == 2 and "export it with --padding" in unpadded.output

    padded = tmp_path / "padded"
    result = _cli("export-decoder", folder, "--prompt", "what is it? tell me", "--image", photos[0], "--keep", "0.5",
                  "-o", padded, "--padding", "--verify")
    assert result.exit_code == 0 and "8 greedy tokens identical" in result.output, result.output
    from_onnx = _cli("generate", padded, *two, "--tokenizer", folder, "--max-new-tokens", 6)
    assert from_onnx.exit_code == 0, from_onnx.output
    runner = OnnxRunner(str(padded))
    from tokencompile.decoder.cli import _image_prompts, _load_processor

    ids, mask, extra = _image_prompts(_load_processor(str(folder)), tuple(two[1::4]), tuple(two[3::4]), False,
                                      runner.prompt_tokens)
    assert mask[0].tolist().count(0) == 14 and mask[1].tolist().count(0) == 8 and list(extra) == ["pixel_values"]
    out = generate(runner, ids, 6, extra=extra, attention_mask=mask)[:, ids.shape[1]:]
    tokenizer = _load_processor(str(folder)).tokenizer
    assert from_onnx.stdout == "".join(tokenizer.decode(row, skip_special_tokens=True) + "\n" for row in out)

    # vtc-cls renumbered on padded prompts: the export generates what the model folder generates
    zipped = tmp_path / "vtc_padded"
    flags = ["--method", "vtc-cls", "--keep", "0.25", "--positions", "renumber"]
    result = _cli("export-decoder", folder, "--prompt", "what is it? tell me", "--image", photos[0], *flags,
                  "-o", zipped, "--padding", "--verify")
    assert result.exit_code == 0 and "8 greedy tokens identical" in result.output, result.output
    from_onnx = _cli("generate", zipped, *two, "--tokenizer", folder, "--max-new-tokens", 6)
    in_torch = _cli("generate", folder, *two, *flags, "--max-new-tokens", 6)
    assert from_onnx.exit_code == 0 and in_torch.exit_code == 0, from_onnx.output + in_torch.output
    assert from_onnx.stdout == in_torch.stdout

    # Qwen2-VL (its language model's inputs, computed by the model folder's own code before the exported graphs)
    model, processor = qwen2_vl_folder(tmp_path / "qwen")
    result = _cli("export-decoder", tmp_path / "qwen", "--prompt", "what is it? tell me now", "--image", photos[0],
                  "--keep", "0.5", "--layer", "2", "-o", tmp_path / "qwen_onnx", "--padding", "--verify")
    assert result.exit_code == 0 and "8 greedy tokens identical" in result.output, result.output
    from_onnx = _cli("generate", tmp_path / "qwen_onnx", *two, "--tokenizer", tmp_path / "qwen",
                     "--max-new-tokens", 6)
    assert from_onnx.exit_code == 0, from_onnx.output
    runner = OnnxRunner(str(tmp_path / "qwen_onnx"))
    ids, mask, extra = _image_prompts(processor, tuple(two[1::4]), tuple(two[3::4]), False, runner.prompt_tokens,
                                      model)
    assert runner.extra_inputs == ("attention_mask", "inputs_embeds", "position_ids")
    out = generate(runner, ids, 6, extra=extra, attention_mask=mask)[:, ids.shape[1]:]
    assert from_onnx.stdout == "".join(processor.tokenizer.decode(row, skip_special_tokens=True) + "\n"
                                       for row in out)


def test_a_padded_image_prompt_gives_what_it_gives_alone(vlm, inputs):
    """Image prompts of different lengths padded on the left (fastv on the image span): every row gives up
    the same number of slots, padding first, so the padded row keeps 6 more image tokens (38 of 64) and
    gives what it gives alone when keeping 38 (logits, the real cache slots, a teacher-forced
    continuation); the padding id's embedding is loud, so attention to padding would show."""
    loud, ids, pixels, short, mask, continuation = padded_image_batch(vlm, inputs)
    padded = compile_decoder(loud, ids, keep=0.5, layer=2, span=IMAGE, padding=True,
                             extra_inputs={"pixel_values": pixels})
    assert padded.extra_inputs == ("attention_mask", "pixel_values")
    extra = {"pixel_values": pixels}
    logits, caches = prefill(padded, ids, {**extra, "attention_mask": mask})
    forced = teacher_forced_logits(padded, ids, continuation, extra, attention_mask=mask)
    for row, own_ids, kept in [(0, ids[:1], 32), (1, short[None], 38)]:
        own_extra = {"pixel_values": pixels[row:row + 1]}
        own = compile_decoder(loud, own_ids, keep=kept / 64, layer=2, span=IMAGE, extra_inputs=own_extra)
        own_logits, own_caches = prefill(own, own_ids, own_extra)
        torch.testing.assert_close(logits[row:row + 1], own_logits, atol=1e-5, rtol=1e-4)
        for (key, value, key_mask), (own_key, own_value) in zip(caches, own_caches):
            real = key_mask[row].bool()
            torch.testing.assert_close(key[row][:, real], own_key[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(value[row][:, real], own_value[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(forced[row:row + 1], teacher_forced_logits(own, own_ids, continuation[row:row + 1],
                                                                              own_extra), atol=1e-5, rtol=1e-4)
    assert [m.sum(1).tolist() for *_, m in caches] == [[80, 74], [80, 74], [48, 48], [48, 48]]
    # unreduced, the recipe's wrapper takes the mask too: Hugging Face's generate with the mask
    expected = loud.model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=4,
                                   do_sample=False)
    assert torch.equal(generate(loud, ids, 4, extra=extra, attention_mask=mask), expected)
