"""A deliberately simple ToMe written from the paper with Python loops, one sample at a time.

It shares no code with tokencompile: it drives the original model's own submodules eagerly and
merges tokens with explicit loops, so it checks the compiled graph's semantics independently.
"""

import math

import torch


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm().clamp(min=1e-12) * b.norm().clamp(min=1e-12)))


def tome_merge(x, metric, size, r, protected, valid=None, order="official", distill_token=False):
    """Merge r tokens of x [N, C] (ToMe bipartite matching). Returns new x, size and valid lists.

    order="official": the output order of the official ToMe code: the unmerged A tokens in the order of
    the descending score sort (by position when token 0 is a protected class token), then the B tokens;
    with a distillation token [unm[0], b[0], unm[1:], b[1:]]. With padding (``valid``), this project's
    rule: the protected last valid token follows the other real tokens, padding comes last.
    order="keep": every token keeps its position order."""
    n = x.shape[0]
    a_side = [i for i in range(0, n, 2)]
    b_side = [i for i in range(1, n, 2)]
    best = {}
    for a in a_side:
        best_score, best_b = -math.inf, None
        if a not in protected:
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
    ranked = sorted(a_side, key=lambda a: -best[a][0])  # sorted() is stable: ties keep position order
    merged = set(ranked[:r])
    members = {i: [i] for i in range(n) if i not in merged}
    for a in merged:
        members[best[a][1]].append(a)
    if order == "keep":
        kept = [i for i in range(n) if i not in merged]
    else:
        unmerged = ranked[r:]
        if 0 in protected:  # a class token: the official code re-sorts the unmerged A tokens by position
            unmerged = sorted(unmerged)
        kept = [unmerged[0], b_side[0]] + unmerged[1:] + b_side[1:] if distill_token else unmerged + b_side
        if valid is not None:
            last_valid = max(i for i in range(n) if valid[i])
            kept = ([i for i in kept if valid[i] and i != last_valid] + [last_valid]
                    + [i for i in kept if not valid[i]])
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
def timm_vit(model, images, schedule, prop_attn=True, order="official"):
    """ToMe on a timm VisionTransformer (class token, class + distillation token, or neither with
    average pooling, which weights each token by its size); returns logits [B, classes]."""
    assert len(schedule) == len(model.blocks), "one r per block"
    distilled = getattr(model, "dist_token", None) is not None
    outputs = []
    for image in images:
        x = model._pos_embed(model.patch_embed(image[None]))[0]
        size = [1.0] * x.shape[0]
        prefix = set(range(model.num_prefix_tokens))
        for block, r in zip(model.blocks, schedule):
            n, heads = x.shape[0], block.attn.num_heads
            qkv = block.attn.qkv(block.norm1(x)).reshape(n, 3, heads, -1)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            x = x + block.attn.proj(_attention(q, k, v, size, q.shape[-1] ** -0.5, prop_attn=prop_attn))
            r = min(r, (x.shape[0] - len(prefix)) // 2)  # the official cap
            if r:
                x, size, _ = tome_merge(x, k.mean(1), size, r, prefix, order=order, distill_token=distilled)
            x = x + block.mlp(block.norm2(x))
        x = model.norm(x)
        if distilled:
            outputs.append((model.head(x[0]) + model.head_dist(x[1])) / 2)
        elif prefix:
            outputs.append(model.head(x[0]))
        else:
            weights = torch.tensor(size, dtype=x.dtype)
            outputs.append(model.head(model.fc_norm((x * weights[:, None]).sum(0) / weights.sum())))
    return torch.stack(outputs)


@torch.no_grad()
def bert_mean_pooled(model, input_ids, attention_mask, schedule, prop_attn=True, order="official"):
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
                x, size, valid = tome_merge(x, k.mean(1), size, r, {0, last_valid}, valid, order)
            x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
        weights = torch.tensor([s * ok for s, ok in zip(size, valid)], dtype=x.dtype)
        outputs.append((x * weights[:, None]).sum(0) / weights.sum())
    return torch.stack(outputs)
