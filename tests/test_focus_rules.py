"""FOCUS rules checked against slow, literal Python versions: importance, delta, target, selection,
compaction, and end-to-end generation invariants on a tiny random model."""
from __future__ import annotations

import math
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import focus  # noqa: E402
import generate  # noqa: E402
import model  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# 1. Importance

def slow_importance(q, k, scale):
    """q (m, heads, d), k (m, kv_heads, d) of one mask set -> list of m floats, by plain loops."""
    m, heads, _ = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = [0.0] * m
    for h in range(heads):
        g = h // group
        for i in range(m):
            s = [float((q[i, h].double() * k[j, g].double()).sum()) * scale for j in range(m)]
            pooled = []
            for j in range(m):
                cands = [s[j]]
                if j - 1 >= 0:
                    cands.append(s[j - 1])
                if j + 1 < m:
                    cands.append(s[j + 1])
                pooled.append(max(cands))
            top = max(pooled)
            e = [math.exp(p - top) for p in pooled]
            z = sum(e)
            for j in range(m):
                out[j] += e[j] / z
    return out


def ragged_case(sizes, heads=4, kv_heads=2, head_dim=8, seed=0, slots=None):
    gen = torch.Generator().manual_seed(seed)
    slots = list(range(len(sizes))) if slots is None else slots
    seq = torch.tensor([s for s, n in zip(slots, sizes) for _ in range(n)])
    M = len(seq)
    q = torch.randn(M, heads, head_dim, generator=gen) * 2
    k = torch.randn(M, kv_heads, head_dim, generator=gen) * 2
    return seq, q, k


def test_importance_matches_literal_loops_on_ragged_batch():
    sizes = [1, 2, 5, 7]
    seq, q, k = ragged_case(sizes, slots=[0, 2, 3, 6])
    scale = 8 ** -0.5
    g = focus.grid(seq)
    got = focus.ragged_importance(q, k, g, scale)
    assert got.shape == (4, 7)
    assert got.dtype == torch.float32
    start = 0
    for a, n in enumerate(sizes):
        want = slow_importance(q[start:start + n], k[start:start + n], scale)
        assert torch.allclose(got[a, :n], torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=1e-5), (a, n)
        assert torch.all(got[a, n:] == 0)
        # every query head and every masked query contributes a distribution summing to 1
        assert abs(float(got[a, :n].sum()) - 4 * n) < 1e-4
        start += n
    assert g.active.tolist() == [0, 2, 3, 6]


def test_importance_groups_query_heads_by_interleave():
    """Query heads 0,1 read kv head 0 and 2,3 read kv head 1: a tiled (.repeat) layout gives other numbers."""
    seq, q, k = ragged_case([5, 7], seed=3)
    scale = 0.5
    g = focus.grid(seq)
    got = focus.ragged_importance(q, k, g, scale)
    start = 0
    for a, n in enumerate([5, 7]):
        qq, kk = q[start:start + n], k[start:start + n]
        want = torch.tensor(slow_importance(qq, kk, scale), dtype=torch.float32)
        tiled = torch.tensor(slow_importance(qq, kk.repeat(1, 2, 1), scale), dtype=torch.float32)
        assert torch.allclose(got[a, :n], want, atol=1e-5)
        assert not torch.allclose(got[a, :n], tiled, atol=1e-3)  # the wrong grouping is distinguishable
        start += n


