"""Load a model given on the command line: a .pt2 program, timm:<name>, hf:<dir>, or a trusted pickle."""

from __future__ import annotations

import importlib
import logging
import os
import re
from contextlib import contextmanager

import torch
from torch.export import ExportedProgram

from .compiler import export_module
from .errors import TokenCompileError, UnsupportedModelError


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(size <= 0 for size in shape):
        raise TokenCompileError(f"cannot read input shape {text!r}", "give sizes like 8,3,224,224 (images) or 8,128 (text)")
    return shape


UNREGISTERED_OUTPUT = re.compile(r"Deserializing ([\w.]+)\.(\w+) in pytree is not registered")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage() + "\n" + (logging.Formatter().formatException(record.exc_info)
                                                           if record.exc_info else ""))


@contextmanager
def _torch_export_log():
    """Collect torch.export's warnings (tracebacks of why a load failed) instead of printing them."""
    logger = logging.getLogger("torch.export")
    handler, saved = _Records(), (logger.handlers, logger.propagate)
    logger.handlers, logger.propagate = [handler], False
    try:
        yield handler.messages
    finally:
        logger.handlers, logger.propagate = saved


def _unregistered_output_module(messages: list[str]) -> tuple[str, str] | None:
    """(module, class) of an output type the program returns that is not imported yet, if that is why it failed."""
    for message in messages:
        match = UNREGISTERED_OUTPUT.search(message)
        if match:
            return match.group(1), match.group(2)
    return None


def load_program(path: str, trust_pickle: bool = False) -> ExportedProgram:
    """torch.export.load of a checked archive (see tokencompile.archive), with one clear error on failure.

    A program returning a type registered on import (a Hugging Face ModelOutput) loads after importing
    the type's module."""
    from . import ops  # noqa: F401  (optimized programs call tokencompile ops)
    from .archive import check_archive

    if not os.path.isfile(path):
        raise TokenCompileError(f"no such file: {path}", "give a .pt2 program, timm:<name> or hf:<directory>")
    if not trust_pickle:
        check_archive(path)
    imported = set()
    while True:
        with _torch_export_log() as messages:
            try:
                return torch.export.load(path)
            except Exception as error:  # noqa: BLE001 - torch raises many kinds for a bad archive
                failure = error
        missing = _unregistered_output_module(messages)
        if missing is None or missing[0] in imported:
            break
        try:
            importlib.import_module(missing[0])
        except ImportError:
            raise TokenCompileError(f"{path} returns {'.'.join(missing)}, whose module cannot be imported here",
                                    f"install the package of {missing[0].split('.')[0]}, or export a model "
                                    "returning plain tensors") from None
        imported.add(missing[0])
    raise TokenCompileError(f"cannot read {path} as a torch.export program ({type(failure).__name__})",
                            "save it with torch.export.save; optimized programs need `import tokencompile`") \
        from None


def check_input_shape(program: ExportedProgram, shape: tuple[int, ...], source: str) -> None:
    """--input-shape must fit the program's first input: its rank, and every size the program fixes."""
    from .signature import input_specs

    specs = input_specs(program)
    expected = specs[0].shape if specs else ()
    if len(shape) != len(expected) or any(size is not None and size != given for size, given in zip(expected, shape)):
        wanted = ",".join("B" if size is None else str(size) for size in expected)
        raise TokenCompileError(f"--input-shape {','.join(map(str, shape))} does not fit {source}, whose first input "
                                f"has shape {wanted}", f"give --input-shape {wanted.replace('B', '2')}")
    if len(shape) == 2 and len(specs) != 2 or len(shape) != 2 and len(specs) != 1:
        raise TokenCompileError(f"--input-shape cannot describe the {len(specs)} inputs of {source}",
                                "omit --input-shape: the program's stored example inputs are used")
    low, high = specs[0].batch_range
    if not low <= shape[0] <= (high or shape[0]):
        raise TokenCompileError(f"batch {shape[0]} of --input-shape is outside {source}'s batch range "
                                f"{low}..{high or 'any'}", f"give a batch in {low}..{high or 'any'}")


def _inputs_for(shape: tuple[int, ...] | None, default: tuple[int, ...]) -> tuple:
    shape = shape or default
    if len(shape) == 2:  # token ids + attention mask
        return torch.randint(1000, 2000, shape), torch.ones(shape, dtype=torch.long)
    return (torch.randn(shape),)


