"""A reduced decoder as two ONNX graphs, prefill and decode, and a generation loop in ONNX Runtime.

Names follow Optimum / onnxruntime-genai:

- ``prefill.onnx``: ``input_ids [batch, N]`` (N fixed at compile time) -> ``logits [batch, V]``
  (the last prompt token's), ``present.{i}.key`` / ``present.{i}.value [batch, H_kv, n_i, D]``. After a
  reduction n_i differs per layer: layers below the first reduced one hold all N tokens.
- ``decode.onnx``: ``input_ids [batch, 1]``, ``position_ids [batch, 1]``, ``past_key_values.{i}.key`` /
  ``.value [batch, H_kv, past_sequence_length.{i}, D]`` -> ``logits [batch, V]``, ``present.{i}.key`` /
  ``.value`` one token longer. Each layer's past length is its own axis, so one graph decodes on
  full and reduced caches alike. Without padding the new token sees its layer's whole cache.
- With padding (``compile_decoder(..., padding=True)``, ``export-decoder --padding``): prefill also takes
  ``attention_mask [batch, N]`` (left padding) and returns ``present.{i}.mask [batch, n_i]``, each layer's
  key mask (padding a reduction kept stays masked); decode takes ``past_key_values.{i}.mask`` and returns
  it one longer. Positions are each prompt's own: ``position_ids`` of the first decode step = the
  prompt's token count.
- ``prefill.onnx.data`` / ``decode.onnx.data``: the weights, for models whose weights pass 2 GB (one
  protobuf's limit); each graph has its own copy.
- ``decoder.json``: prompt length, layer count, position policy, the compile report.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.export import Dim, ExportedProgram

from ..errors import TokenCompileError
from ..lowering.onnx_export import DEFAULT_OPSET, ort_session, run_torch_onnx_export
from ..lowering.onnx_files import save_onnx
from ..lowering.onnx_ops import translation_table
from ..outputs import write_json
from .generate import (
    Caches,
    TorchRunner,
    check_extra_inputs,
    check_padding,
    check_span_tokens,
    decode_step,
    flat_caches,
    pair_caches,
    start_position,
    unpadded,
)
from .prefill import (
    DecoderProgram,
    as_causal_lm,
    decode_position,
    eos_token_id,
    sliding_window,
)

PREFILL, DECODE, MANIFEST = "prefill.onnx", "decode.onnx", "decoder.json"
MAX_CACHE = 1 << 17


def cache_names(prefix: str, layers: int, masked: bool = False) -> list[str]:
    """The cache inputs / outputs in ``flat_caches`` order: every key and value, then (padded prompts)
    every layer's key mask."""
    names = [f"{prefix}.{i}.{role}" for i in range(layers) for role in ("key", "value")]
    return names + ([f"{prefix}.{i}.mask" for i in range(layers)] if masked else [])


class DecodeStep(torch.nn.Module):
    """(input_ids [B, 1], position_ids [B, 1], key_0, value_0, ... [, mask_0, ...]) -> (logits [B, V],
    key_0', value_0', ... [, mask_0', ...])."""

    def __init__(self, model: torch.nn.Module, masked: bool = False):
        super().__init__()
        self.model = model
        self.masked = masked

    def forward(self, input_ids, position_ids, past):
        logits, caches = decode_step(self.model, input_ids, position_ids, pair_caches(past, self.masked))
        return (logits, *flat_caches(caches))


def decode_example(caches: Caches) -> tuple:
    """(input_ids, position_ids, past) to trace the decode step with. Only shapes count; a layer that kept
    one token would have its past length fixed to 1 by torch.export (0/1 specialisation), so each
    example cache is at least 2 long."""
    past = tuple(t.new_zeros(*t.shape[:2], max(2, t.shape[2]), t.shape[3]) for layer in caches for t in layer[:2])
    if len(caches[0]) == 3:
        past += tuple(layer[2].new_ones(layer[2].shape[0], max(2, layer[2].shape[1])) for layer in caches)
    token = torch.zeros(past[0].shape[0], 1, dtype=torch.long)
    return token, torch.full_like(token, past[0].shape[2]), past