def test_importance_pool_uses_set_neighbours_and_ignores_padding():
    """A single row with a huge score: pooling spreads it to its set neighbours only, never into padding."""
    heads, kv, d = 1, 1, 2
    q = torch.zeros(3, heads, d)
    k = torch.zeros(3, kv, d)
    q[:, 0, 0] = 1.0
    k[1, 0, 0] = 50.0          # key 1 dominates every query
    seq = torch.tensor([0, 0, 0])
    g = focus.grid(seq)
    got = focus.ragged_importance(q, k, g, 1.0)[0]
    # pooled = [50, 50, 50] -> uniform softmax; 3 queries -> each key gets 1.0
    assert torch.allclose(got, torch.ones(3), atol=1e-6)
    # with padding next to a short set, the short set's values do not change
    seq2 = torch.tensor([0, 0, 1, 1, 1])
    q2 = torch.cat([q[:2], q])
    k2 = torch.cat([k[:2], k])
    got2 = focus.ragged_importance(q2, k2, focus.grid(seq2), 1.0)
    alone = focus.ragged_importance(q[:2], k[:2], focus.grid(torch.tensor([0, 0])), 1.0)
    assert torch.allclose(got2[0, :2], alone[0], atol=1e-6)
    assert torch.allclose(got2[0, :2], torch.tensor(slow_importance(q[:2], k[:2], 1.0)), atol=1e-5)


def test_max_pool3_literal():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, generator=gen)
    got = focus.max_pool3(x)
    for r in range(3):
        for j in range(9):
            want = max(float(x[r, t]) for t in (j - 1, j, j + 1) if 0 <= t < 9)
            assert float(got[r, j]) == want


# ---------------------------------------------------------------------------------------------------
# 2. Delta

def test_importance_delta_is_fp32_difference_of_bf16_inputs():
    """fp32 importances are rounded to the model's dtype (bf16 here) first, then subtracted in fp32."""
    gen = torch.Generator().manual_seed(2)
    i1 = torch.rand(3, 6, generator=gen) * 20
    i0 = torch.rand(3, 6, generator=gen) * 20
    got = focus.importance_delta(i1, i0, torch.bfloat16)
    assert got.dtype == torch.float32
    for a in range(3):
        for j in range(6):
            bf16 = lambda v: float(torch.tensor(float(v)).to(torch.bfloat16))
            assert float(got[a, j]) == bf16(i1[a, j]) - bf16(i0[a, j])
    # a difference bf16 cannot hold exactly must survive
    a, b = torch.tensor([256.0]), torch.tensor([1.0])
    assert float(focus.importance_delta(a, b, torch.bfloat16)[0]) == 255.0
    assert float(focus.importance_delta(b, a, torch.bfloat16)[0]) == -255.0


# ---------------------------------------------------------------------------------------------------
# 3. Target

def slow_target(avg, L, alpha):
    if L == 0:
        return 0
    return min(L, max(1, math.ceil(max(avg, 1.0) * alpha)))


def test_retain_target_formula():
    cases = [(0.5, 8, 1.0), (1.0, 8, 1.5), (2.5, 8, 1.5), (3.0, 2, 2.0), (1.7, 0, 1.0), (0.2, 5, 1.0),
             (4.0, 9, 1.0), (1.0, 1, 1.0), (2.2, 10, 1.3), (6.0, 3, 1.0), (1.0, 6, 1000.0)]
    for (a, l, al) in cases:
        got = focus.retain_target(torch.tensor([a]), torch.tensor([l]), al)
        assert int(got[0]) == slow_target(a, l, al), (a, l, al)
    # explicit: avg below 1 is floored to 1
    assert focus.retain_target(torch.tensor([0.5]), torch.tensor([8]), 1.0).tolist() == [1]
    assert focus.retain_target(torch.tensor([0.5]), torch.tensor([8]), 2.5).tolist() == [3]
    assert focus.retain_target(torch.tensor([2.5, 2.0]), torch.tensor([0, 4]), 1.5).tolist() == [0, 3]


# ---------------------------------------------------------------------------------------------------
# 4. Selection

def slow_select(delta, pos, target, progress):
    """One sequence: delta, pos lists of length L (set order) -> list of bools."""
    L = len(delta)
    if not (target > 0 and L > target):
        return [True] * L
    # top-target, ties to lower index
    taken = set()
    for _ in range(target):
        best = None
        for j in range(L):
            if j in taken:
                continue
            if best is None or delta[j] > delta[best]:
                best = j
        taken.add(best)
    mean = sum(delta) / L
    std = math.sqrt(sum((d - mean) ** 2 for d in delta) / L)
    over = {j for j in range(L) if delta[j] >= mean + std}
    base = over if len(over) >= target else taken
    kept = [j in base for j in range(L)]
    for j in range(L - 1):
        if j not in base and (j + 1) in base and pos[j + 1] == pos[j] + 1:
            kept[j] = True
    if not any(kept):
        kept = [True] * L
    R = max(pos[j] for j in range(L) if kept[j])
    for j in range(L):
        if progress < pos[j] < R:
            kept[j] = True
    return kept


