"""FOCUS (arXiv 2601.23278): predict after layer 1 which masked tokens will be decoded, and compute only
those in layers 2..L.

Each step of a block, per sequence, over its mask set M (the block's still-masked slots, in block order):
1. token importance at layers 0 and 1 from the attention scores among M       token_importance()
2. the delta dI_j = I^(1)_j - I^(0)_j ranks the tokens                          importance_delta()
3. keep about alpha x (average tokens decoded per step) of them                retain_target()
4. selection: top-target or the mean+std set, adjacency, fallback, progress    select_retained()
5. compact the running state and run layers 1 (attention) .. L on the kept     forward_focus()

Everything works on a batch at once: the mask sets of all sequences are laid out on a padded grid
(A sequences x m places) with a `valid` mask; a place is a token's index in its mask set, its block position
is `position`. Rules follow the public reference implementation (an LMDeploy fork); where this code differs
it says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

import kernels
from model import Rows, RowsAhead, layout_sizes, ragged_layout


# ---------------------------------------------------------------------------------------------------
# The mask-set grid: the masked rows of a whole ragged batch on one padded (A sequences x m places) grid.

@dataclass
class Grid:
    active: torch.Tensor  # (A,) cache slots with a non-empty mask set
    line: torch.Tensor    # (M,) each masked row's line on the grid
    place: torch.Tensor   # (M,) and its place in the line (its index in the mask set)
    valid: torch.Tensor   # (A, m) bool


def grid(seq_of_row: torch.Tensor) -> Grid:
    """Layout of M masked rows, grouped by sequence in set order, on an (A, m) grid."""
    num_slots = int(seq_of_row.max()) + 1 if len(seq_of_row) else 0
    counts, line, place = ragged_layout(seq_of_row, num_slots)
    active = counts.nonzero().squeeze(1)
    counts = counts[active]                                                # (A,) the mask sets' sizes
    width = int(counts.max()) if len(counts) else 0
    valid = torch.arange(width, device=seq_of_row.device) < counts[:, None]
    return Grid(active, line, place, valid)


def to_grid(x: torch.Tensor, g: Grid, fill=0):
    """x (M, ...) -> (A, m, ...), padding filled with `fill`."""
    out = x.new_full((g.valid.shape[0], g.valid.shape[1], *x.shape[1:]), fill)
    out[g.line, g.place] = x
    return out


def token_importance(q, k, valid, scale: float):
    """Eq. (importance): I_j = sum_h sum_i softmax_j( MaxPool1D( S^(h)_{i,j} ) ),  S^(h)_{i,j} = q_i.k_j * scale.

    q: (A, m, heads, head_dim) and k: (A, m, kv_heads, head_dim), post-norm and post-RoPE, of the masked
    tokens only, in block order; valid (A, m) marks real places. Returns I (A, m) in fp32.
    - keys are the mask set alone (no context, no decoded tokens) and there is no causal mask;
    - the max-pool (window 3) runs along the key axis in set order: the neighbours of a masked token are the
      previous and next masked tokens, whatever decoded tokens lie between; missing ends count as -inf;
    - grouped-query attention: query head h reads kv head h // (heads / kv_heads), as the model does.
    """
    A, m, heads, _ = q.shape
    k = k.repeat_interleave(heads // k.shape[2], dim=2)                       # (A, m, heads, head_dim)
    scores = torch.einsum("aihd,ajhd->ahij", q.float(), k.float()) * scale   # (A, heads, m queries, m keys)
    key_ok = valid[:, None, None, :]
    scores = scores.masked_fill(~key_ok, float("-inf"))
    pooled = max_pool3(scores).masked_fill(~key_ok, float("-inf"))           # pooling spreads into padding
    probs = torch.softmax(pooled, dim=-1) * valid[:, None, :, None]           # only masked queries vote
    return probs.sum(dim=(1, 2))


def max_pool3(scores):
    """MaxPool1D, window 3, stride 1, along the last axis: out_j = max(s_{j-1}, s_j, s_{j+1}), -inf past the ends."""
    pad = torch.full_like(scores[..., :1], float("-inf"))
    left = torch.cat([pad, scores[..., :-1]], dim=-1)
    right = torch.cat([scores[..., 1:], pad], dim=-1)
    return torch.maximum(scores, torch.maximum(left, right))


def ragged_importance(q, k, g: Grid, scale: float):
    """Importance of every masked row of the batch in one call: q (M, heads, head_dim), k (M, kv_heads,
    head_dim) -> (A, m)."""
    return token_importance(to_grid(q, g), to_grid(k, g), g.valid, scale)


def importance_delta(importance_1, importance_0, dtype: torch.dtype):
    """dI_j = I^(1)_j - I^(0)_j. Both are rounded to the model's dtype first, as the reference does
    (importance.to(query dtype)); the difference is taken in fp32. Subtracting layer 0 removes what both
    layers share ("common-mode rejection"), leaving what layer 1 learned about decodability."""
    return importance_1.to(dtype).float() - importance_0.to(dtype).float()


def retain_target(avg_decoded, mask_count, alpha: float):
    """How many masked tokens to keep: min(L, max(1, ceil(max(avg, 1) * alpha))), and 0 when L = 0.

    avg_decoded (S,): running average of tokens decoded per step in this block (1.0 before any step counted);
    mask_count (S,): L, the size of the mask set. A sequence evicts only if L > target."""
    target = torch.ceil(avg_decoded.clamp(min=1.0) * alpha).long().clamp(min=1)
    return torch.where(mask_count > 0, torch.minimum(target, mask_count), 0)


TARGETS = ("reference", "near-threshold", "saturation")
NEAR = 0.3  # near-threshold: a token counts when its last confidence came within this of the threshold


def near_threshold_target(target, confidence, masked, threshold: float):
    """Beyond the paper: the reference's target, raised to the number of masked tokens whose confidence at the
    last step that computed them came within NEAR of the threshold, the tokens likely to be decodable now.
    target (S,); confidence, masked (S, block)."""
    near = ((confidence >= threshold - NEAR) & masked).sum(1)
    return torch.maximum(target, torch.minimum(near, masked.sum(1)))


def saturation_target(target, last_target, saturated, mask_count):
    """Beyond the paper: after a step that decoded every masked token it kept while it evicted others (the cap,
    not the threshold, limited it), keep twice as many as that step's target, else the reference's target.
    target, last_target, mask_count (S,); saturated (S,) bool, reset at each block's start."""
    grown = torch.minimum(2 * last_target, mask_count)
    return torch.where(saturated, torch.maximum(target, grown), target)


