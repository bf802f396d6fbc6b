"""The two objectives train.py trains with, one per phase (tools/train.py says why two phases).

Phase 1, autoregressive: next-token cross-entropy on every token of every packed example, attention causal
inside each example (ar_loss_fn).

Phase 2, block diffusion (as BD3-LM and SDAR train): a sequence is cut into blocks of `block_size`. Each block
of a noised copy gets its own noise level t ~ U(eps, 1) and each of its trainable tokens is replaced by the mask
token with probability t. The model sees, in one pass, the noised copy and the clean copy side by side: a noised
block attends to itself (both directions) and to the clean copy's earlier blocks; the clean copy is
block-causal. The loss is the cross-entropy on the masked positions weighted by 1/t (the masked-diffusion ELBO
weight; SDAR's trainer divides by the same p_mask), averaged over the trainable tokens. No shift: a masked
position predicts its own token (loss_fn).

Batches are packed rows (train.pack): ids, doc (each position's example, -1 for padding) and pos (its position
in the example), all (B, S).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------
# Phase 1: next-token prediction.

def causal_mask(doc, pos):
    """(B, S, S) bool: a position sees the positions at or before it in its own example. Padding (doc -1)
    sees itself only, so no row is empty."""
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    eye = torch.eye(doc.shape[1], dtype=torch.bool, device=doc.device)[None] & (doc[:, :, None] < 0)
    return (same_doc & (pos[:, None, :] <= pos[:, :, None])) | eye


def ar_loss_fn(model, ids, doc, pos, trainable=None):
    """Next-token cross-entropy: position p of an example predicts its token p + 1. Every token of the
    example is a target, prompt included (an autoregressive model learns the whole text)."""
    hidden = model_hidden(model, ids, pos, causal_mask(doc, pos))
    has_next = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)           # (B, S-1)
    logits = model.lm_head(model.norm(hidden[:, :-1][has_next])).float()   # (targets, vocab)
    loss = F.cross_entropy(logits, ids[:, 1:][has_next])
    return loss, loss


# ---------------------------------------------------------------------------------------------------
# Phase 2: block diffusion.

def two_copy_mask(doc, pos, block_size: int):
    """(B, 2S, 2S) bool for [noised copy, clean copy], as BD3-LM/SDAR train. Within one example:
    noised block -> same noised block (both directions) and earlier clean blocks; clean -> clean block-causal.
    Padding positions (doc -1) only see themselves, so no row is empty."""
    blk = pos // block_size
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    same_blk = same_doc & (blk[:, :, None] == blk[:, None, :])
    earlier = same_doc & (blk[:, None, :] < blk[:, :, None])
    causal = same_blk | earlier
    eye = torch.eye(doc.shape[1], dtype=torch.bool, device=doc.device)[None] & (doc[:, :, None] < 0)
    top = torch.cat([same_blk | eye, earlier], dim=2)
    bottom = torch.cat([torch.zeros_like(causal), causal | eye], dim=2)
    return torch.cat([top, bottom], dim=1)


def noise(ids, doc, pos, trainable, block_size: int, mask_id: int, eps: float = 1e-3, generator=None):
    """Mask each trainable token with its block's probability t ~ U(eps, 1). Returns noised ids, the masked
    positions and t per position."""
    B, S = ids.shape
    t = eps + (1 - eps) * torch.rand(B, S // block_size + 1, device=ids.device, generator=generator)
    # one t per (row, example, block): key the block by its start in the row
    start = torch.arange(S, device=ids.device) - pos % block_size
    t = t.gather(1, (start // block_size).expand(B, S))
    masked = trainable & (torch.rand(B, S, device=ids.device, generator=generator) < t)
    return torch.where(masked, mask_id, ids), masked, t


def loss_fn(model, ids, doc, pos, trainable, block_size, mask_id, generator=None):
    """Block-diffusion loss: cross-entropy on masked positions of the noised copy, weighted by 1/t."""
    noised, masked, t = noise(ids, doc, pos, trainable, block_size, mask_id, generator=generator)
    x = torch.cat([noised, ids], 1)
    positions = torch.cat([pos, pos], 1)
    hidden = model_hidden(model, x, positions, two_copy_mask(doc, pos, block_size))
    h = hidden[:, :ids.shape[1]][masked]                       # (masked tokens, hidden)
    logits = model.lm_head(model.norm(h)).float()
    ce = F.cross_entropy(logits, ids[masked], reduction="none")
    loss = (ce / t[masked]).sum() / trainable.sum().clamp(min=1)
    return loss, ce.mean()


def model_hidden(model, input_ids, position_ids, mask):
    """The spec forward with an explicit (B, S, S) mask, without the head (logits only where needed)."""
    cos, sin = model.rope(position_ids)
    x = model.embed_tokens(input_ids)
    for layer in model.layers:
        q, k, v = layer.qkv(x, cos, sin)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask[:, None], scale=layer.self_attn.scale, enable_gqa=True)
        x = layer.finish(x, attn.transpose(1, 2))
    return x
