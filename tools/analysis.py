"""How well FOCUS predicts which masked tokens a step can decode, and what a miss costs.

- predictor_probe (the premise of FOCUS): decode with the delayed cache and, at every step, score the mask set
  by I^(0), I^(1), the delta and two positional baselines, then compare with what the step decoded. Used by
  bench.py and eval.py --study.
- oracle_probe (where FOCUS's extra steps come from): decode with FOCUS and, before every step, find what the
  full model would decode at that step (a side forward of every masked row through every layer, its cache
  writes undone); then count how many of those the kept set held, and whether a miss was the ranking's or the
  target's (the cap). It can also rank by those true confidences (the oracle ranking), and keep exactly as
  many as the rule decodes (the oracle target): the headroom left above any ranking. Used by eval.py --oracle.
"""
from __future__ import annotations

import numpy as np
import torch

import focus
from decoder import Options, unmask
from generate import encode_prompts, generate_ids



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
        x = layer.finish(x, layer.attend(q, i, rows, dec.cache))
    logits = model.logits(x, mask_rows).float()
    logits[:, dec.mask_id] = float("-inf")
    return importance, torch.softmax(logits, -1).amax(-1)


def step_signals(model, dec):
    """The step the decoder is about to take, run through probe_forward, and what a ranking reads of it: the
    masked rows' slots and block positions (M,), their grid, the Signals (no confidence) and the masked rows'
    confidences (M,); None when nothing is masked."""
    plan = dec.plan()
    seq, col, rows = plan.seq, plan.col, plan.rows
    mask_rows = dec.masked[seq, col].nonzero().squeeze(1)
    if len(mask_rows) == 0:
        return None
    g = focus.grid(seq[mask_rows])
    (i0, i1), conf = probe_forward(model, dec, seq, col, rows, mask_rows, g)
    position = focus.to_grid(col[mask_rows], g, fill=-1)
    signals = focus.Signals(i0, i1, focus.importance_delta(i1, i0, i1.dtype), position, torch.zeros_like(i0))
    return seq[mask_rows], col[mask_rows], g, signals, conf


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
        step = step_signals(model, dec)
        if step is None:
            return
        seq_m, col_m, g, s, conf = step
        grid_scores = {"I0": s.importance_0, "I1": s.importance_1, "delta": s.delta,
                       "leftmost": focus.ranking_score("leftmost", s), "after-decoded": focus.ranking_score("after-decoded", s)}
        avg = torch.where(dec.decoded_steps > 0, dec.decoded_sum / dec.decoded_steps.clamp(min=1), 1.0)
        target = focus.retain_target(avg, dec.masked.sum(1) * dec.live, alpha)
        pending.append((seq_m, col_m, {k: v[g.line, g.place] for k, v in grid_scores.items()}, conf, target[seq_m]))

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
    if not per_step["I0"]:  # every step decoded all its masked tokens or none (a budget of one token): no ranking
        raise ValueError("the predictor analysis found no step that decoded some masked tokens and not others, so "
                         "there is nothing to score; raise --max-new-tokens or give more problems")
    out = {}
    for name in PREDICTORS:
        out[name] = {"auc_per_step": float(np.mean(per_step[name])), "auc_pooled": auc(pooled[name], pooled["label"]),
                     "precision_top_k": float(np.mean(precision[name])), "top1_kept": mean(top1_kept[name]),
                     "decoded_kept": mean(decoded_kept[name]), "roc": roc_points(pooled[name], pooled["label"])}
    out["steps_with_both_classes"] = len(per_step["I0"])
    out["steps_where_focus_evicts"] = len(top1_kept["I0"])
    out["top_k"] = "k = the number of tokens that step decoded"
    return out


def mean(values: list) -> float | None:
    """The mean, or None where there is nothing to average (FOCUS never evicted: nothing was kept or not)."""
    return float(np.mean(values)) if values else None


def figure(value: float | None) -> str:
    """A share for a report: 0.123, or - where it is absent."""
    return "-" if value is None else f"{value:.3f}"


ORACLES = (None, "ranking", "ranking+target")
STUDIED = ("delta", "leftmost", "I1", "confidence", "delta+position", "delta+confidence", "probe")  # eval --oracle


