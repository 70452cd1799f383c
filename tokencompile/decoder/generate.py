"""Generation: a (reduced) prefill, then decode steps on per-layer key/value caches.

After a reduced prefill the caches have different lengths: layers < K hold every prompt token,
layers >= K only the kept ones. A decode step feeds one token per sample to the causal LM with each
layer's own cache (a Hugging Face ``DynamicCache`` filled from the prefill outputs). One new token
may see every cached key, so its mask is an all-zero additive [B, 1, 1, 1] tensor that broadcasts
over each layer's own cache length. With ``positions=keep`` decode positions continue from the full
prompt length: the kept tokens kept their original rotary positions.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import TokenCompileError
from .prefill import (
    MASK,
    DecoderProgram,
    as_causal_lm,
    cache_argument,
    cache_tensors,
    decode_position,
    multimodal_positions,
    prefill_module,
    sliding_window,
)

Caches = list[tuple[torch.Tensor, ...]]  # per layer (key, value), or (key, value, key mask) with padding


def _check_prompt(prompt_ids) -> torch.Tensor:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.dtype.is_floating_point:
        raise TokenCompileError("prompt_ids must be an integer tensor [batch, tokens]", "tokenize the prompt first")
    return prompt_ids


def check_extra_inputs(expected: tuple[str, ...], extra: dict | None) -> tuple:
    """The values of ``extra`` in the program's input order, after checking the names."""
    extra = extra or {}
    if set(extra) != set(expected):
        raise TokenCompileError(f"the program takes {', '.join(('input_ids', *expected))}, got "
                                f"{', '.join(('input_ids', *extra))}", "pass the same inputs as at compile time")
    return tuple(extra[name] for name in expected)


def check_span_tokens(report: dict, prompt_ids: torch.Tensor) -> None:
    """Every prompt must hold the number of span tokens (image tokens) the program was compiled for: it
    removes a fixed number of them, and with fewer it would remove text."""
    token_id = report.get("span_token_id")
    if token_id is None:
        return
    counts = sorted(set((prompt_ids == token_id).sum(1).tolist()))
    if counts != [report["span_token_count"]]:
        raise TokenCompileError(f"the prompts hold {', '.join(map(str, counts))} tokens of id {token_id}; the "
                                f"program was compiled for {report['span_token_count']}",
                                "compile it for this number of image tokens")


def check_padding(prompt_ids: torch.Tensor, extra: dict | None) -> None:
    """An ``attention_mask`` must be [B, N] of 0 / 1 with the padding on the left."""
    mask = (extra or {}).get(MASK)
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(prompt_ids.shape):
        raise TokenCompileError(f"attention_mask must be a tensor shaped like the prompt ids {list(prompt_ids.shape)}",
                                "give 1 for each token and 0 for each padding position")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise TokenCompileError("attention_mask holds values other than 0 and 1", "give 1 for tokens, 0 for padding")
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool((mask[:, -1] == 1).all()):
        raise TokenCompileError("attention_mask pads on the right (or inside a prompt): prompt reduction needs "
                                "every prompt to end at the last column", "pad on the left (Hugging Face "
                                "tokenizers: padding_side='left')")


def prefill(program_or_model, prompt_ids: torch.Tensor, extra: dict | None = None) -> tuple[torch.Tensor, Caches]:
    """Logits of the last prompt token [B, V] and every layer's (key, value) cache, with the layer's key
    mask when the prompts are padded. ``extra``: further inputs by name (a VLM's pixel_values, the
    ``attention_mask`` of left-padded prompts)."""
    prompt_ids = _check_prompt(prompt_ids)
    check_padding(prompt_ids, extra)
    with torch.no_grad():
        if isinstance(program_or_model, DecoderProgram):
            if prompt_ids.shape[1] != program_or_model.prompt_tokens:
                raise TokenCompileError(f"the program was compiled for {program_or_model.prompt_tokens}-token "
                                        f"prompts, got {prompt_ids.shape[1]}", "compile it for this prompt length")
            check_span_tokens(program_or_model.report, prompt_ids)
            values = check_extra_inputs(program_or_model.extra_inputs,
                                        unpadded(program_or_model.extra_inputs, prompt_ids, extra))
            logits, *flat = program_or_model.prefill.module()(prompt_ids, *values)
        else:
            extra = extra or {}
            logits, *flat = prefill_module(program_or_model, tuple(extra))(prompt_ids, *extra.values())
    return logits, pair_caches(flat, masked=MASK in (extra or {}))