def _export(module: torch.nn.Module, inputs: tuple, source: str) -> ExportedProgram:
    try:
        return export_module(module.eval(), inputs)
    except Exception as error:
        raise UnsupportedModelError(f"torch.export could not trace {source}: {str(error).splitlines()[0]}",
                                    "check --input-shape, or export the model yourself and pass the .pt2") from error


def _load_timm(name: str, shape) -> tuple[ExportedProgram, tuple]:
    try:
        import timm
    except ImportError:
        raise TokenCompileError("timm is not installed", "pip install 'tokencompile[models]'") from None
    try:
        module = timm.create_model(name, pretrained=False)
    except Exception as error:
        raise TokenCompileError(f"timm has no model {name!r} ({str(error).splitlines()[0]})",
                                "see timm.list_models()") from None
    default = (2, *module.pretrained_cfg.get("input_size", (3, 224, 224)))
    inputs = _inputs_for(shape, default)
    return _export(module, inputs, f"timm:{name}"), inputs


class _VisionOutputs(torch.nn.Module):
    """A Hugging Face vision encoder returning its final [CLS] state as a plain tensor (a .pt2 whose
    program returns a ModelOutput does not load in another process)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class MeanPooled(torch.nn.Module):
    """A BERT-style encoder with masked mean pooling of its final states (how sentence-transformers
    embeds a sentence), returned as a plain tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _load_hf(directory: str, shape) -> tuple[ExportedProgram, tuple]:
    if not os.path.isdir(directory):
        raise TokenCompileError(f"no such model directory: {directory}",
                                "hf: takes a local directory with config.json and the weights")
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise TokenCompileError("transformers is not installed", "pip install 'tokencompile[models]'") from None
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        model = AutoModel.from_pretrained(directory, local_files_only=True, attn_implementation="sdpa")
    except Exception as error:
        raise TokenCompileError(f"cannot load a Hugging Face model from {directory}: {str(error).splitlines()[0]}",
                                "the directory needs config.json and safetensors weights") from None
    vision = hasattr(config, "image_size")
    default = (2, getattr(config, "num_channels", 3), config.image_size, config.image_size) if vision else (2, 128)
    inputs = _inputs_for(shape, default)
    wrapper = _VisionOutputs(model.eval()) if vision else MeanPooled(model.eval())
    return _export(wrapper, inputs, f"hf:{directory}"), inputs


def load_model(spec: str, input_shape: str | None = None, trust_pickle: bool = False) -> tuple[ExportedProgram, tuple]:
    """(program, example inputs) for a model given as a path or `timm:` / `hf:` id."""
    shape = parse_shape(input_shape)
    if spec.startswith("timm:"):
        return _load_timm(spec[5:], shape)
    if spec.startswith("hf:"):
        return _load_hf(spec[3:], shape)
    if not os.path.exists(spec):
        raise TokenCompileError(f"no such file: {spec}", "give a .pt2 program, timm:<name> or hf:<directory>")
    if spec.endswith(".pt2"):
        program = load_program(spec, trust_pickle)
        inputs = None
        if shape is not None:
            check_input_shape(program, shape, spec)
            inputs = _inputs_for(shape, shape)
        elif program.example_inputs and not program.example_inputs[1]:
            inputs = tuple(program.example_inputs[0])
        if inputs is None:
            raise TokenCompileError(f"{spec} stores no example inputs", "pass --input-shape")
        return program, inputs
    if spec.endswith((".pt", ".pth", ".pkl")):
        if not trust_pickle:
            raise TokenCompileError(f"{spec} is a pickle: loading it runs arbitrary code",
                                    "pass --trust-pickle if you trust its source, or export it to .pt2")
        try:
            module = torch.load(spec, weights_only=False)
        except Exception as error:
            raise TokenCompileError(f"cannot unpickle {spec} ({type(error).__name__}: {error})",
                                    "save the nn.Module with torch.save(module)") from None
        if not isinstance(module, torch.nn.Module):
            raise TokenCompileError(f"{spec} holds a {type(module).__name__}, not an nn.Module",
                                    "save the module itself, not its state_dict")
        if shape is None:
            raise TokenCompileError("a pickled module needs --input-shape to be traced", "e.g. --input-shape 2,3,224,224")
        inputs = _inputs_for(shape, shape)
        return _export(module, inputs, spec), inputs
    raise TokenCompileError(f"unknown model format: {spec}", "give a .pt2 program, a .pt pickle, timm:<name> or hf:<dir>")