def select_retained(score, valid, position, target, progress):
    """Which masked tokens stay in layers 2..L. All (A, m) on the mask-set grid except target and progress (A,).

    score: what ranks the tokens (the paper: the delta; ranking_score gives the others); position: each
    token's position in the block; progress: the rightmost block position kept by an earlier step of this
    block (-1 at the block's start). The rules, in the reference's order:
    1. no eviction unless L > target: keep the whole mask set;
    2. base set: the `target` highest scores (ties to the lower position), unless at least `target` tokens
       reach mean + std of the scores (population std), in which case exactly those;
    3. adjacency, one leftward pass against the base set: a token whose right neighbour in the set sits at
       the next block position and is in the base set is kept too (no cascade);
    4. nothing kept: keep everything;
    5. progress: a never-computed token left of the rightmost kept one cannot be skipped, so every masked
       token between `progress` and the rightmost kept position is kept.
    """
    m = score.shape[1]
    count = valid.sum(1)
    evicting = (target > 0) & (count > target)                              # rule 1
    s = score.masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices      # rule 2: stable, ties keep set order
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(m, device=s.device).expand_as(order))
    top = valid & (rank < target[:, None])
    n = count.clamp(min=1)[:, None]
    mean = (score * valid).sum(1, keepdim=True) / n
    std = (((score - mean) ** 2) * valid).sum(1, keepdim=True).div(n).sqrt()
    over = valid & (score >= mean + std)
    base = torch.where((over.sum(1) >= target)[:, None], over, top)
    base = torch.where(evicting[:, None], base, valid)                      # rule 1
    right_kept = torch.zeros_like(base)                                     # rule 3
    right_kept[:, :-1] = base[:, 1:] & (position[:, 1:] == position[:, :-1] + 1)
    kept = base | (valid & right_kept)
    kept = torch.where(kept.any(1, keepdim=True), kept, valid)              # rule 4
    rightmost = position.masked_fill(~kept, -1).amax(1, keepdim=True)       # rule 5
    return kept | (valid & (position < rightmost) & (position > progress[:, None]))