def run_select(rows, targets, progresses):
    """rows: list of (deltas, positions) per sequence -> list of bool lists from focus.select_retained."""
    A = len(rows)
    m = max(len(d) for d, _ in rows)
    delta = torch.zeros(A, m)
    position = torch.full((A, m), -1, dtype=torch.long)
    valid = torch.zeros(A, m, dtype=torch.bool)
    for a, (d, p) in enumerate(rows):
        n = len(d)
        # padding deltas are junk on purpose: they must not matter
        delta[a] = 7.0
        delta[a, :n] = torch.tensor(d, dtype=torch.float32)
        position[a, :n] = torch.tensor(p)
        valid[a, :n] = True
    kept = focus.select_retained(delta, valid, position, torch.tensor(targets, dtype=torch.long),
                                 torch.tensor(progresses, dtype=torch.long))
    out = []
    for a, (d, _) in enumerate(rows):
        assert not kept[a, len(d):].any()
        out.append(kept[a, :len(d)].tolist())
    return out


def test_select_retained_random_against_literal():
    rnd = random.Random(1234)
    values = [-1.5, -0.25, 0.0, 0.5, 0.75, 2.0]
    n_cases, per_batch = 300, 6
    done = 0
    while done < n_cases:
        rows, targets, progs = [], [], []
        for _ in range(min(per_batch, n_cases - done)):
            L = rnd.randint(1, 10)
            nv = rnd.randint(1, 4)
            vals = rnd.sample(values, nv)
            d = [rnd.choice(vals) for _ in range(L)]
            p, cur = [], rnd.randint(0, 3)
            for _ in range(L):
                p.append(cur)
                cur += 1 if rnd.random() < 0.6 else rnd.randint(2, 4)
            rows.append((d, p))
            targets.append(rnd.randint(0, 10))
            progs.append(rnd.randint(-1, 31))
        got = run_select(rows, targets, progs)
        for (d, p), t, pr, g in zip(rows, targets, progs, got):
            assert g == slow_select(d, p, t, pr), (d, p, t, pr)
        done += len(rows)


def test_select_rule1_no_eviction_when_set_not_larger_than_target():
    d = [0.0, 5.0, 1.0]
    p = [0, 1, 2]
    assert run_select([(d, p), (d, p)], [3, 0], [-1, -1]) == [[True] * 3, [True] * 3]
    assert run_select([(d, p)], [5], [-1]) == [[True] * 3]


def test_select_rule2_topk_ties_to_lower_index():
    # equal deltas at non-adjacent positions, progress past them so rule 5 adds nothing on the left
    d = [1.0, 1.0, 1.0, 1.0]
    p = [0, 2, 4, 6]
    # std = 0 -> everyone reaches mean + std -> |C| = 4 >= 2 -> keep all four
    assert run_select([(d, p)], [2], [10]) == [[True] * 4]
    # distinct deltas where the threshold set is too small: top-2 with a tie for second place
    d = [0.0, 3.0, 2.0, 2.0, -10.0]
    p = [0, 2, 4, 6, 8]
    # mean = -0.6, std ~ 4.8, mean+std ~ 4.2: C empty -> top-2 = {1, 2} (index 2 wins the tie with 3)
    assert run_select([(d, p)], [2], [10]) == [[False, True, True, False, False]]