def oracle_probe(model, tok, prompts: list[str], opts: Options, oracle: str | None = None):
    """Decode `prompts` (chat) with opts (FOCUS, with its ranking) and measure each step against the full model.
    oracle: None, the decoder's own ranking; "ranking": rank by the full model's confidences at this step;
    "ranking+target": that, and the target set to exactly the number of tokens the rule decodes.
    Returns (summary dict, generate_ids' outputs). Per sequence and step where FOCUS evicts (more masked tokens
    than its target): decodable = what the unmasking rule would pick from the full model's confidences;
    recall = decodable tokens kept / decodable; a missed token is counted against the cap when more tokens
    were decodable than the target, up to the difference, and against the ranking otherwise."""
    if oracle not in ORACLES:
        raise ValueError(f"unknown oracle {oracle!r}; use one of {ORACLES[1:]}")
    if not opts.focus:  # nothing is evicted: no side forward needed
        ids = encode_prompts(tok, prompts, chat=True)
        with torch.inference_mode():
            out = generate_ids(model, ids, tok.mask_id, tok.eos_ids, opts)
        return {"evicting_steps": 0, "decodable": 0, "kept": 0, "missed_by_cap": 0, "missed_by_ranking": 0,
                "recall": 1.0, "steps": sum(len(stats["decoded"]) for _, stats in out)}, out
    if oracle is not None and opts.focus_rank != "confidence":
        raise ValueError("an oracle ranks by the true confidences: pass focus_rank='confidence'")
    totals = {"evicting_steps": 0, "decodable": 0, "kept": 0, "missed_by_cap": 0, "missed_by_ranking": 0}
    pending = []

    def settle(dec):
        """Score the previous step now that its kept set is known."""
        if not pending:
            return
        decodable, target, evicting = pending.pop()
        kept = dec.last_step.kept & decodable
        n_dec, n_kept = decodable.sum(1)[evicting], kept.sum(1)[evicting]
        by_cap = torch.minimum((n_dec - target[evicting]).clamp(min=0), n_dec - n_kept)
        totals["evicting_steps"] += int(evicting.sum())
        totals["decodable"] += int(n_dec.sum())
        totals["kept"] += int(n_kept.sum())
        totals["missed_by_cap"] += int(by_cap.sum())
        totals["missed_by_ranking"] += int((n_dec - n_kept - by_cap).sum())

    def hook(dec):
        settle(dec)
        confidence, candidate = full_model_confidence(model, dec)
        if candidate is None:
            return
        decodable = unmask(confidence, candidate, opts.strategy, opts.threshold, opts.tokens_per_step)
        if oracle is not None:
            dec.confidence = confidence
        target = decodable.sum(1).clamp(min=1) if oracle == "ranking+target" else dec.retain_target()
        if oracle == "ranking+target":
            dec.retain_target = lambda: torch.where(dec.masked.sum(1) * dec.live > 0,
                                                    torch.minimum(target, dec.masked.sum(1)), 0)
        evicting = dec.live & (candidate.sum(1) > target)
        pending.append((decodable, target, evicting))
        last["dec"] = dec

    last = {}
    ids = encode_prompts(tok, prompts, chat=True)
    with torch.inference_mode():
        out = generate_ids(model, ids, tok.mask_id, tok.eos_ids, opts, step_hook=hook)
        if last:
            settle(last["dec"])
    summary = dict(totals)
    summary["recall"] = totals["kept"] / max(totals["decodable"], 1)
    summary["steps"] = sum(len(stats["decoded"]) for _, stats in out)
    return summary, out


def full_model_confidence(model, dec):
    """The full model's confidence in every masked token of every live block at this step, (S, block) fp32, and
    which positions those are (S, block) bool, or (None, None) when nothing is masked. The side forward runs
    the rows the step computes, all through every layer, then puts back the keys and values it overwrote, so
    the decode goes on as if it had not run."""
    plan = dec.plan()
    seq, col, rows = plan.seq, plan.col, plan.rows
    if len(seq) == 0:
        return None, None
    is_mask = dec.masked[seq, col]
    mask_rows = is_mask.nonzero().squeeze(1)
    if len(mask_rows) == 0:
        return None, None
    saved = dec.cache.k[:, rows.seq, :, rows.pos].clone(), dec.cache.v[:, rows.seq, :, rows.pos].clone()
    logits = model.forward_rows(dec.tokens[seq, rows.pos], rows, dec.cache, logits_for=mask_rows).float()
    dec.cache.k[:, rows.seq, :, rows.pos], dec.cache.v[:, rows.seq, :, rows.pos] = saved
    logits[:, dec.mask_id] = float("-inf")
    confidence = torch.zeros(dec.masked.shape, device=logits.device)
    confidence[seq[mask_rows], col[mask_rows]] = torch.softmax(logits, -1).amax(-1)
    candidate = torch.zeros_like(dec.masked)
    candidate[seq[mask_rows], col[mask_rows]] = True
    return confidence, candidate


def probe_prompts(n: int) -> list[str]:
    """Training prompts (never held out) of the long workload's kinds, shuffled: n arithmetic and list
    problems, n / 2 multi-step problems, n / 2 story prompts."""
    import random

    import data
    prompts = [p.question for p in data.make_problems("train", n)]
    prompts += [p.question for p in data.make_problems("train", n // 2, family="multistep")]
    prompts += [q for q, _ in data.story_samples(n // 2, 7)]
    random.Random(0).shuffle(prompts)
    return prompts


def fit_probe(model, tok, prompts: list[str], opts: Options, steps: int = 2000, lr: float = 0.5):
    """The logistic probe behind focus.ranking_score("probe"): decode `prompts` with the delayed cache (opts
    without FOCUS), and at every step where the mask set holds more than one token take each masked token's
    features (focus.probe_features) and its label, decoded at this step or not (the delayed cache computes
    every masked token through every layer, so its step decodes what the full model decodes). Then fit
    w, b by gradient descent on the mean logistic loss. Returns (weights, bias, number of examples)."""
    features, labels, pending = [], [], []

    def hook(dec):
        if pending:
            seq_m, col_m, f = pending.pop()
            features.append(f)
            labels.append(dec.last_step.decoded[seq_m, col_m].float())
        step = step_signals(model, dec)
        if step is None:
            return
        seq_m, col_m, g, signals, _ = step
        several = (g.valid.sum(1) > 1)[g.line]                          # a set of one needs no ranking
        pending.append((seq_m[several], col_m[several], focus.probe_features(signals)[g.line, g.place][several]))

    ids = encode_prompts(tok, prompts, chat=True)
    with torch.inference_mode():
        generate_ids(model, ids, tok.mask_id, tok.eos_ids, opts, step_hook=hook)
    if not sum(len(f) for f in features):  # no mask set of more than one token: no example, NaN weights
        raise ValueError("the probe fit found no step with more than one masked token to rank; raise "
                         "--max-new-tokens or give more problems")
    x, y = torch.cat(features).float(), torch.cat(labels)
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= lr * gw
            b -= lr * gb
    return [round(float(v), 3) for v in w.detach()], round(float(b.detach()), 3), len(y)
