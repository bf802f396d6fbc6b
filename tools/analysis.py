"""How well the attention of layers 0 and 1 predicts which masked tokens a step decodes (the premise of
FOCUS): decode with the delayed cache and, at every step, score the mask set by I^(0), I^(1), the delta and
two positional baselines, then compare with what the step decoded. Used by bench.py and eval.py --study.
"""
from __future__ import annotations

import numpy as np
import torch

import focus
from decoder import Options
from generate import encode_prompts, generate_ids
from model import cached_attention



def auc(score, label) -> float:
    """ROC AUC by ranks (Mann-Whitney U), ties averaged."""
    score, label = np.asarray(score, float), np.asarray(label, bool)
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_s = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1, n0 = label.sum(), (~label).sum()
    return float((ranks[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def roc_points(score, label, n=50):
    score, label = np.asarray(score), np.asarray(label, bool)
    cuts = np.quantile(score, np.linspace(1, 0, n))
    return [[float(((score >= c) & ~label).sum() / max((~label).sum(), 1)),
             float(((score >= c) & label).sum() / max(label.sum(), 1))] for c in cuts]


PREDICTORS = ("I0", "I1", "delta", "leftmost", "after-decoded")


def probe_forward(model, dec, seq, col, rows, mask_rows, g):
    """The step's own forward, as the decoder will run it (same rows, same cache writes), keeping what a
    predictor analysis needs: I^(0) and I^(1) of the mask set on the grid (A, m), rounded to the model
    dtype as forward_focus does, and the confidence of every masked row (M,)."""
    cos, sin = model.rope(rows.pos)
    x = model.embed_tokens(dec.tokens[seq, rows.pos])
    importance = []
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(x, cos, sin)
        dec.cache.write(i, rows, k, v)
        if i < 2:
            qg, kg = focus.to_grid(q[mask_rows], g), focus.to_grid(k[mask_rows], g)
            importance.append(focus.token_importance(qg, kg, g.valid, layer.self_attn.scale).to(q.dtype))
        x = layer.finish(x, cached_attention(q, i, rows, dec.cache, layer.self_attn.scale))
    logits = model.logits(x, mask_rows).float()
    logits[:, dec.mask_id] = float("-inf")
    return importance, torch.softmax(logits, -1).amax(-1)


def predictor_probe(model, tok, problems, max_new_tokens: int, threshold: float, batch_size: int,
                    alpha: float = 1.5) -> dict:
    """Decode with the delayed cache; at every step score the masked tokens by I^(0), I^(1), the delta and
    two positional baselines (focus.ranking_score), then label them with what the step decoded.

    Per step and sequence (steps where both labels occur): ROC AUC for "decoded this step", and the
    precision of the top-k (k = tokens decoded). And a measure of what FOCUS needs: at steps where FOCUS
    would evict (more masked tokens than its target), is the token the full model is most confident about
    (the one the threshold rule always decodes) among the `target` best by the score (top1_kept), and
    what share of the tokens decoded are (decoded_kept)."""
    records, pending = [], []

    def hook(dec):
        if pending:
            seq_m, col_m, scores, conf, target = pending.pop()
            records.append((seq_m.cpu().numpy(), {k: v.float().cpu().numpy() for k, v in scores.items()},
                            conf.cpu().numpy(), target.cpu().numpy(), dec.last_step.decoded[seq_m, col_m].cpu().numpy()))
        seq, col, rows, _ = dec.rows(dec.processing())
        mask_rows = dec.masked[seq, col].nonzero().squeeze(1)
        if len(mask_rows) == 0:
            return
        g = focus.grid(seq[mask_rows])
        (i0, i1), conf = probe_forward(model, dec, seq, col, rows, mask_rows, g)
        position = focus.to_grid(col[mask_rows], g, fill=-1)
        delta = focus.importance_delta(i1, i0, i1.dtype)
        grid_scores = {"I0": i0, "I1": i1, "delta": delta, "leftmost": focus.ranking_score("leftmost", delta, position),
                       "after-decoded": focus.ranking_score("after-decoded", delta, position)}
        avg = torch.where(dec.decoded_steps > 0, dec.decoded_sum / dec.decoded_steps.clamp(min=1), 1.0)
        target = focus.retain_target(avg, dec.masked.sum(1) * dec.live, alpha)
        pending.append((seq[mask_rows], col[mask_rows], {k: v[g.line, g.place] for k, v in grid_scores.items()},
                        conf, target[seq[mask_rows]]))

    prompts = encode_prompts(tok, [p.question for p in problems], chat=True)
    with torch.inference_mode():
        generate_ids(model, prompts, tok.mask_id, tok.eos_ids,
                     Options(max_new_tokens=max_new_tokens, threshold=threshold, batch_size=batch_size), step_hook=hook)
    per_step = {n: [] for n in PREDICTORS}
    precision = {n: [] for n in PREDICTORS}
    top1_kept = {n: [] for n in PREDICTORS}
    decoded_kept = {n: [] for n in PREDICTORS}
    pooled = {n: [] for n in PREDICTORS + ("label",)}
    for seq_m, scores, conf, target, label in records:
        for s in np.unique(seq_m):
            sel = seq_m == s
            y, t = label[sel].astype(bool), int(target[sel][0])
            best = int(np.argmax(conf[sel]))
            for name in PREDICTORS:
                v = scores[name][sel]
                order = np.argsort(-v, kind="stable")  # ties to the lower position, as select_retained
                if len(v) > t and y.any():
                    top1_kept[name].append(best in order[:t])
                    decoded_kept[name].append(y[order[:t]].sum() / y.sum())
                if y.all() or not y.any():
                    continue
                per_step[name].append(auc(v, y))
                precision[name].append(y[order[:y.sum()]].mean())  # pick as many as were decoded
                pooled[name] += v.tolist()
            if not (y.all() or not y.any()):
                pooled["label"] += y.tolist()
    out = {}
    for name in PREDICTORS:
        out[name] = {"auc_per_step": float(np.mean(per_step[name])), "auc_pooled": auc(pooled[name], pooled["label"]),
                     "precision_top_k": float(np.mean(precision[name])), "top1_kept": float(np.mean(top1_kept[name])),
                     "decoded_kept": float(np.mean(decoded_kept[name])), "roc": roc_points(pooled[name], pooled["label"])}
    out["steps_with_both_classes"] = len(per_step["I0"])
    out["steps_where_focus_evicts"] = len(top1_kept["I0"])
    out["top_k"] = "k = the number of tokens that step decoded"
    return out