def test_select_rule2_threshold_set_overrides_topk():
    d = [10.0, 10.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    p = [0, 2, 4, 6, 8, 10, 12, 14]
    # mean 3.75, population std ~4.84 -> C = {0, 1, 2}, size 3 >= target 1: keep exactly C
    assert run_select([(d, p)], [1], [20]) == [[True, True, True] + [False] * 5]
    # target 4 > |C| = 3: fall back to the top 4 (ties to lower index)
    assert run_select([(d, p)], [4], [20]) == [[True, True, True, True] + [False] * 4]


def test_select_rule3_adjacency_single_pass_leftward():
    d = [0.0, 0.0, 0.0, 9.0, 0.0, 0.0]
    p = [0, 1, 2, 3, 4, 6]
    # base {3}; its left neighbour 2 sits at position 2 = 3 - 1 -> kept; no cascade to 1; nothing rightward
    assert run_select([(d, p)], [1], [10]) == [[False, False, True, True, False, False]]
    # a gap in block positions blocks the adjacency rule
    p2 = [0, 1, 2, 4, 5, 6]
    assert run_select([(d, p2)], [1], [10]) == [[False, False, False, True, False, False]]


def test_select_rule4_never_returns_an_empty_set():
    """Rule 4 is a safety net: with target >= 1 the top-t set is never empty, so no valid mask set may end
    up with nothing kept, even for degenerate deltas (NaN, -inf)."""
    nan, inf = float("nan"), float("inf")
    rows = [([nan, nan, nan], [0, 1, 2]), ([-inf, -inf, -inf, -inf], [0, 2, 4, 6]), ([0.0, 0.0], [1, 5])]
    got = run_select(rows, [1, 2, 1], [-1, 10, 3])
    for g, (d, p), t, pr in zip(got, rows, [1, 2, 1], [-1, 10, 3]):
        assert any(g)
        assert g == slow_select(d, p, t, pr)


def test_select_rule5_progress_fills_left_of_rightmost():
    d = [0.0, 0.0, 0.0, 0.0, 9.0, 0.0]
    p = [0, 2, 4, 6, 8, 10]
    # base {4} at position 8; progress -1 -> every slot left of 8 kept; the one at 10 evicted
    assert run_select([(d, p)], [1], [-1]) == [[True, True, True, True, True, False]]
    # progress 4: only positions in (4, 8) are added
    assert run_select([(d, p)], [1], [4]) == [[False, False, False, True, True, False]]
    # progress past R adds nothing
    assert run_select([(d, p)], [1], [9]) == [[False, False, False, False, True, False]]


# ---------------------------------------------------------------------------------------------------
# 5. Compaction

def test_compact_gathers_kept_rows_in_order():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(9, 4, generator=gen)
    b = torch.randn(9, 2, 3, generator=gen)
    keep_mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    keep = keep_mask.nonzero().squeeze(1)
    ca, cb = focus.compact(keep, a, b)
    assert torch.equal(ca, a[keep_mask])
    assert torch.equal(cb, b[keep_mask])


@pytest.mark.parametrize("seed", range(6))
def test_kept_first_is_a_stable_partition(seed):
    """focus.kept_first (the compaction's order, by cumulative sums): the flagged rows ascending, then the rest
    ascending, as two nonzero() calls give them."""
    gen = torch.Generator().manual_seed(seed)
    flags = torch.rand(int(torch.randint(1, 40, (1,), generator=gen)), generator=gen) < 0.4
    want = torch.cat([flags.nonzero().squeeze(1), (~flags).nonzero().squeeze(1)])
    assert focus.kept_first(flags).tolist() == want.tolist()


@pytest.mark.parametrize("seed", range(6))
def test_compact_step_is_the_plain_compaction(seed):
    """focus.compact_step lays out and gathers all T rows with the kept ones first, before its one host read,
    and slices after it: the same as taking the kept rows (kept.nonzero()) and building their Rows, each
    attending up to its sequence's rightmost kept position."""
    rnd, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    num_slots, seq, col = 5, [], []
    for s in rnd.sample(range(num_slots), rnd.randint(1, num_slots)):
        cols = sorted(rnd.sample(range(8), rnd.randint(1, 8)))
        seq += [s] * len(cols)
        col += cols
    order = sorted(range(len(seq)), key=lambda i: (seq[i], col[i]))
    seq, col = torch.tensor([seq[i] for i in order]), torch.tensor([col[i] for i in order])
    block_start = torch.tensor([16 * rnd.randint(1, 4) for _ in range(num_slots)])
    rows = model.Rows.build(seq, block_start[seq] + col, block_start[seq] + 8, num_slots)
    kept = torch.rand(len(seq), generator=gen) < 0.5
    kept[rnd.randrange(len(seq))] = True
    is_mask_row = torch.rand(len(seq), generator=gen) < 0.6
    selected = focus.Selected(torch.randn(len(seq), 6, generator=gen), torch.randn(len(seq), 2, 3, generator=gen),
                              kept)
    keep, kept_rows, x, q1, last_kept, logit_rows = focus.compact_step(selected, kept, rows, is_mask_row, col,
                                                                       block_start)
    want_keep = kept.nonzero().squeeze(1)
    want_last = torch.full((num_slots,), -1).scatter_reduce(0, seq, torch.where(kept, col, -1), "amax")
    want = model.Rows.build(seq[want_keep], rows.pos[want_keep], (block_start + want_last + 1)[seq[want_keep]],
                            num_slots)
    assert torch.equal(keep, want_keep) and torch.equal(last_kept, want_last)
    for name in ("seq", "pos", "line", "place", "key_end", "active"):
        assert torch.equal(getattr(kept_rows, name), getattr(want, name)), name
    for name in ("q_max", "kv_max", "all_slots", "dense", "key_end_per_seq"):
        assert getattr(kept_rows, name) == getattr(want, name), name
    assert torch.equal(x, selected.x[want_keep]) and torch.equal(q1, selected.q1[want_keep])
    assert torch.equal(logit_rows, is_mask_row[want_keep].nonzero().squeeze(1))


# ---------------------------------------------------------------------------------------------------
# 6. End to end on a tiny random model

MASK = 3
EOS = [2]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = model.ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, block_size=8,
                            mask_token_id=MASK)
    m = model.SDAR(cfg)
    with torch.no_grad():
        m.embed_tokens.weight.mul_(4)
    return m.eval()


