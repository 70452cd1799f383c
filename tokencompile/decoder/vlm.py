"""Prefill modules of vision-language models whose own forward cannot be exported with a symbolic batch.

Hugging Face's LLaVA splits the image features per image in a Python loop, so ``torch.export`` fixes the
batch size. ``LlavaPrefill`` computes the features itself (vision tower, feature layer(s), [CLS] dropped
by the "default" strategy, projector) and hands them to the model as one [B * image tokens, C] tensor,
which it scatters into the image placeholders as usual. ``prefill_module`` picks it for a LLaVA model
given ``pixel_values``.
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


__all__ = ["LlavaPrefill", "is_llava"]
