"""Greedy generation: a (reduced) prefill, then decode steps on per-layer key/value caches.

After a reduced prefill the caches have different lengths: layers < K hold every prompt token,
layers >= K only the kept ones. A decode step feeds one token per sample to the causal LM with each
layer's own cache (a Hugging Face ``DynamicCache`` filled from the prefill outputs). One new token
may see every cached key, so its mask is an all-zero additive [B, 1, 1, 1] tensor that broadcasts
over each layer's own cache length. With ``positions=keep`` decode positions continue from the full
prompt length: the kept tokens kept their original rotary positions.
"""

from __future__ import annotations

import torch

from ..errors import TokenCompileError
from .prefill import (
    DecoderProgram,
    as_causal_lm,
    cache_argument,
    cache_tensors,
    decode_position,
    prefill_module,
    sliding_window,
)

Caches = list[tuple[torch.Tensor, torch.Tensor]]


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


def prefill(program_or_model, prompt_ids: torch.Tensor, extra: dict | None = None) -> tuple[torch.Tensor, Caches]:
    """Logits of the last prompt token [B, V] and every layer's (key, value) cache. ``extra``: further
    inputs by name (a VLM's pixel_values)."""
    prompt_ids = _check_prompt(prompt_ids)
    with torch.no_grad():
        if isinstance(program_or_model, DecoderProgram):
            if prompt_ids.shape[1] != program_or_model.prompt_tokens:
                raise TokenCompileError(f"the program was compiled for {program_or_model.prompt_tokens}-token "
                                        f"prompts, got {prompt_ids.shape[1]}", "compile it for this prompt length")
            check_span_tokens(program_or_model.report, prompt_ids)
            values = check_extra_inputs(program_or_model.extra_inputs, extra)
            logits, *flat = program_or_model.prefill.module()(prompt_ids, *values)
        else:
            extra = extra or {}
            logits, *flat = prefill_module(program_or_model, tuple(extra))(prompt_ids, *extra.values())
    return logits, pair_caches(flat)


def flat_caches(caches: Caches) -> list[torch.Tensor]:
    return [t for kv in caches for t in kv]


def pair_caches(flat) -> Caches:
    return list(zip(flat[0::2], flat[1::2]))


def decode_step(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                caches: Caches) -> tuple[torch.Tensor, Caches]:
    """Logits [B, V] for one new token per sample ([B, 1] ids at [B, 1] positions); the caches grow by one."""
    from transformers import DynamicCache

    lm = as_causal_lm(model)
    cache = DynamicCache(ddp_cache_data=caches)
    visible = torch.zeros(tokens.shape[0], 1, 1, 1, dtype=caches[0][0].dtype, device=tokens.device)
    with torch.no_grad():
        out = lm(input_ids=tokens, position_ids=positions, attention_mask=visible, use_cache=True,
                 **{cache_argument(lm): cache})
    return out.logits[:, -1], pair_caches(cache_tensors(cache))


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

    def start_position(self, prompt_ids: torch.Tensor) -> int:
        """The rotary position of the first generated token."""
        return prompt_ids.shape[1] if self.position is None else self.position

    def prefill(self, prompt_ids: torch.Tensor, extra: dict | None = None) -> tuple[torch.Tensor, Caches]:
        return prefill(self.source, prompt_ids, extra)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, caches: Caches) -> tuple[torch.Tensor, Caches]:
        return decode_step(self.decoder, tokens, positions, caches)


def as_runner(source):
    """A runner (``prefill`` and ``decode`` methods, e.g. ``OnnxRunner``) as is; a program or model in torch."""
    return source if hasattr(source, "prefill") and hasattr(source, "decode") else TorchRunner(source)


def check_window(runner, start: int, steps: int) -> None:
    """Decode steps feed positions start .. start + steps - 1; a token at position p of a model with a
    sliding window W may see every cached key only while p < W (the decode mask is all-visible)."""
    window = getattr(runner, "window", None)
    if window is not None and steps > 0 and start + steps - 1 >= window:
        raise TokenCompileError(f"decoding would reach position {start + steps - 1}, past the model's sliding "
                                f"attention window ({window} tokens), which decoding on reduced caches does not "
                                f"apply", f"generate or score at most {max(window - start + 1, 0)} tokens after "
                                "this prompt")


def generate(source, prompt_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
             extra: dict | None = None) -> torch.Tensor:
    """Greedy decoding: [B, N + new] ids (stops early when every sample produced ``eos_token_id``).
    ``source``: a DecoderProgram, a causal LM, or a runner such as ``OnnxRunner``; ``extra``: further
    prefill inputs by name (a VLM's pixel_values)."""
    runner = as_runner(source)
    ids, position = prompt_ids, runner.start_position(_check_prompt(prompt_ids))
    check_window(runner, position, max_new_tokens - 1)
    logits, caches = runner.prefill(prompt_ids, extra)
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool)
    for step in range(max_new_tokens):
        token = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if eos_token_id is not None:
            finished |= torch.isin(token[:, 0], torch.as_tensor(eos_token_id).reshape(-1))
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            logits, caches = runner.decode(token, torch.full_like(token, position), caches)
            position += 1
    return ids


def teacher_forced_logits(source, prompt_ids: torch.Tensor, continuation: torch.Tensor,
                          extra: dict | None = None) -> torch.Tensor:
    """[B, T, V]: logits predicting continuation[:, t] after the prompt and continuation[:, :t]."""
    runner = as_runner(source)
    position = runner.start_position(_check_prompt(prompt_ids))
    check_window(runner, position, continuation.shape[1] - 1)
    logits, caches = runner.prefill(prompt_ids, extra)
    steps = [logits]
    for t in range(continuation.shape[1] - 1):
        token = continuation[:, t:t + 1]
        logits, caches = runner.decode(token, torch.full_like(token, position), caches)
        steps.append(logits)
        position += 1
    return torch.stack(steps, dim=1)


__all__ = ["Caches", "TorchRunner", "flat_caches", "pair_caches", "as_runner", "decode_step", "generate", "prefill", "teacher_forced_logits"]
