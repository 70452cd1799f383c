"""Fidelity of a reduced causal LM on a text file: next-token agreement with the full model and the
perplexity of the true continuation, teacher-forced through the reduced prefill and decode steps.

The file is read as one text, tokenized, and cut into consecutive windows of ``prompt + continuation``
tokens. The reference is the full model's single forward over each window.
"""

from __future__ import annotations

import torch

from ..errors import TokenCompileError
from .data import _read_lines
from .metrics import next_token_agreement, perplexity
from .runner import check_finite


def lm_windows(tokenizer, path: str, prompt_tokens: int, continuation: int, limit: int | None = None) -> torch.Tensor:
    """[W, prompt + continuation] token ids: consecutive windows of the tokenized file."""
    text = "\n".join(_read_lines(path))
    ids = tokenizer(text).input_ids
    window = prompt_tokens + continuation
    count = len(ids) // window if limit is None else min(limit, len(ids) // window)
    if count == 0:
        raise TokenCompileError(f"{path} has {len(ids)} tokens, fewer than one window of {prompt_tokens} prompt + "
                                f"{continuation} continuation tokens", "give a longer text or a shorter --continuation")
    return torch.tensor(ids[:count * window]).view(count, window)


def evaluate_lm(model: torch.nn.Module, source, windows: torch.Tensor, prompt_tokens: int, batch: int = 4,
                progress=None) -> dict:
    """Agreement and perplexity of ``source`` (a DecoderProgram, a runner such as OnnxRunner, or the model)
    against ``model``'s full forward, ``batch`` windows at a time."""
    from ..decoder.generate import teacher_forced_logits
    from ..decoder.prefill import as_causal_lm

    lm = as_causal_lm(model)
    references, outputs = [], []
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        with torch.no_grad():
            references.append(lm(input_ids=chunk).logits[:, prompt_tokens - 1:-1])
        outputs.append(teacher_forced_logits(source, chunk[:, :prompt_tokens], chunk[:, prompt_tokens:]))
        if progress:
            progress(f"lm: {min(start + batch, len(windows))}/{len(windows)} windows")
    reference, logits = torch.cat(references), torch.cat(outputs)
    targets = windows[:, prompt_tokens:]
    original, reduced = perplexity(reference, targets), perplexity(logits, targets)
    result = {"task": "lm", "windows": len(windows), "prompt_tokens": prompt_tokens,
            "continuation_tokens": int(targets.shape[1]), "next_token_agreement": next_token_agreement(reference, logits),
            "perplexity_original": original, "perplexity": reduced, "perplexity_change": reduced / original - 1}
    check_finite(result)
    return result


__all__ = ["evaluate_lm", "lm_windows"]