RANKINGS = ("delta", "random", "negated-delta", "leftmost", "after-decoded", "I1", "confidence", "delta+position",
            "delta+confidence", "probe")


@dataclass
class Signals:
    """What a ranking may read, each (A, m) on the mask-set grid."""
    importance_0: torch.Tensor  # I^(0)
    importance_1: torch.Tensor  # I^(1)
    delta: torch.Tensor         # dI = I^(1) - I^(0)
    position: torch.Tensor      # block position (-1 on padding)
    confidence: torch.Tensor    # each token's confidence at the last step that computed it to the last layer (0: none)

    @property
    def valid(self):
        return self.position >= 0


def ranking_score(rank_by: str, s: Signals, generator=None):
    """The score select_retained ranks the mask set by, (A, m) on the grid. The paper ranks by the delta.
    Controls for the ablation (the paper's top / random / bottom test), and positional baselines that use no
    attention at all:
    - random: uniform noise; negated-delta: the paper's "bottom";
    - leftmost: the leftmost masked token first (decoding order of an autoregressive model);
    - after-decoded: a masked token right of a decoded one (or first in its block) first, then leftmost first.
    Beyond the paper (each a cheap function of what the step already has; none adds a host sync):
    - I1: layer 1's importance alone, without subtracting layer 0's;
    - confidence: the token's confidence at the last step that computed it to the last layer (ES-dLLM's
      signal, arXiv 2603.10088), free: the decoder keeps it;
    - delta+position, delta+confidence: the delta's rank within the mask set plus the other signal's
      (rank-normalised, so neither scale dominates);
    - probe: a logistic probe on layer-0/1 features and positions (probe_score), fitted offline.
    Everything else (target, rules, progress) stays the same, so a comparison isolates the ranking."""
    if rank_by == "delta":
        return s.delta
    if rank_by == "negated-delta":
        return -s.delta
    if rank_by == "random":
        return torch.rand(s.delta.shape, generator=generator, device=s.delta.device)
    if rank_by == "leftmost":
        return -s.position.float()
    if rank_by == "after-decoded":
        return after_decoded(s.position).float() * (s.position.shape[1] + 1) * 4 - s.position.float()
    if rank_by == "I1":
        return s.importance_1.float()
    if rank_by == "confidence":
        return s.confidence
    if rank_by == "delta+position":
        return rank_within(s.delta, s.valid) + rank_within(-s.position.float(), s.valid)
    if rank_by == "delta+confidence":
        return rank_within(s.delta, s.valid) + rank_within(s.confidence, s.valid)
    if rank_by == "probe":
        return probe_score(s)
    raise ValueError(f"unknown ranking {rank_by!r}; use one of {', '.join(RANKINGS)}")


def after_decoded(position):
    """(A, m) bool: the token's left neighbour in the block is not masked (or it is first in its block)."""
    previous = torch.cat([torch.full_like(position[:, :1], -2), position[:, :-1]], dim=1)  # previous set element
    return (position == 0) | (previous != position - 1)