def flat_caches(caches: Caches) -> list[torch.Tensor]:
    """key_0, value_0, key_1, value_1, ..., then mask_0, mask_1, ... when the caches have key masks."""
    return [t for layer in caches for t in layer[:2]] + [layer[2] for layer in caches if len(layer) == 3]


def pair_caches(flat, masked: bool = False) -> Caches:
    """The per-layer caches of ``flat_caches``' order."""
    if not masked:
        return list(zip(flat[0::2], flat[1::2]))
    layers = len(flat) // 3
    return list(zip(flat[0:2 * layers:2], flat[1:2 * layers:2], flat[2 * layers:]))


def decoder_layers(lm: torch.nn.Module, count: int) -> torch.nn.ModuleList:
    """The causal LM's stack of ``count`` decoder layers: searched in its decoder (``get_decoder``, the
    language model of a VLM) first, so that a vision tower of the same depth is never taken for it."""
    decoder = lm.get_decoder() if callable(getattr(lm, "get_decoder", None)) else lm
    for module in (*decoder.modules(), *lm.modules()):
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise TokenCompileError(f"cannot find the {count} decoder layers of {type(lm).__name__}",
                            "decode padded prompts with a Hugging Face causal LM")


def _mask_per_layer(layers: torch.nn.ModuleList, masks: list[torch.Tensor]) -> list:
    """Forward pre-hooks giving layer i the additive key mask ``masks[i]`` [B, 1, 1, keys] (Hugging Face
    builds one mask for all layers; after a reduction each layer's cache has its own tokens)."""
    handles = []
    for layer, mask in zip(layers, masks):
        names = [name for name in inspect.signature(layer.forward).parameters]
        slot = names.index("attention_mask") if "attention_mask" in names else None

        def hook(module, args, kwargs, mask=mask, slot=slot):
            if "attention_mask" in kwargs or slot is None or len(args) <= slot:
                kwargs["attention_mask"] = mask
            else:
                args = (*args[:slot], mask, *args[slot + 1:])
            return args, kwargs
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def decode_step(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                caches: Caches) -> tuple[torch.Tensor, Caches]:
    """Logits [B, V] for one new token per sample ([B, 1] ids at [B, 1] positions); the caches grow by one."""
    from transformers import DynamicCache

    lm = as_causal_lm(model)
    cache = DynamicCache(ddp_cache_data=[layer[:2] for layer in caches])
    dtype = caches[0][0].dtype
    visible = torch.zeros(tokens.shape[0], 1, 1, 1, dtype=dtype, device=tokens.device)
    masks, handles = [], []
    if len(caches[0]) == 3:  # padded prompts: each layer's keys have their own mask, the new token is seen
        masks = [torch.cat([layer[2], torch.ones_like(layer[2][:, :1])], 1) for layer in caches]
        additive = [torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m == 0, torch.finfo(dtype).min)
                    [:, None, None] for m in masks]
        handles = _mask_per_layer(decoder_layers(lm, len(caches)), additive)
    try:
        with torch.no_grad():
            out = lm(input_ids=tokens, position_ids=positions, attention_mask=visible, use_cache=True,
                     **{cache_argument(lm): cache})
    finally:
        for handle in handles:
            handle.remove()
    return out.logits[:, -1], pair_caches([*cache_tensors(cache), *masks], masked=bool(masks))