@pytest.fixture(scope="module")
def prompts():
    rnd = random.Random(0)
    return [[rnd.randint(10, 299) for _ in range(n)] for n in (5, 9, 12)]


def gen(m, prompts, **opts):
    opts.setdefault("max_new_tokens", 24)
    with torch.no_grad():
        return generate.generate_ids(m, [list(p) for p in prompts], MASK, list(EOS), generate.Options(**opts))


def test_focus_huge_alpha_equals_delayed_cache(tiny, prompts):
    base = gen(tiny, prompts, batch_size=3, focus=False)
    wide = gen(tiny, prompts, batch_size=3, focus=True, alpha=1000.0)
    assert [ids for ids, _ in wide] == [ids for ids, _ in base]
    for (_, s_w), (_, s_b) in zip(wide, base):
        assert s_w["computed"] == s_b["computed"]
        assert s_w["computed_deep"] == s_w["computed"]


def test_focus_path_with_every_row_kept_equals_the_plain_path(tiny, prompts, monkeypatch):
    """forward_focus's own path (layers 0-1 on every row, the selection, compaction, layer 1's attention and
    layers 2..L on the kept rows), made to keep every row, gives the plain forward's logits and writes the
    same keys and values in every layer. A target of 1 passes the batch gate, so the path really runs."""
    from decoder import Decoder
    monkeypatch.setattr(focus, "select_retained", lambda score, valid, *rest: valid)
    opts = generate.Options(max_new_tokens=24, batch_size=3, focus=True, alpha=1.0, threshold=1.0)  # one a step
    dec = Decoder(tiny, MASK, [], opts, num_slots=3, max_len=48)  # no EOS: every sequence runs on
    with torch.no_grad():
        dec.admit([0, 1, 2], prompts)
        for step in range(8):  # past the first step, to one that mixes masked rows and decoded, uncached ones
            seq, col, rows = (plan := dec.plan()).seq, plan.col, plan.rows
            ids, is_mask = dec.tokens[seq, rows.pos], dec.masked[seq, col]
            if step > 0 and 0 < int(is_mask.sum()) < len(is_mask):
                break
            dec.finish_blocks(dec.step()["committing"])
        assert 0 < int(is_mask.sum()) < len(is_mask)
        plain_cache = model.KVCache.__new__(model.KVCache)
        plain_cache.k, plain_cache.v, plain_cache.max_len = dec.cache.k.clone(), dec.cache.v.clone(), dec.cache.max_len
        mask_rows = is_mask.nonzero().squeeze(1)
        want = tiny.forward_rows(ids, rows, plain_cache, logits_for=mask_rows)
        target = torch.ones(3, dtype=torch.long)
        assert focus.evicts(rows, is_mask, target)
        out = focus.forward_focus(tiny, ids, rows, dec.cache, is_mask, col, dec.block_start, dec.progress, target)
    assert bool(out.kept.all()) and torch.equal(out.logit_rows, mask_rows)
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec.cache.k, plain_cache.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec.cache.v, plain_cache.v, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_focus_generates_the_same_tokens(tiny, prompts):
    """generate.py --compile: FOCUS with the fused RMSNorm, RoPE and SwiGLU (kernels.fast_paths) gives the plain
    path's tokens (greedy). tests/test_kernels.py checks the CUDA graphs."""
    plain = gen(tiny, prompts, batch_size=3, focus=True, alpha=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = gen(tiny, prompts, batch_size=3, focus=True, alpha=1.0, compile=True)
    assert not [w for w in caught if "plain version" in str(w.message)]
    assert fused == plain
    assert any(sum(s["computed_deep"]) < sum(s["computed"]) for _, s in plain)  # it evicted


@pytest.mark.parametrize("batch_size", [3, 2])
def test_focus_batching_invariance(tiny, prompts, batch_size):
    alone = [gen(tiny, [p], batch_size=1, focus=True, alpha=1.0)[0] for p in prompts]
    batched = gen(tiny, prompts, batch_size=batch_size, focus=True, alpha=1.0)
    for (ids_b, st_b), (ids_a, st_a) in zip(batched, alone):
        assert ids_b == ids_a
        assert st_b["computed_deep"] == st_a["computed_deep"]
        assert st_b["decoded"] == st_a["decoded"]


def test_focus_evicts_and_stats_are_ordered(tiny, prompts):
    out = gen(tiny, prompts, batch_size=3, focus=True, alpha=1.0)
    evicted_somewhere = False
    for ids, st in out:
        assert len(ids) > 0
        assert len(st["computed"]) == len(st["computed_deep"]) == len(st["decoded"])
        for c, cd, dec in zip(st["computed"], st["computed_deep"], st["decoded"]):
            assert cd <= c
            assert dec <= cd
            evicted_somewhere |= cd < c
    assert evicted_somewhere


# ---------------------------------------------------------------------------------------------------
# 7. Ranking controls for the ablation (focus.ranking_score)

# Mask set of one sequence at block positions 0, 2, 3, 6, 7 (1, 4, 5 decoded) and a padded second line.
POSITION = torch.tensor([[0, 2, 3, 6, 7], [1, 2, -1, -1, -1]])
VALID = POSITION >= 0
DELTA = torch.tensor([[0.1, 0.5, -0.2, 0.3, 0.0], [0.2, 0.1, 0.0, 0.0, 0.0]])
I0 = torch.tensor([[1.0, 0.5, 2.0, 0.1, 0.3], [0.4, 0.4, 0.0, 0.0, 0.0]])
CONFIDENCE = torch.tensor([[0.2, 0.1, 0.9, 0.5, 0.3], [0.6, 0.7, 0.0, 0.0, 0.0]])
SIGNALS = focus.Signals(I0, I0 + DELTA, DELTA, POSITION, CONFIDENCE)


def order(name):
    """The mask set's places, best first, as select_retained ranks them (ties to the lower position)."""
    score = focus.ranking_score(name, SIGNALS)
    return [[int(i) for i in torch.sort(score[a].masked_fill(~VALID[a], -1e9), descending=True, stable=True).indices
             if VALID[a, i]] for a in range(2)]


def test_ranking_score_controls_literal():
    assert torch.equal(focus.ranking_score("delta", SIGNALS), DELTA)
    assert torch.equal(focus.ranking_score("negated-delta", SIGNALS), -DELTA)
    assert order("leftmost") == [[0, 1, 2, 3, 4], [0, 1]]
    # After a decoded token (or first in the block): positions 0, 2 and 6 in line 0 (left neighbours -, 1, 5
    # decoded), leftmost first; then 3 and 7; line 1: position 1 (after decoded 0), then 2.
    assert order("after-decoded") == [[0, 1, 3, 2, 4], [0, 1]]
    g = torch.Generator().manual_seed(0)
    r = focus.ranking_score("random", SIGNALS, g)
    assert r.shape == DELTA.shape and not torch.equal(r, focus.ranking_score("random", SIGNALS, g))
    with pytest.raises(ValueError):
        focus.ranking_score("oracle", SIGNALS)


def test_rankings_beyond_the_paper_literal():
    assert order("I1") == [[2, 0, 1, 3, 4], [0, 1]]             # I1 = I0 + delta: 1.1 1.0 1.8 0.4 0.3 | 0.6 0.5
    assert order("confidence") == [[2, 3, 4, 0, 1], [1, 0]]
    # rank_within: 1 for the best, 0 for the worst, equal steps between; padding 0
    ranks = focus.rank_within(DELTA, VALID)
    assert ranks[0].tolist() == pytest.approx([0.5, 1.0, 0.0, 0.75, 0.25]) and ranks[1].tolist() == [1.0, 0.0, 0, 0, 0]
    # delta+position: delta ranks (0.5 1 0 .75 .25) + leftmost ranks (1 .75 .5 .25 0) = 1.5 1.75 .5 1 .25
    assert order("delta+position") == [[1, 0, 3, 2, 4], [0, 1]]
    # delta+confidence: + confidence ranks (.25 0 1 .75 .5) = .75 1 1 1.5 .75; ties to the lower position
    assert order("delta+confidence") == [[3, 1, 2, 0, 4], [0, 1]]


def test_rank_within_breaks_ties_toward_the_lower_position():
    score, valid = torch.tensor([[0.3, 0.3, 0.1]]), torch.tensor([[True, True, True]])
    assert focus.rank_within(score, valid).tolist() == [[1.0, 0.5, 0.0]]
    assert focus.rank_within(torch.tensor([[5.0]]), torch.tensor([[True]])).tolist() == [[1.0]]  # a set of one


def test_probe_is_a_linear_score_of_its_features():
    feats = focus.probe_features(SIGNALS)
    assert feats.shape == (2, 5, len(focus.PROBE_FEATURES))
    want = feats @ torch.tensor(focus.PROBE_WEIGHTS) + focus.PROBE_BIAS
    torch.testing.assert_close(focus.ranking_score("probe", SIGNALS), want)
    assert feats[0, :, 4].tolist() == [1, 1, 0, 1, 0]          # after decoded: positions 0, 2, 6


@pytest.mark.parametrize("rank_by", ["negated-delta", "leftmost", "random"])
def test_focus_rank_changes_only_the_ranking(tiny, prompts, rank_by):
    # Same target and rules: the tokens kept per step stay within the target's reach; with a huge alpha no
    # ranking matters and every control equals the delayed cache.
    base = gen(tiny, prompts, batch_size=3, focus=False)
    wide = gen(tiny, prompts, batch_size=3, focus=True, alpha=1000.0, focus_rank=rank_by)
    assert [ids for ids, _ in wide] == [ids for ids, _ in base]
    delta = gen(tiny, prompts, batch_size=3, focus=True, alpha=1.0)
    other = gen(tiny, prompts, batch_size=3, focus=True, alpha=1.0, focus_rank=rank_by)
    assert [s["computed_deep"] for _, s in other] != [s["computed_deep"] for _, s in delta] or \
        [ids for ids, _ in other] != [ids for ids, _ in delta]


def test_near_threshold_target_literal():
    """Raised to the masked tokens whose last confidence came within NEAR of the threshold, never lowered,
    never past the mask set."""
    target = torch.tensor([2, 2, 5])
    confidence = torch.tensor([[0.95, 0.7, 0.61, 0.1], [0.9, 0.9, 0.9, 0.9], [0.8, 0.8, 0.0, 0.0]])
    masked = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, True]])
    got = focus.near_threshold_target(target, confidence, masked, threshold=0.9)   # near: >= 0.6
    assert got.tolist() == [3, 2, 5]
    masked[1] = True
    assert focus.near_threshold_target(target, confidence, masked, 0.9).tolist() == [3, 4, 5]


