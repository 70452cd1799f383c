"""Prefill inputs of vision-language models whose own forward cannot be exported with a symbolic batch.

Hugging Face's LLaVA splits the image features per image in a Python loop, so ``torch.export`` fixes the
batch size. ``LlavaPrefill`` computes the features itself (vision tower, feature layer(s), [CLS] dropped
by the "default" strategy, projector) and hands them to the model as one [B * image tokens, C] tensor,
which it scatters into the image placeholders as usual. ``prefill_module`` picks it for a LLaVA model
given ``pixel_values``.

Models whose vision path does not export at all (LLaVA-NeXT picks tiles by each image's size) hand the
compiler their language model's input instead: ``language_model_inputs`` runs the model's own code up to
its language model and returns the prompt embeddings with the image features merged in (and, for
multimodal RoPE, each token's positions on the rotary axes); the program takes them as ``inputs_embeds``
(and ``position_ids``); the prefill FLOPs are then the language model's.
"""

from __future__ import annotations

import torch

from .prefill import CausalLMPrefill

PIXELS = "pixel_values"


def is_llava(model: torch.nn.Module) -> bool:
    """A Hugging Face LLaVA model (``LlavaForConditionalGeneration``: vision tower, projector, language model)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "llava" and hasattr(
        getattr(model, "model", None), "multi_modal_projector")


class LlavaPrefill(CausalLMPrefill):
    """(input_ids [B, N], *extra) -> (last logits, key_0, value_0, ...) of a LLaVA model, the extra inputs
    holding pixel_values [B, 3, H, W] (and the attention_mask of left-padded prompts), with the batch
    symbolic in its export."""

    def __init__(self, model: torch.nn.Module, extra_inputs: tuple[str, ...] = (PIXELS,)):
        super().__init__(model, extra_inputs)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vlm, config = self.model.model, self.model.config
        states = vlm.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        layers = config.vision_feature_layer
        hidden = states[layers] if isinstance(layers, int) else torch.cat([states[i] for i in layers], -1)
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return vlm.multi_modal_projector(hidden).flatten(0, 1)

    def model_inputs(self, named: dict) -> dict:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        named = dict(named)
        image = BaseModelOutputWithPooling(pooler_output=[self.image_features(named.pop(PIXELS))])
        return {**named, "mm_encoder_outputs": {"image": image}}


EMBEDS = "inputs_embeds"
POSITIONS = "position_ids"
# what a language model may be handed besides its embeddings and positions: a padding mask [B, N] (used only
# while computing them), the cache and output switches
HANDED_ON = {EMBEDS, POSITIONS, "attention_mask", "input_ids", "cache", "past_key_values", "use_cache",
             "cache_position", "return_dict", "output_attentions", "output_hidden_states", "output_router_logits",
             "logits_to_keep"}


def language_model_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The language model inside a Hugging Face vision-language model (``model.model.language_model``, or
    ``text_model`` for Idefics3 / SmolVLM: Hugging Face's ``get_decoder``); None for a text-only model, whose
    decoder is its ``model`` itself."""
    inner = getattr(model, "model", None)
    find = getattr(model, "get_decoder", None)
    try:
        decoder = find() if callable(find) else None
    except (AttributeError, ValueError):
        decoder = None
    return decoder if isinstance(decoder, torch.nn.Module) and inner is not None and decoder is not inner and any(
        part is decoder for part in inner.modules()) else None


class _Captured(Exception):
    def __init__(self, inputs: dict):
        super().__init__()
        self.inputs = inputs


def language_model_inputs(model: torch.nn.Module, input_ids: torch.Tensor, **processor_outputs) -> dict:
    """What a vision-language model hands its language model, as a program's extra inputs:
    ``inputs_embeds`` [B, N, C], the prompt's token embeddings with the image features in the image
    placeholders, and for multimodal RoPE (Qwen2-VL) ``position_ids`` [B, axes, N], each token's position
    on every rotary axis (batch first; the program hands them on in the model's layout). Computed by the
    model's own code: its forward runs, eagerly, up to the language model. For models whose vision path
    does not export (LLaVA-NeXT's image_sizes, tiles; Qwen2-VL's image grids):
    ``compile_decoder(model, ids, extra_inputs=language_model_inputs(model, ids, **processor_outputs))``
    reduces the language model's prompt, and decoding reads the cache as usual. ``processor_outputs``: the
    processor's outputs but input_ids (an ``attention_mask`` among them is used only here)."""
    from ..errors import TokenCompileError, UnsupportedModelError

    language_model = language_model_of(model)
    if language_model is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no language model of its own to hand embeddings to",
                                    "give a Hugging Face image-text-to-text model")
    name = type(model).__name__

    def capture(module, args, kwargs):
        raise _Captured({**dict(zip(("input_ids",), args)), **kwargs})

    hook = language_model.register_forward_pre_hook(capture, with_kwargs=True)
    state = dict(vars(model.model))  # the call's own attributes (Qwen2-VL keeps its rope deltas) are undone
    try:
        with torch.no_grad():
            model(input_ids=input_ids, **processor_outputs)
    except _Captured as captured:
        inputs = captured.inputs
    except (TypeError, ValueError, RuntimeError) as error:
        raise TokenCompileError(f"{name} did not take the prompt and its processor outputs "
                                f"({', '.join(processor_outputs) or 'none'}): {str(error).splitlines()[0]}",
                                "give the processor's outputs for these input_ids") from None
    else:
        raise UnsupportedModelError(f"{name} did not call its language model",
                                    "give a Hugging Face image-text-to-text model")
    finally:
        hook.remove()
        for key in set(vars(model.model)) - set(state):
            delattr(model.model, key)
        vars(model.model).update(state)
    mask = inputs.get("attention_mask")
    others = sorted(key for key, value in inputs.items() if value is not None and key not in HANDED_ON)
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        others.append("an attention mask of its own")
    if others or not isinstance(inputs.get(EMBEDS), torch.Tensor):
        raise UnsupportedModelError(f"{name} hands its language model more than embeddings and positions "
                                    f"({', '.join(others) or 'no inputs_embeds'}: e.g. image tokens that see each "
                                    "other both ways, image features added inside its layers (Qwen3-VL's "
                                    "deepstack), or cross-attention states); the program would run a plain causal "
                                    "prefill", "use a model whose language model takes the embeddings causally "
                                    "(e.g. LLaVA-NeXT, Qwen2-VL, Idefics3)")
    extra = {EMBEDS: inputs[EMBEDS].detach()}
    positions = inputs.get("position_ids")
    if positions is not None and positions.dim() == 3:
        extra[POSITIONS] = positions.transpose(0, 1).contiguous()
    return extra


__all__ = ["LlavaPrefill", "is_llava", "language_model_inputs"]