class TorchRunner:
    """Prefill (the reduced program, or the unreduced model) and decode steps (the model's layers) in torch."""

    def __init__(self, program_or_model):
        if isinstance(program_or_model, DecoderProgram):
            self.position = decode_position(program_or_model)
            self.decoder = program_or_model.model
        else:
            self.position, self.decoder = None, program_or_model
        self.source = program_or_model
        self.window = sliding_window(as_causal_lm(self.decoder))

    def start_position(self, prompt_ids: torch.Tensor, extra: dict | None = None) -> int | torch.Tensor:
        """The rotary position of the first generated token ([B, 1] per prompt when padded)."""
        return start_position(prompt_ids.shape[1] if self.position is None else self.position, extra)

    def prefill(self, prompt_ids: torch.Tensor, extra: dict | None = None) -> tuple[torch.Tensor, Caches]:
        return prefill(self.source, prompt_ids, extra)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, caches: Caches) -> tuple[torch.Tensor, Caches]:
        return decode_step(self.decoder, tokens, positions, caches)


def start_position(position: int, extra: dict | None) -> int | torch.Tensor:
    """``position``, or for left-padded prompts (kept positions) each prompt's own length [B, 1]; with
    multimodal RoPE positions each prompt's largest position + 1 (as Hugging Face's rope deltas)."""
    rotary = multimodal_positions(extra)
    if rotary is not None:  # the three rotary axes are the last three (a fourth, first, holds text positions)
        return rotary[:, -3:].amax((1, 2))[:, None].long() + 1
    mask = (extra or {}).get(MASK)
    return position if mask is None else mask.long().sum(1, keepdim=True)


def as_runner(source):
    """A runner (``prefill`` and ``decode`` methods, e.g. ``OnnxRunner``) as is; a program or model in torch."""
    return source if hasattr(source, "prefill") and hasattr(source, "decode") else TorchRunner(source)


def check_window(runner, start: int | torch.Tensor, steps: int) -> None:
    """Decode steps feed positions start .. start + steps - 1; a token at position p of a model with a
    sliding window W may see every cached key only while p < W (the decode mask is all-visible)."""
    window = getattr(runner, "window", None)
    start = int(start.max()) if isinstance(start, torch.Tensor) else start
    if window is not None and steps > 0 and start + steps - 1 >= window:
        raise TokenCompileError(f"decoding would reach position {start + steps - 1}, past the model's sliding "
                                f"attention window ({window} tokens), which decoding on reduced caches does not "
                                f"apply", f"generate or score at most {max(window - start + 1, 0)} tokens after "
                                "this prompt")