def test_the_decoder_raises_its_target_near_the_threshold(tiny, prompts):
    """Decoder.retain_target with --focus-target near-threshold is the reference target put through
    near_threshold_target with the decoder's own last confidences and mask sets."""
    from decoder import Decoder
    decs = {}
    for rule in focus.TARGETS:
        opts = generate.Options(max_new_tokens=24, batch_size=3, focus=True, alpha=1.0, focus_target=rule,
                                threshold=1.0)  # one token a step: the rest stay masked, some of them near
        dec = decs[rule] = Decoder(tiny, MASK, [], opts, num_slots=3, max_len=48)
        with torch.no_grad():
            dec.admit([0, 1, 2], prompts)
            dec.finish_blocks(dec.step()["committing"])
        dec.confidence[:, ::2] = 0.8                               # as if an earlier step had computed these
    ref, near = decs["reference"], decs["near-threshold"]
    assert torch.equal(ref.confidence, near.confidence)
    want = focus.near_threshold_target(ref.retain_target(), ref.confidence, ref.masked & ref.live[:, None], 1.0)
    assert torch.equal(near.retain_target(), want) and not torch.equal(want, ref.retain_target())


def test_saturation_target_literal():
    """Doubled (from the last step's target, within the mask set) only after a saturated step, never lowered."""
    target, last = torch.tensor([2, 2, 2, 3]), torch.tensor([3, 3, 5, 1])
    saturated = torch.tensor([True, False, True, True])
    mask_count = torch.tensor([10, 10, 7, 10])
    assert focus.saturation_target(target, last, saturated, mask_count).tolist() == [6, 2, 7, 3]