def rank_within(score, valid):
    """Each token's rank within its mask set, scaled to [0, 1]: 1 for the highest score, 0 for the lowest
    (ties to the lower position). Padding gets 0."""
    order = torch.sort(score.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
    place = torch.empty_like(order).scatter_(1, order, torch.arange(score.shape[1], device=score.device)
                                             .expand_as(order))   # 0 for the best; padding sorts last
    return (1 - place / (valid.sum(1, keepdim=True) - 1).clamp(min=1)).masked_fill(~valid, 0)


# probe: logistic regression on the features below (label: the full model decodes the token at that step),
# fitted on 97,694 masked tokens of delayed-cache decodes of the shipped model on training prompts:
# `python tools/eval.py --fit-probe -n 64` (tools/analysis.py::fit_probe).
PROBE_FEATURES = ("rank of I0", "rank of I1", "rank of delta", "rank of leftmost", "after decoded")
PROBE_WEIGHTS = (0.442, 1.523, 0.797, -0.042, 1.169)
PROBE_BIAS = -3.158


def probe_features(s: Signals):
    """(A, m, F): the probe's features, each in [0, 1]."""
    v = s.valid
    return torch.stack([rank_within(s.importance_0.float(), v), rank_within(s.importance_1.float(), v),
                        rank_within(s.delta, v), rank_within(-s.position.float(), v),
                        after_decoded(s.position).float()], dim=-1)


def probe_score(s: Signals):
    features = probe_features(s).unbind(-1)  # weights as Python numbers: no host-to-device copy (CUDA graphs)
    return sum(w * f for w, f in zip(PROBE_WEIGHTS, features)) + PROBE_BIAS


def compact(keep, *tensors):
    """Order-preserving gather of the kept rows: keep (K,) ascending row indices; tensors (T, ...) each."""
    return tuple(t.index_select(0, keep) for t in tensors)


def kept_first(flags):
    """(T,) bool -> (T,) row indices: the flagged rows, ascending, then the others, ascending. A stable partition
    by cumulative sums: no host sync and no size that depends on the data (torch.compile need not specialize)."""
    n_flagged = flags.sum()
    dest = torch.where(flags, flags.cumsum(0) - 1, n_flagged + (~flags).cumsum(0) - 1)  # each row's new index
    return torch.empty_like(dest).scatter_(0, dest, torch.arange(len(flags), device=flags.device))


class Compacted(NamedTuple):
    """The compaction before its host read (compaction): T rows (T: the step's rows, or a graph's padded ones)
    with the kept ones first; read_compacted keeps the first K."""
    keep: torch.Tensor        # (T,) row indices, the kept rows first
    rows: RowsAhead           # their layout; rows past the K-th sit in the spare slot
    x: torch.Tensor           # (T, hidden) hidden states after layer 0, in keep's order
    q1: torch.Tensor          # (T, heads, head_dim) layer 1's queries, in keep's order
    last_kept: torch.Tensor   # (S,) each sequence's rightmost kept block position (-1: none)
    logit_rows: torch.Tensor  # (T,) indices into keep: the kept masked rows first
    sizes: torch.Tensor       # (8,) what the host reads: K, the kept masked rows' count, then layout_sizes


@dataclass
class Selected:
    """A FOCUS step up to the selection (select_step), what the rest of the step (finish_step) needs."""
    x: torch.Tensor          # (T, hidden) hidden states after layer 0
    q1: torch.Tensor         # (T, heads, head_dim) layer 1's queries
    kept: torch.Tensor       # (T,) bool: the selection's rows for layers 2..L (decoded, uncached rows always)
    compacted: Compacted | None = None  # the compaction's device side, where the first graph ran it


@dataclass
class FocusOutput:
    logits: torch.Tensor         # (R, vocab) for the kept masked rows
    logit_rows: torch.Tensor     # (R,) their indices among the step's rows
    kept: torch.Tensor           # (T,) bool: row computed in layers 2..L
    rightmost_kept: torch.Tensor  # (S,) block position of each sequence's last kept row (-1: none)


def forward_focus(model, input_ids, rows: Rows, cache, is_mask_row, col, block_start, progress, target,
                  rank_by: str = "delta", generator=None, graphs: bool = False, confidence=None,
                  evicting: bool | None = None, num_masked: int | None = None) -> FocusOutput:
    """One decode step with FOCUS. input_ids, is_mask_row, col (block positions): (T,) for the step's rows;
    block_start, progress, target: (S,) per cache slot; rank_by: the ranking score (ranking_score: the delta,
    an ablation control or a ranking beyond the paper); graphs: the layers before and after the selection as
    two CUDA graphs (kernels.graphed, on CUDA); confidence (S, block): each block position's confidence at
    the last step that computed it (for the rankings that read it; zeros when None); evicting (does any
    sequence evict, evicts()) and num_masked (is_mask_row's count): known to a caller that read them in a host
    sync of its own (Decoder.plan), or found here, a sync each.

    Layer 0 runs all rows and gives I^(0); layer 1 computes q, k, v for all rows, writes their keys/values
    (so the next steps and the evicted tokens' layer-1 entries are fresh), gives I^(1), and selects; then
    the state is compacted and layer 1's attention and layers 2..L run the kept rows only. Evicted tokens
    keep, in layers 2..L, the keys/values of the last step that computed them, and kept rows attend up to
    the rightmost kept position of their block (the reference's kv_len after eviction).
    """
    if evicting is None:
        evicting = evicts(rows, is_mask_row, target)
    if not evicting:  # nobody in the batch evicts: the plain forward
        mask_rows = (is_mask_row.nonzero() if num_masked is None
                     else torch.nonzero_static(is_mask_row, size=num_masked)).squeeze(1)
        logits = model.forward_rows(input_ids, rows, cache, logits_for=mask_rows, graphs=graphs)
        return FocusOutput(logits, mask_rows, torch.ones_like(is_mask_row), rightmost(rows.seq, col, None, len(target)))
    selected = select_step(model, input_ids, rows, cache, is_mask_row, col, progress, target, rank_by, generator,
                           graphs, confidence, block_start)
    return finish_step(model, selected, rows, cache, is_mask_row, col, block_start, graphs)


def evicts(rows: Rows, is_mask_row, target) -> bool:
    """Does any sequence of the step evict? One host sync."""
    mask_count = torch.zeros_like(target).index_add_(0, rows.seq, is_mask_row.long())
    return bool(evicting(mask_count, target).any())


def evicting(mask_count, target):
    """(S,) bool: the sequences that evict, those with more masked rows than their target (rule 1; a target of 0:
    nothing to decode, nothing evicted)."""
    return (target > 0) & (mask_count > target)


def select_step(model, input_ids, rows: Rows, cache, is_mask_row, col, progress, target, rank_by="delta",
                generator=None, graphs: bool = False, confidence=None, block_start=None,
                recorded_kept=None) -> Selected:
    """Layers 0 and 1 up to the selection on every row, then Eq. (importance) at both layers, the delta, the
    ranking score and the selection rules on the mask sets (arguments as forward_focus). graphs: all of it
    inside the first CUDA graph, through the static-shape form below (select_in_graph), and with it the
    compaction's device side (which needs block_start). recorded_kept (T,) bool: rows kept instead of the
    selection's (tools/replay.py replays a recorded schedule; the selection still runs, so the step costs the
    same)."""
    # (the random ranking draws from a generator, which a graph cannot replay: it runs plain)
    if graphs and kernels.captures(model, rows.pos.device) and rank_by != "random":
        return select_in_graph(model, input_ids, rows, cache, is_mask_row, col, progress, target, rank_by,
                               confidence, block_start, recorded_kept)
    x, q0, k0, q1, k1 = early_layers(model, model.embed_tokens(input_ids), rows, cache)
    mask_rows = is_mask_row.nonzero().squeeze(1)                      # the mask sets, in set order
    g = grid(rows.seq[mask_rows])
    importance = [ragged_importance(q[mask_rows], k[mask_rows], g, model.layers[i].self_attn.scale)
                  for i, (q, k) in enumerate(((q0, k0), (q1, k1)))]
    delta = importance_delta(importance[1], importance[0], q1.dtype)
    position = to_grid(col[mask_rows], g, fill=-1)
    conf = 0.0 if confidence is None else confidence[rows.seq[mask_rows], col[mask_rows]]
    signals = Signals(importance[0], importance[1], delta, position,
                      to_grid(torch.zeros_like(delta[g.line, g.place]) + conf, g))
    score = ranking_score(rank_by, signals, generator)
    kept_grid = select_retained(score, g.valid, position, target[g.active], progress[g.active])
    kept = torch.ones_like(is_mask_row)
    kept[mask_rows] = kept_grid[g.line, g.place]                       # decoded, uncached rows always stay
    return Selected(x, q1, kept if recorded_kept is None else recorded_kept)


# ---------------------------------------------------------------------------------------------------
# The same selection on static shapes, so that it runs inside the first CUDA graph (--compile).
#
# select_step lays the mask sets out on a grid as wide as the widest set, which it learns from the host (a
# sync), and gathers the masked rows by index lists of data-dependent length. A CUDA graph can do neither.
# Inside a graph the rows already sit on a fixed grid (one line per cache slot, a bucketed number of places,
# kernels.graphed), so the mask sets are laid out on that grid instead: a masked row's place in its set is the
# number of masked rows before it in its line, and every other row is parked in one spare column. The same
# functions as above (token_importance, importance_delta, ranking_score, select_retained) then run on wider,
# padded lines; padding is invalid everywhere, so each set's result is the same. The compaction's device side
# (compaction) follows in the same graph, on the padded rows: padding rows are never kept, so they sort after
# the kept ones and the first K are the same. Tested against select_step and compact_step (tests/test_kernels.py).

def select_in_graph(model, input_ids, rows: Rows, cache, is_mask_row, col, progress, target, rank_by,
                    confidence, block_start, recorded_kept=None) -> Selected:
    """select_step with layers 0-1, the whole selection and the compaction's device side as one CUDA graph
    (kernels.graphed). Per-slot inputs travel as per-row tensors (each row carries its sequence's target,
    progress and block start), since a graph's inputs are padded by rows."""
    conf = (torch.zeros(col.shape, device=col.device) if confidence is None
            else confidence[rows.seq, col].float())
    early = kernels.graphed(early_layers_and_selection)
    x, q1, kept, compacted = early(model, model.embed_tokens(input_ids), rows, cache, is_mask_row, col,
                                   target[rows.seq], progress[rows.seq], conf, block_start[rows.seq],
                                   recorded_kept, rank_by, True)
    # The graph's outputs last until the next graph runs: the compacted rows are copied into the late layers'
    # graph before it runs, but kept is read after it (the step's records), so it is copied out (finish_step
    # copies what else it needs afterwards).
    return Selected(x, q1, kept.clone(), compacted.value)


def early_layers_and_selection(model, x, rows: Rows, cache, is_mask_row, col, target_row, progress_row,
                               conf_row, block_start_row, recorded_kept, rank_by: str, fuse: bool):
    """early_layers, then the selection on the rows' own grid (rows.line x rows.q_max places), then the
    compaction's device side. All tensor inputs (T,) per row; recorded_kept: None, or kept rows to use instead
    of the selection's. Returns x after layer 0, layer 1's queries, kept (T,) bool, and the Compacted (whole:
    it is not cut to the rows). No host sync, static shapes. fuse: the selection and the compaction through
    torch.compile (kernels.fused), their small steps fused into a few kernels."""
    x, q0, k0, q1, k1 = early_layers(model, x, rows, cache)
    select = kernels.fused(selection_on_rows) if fuse else selection_on_rows
    kept = select(q0, k0, q1, k1, rows.line, rows.place, is_mask_row, col, target_row, progress_row, conf_row,
                  len(rows.active), rows.q_max, model.layers[0].self_attn.scale, model.layers[1].self_attn.scale,
                  rank_by)
    num_slots = cache.k.shape[1] - 1                         # the spare slot: where a graph's padding rows sit
    kept = (kept if recorded_kept is None else recorded_kept) & (rows.seq < num_slots)  # padding: never kept
    compact_rows = kernels.fused(compaction) if fuse else compaction
    compacted = compact_rows(kept, rows.seq, rows.pos, is_mask_row, col, block_start_row, x, q1, num_slots)
    return x, q1, kept, kernels.Whole(compacted)


def selection_on_rows(q0, k0, q1, k1, line, place, is_mask_row, col, target_row, progress_row, conf_row,
                      num_lines: int, width: int, scale_0: float, scale_1: float, rank_by: str):
    """Steps 1-4 of a FOCUS step on a (num_lines, width) grid where row r sits at (line[r], place[r]).
    q*, k* (T, heads or kv_heads, head_dim); the rest (T,). Returns kept (T,) bool (rows not masked: True)."""
    lines = torch.zeros(num_lines, width + 1, dtype=torch.bool, device=line.device)
    lines[line, place] = is_mask_row
    set_place = lines.cumsum(1) - 1                                     # a masked row's index in its mask set
    cell = torch.where(is_mask_row, set_place[line, place], width)      # other rows: the spare column
    valid = torch.arange(width, device=line.device) < lines.sum(1, keepdim=True)   # (A, width)

    def on_grid(x, fill=0):  # (T, ...) -> (A, width, ...) in set order
        out = x.new_full((num_lines, width + 1, *x.shape[1:]), fill)
        out[line, cell] = x
        return out[:, :width]

    def per_line(x):         # each line's value of a per-row input that is the same for all rows of a sequence
        return x.new_zeros(num_lines).index_put_((line,), x)

    importance_0 = token_importance(on_grid(q0), on_grid(k0), valid, scale_0)
    importance_1 = token_importance(on_grid(q1), on_grid(k1), valid, scale_1)
    delta = importance_delta(importance_1, importance_0, q1.dtype)
    position = on_grid(col, fill=-1).masked_fill(~valid, -1)
    signals = Signals(importance_0, importance_1, delta, position, on_grid(conf_row).masked_fill(~valid, 0))
    kept_grid = select_retained(ranking_score(rank_by, signals), valid, position, per_line(target_row),
                                per_line(progress_row))
    kept_grid = torch.cat([kept_grid, torch.ones_like(kept_grid[:, :1])], 1)  # the spare column: kept
    return kept_grid[line, cell]


def finish_step(model, selected: Selected, rows: Rows, cache, is_mask_row, col, block_start,
                graphs: bool = False) -> FocusOutput:
    """Compaction and the rest of the step on the kept rows, selected.kept (T,) bool (the selection's, or a
    recorded one when tools/replay.py replays a schedule): layer 1's attention and layers 2..L, then the logits
    of the kept masked rows. Where the first graph compacted already (select_in_graph), only its read remains."""
    if selected.compacted is None:
        keep, kept_rows, x, q1, last_kept, logit_rows = compact_step(selected, selected.kept, rows, is_mask_row,
                                                                     col, block_start)
    else:  # the first graph's buffers: what is needed after the late layers' graph is copied out first
        keep, kept_rows, x, q1, last_kept, logit_rows = read_compacted(selected.compacted)
        keep, last_kept, logit_rows = keep.clone(), last_kept.clone(), logit_rows.clone()
    late = kernels.graphed(late_layers) if graphs else late_layers
    x = late(model, x, kept_rows, cache, q1)
    return FocusOutput(model.logits(x, logit_rows), keep[logit_rows], selected.kept, last_kept)


def compact_step(selected: Selected, kept, rows: Rows, is_mask_row, col, block_start):
    """The compaction, kept (T,) bool -> the kept rows' indices (K,), their Rows (each attends up to its
    sequence's rightmost kept position: the reference's kv_len after eviction), their hidden states and layer-1
    queries (K, ...), each sequence's rightmost kept block position (S,), and the kept masked rows' indices
    among the kept ones (R,), whose logits the step needs. Its device side (compaction) runs on all T rows, so
    it queues behind the first graph (or runs inside it: select_in_graph); one host read follows
    (read_compacted)."""
    return read_compacted(compaction(kept, rows.seq, rows.pos, is_mask_row, col, block_start[rows.seq],
                                     selected.x, selected.q1, block_start.shape[0]))


def compaction(kept, seq, pos, is_mask_row, col, block_start_row, x, q1, num_slots: int) -> Compacted:
    """compact_step's device side, on static shapes (no host sync, no size that depends on the data). All T rows
    are laid out and gathered with the kept ones first, as Decoder.plan_on_device lays out a step's rows; rows
    not kept follow as padding in the spare slot (num_slots). Inputs (T, ...) per row, grouped by sequence;
    rows of slot num_slots (a graph's padding) must not be kept."""
    last_kept = rightmost(seq, col, kept, num_slots)
    ends = torch.zeros(num_slots + 1, dtype=pos.dtype, device=pos.device).index_put_((seq,), block_start_row)
    ends = ends[:num_slots] + last_kept + 1                               # (S,) keys the kept rows attend to
    keep, num_kept = kept_first(kept), kept.sum()                        # (T,), ()
    is_kept = torch.arange(len(keep), device=keep.device) < num_kept
    kept_seq = torch.where(is_kept, seq[keep], num_slots)
    ahead = Rows.lay_out(kept_seq, pos[keep], ends[kept_seq.clamp(max=num_slots - 1)], num_slots)
    logit_rows = kept_first(is_mask_row[keep] & is_kept)
    sizes = torch.cat([torch.stack([num_kept, (kept & is_mask_row).sum()]),
                       layout_sizes(ahead.counts, ends, ends)])             # (ahead.counts: kept rows per slot)
    return Compacted(keep, ahead, *compact(keep, x, q1), last_kept, logit_rows, sizes)


def read_compacted(c: Compacted):
    """The compaction's one host sync: the counts and the kept rows' layout, read together (only what picks the
    second graph's bucket crosses to the host); after it only slices (views) remain. Returns compact_step's
    tuple."""
    num_kept, num_logits, *sizes = c.sizes.tolist()
    return (c.keep[:num_kept], c.rows.sized(num_kept, sizes), c.x[:num_kept], c.q1[:num_kept], c.last_kept,
            c.logit_rows[:num_logits])


def early_layers(model, x, rows: Rows, cache):
    """Layers 0 and 1 up to the selection, on every row: layer 0 whole, layer 1's q, k, v with its keys and
    values written. x (T, hidden) -> x after layer 0, and the post-RoPE queries and keys of both layers,
    q0, k0, q1, k1, from which the importance is computed."""
    cos, sin = model.rope(rows.pos)
    layer0, layer1 = model.layers[0], model.layers[1]
    q0, k0, v0 = layer0.qkv(x, cos, sin)
    cache.write(0, rows, k0, v0)
    x = layer0.finish(x, layer0.attend(q0, 0, rows, cache))
    q1, k1, v1 = layer1.qkv(x, cos, sin)
    cache.write(1, rows, k1, v1)
    return x, q0, k0, q1, k1


def late_layers(model, x, rows: Rows, cache, q1):
    """After the selection, on the kept rows (compacted): layer 1's attention, then layers 2..L.
    x (K, hidden), q1 (K, heads, head_dim) -> x (K, hidden). RoPE comes from the kept rows' positions."""
    layer1 = model.layers[1]
    x = layer1.finish(x, layer1.attend(q1, 1, rows, cache))
    return model.decode_layers(x, rows, cache, 2, len(model.layers))


def rightmost(seq, col, kept, num_slots: int):
    """(S,) the block position of each sequence's last kept row (every row when kept is None); -1 where a
    sequence has none. seq (T,): the rows' slots (slot num_slots, a graph's padding, is left out)."""
    c = col if kept is None else torch.where(kept, col, -1)
    out = torch.full((num_slots + 1,), -1, dtype=col.dtype, device=col.device)
    return out.scatter_reduce(0, seq, c, reduce="amax")[:num_slots]