def export_decode_step(model: torch.nn.Module, example: tuple) -> ExportedProgram:
    """The decode step with a symbolic batch and a symbolic past length per layer (``example``: from
    ``decode_example``; key masks, if any, share their layer's past length)."""
    token, position, past = example
    masked = len(past) % 3 == 0 and past[-1].dim() == 2
    layers = len(past) // (3 if masked else 2)
    batch_dim = Dim("batch", min=1, max=4096)
    past_dims = [Dim(f"past_{i}", min=1, max=MAX_CACHE) for i in range(layers)]
    shapes = [{0: batch_dim, 2: past_dims[i // 2]} for i in range(2 * layers)]
    shapes += [{0: batch_dim, 1: past_dims[i]} for i in range(layers)] if masked else []
    dynamic = ({0: batch_dim}, {0: batch_dim}, tuple(shapes))
    try:
        with torch.no_grad():
            return torch.export.export(DecodeStep(model, masked).eval(), (token, position, past),
                                       dynamic_shapes=dynamic, strict=False)
    except Exception as error:  # noqa: BLE001 - torch.export raises many kinds
        raise TokenCompileError(f"export of the decode step failed: {str(error).strip().splitlines()[0]}",
                                "rerun with --debug and report the model") from error


def _rename(exported, inputs: list[str], outputs: list[str]) -> None:
    """Name the graph's inputs and outputs; an output that is an input or another output (a padding mask
    passed through to several layers) gets its own Identity first."""
    import onnx_ir

    graph = exported.model.graph
    for value, name in zip(graph.inputs, inputs):
        value.name = name
    seen = set(graph.inputs)
    for index, (value, name) in enumerate(zip(list(graph.outputs), outputs)):
        if value in seen:
            copy = onnx_ir.node("Identity", inputs=[value], name=f"{name}/Identity")
            graph.append(copy)
            value = graph.outputs[index] = copy.outputs[0]
        seen.add(value)
        value.name = name
    axes = {}
    for value in graph.inputs:
        if value.name.startswith("past_key_values.") and not value.name.endswith(".mask") and value.shape is not None:
            layer = value.name.split(".")[1]
            axis = value.shape[2]
            if not isinstance(axis, int):
                axes[str(axis)] = f"past_sequence_length.{layer}"
    if axes:
        exported.rename_axes(axes)


@dataclass
class DecoderExport:
    folder: str
    prefill: str
    decode: str
    seconds: float
    layers: int


def export_decoder_onnx(program: DecoderProgram, folder: str, opset: int = DEFAULT_OPSET,
                        external_data: bool | None = None) -> DecoderExport:
    """Write prefill.onnx, decode.onnx and decoder.json of ``program`` into ``folder`` (traced on the
    inputs it was compiled with). Each graph's weights go to ``NAME.onnx.data`` when they exceed 2 GB, or
    always with ``external_data=True``."""
    import tokencompile.ops  # noqa: F401  (the token ops' ONNX lowering)

    position = decode_position(program)
    started = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    manifest = os.path.join(folder, MANIFEST)
    if os.path.exists(manifest):  # written last: a folder without it is never mistaken for a whole export
        os.remove(manifest)
    example, *extra = program.example_inputs
    _, caches = TorchRunner(program).prefill(example, dict(zip(program.extra_inputs, extra)))
    layers, masked = len(caches), len(caches[0]) == 3
    table = translation_table()

    exported, _ = run_torch_onnx_export(program.prefill, (example, *extra), opset, table, "ONNX export of the prefill")
    _rename(exported, ["input_ids", *program.extra_inputs], ["logits", *cache_names("present", layers, masked)])
    prefill_path = os.path.join(folder, PREFILL)
    save_onnx(exported.model, prefill_path, external_data)

    step_example = decode_example(caches)
    exported, _ = run_torch_onnx_export(export_decode_step(program.model, step_example), step_example, opset,
                                        table, "ONNX export of the decode step")
    _rename(exported, ["input_ids", "position_ids", *cache_names("past_key_values", layers, masked)],
            ["logits", *cache_names("present", layers, masked)])
    decode_path = os.path.join(folder, DECODE)
    save_onnx(exported.model, decode_path, external_data)

    write_json(manifest, {
        "prompt_tokens": program.prompt_tokens, "extra_inputs": list(program.extra_inputs), "layers": layers,
        "positions": program.positions,
        "first_reduced_layer": program.first_reduced_layer, "decode_position": position,
        "cache_tokens": [int(layer[0].shape[2]) for layer in caches], "opset": opset, "padding": masked,
        "sliding_window": sliding_window(as_causal_lm(program.model)),
        "eos_token_id": eos_token_id(program.model),
        "report": program.report})
    return DecoderExport(folder, prefill_path, decode_path, time.perf_counter() - started, layers)


class OnnxRunner:
    """Prefill and decode steps of an exported decoder folder in ONNX Runtime (CPU)."""

    def __init__(self, folder: str, threads: int = 2):
        manifest = os.path.join(folder, MANIFEST)
        missing = [name for name in (PREFILL, DECODE, MANIFEST) if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise TokenCompileError(f"{folder} is not an exported decoder: {', '.join(missing)} missing",
                                    "write it with `tokencompile export-decoder ... -o FOLDER`")
        with open(manifest) as handle:
            self.manifest = json.load(handle)
        self.prompt_tokens = int(self.manifest["prompt_tokens"])
        self.layers = int(self.manifest["layers"])
        self.prefill_session = ort_session(os.path.join(folder, PREFILL), threads)
        self.decode_session = ort_session(os.path.join(folder, DECODE), threads)
        self.masked = bool(self.manifest.get("padding", False))
        self.past_names = cache_names("past_key_values", self.layers, self.masked)
        self.extra_inputs = tuple(self.manifest.get("extra_inputs", ()))
        self.position = int(self.manifest.get("decode_position", self.prompt_tokens))
        self.window = self.manifest.get("sliding_window")

    def start_position(self, prompt_ids: torch.Tensor, extra: dict | None = None) -> int | torch.Tensor:
        return start_position(self.position, extra)

    def prefill(self, prompt_ids: torch.Tensor, extra: dict | None = None) -> tuple[torch.Tensor, Caches]:
        if prompt_ids.shape[1] != self.prompt_tokens:
            raise TokenCompileError(f"the decoder was exported for {self.prompt_tokens}-token prompts, got "
                                    f"{prompt_ids.shape[1]}", "export it again for this prompt length")
        check_span_tokens(self.manifest["report"], prompt_ids)
        extra = unpadded(self.extra_inputs, prompt_ids, extra)
        check_padding(prompt_ids, extra)
        feeds = {"input_ids": prompt_ids.numpy()}
        for name, value in zip(self.extra_inputs, check_extra_inputs(self.extra_inputs, extra)):
            feeds[name] = np.ascontiguousarray(value.numpy())
        logits, *flat = self.prefill_session.run(None, feeds)
        return torch.from_numpy(logits), pair_caches([torch.from_numpy(t) for t in flat], self.masked)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, caches: Caches) -> tuple[torch.Tensor, Caches]:
        feeds = {"input_ids": tokens.numpy(), "position_ids": positions.numpy()}
        for name, tensor in zip(self.past_names, flat_caches(caches)):
            feeds[name] = np.ascontiguousarray(tensor.numpy())
        logits, *flat = self.decode_session.run(None, feeds)
        return torch.from_numpy(logits), pair_caches([torch.from_numpy(t) for t in flat], self.masked)


__all__ = ["DECODE", "MANIFEST", "PREFILL", "DecodeStep", "DecoderExport", "OnnxRunner", "cache_names",
           "export_decode_step", "export_decoder_onnx"]
