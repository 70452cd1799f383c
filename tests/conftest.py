import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the model recipes in models/

import models

SHARED = os.path.join(os.path.dirname(ROOT), "shared")

# One thread per pytest-xdist worker: CI's `-n 2` runs two workers on the machine's two cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """A sweep is part of the slow set: `-m slow` runs it, the default run leaves it out."""
    for item in items:
        if item.get_closest_marker("sweep") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def recipe():
    """recipe(name) -> (module, program with symbolic batch); built once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            module, inputs = models.build(name, batch=2)
            from tokencompile.compiler import export_module

            cache[name] = (module, export_module(module, inputs))
        return cache[name]
    return get


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (real weights, its prefill wrapper; .model is the Hugging Face model): the GGUF
    is dequantised once per session."""
    return models.build("smollm2")[0]


@pytest.fixture(scope="session")
def optimized(recipe):
    """optimized(name, budget) -> OptimizeResult; built once per session."""
    import tokencompile

    cache = {}

    def get(name, budget):
        if (name, budget) not in cache:
            cache[name, budget] = tokencompile.optimize(recipe(name)[1], budget=budget)
        return cache[name, budget]
    return get


@pytest.fixture(scope="session")
def tiny_vit_module():
    """A 2-block timm ViT on 32x32 images (16 patches + CLS), 10 classes, and example inputs (batch 2)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    module = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()
    return module, (torch.randn(2, 3, 32, 32),)


@pytest.fixture(scope="session")
def tiny_vit(tiny_vit_module):
    """tiny_vit_module exported with a symbolic batch."""
    from tokencompile.compiler import export_module

    return export_module(*tiny_vit_module)


@pytest.fixture(scope="session")
def tiny_bert_module():
    """A 2-layer BERT with masked mean pooling over 16 tokens (MiniLM's vocabulary size), and example inputs."""
    from transformers import BertConfig, BertModel

    from tokencompile.load import MeanPooled

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, attn_implementation="sdpa")
    module = MeanPooled(BertModel(config).eval()).eval()
    ids = torch.randint(1000, 2000, (2, 16))
    return module, (ids, torch.ones(2, 16, dtype=torch.long))


@pytest.fixture(scope="session")
def tiny_bert(tiny_bert_module):
    """tiny_bert_module exported with a symbolic batch."""
    from tokencompile.compiler import export_module

    return export_module(*tiny_bert_module)


@pytest.fixture(scope="session")
def llama():
    """The tiny random-weight Llama of the decoder tests (Hugging Face LlamaForCausalLM), built once."""
    return models.build("tiny_llama")[0].model


@pytest.fixture(scope="module")
def one_trace_per_prompt():
    """Compiles of the same model on equal prompts within a module share one export (the trace is
    not what these tests check; tests/test_decoder.py checks that a reused trace compiles like a fresh one)."""
    from tokencompile.decoder import reuse_traces

    with reuse_traces():
        yield