def test_the_decoder_marks_a_step_saturated_when_the_cap_bound(tiny, prompts):
    """A step is saturated when it decoded every masked token it kept and evicted some; with --focus-target
    saturation the next target is saturation_target of the reference's."""
    from decoder import Decoder
    opts = generate.Options(max_new_tokens=24, batch_size=3, focus=True, alpha=1.0, focus_target="saturation",
                            threshold=1e-6)  # every computed masked token reaches the threshold
    dec = Decoder(tiny, MASK, [], opts, num_slots=3, max_len=48)
    with torch.no_grad():
        dec.admit([0, 1, 2], prompts)
        dec.finish_blocks(dec.step()["committing"])   # the block's first step
        stats = dec.step()                             # a small target of many masked: all kept decode
    kept_masked = (dec.last_step.kept & dec.last_step.masked_before).sum(1)
    evicted = kept_masked < dec.last_step.masked_before.sum(1)
    assert evicted.any() and torch.equal(dec.saturated, evicted & (stats["decoded"] >= kept_masked))
    reference = focus.retain_target(dec.decoded_sum / dec.decoded_steps.clamp(min=1), dec.masked.sum(1) * dec.live,
                                    opts.alpha)
    want = focus.saturation_target(reference, stats["target"], dec.saturated & dec.live, dec.masked.sum(1) * dec.live)
    assert torch.equal(dec.retain_target(), want) and not torch.equal(want, reference)
