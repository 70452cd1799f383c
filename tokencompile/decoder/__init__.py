"""Decoder LLMs and VLMs: reduce the prompt in prefill (FastV, PyramidDrop), then decode on the reduced KV
cache (each layer's cache holds the tokens that layer saw).

    program = compile_decoder(model, prompt_ids, budget=0.6, span=(0, n - 64))
    program = compile_decoder(model, prompt_ids, method="pyramiddrop", budget=0.6, span=(0, n - 64))
    ids = generate(program, prompt_ids, max_new_tokens=32)
"""

from .analysis import DecoderAnalysis, Span, analyse_decoder
from .fastv import FastV, PyramidDrop, pyramid_layers
from .generate import decode_step, generate, prefill, teacher_forced_logits
from .prefill import (
           CausalLMPrefill,
           DecoderProgram,
           Stage,
           compile_decoder,
           export_prefill,
           reuse_traces,
)

__all__ = ["CausalLMPrefill", "DecoderAnalysis", "DecoderProgram", "FastV", "PyramidDrop", "Span", "Stage",
           "analyse_decoder", "compile_decoder", "decode_step", "export_prefill", "generate", "prefill",
           "pyramid_layers", "reuse_traces", "teacher_forced_logits"]
