"""Fidelity metrics: pure functions on tensors comparing an optimized model's outputs with the original's.

Logits are (samples, classes) for classification and (samples, positions, vocabulary) for language models;
embeddings are (samples, features)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def top1_agreement(original: torch.Tensor, optimized: torch.Tensor) -> float:
    """Share of samples where both models predict the same class."""
    return (original.argmax(-1) == optimized.argmax(-1)).double().mean().item()


def top5_agreement(original: torch.Tensor, optimized: torch.Tensor, k: int = 5) -> float:
    """Share of samples where the original's top-1 class is among the optimized model's top-k
    (top-k accuracy with the original's prediction as the label)."""
    k = min(k, optimized.shape[-1])
    top = optimized.topk(k, dim=-1).indices
    return (top == original.argmax(-1, keepdim=True)).any(-1).double().mean().item()


def kl_divergence(original: torch.Tensor, optimized: torch.Tensor) -> float:
    """Mean over samples of KL(original || optimized) between the softmax distributions, in nats."""
    log_p = F.log_softmax(original.double(), dim=-1)
    log_q = F.log_softmax(optimized.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float | None:
    """Top-k accuracy over the samples whose label is known (label >= 0); None if none is."""
    known = labels >= 0
    if not known.any():
        return None
    top = logits[known].topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == labels[known].unsqueeze(-1)).any(-1).double().mean().item()


def cosine_to_original(original: torch.Tensor, optimized: torch.Tensor) -> float:
    """Mean cosine similarity between each sample's optimized and original embedding."""
    return F.cosine_similarity(original.double(), optimized.double(), dim=-1).mean().item()


def spearman(a, b) -> float:
    """Spearman's rank correlation (scipy; ties get average ranks)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        from ..errors import TokenCompileError

        raise TokenCompileError("scipy is not installed", "pip install 'tokencompile[eval]'") from None
    return float(spearmanr(torch.as_tensor(a).tolist(), torch.as_tensor(b).tolist()).statistic)


def sts_spearman(first: torch.Tensor, second: torch.Tensor, gold: torch.Tensor) -> float:
    """STS score: Spearman between the pairs' embedding cosine similarities and the gold scores."""
    from ..errors import TokenCompileError

    similarity = F.cosine_similarity(first.double(), second.double(), dim=-1)
    for values, what in ((gold, "the gold scores are"), (similarity, "the model's pair similarities are")):
        if len(values) < 2 or bool((values == values[0]).all()):
            raise TokenCompileError(f"Spearman is undefined: {what} all equal", "give pairs with different "
                                    "gold scores (at least two pairs)")
    return spearman(similarity, gold)


def _positions(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape, dtype=torch.bool) if mask is None else mask.bool()


def next_token_agreement(original: torch.Tensor, optimized: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Share of (unmasked) positions where both language models predict the same next token."""
    same = original.argmax(-1) == optimized.argmax(-1)
    return same[_positions(mask, same)].double().mean().item()


def perplexity(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """exp(mean cross-entropy) of ``targets`` (samples, positions) under ``logits`` (samples, positions, vocab).

    Position t of ``logits`` must already predict ``targets[:, t]`` (shift by one before calling)."""
    losses = F.cross_entropy(logits.double().flatten(0, -2), targets.flatten(), reduction="none")
    return losses[_positions(mask, targets).flatten()].mean().exp().item()
