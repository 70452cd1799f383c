"""A deliberately simple ToMe written from the paper with Python loops, one sample at a time.

It shares no code with tokencompile: it drives the original model's own submodules eagerly and
merges tokens with explicit loops, so it checks the compiled graph's semantics independently.
"""

import math

import torch


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm().clamp(min=1e-12) * b.norm().clamp(min=1e-12)))


def tome_merge(x, metric, size, r, protected, valid=None):
    """Merge r tokens of x [N, C] (ToMe bipartite matching). Returns new x, size and valid lists."""
    n = x.shape[0]
    a_side = [i for i in range(0, n, 2)]
    b_side = [i for i in range(1, n, 2)]
    best = {}
    for a in a_side:
        if a in protected:
            continue
        best_score, best_b = -math.inf, None
        for b in b_side:
            if b in protected:
                continue
            score = _cos(metric[a], metric[b])
            if valid is not None:
                if not valid[a] and not valid[b]:
                    score += 4.0
                elif valid[a] != valid[b]:
                    score -= 4.0
            if score > best_score:
                best_score, best_b = score, b
        best[a] = (best_score, best_b)
    ranked = sorted(best, key=lambda a: -best[a][0])  # sorted() is stable: ties keep position order
    merged = set(ranked[:r])
    members = {i: [i] for i in range(n) if i not in merged}
    for a in merged:
        members[best[a][1]].append(a)
    kept = [i for i in range(n) if i not in merged]
    new_x = torch.stack([sum(x[j] * size[j] for j in members[i]) / sum(size[j] for j in members[i]) for i in kept])
    new_size = [sum(size[j] for j in members[i]) for i in kept]
    new_valid = [valid[i] for i in kept] if valid is not None else None
    return new_x, new_size, new_valid


def _attention(q, k, v, size, scale, key_ok=None, prop_attn=True):
    """q, k, v: [N, H, D] -> [N, H*D], with log(size) added to the logits over keys."""
    logits = torch.einsum("qhd,khd->hqk", q, k) * scale
    if prop_attn:
        logits = logits + torch.log(torch.tensor(size, dtype=q.dtype))[None, None, :]
    if key_ok is not None:
        logits = logits.masked_fill(~torch.tensor(key_ok)[None, None, :], -math.inf)
    out = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v)
    return out.reshape(q.shape[0], -1)


@torch.no_grad()
def timm_vit(model, images, schedule, prop_attn=True):
    """ToMe on a timm VisionTransformer with a class token; returns logits [B, classes]."""
    assert len(schedule) == len(model.blocks), "one r per block"
    outputs = []
    for image in images:
        x = model.patch_embed(image[None])
        x = torch.cat([model.cls_token, x], dim=1) + model.pos_embed
        x = x[0]
        size = [1.0] * x.shape[0]
        prefix = set(range(model.num_prefix_tokens))
        for block, r in zip(model.blocks, schedule):
            n, heads = x.shape[0], block.attn.num_heads
            qkv = block.attn.qkv(block.norm1(x)).reshape(n, 3, heads, -1)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            x = x + block.attn.proj(_attention(q, k, v, size, q.shape[-1] ** -0.5, prop_attn=prop_attn))
            if r:
                x, size, _ = tome_merge(x, k.mean(1), size, r, prefix)
            x = x + block.mlp(block.norm2(x))
        outputs.append(model.head(model.norm(x)[0]))
    return torch.stack(outputs)


@torch.no_grad()
def bert_mean_pooled(model, input_ids, attention_mask, schedule, prop_attn=True):
    """ToMe on a Hugging Face BertModel followed by masked mean pooling."""
    assert len(schedule) == len(model.encoder.layer), "one r per layer"
    outputs = []
    for ids, mask in zip(input_ids, attention_mask):
        x = model.embeddings(input_ids=ids[None])[0]
        valid = [bool(m) for m in mask]
        size = [1.0] * x.shape[0]
        for layer, r in zip(model.encoder.layer, schedule):
            n = x.shape[0]
            attn = layer.attention.self
            heads = attn.num_attention_heads
            q = attn.query(x).reshape(n, heads, -1)
            k = attn.key(x).reshape(n, heads, -1)
            v = attn.value(x).reshape(n, heads, -1)
            context = _attention(q, k, v, size, q.shape[-1] ** -0.5, key_ok=valid, prop_attn=prop_attn)
            out = layer.attention.output
            x = out.LayerNorm(out.dense(context) + x)
            if r:
                last_valid = max(i for i, ok in enumerate(valid) if ok)
                x, size, valid = tome_merge(x, k.mean(1), size, r, {0, last_valid}, valid)
            x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
        weights = torch.tensor([s * ok for s, ok in zip(size, valid)], dtype=x.dtype)
        outputs.append((x * weights[:, None]).sum(0) / weights.sum())
    return torch.stack(outputs)