def _positions(token: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
    return torch.full_like(token, position) if isinstance(position, int) else position.expand_as(token).clone()


def unpadded(takes, prompt_ids: torch.Tensor, extra: dict | None) -> dict | None:
    """``extra`` with an all-ones attention_mask when a program built for padded batches (it ``takes`` one)
    is given prompts without one."""
    if takes is None or MASK not in takes or MASK in (extra or {}):
        return extra
    return {**(extra or {}), MASK: torch.ones_like(prompt_ids)}


def with_mask(source, prompt_ids: torch.Tensor, extra: dict | None,
              attention_mask: torch.Tensor | None) -> dict | None:
    """``extra`` with the ``attention_mask`` of padded prompts, after checking the program takes one (all
    ones for a program that takes one when none is given)."""
    if isinstance(source, DecoderProgram):
        takes = source.extra_inputs
    elif isinstance(source, torch.nn.Module):  # a model (or its prefill wrapper) takes a mask
        takes = None
    else:  # an exported runner has fixed inputs
        takes = getattr(source, "extra_inputs", None)
    if attention_mask is None:
        return unpadded(takes, prompt_ids, extra)
    if takes is not None and MASK not in takes:
        raise TokenCompileError("the program was compiled for prompts without padding",
                                "compile it with padding=True (--padding) for an attention_mask")
    if isinstance(attention_mask, torch.Tensor) and not attention_mask.dtype.is_floating_point:
        attention_mask = attention_mask.long()
    return {**(extra or {}), MASK: attention_mask}


def token_chooser(do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None):
    """(ids [B, n], logits [B, V]) -> next tokens [B, 1]: the most likely, or with ``do_sample`` a draw
    from the softmax after Hugging Face's temperature, top-k and top-p warpers, in its order (so that a
    seeded run draws what its ``generate(do_sample=True, ...)`` draws). No hidden defaults: top_k=0 and
    top_p=1.0 filter nothing (Hugging Face's generation config defaults to top_k=50)."""
    if not do_sample:
        if (temperature, top_k, top_p) != (1.0, 0, 1.0) or generator is not None:
            raise TokenCompileError("temperature, top_k, top_p and generator shape sampling; greedy decoding "
                                    "ignores them", "add do_sample=True, or leave them at their defaults")
        return lambda ids, logits: logits.argmax(-1, keepdim=True)
    if not temperature > 0:
        raise TokenCompileError(f"temperature {temperature:g} is not above 0",
                                "give temperature > 0, or decode greedily")
    if top_k < 0 or int(top_k) != top_k:
        raise TokenCompileError(f"top_k {top_k} is not a count", "give top_k >= 0 (0: no top-k filter)")
    if not 0 < top_p <= 1:
        raise TokenCompileError(f"top_p {top_p:g} is out of range", "give 0 < top_p <= 1 (1: no top-p filter)")
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
    warpers += [TopKLogitsWarper(int(top_k))] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []

    def draw(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probabilities = warpers(ids, logits.float()).softmax(-1)
        return torch.multinomial(probabilities, 1, generator=generator)
    return draw


def generate(source, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
             extra: dict | None = None, attention_mask: torch.Tensor | None = None, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy decoding, or sampling with ``do_sample`` (``temperature``, ``top_k``, ``top_p`` as in
    Hugging Face; ``generator``: a seeded ``torch.Generator``, else torch's global one): [B, N + new]
    ids (stops early when every sample produced ``eos_token_id``).
    ``source``: a DecoderProgram, a causal LM, or a runner such as ``OnnxRunner``; ``extra``: further
    prefill inputs by name (a VLM's pixel_values); ``attention_mask``: 1 for tokens, 0 for the padding
    of left-padded prompts (a program compiled with ``padding=True``)."""
    choose = token_chooser(do_sample, temperature, top_k, top_p, generator)
    runner = as_runner(source)
    extra = with_mask(source, prompt_ids, extra, attention_mask)
    ids, position = prompt_ids, runner.start_position(_check_prompt(prompt_ids), extra)
    check_window(runner, position, max_new_tokens - 1)
    logits, caches = runner.prefill(prompt_ids, extra)
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool)
    for step in range(max_new_tokens):
        token = choose(ids, logits)
        ids = torch.cat([ids, token], dim=1)
        if eos_token_id is not None:
            finished |= torch.isin(token[:, 0], torch.as_tensor(eos_token_id).reshape(-1))
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            logits, caches = runner.decode(token, _positions(token, position), caches)
            position = position + 1
    return ids


def teacher_forced_logits(source, prompt_ids: torch.Tensor, continuation: torch.Tensor,
                          extra: dict | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, V]: logits predicting continuation[:, t] after the prompt and continuation[:, :t]
    (``attention_mask``: as in ``generate``)."""
    runner = as_runner(source)
    extra = with_mask(source, prompt_ids, extra, attention_mask)
    position = runner.start_position(_check_prompt(prompt_ids), extra)
    check_window(runner, position, continuation.shape[1] - 1)
    logits, caches = runner.prefill(prompt_ids, extra)
    steps = [logits]
    for t in range(continuation.shape[1] - 1):
        token = continuation[:, t:t + 1]
        logits, caches = runner.decode(token, _positions(token, position), caches)
        steps.append(logits)
        position = position + 1
    return torch.stack(steps, dim=1)


__all__ = ["Caches", "TorchRunner", "as_runner", "check_padding", "decode_step", "flat_caches", "generate",
           "pair_caches", "prefill", "teacher_forced_logits"]
