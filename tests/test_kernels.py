"""kernels.py's fast paths against the plain code they replace.

- graphed(fn): a step's ragged rows padded to a bucket (padding rows in the spare cache slot) compute what the
  plain forward computes, and write the same keys and values; checked on CPU through capture=False (the same
  buffers run eagerly), and on CUDA with the graphs themselves.
- fast_paths(model): the model's RMSNorm, RoPE and SwiGLU swapped for compiled versions give the plain numbers,
  and are put back on the way out.
- generation with --compile (fused functions, and CUDA graphs on a GPU) gives the plain path's tokens.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import random
import warnings

import pytest
import torch

import decoder
import focus
import generate
import kernels
import model
from conftest import random_model, tiny_config
from test_model import naive_cached_attention

CUDA = torch.cuda.is_available()


def ragged_rows(counts, starts, num_slots, slots=None):
    """Rows of a decode step: sequence i (in slot slots[i]) computes counts[i] positions of its block at
    starts[i], seeing keys up to its last one."""
    slots = list(range(len(counts))) if slots is None else slots
    seq, pos, key_end = [], [], []
    for s, n, b in zip(slots, counts, starts):
        cols = sorted(random.Random(s).sample(range(8), n))
        seq += [s] * n
        pos += [b + c for c in cols]
        key_end += [b + cols[-1] + 1] * n
    return model.Rows.build(torch.tensor(seq), torch.tensor(pos), torch.tensor(key_end), num_slots)


def filled_cache(cfg, num_slots, max_len, seed):
    """A cache whose every entry is finite and random, as a run leaves it; one slot more: the spare."""
    cache = model.KVCache(cfg, num_slots + 1, max_len, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    return cache


def clone(cache):
    out = model.KVCache.__new__(model.KVCache)
    out.k, out.v, out.max_len = cache.k.clone(), cache.v.clone(), cache.max_len
    return out


@pytest.fixture(scope="module")
def net():
    return random_model(tiny_config(num_hidden_layers=4, block_size=8), seed=3)


@pytest.mark.parametrize("counts,slots,starts", [([3, 8, 1, 5], None, None), ([2, 7], [1, 3], None),
                                                 ([8] * 5, None, None), ([8] * 5, None, [16] * 5),
                                                 ([8] * 5, None, [56] * 5)])
def test_padded_layers_equal_the_plain_layers(net, counts, slots, starts):
    """decode_layers on the padded buffers (capture=False) == on the ragged rows: the same outputs, and the same
    keys and values in every sequence's slot; the padding touches only the spare slot. The last two cases
    are dense rows (every slot, the same rows and keys): their graphs keep the exact key count and run without
    an attention mask."""
    num_slots = 5
    rows = ragged_rows(counts, starts or [16 + 8 * i for i in range(len(counts))], num_slots, slots)
    assert rows.dense == (starts is not None)
    x = torch.randn(rows.num_rows, net.config.hidden_size, generator=torch.Generator().manual_seed(1))
    plain_cache = filled_cache(net.config, num_slots, 64, seed=2)
    padded_cache = clone(plain_cache)
    with torch.no_grad():
        want = net.decode_layers(x, rows, plain_cache, 0, 4)
        got = kernels.graphed(model.SDAR.decode_layers, capture=False)(net, x, rows, padded_cache, 0, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.shape == want.shape
    torch.testing.assert_close(padded_cache.k[:, :num_slots], plain_cache.k[:, :num_slots], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_cache.v[:, :num_slots], plain_cache.v[:, :num_slots], atol=1e-5, rtol=0)
    graph_is_dense = [key[2] for key in kernels._STORES[padded_cache]["graphs"]]
    assert graph_is_dense == [starts is not None]


def test_padded_focus_layers_equal_the_plain_ones(net):
    """FOCUS's two graphs, before and after the selection, on padded buffers == the plain functions."""
    num_slots = 4
    rows = ragged_rows([6, 3, 8, 2], [8, 24, 40, 16], num_slots)
    x = torch.randn(rows.num_rows, net.config.hidden_size, generator=torch.Generator().manual_seed(4))
    plain_cache = filled_cache(net.config, num_slots, 64, seed=5)
    padded_cache = clone(plain_cache)
    keep = torch.tensor([0, 2, 3, 6, 8, 11, 14, 16])
    with torch.no_grad():
        want = focus.early_layers(net, x, rows, plain_cache)
        got = kernels.graphed(focus.early_layers, capture=False)(net, x, rows, padded_cache)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        kept = rows.take(keep, rows.key_end[keep] - 1, num_slots)
        want = focus.late_layers(net, want[0][keep], kept, plain_cache, want[3][keep])
        got = kernels.graphed(focus.late_layers, capture=False)(net, got[0][keep], kept, padded_cache, got[3][keep])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_cache.k[:, :num_slots], plain_cache.k[:, :num_slots], atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths,slots,padding", [([64, 40, 32], [1, 3, 4], 8), ([32], [2], 0), ([8, 8], [0, 5], 0)])
def test_padded_prefill_equals_the_plain_prefill(net, lengths, slots, padding):
    """A prefill through graphed(grid="sequences") (capture=False): a line per sequence with rows, their number
    padded to a power of two, and one for the padding rows == the plain prefill: the same outputs, the same keys
    and values in every slot but the spare."""
    num_slots, bs = 6, net.config.block_size
    seq = torch.tensor([s for s, n in zip(slots, lengths) for _ in range(n)])
    pos = torch.cat([torch.arange(n) for n in lengths])
    rows = model.Rows.build(seq, pos, (pos // bs + 1) * bs, num_slots)                # block-causal, as admit builds
    x = torch.randn(rows.num_rows, net.config.hidden_size, generator=torch.Generator().manual_seed(8))
    plain_cache = filled_cache(net.config, num_slots, 64, seed=9)
    padded_cache = clone(plain_cache)
    with torch.no_grad():
        want = net.decode_layers(x, rows, plain_cache, 0, 4)
        got = kernels.graphed(model.SDAR.decode_layers, capture=False, grid="sequences")(net, x, rows, padded_cache, 0, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_cache.k[:, :num_slots], plain_cache.k[:, :num_slots], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded_cache.v[:, :num_slots], plain_cache.v[:, :num_slots], atol=1e-5, rtol=0)
    (shape,) = [key[3] for key in kernels._STORES[padded_cache]["graphs"]]
    assert shape[3] == 1 << (len(slots) - 1).bit_length()                               # lines: a power of two
    assert shape[0] - rows.num_rows == padding                                         # rows padded to a bucket


def test_a_prefill_shape_is_captured_when_it_comes_back(net, monkeypatch):
    """With capture (CUDA), a prefill's shape met for the first time runs as it is; met again, it is captured
    once and replayed after. A decode step's shape is captured at once. (Capture stood in for on the CPU.)"""
    import weakref
    made = []

    class Captured:
        def __init__(self, fn, model, args, rows, cache, shape, *rest):
            made.append(shape)
            self.model = weakref.ref(model)

        def run(self, args, rows):
            return "replayed"

    monkeypatch.setattr(kernels, "captures", lambda model, device: True)
    monkeypatch.setattr(kernels, "_Graph", Captured)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    seq, pos = torch.tensor([1] * 16), torch.arange(16)
    rows = model.Rows.build(seq, pos, (pos // 8 + 1) * 8, 4)
    cache = filled_cache(net.config, 4, 64, seed=10)
    x = torch.randn(16, net.config.hidden_size)
    prefill = kernels.graphed(model.SDAR.decode_layers, grid="sequences")
    with torch.no_grad():
        first = prefill(net, x, rows, cache, 0, 4)
        assert isinstance(first, torch.Tensor) and made == []                 # met once: run as it is
        assert prefill(net, x, rows, cache, 0, 4) == "replayed" and len(made) == 1
        assert prefill(net, x, rows, cache, 0, 4) == "replayed" and len(made) == 1
        step = ragged_rows([3, 2], [8, 16], 4)
        kernels.graphed(model.SDAR.decode_layers)(net, torch.randn(5, net.config.hidden_size), step, cache, 0, 4)
    assert len(made) == 2                                                     # a decode step: at once


def test_the_first_fill_runs_eagerly_and_refills_through_graphs(net, monkeypatch):
    """--compile: the decoder's first fill is prefilled as it is (a graph used once costs more than it saves),
    a refill of ended sequences' slots through graphed prefill (which off CUDA runs as it is)."""
    asked, original = [], net.forward_rows

    def forward_rows(ids, rows, cache, logits_for=None, graphs=False, grid="slots"):
        if grid == "sequences":
            asked.append(graphs)
        return original(ids, rows, cache, logits_for, graphs, grid)

    monkeypatch.setattr(net, "forward_rows", forward_rows)
    prompts = [[random.Random(i).randint(10, 299) for _ in range(20)] for i in range(3)]  # two whole blocks each
    dec = decoder.Decoder(net, 3, [2], decoder.Options(max_new_tokens=8, batch_size=2, compile=True), 2, 64)
    with torch.no_grad():
        dec.admit([0, 1], prompts[:2])
        dec.admit([1], prompts[2:])     # the slot of a sequence that ended
    assert asked == [False, True]


def test_a_dropped_cache_frees_its_graphs(net):
    """The graphs live in a store keyed weakly by their cache; they must not keep it (and its memory) alive."""
    import weakref
    cache = filled_cache(net.config, 4, 64, seed=7)
    rows = ragged_rows([3, 2, 5, 1], [8, 16, 24, 32], 4)
    with torch.no_grad():
        kernels.graphed(model.SDAR.decode_layers, capture=False)(net, torch.randn(rows.num_rows, 32), rows, cache, 0, 4)
    assert cache in kernels._STORES
    alive = weakref.ref(cache)
    del cache
    gc.collect()
    assert alive() is None


def test_buckets_waste_at_most_an_eighth():
    for n in range(1, 20000, 7):
        b = kernels._bucket(n)
        assert b >= n and (b - n <= b // 8 or b - n < 8), (n, b)
    assert len({kernels._bucket(n) for n in range(1, 8193)}) <= 80  # few shapes, so few graphs


def test_reused_cache_is_handed_back_for_equal_arguments_and_released():
    import weakref

    class Made:
        pass

    made = []

    def make(*args):
        made.append(Made())
        return made[-1]

    owner, other = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    a = kernels.reused_cache(owner, make, 1, "x")
    assert kernels.reused_cache(owner, make, 1, "x") is a
    assert kernels.reused_cache(other, make, 1, "x") is not a           # one per model
    b = kernels.reused_cache(owner, make, 2, "x")                      # other arguments: a new one
    assert b is not a and len(made) == 3
    alive = weakref.ref(b)
    del a, b, made[:]
    kernels.release(owner)
    gc.collect()
    assert alive() is None                                              # release frees it
    kept = weakref.ref(kernels.reused_cache(other, make, 1, "x"))
    del other, made[:]
    gc.collect()
    assert kept() is None                                               # so does dropping the model


def test_fast_paths_swap_in_fused_functions_and_put_them_back(net):
    ids = torch.randint(10, 300, (2, 16), generator=torch.Generator().manual_seed(6))
    plain_fns = {(m, name): m.__dict__[name] for m in net.modules() for name in kernels.SWAPPABLE if name in m.__dict__}
    assert {fn for fn in plain_fns.values()} == {model.rms_norm, model.apply_rope, model.swiglu, model.cached_attention}
    with torch.no_grad():
        want = net(ids, block_size=8)
        with warnings.catch_warnings(record=True) as caught, kernels.fast_paths(net):
            warnings.simplefilter("always")
            assert all(getattr(m, name) is not fn for (m, name), fn in plain_fns.items())
            got = net(ids, block_size=8)
    assert not [c for c in caught if "plain version" in str(c.message)]  # it really ran compiled
    assert all(getattr(m, name) is fn for (m, name), fn in plain_fns.items())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


PROMPTS = [[random.Random(i).randint(10, 299) for _ in range(n)] for i, n in enumerate((5, 9, 12, 3))]


def generate_all(net, device, **opts):
    return decode(copy.deepcopy(net).to(device), **opts)  # a copy: the fixture stays on the CPU for later tests


def decode(net, **opts):
    with torch.no_grad():
        out = generate.generate_ids(net, PROMPTS, 3, [2], generate.Options(max_new_tokens=20, batch_size=3, **opts))
    return [ids for ids, _ in out]


@pytest.mark.parametrize("mode", [dict(delayed_cache=False), dict()])  # FOCUS: test_focus_rules.py
def test_compile_generates_the_plain_tokens_on_cpu(net, mode):
    assert generate_all(net, "cpu", compile=True, **mode) == generate_all(net, "cpu", **mode)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("mode", [dict(delayed_cache=False), dict(), dict(focus=True, alpha=1.0)])
def test_cuda_graphs_generate_the_plain_tokens(net, mode):
    """On CUDA, --compile runs the steps' layers as CUDA graphs; greedy tokens equal the plain CUDA path's. The
    graphs live with the model's reused cache, so a second run on the same model captures nothing."""
    gc.collect()  # earlier tests' caches (and their graphs) go now, not in the middle of the count
    on_gpu = copy.deepcopy(net).to("cuda")
    plain = decode(on_gpu, **mode)
    before = kernels.capture_seconds()
    graphed = decode(on_gpu, compile=True, **mode)
    captured, capture_s = kernels.graph_count(), kernels.capture_seconds()
    again = decode(on_gpu, compile=True, **mode)  # the graphs captured by the first run, replayed
    assert graphed == plain and again == plain
    assert captured > 0 and capture_s > before
    assert (kernels.graph_count(), kernels.capture_seconds()) == (captured, capture_s)  # replays capture nothing
    kernels.release(on_gpu)


def step_inputs(net, counts, num_slots, seed):
    """A FOCUS step's rows (each sequence's whole block of 8, at 8 + 16 * slot), which of them are masked, and
    per-slot targets, progress and last confidences."""
    gen = torch.Generator().manual_seed(seed)
    rows = ragged_rows(counts, [8 + 16 * i for i in range(len(counts))], num_slots)
    col = rows.pos % 8
    is_mask = torch.rand(rows.num_rows, generator=gen) < 0.7
    target = torch.randint(1, 4, (num_slots,), generator=gen)
    progress = torch.randint(-1, 3, (num_slots,), generator=gen)
    confidence = torch.rand(num_slots, 8, generator=gen)
    ids = torch.randint(10, 300, (rows.num_rows,), generator=gen)
    return rows, ids, col, is_mask, target, progress, confidence


@pytest.mark.parametrize("rank_by", [r for r in focus.RANKINGS if r != "random"])
def test_selection_on_the_graph_grid_equals_the_ragged_one(net, rank_by):
    """The first graph of a FOCUS step holds layers 0-1, the whole selection and the compaction's device side on
    static shapes (focus.early_layers_and_selection: the mask sets on the graph's padded grid, then all padded
    rows compacted with the kept ones first): the same kept rows, hidden states and queries as select_step on the
    ragged grid, for every ranking a graph runs, and after the read the same compaction as compact_step's, with
    the selection's kept rows and with recorded ones (tools/replay.py). Some cases pad the rows (a bucket)."""
    num_slots = 5
    for seed, counts in enumerate(([8, 3, 5, 8], [2, 7, 8, 1, 6], [8, 8, 8], [7, 2, 6], [8, 3, 5, 6])):
        rows, ids, col, is_mask, target, progress, confidence = step_inputs(net, counts, num_slots, seed)
        block_start = 8 + 16 * torch.arange(num_slots)
        plain_cache = filled_cache(net.config, num_slots, 96, seed=5)
        recorded = torch.rand(rows.num_rows, generator=torch.Generator().manual_seed(seed)) < 0.5
        for given in (None, recorded):
            padded_cache = clone(plain_cache)
            with torch.no_grad():
                want = focus.select_step(net, ids, rows, plain_cache, is_mask, col, progress, target, rank_by,
                                         confidence=confidence, recorded_kept=given)
                conf_row = confidence[rows.seq, col]
                x, q1, kept, compacted = kernels.graphed(focus.early_layers_and_selection, capture=False)(
                    net, net.embed_tokens(ids), rows, padded_cache, is_mask, col, target[rows.seq],
                    progress[rows.seq], conf_row, block_start[rows.seq], given, rank_by, False)
            assert kernels._bucket(rows.num_rows) > rows.num_rows or counts != [7, 2, 6]  # padding rows ran
            # the step really evicts (the padded cases' own selection may not; their recorded rows do)
            assert want.kept.any() and (not want.kept.all() or (given is None and seed >= 3))
            assert given is None or torch.equal(want.kept, given)
            assert kept.tolist() == want.kept.tolist(), (counts, kept.tolist(), want.kept.tolist())
            torch.testing.assert_close(x, want.x, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(q1, want.q1, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded_cache.k[:, :num_slots], plain_cache.k[:, :num_slots], atol=1e-5, rtol=0)
            got = focus.read_compacted(compacted.value)
            expected = focus.compact_step(want, want.kept, rows, is_mask, col, block_start)
            for name, a, b in zip(("keep", "rows", "x", "q1", "last_kept", "logit_rows"), got, expected):
                if name == "rows":
                    for field in ("seq", "pos", "line", "place", "key_end", "active"):
                        assert torch.equal(getattr(a, field), getattr(b, field)), (counts, field)
                    for field in ("q_max", "kv_max", "all_slots", "dense", "key_end_per_seq"):
                        assert getattr(a, field) == getattr(b, field), (counts, field)
                elif name in ("x", "q1"):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
                else:
                    assert a.tolist() == b.tolist(), (counts, name)


@pytest.mark.slow
def test_fused_compaction_equals_the_plain_one():
    """The compaction's device side through torch.compile (what runs inside the first graph on CUDA) gives the
    plain function's tensors, and one compilation serves every row count (no size depends on the data, so a
    graph's buckets do not each compile it again: a recompilation here raises, and the fallback would warn)."""
    fused = kernels.fused(focus.compaction)
    for seed, counts in enumerate(([8, 3, 5, 8], [2, 7, 8, 1, 6], [7, 2, 6])):
        gen = torch.Generator().manual_seed(seed)
        rows = ragged_rows(counts, [8 + 16 * i for i in range(len(counts))], 5)
        n = rows.num_rows
        args = (torch.rand(n, generator=gen) < 0.5, rows.seq, rows.pos, torch.rand(n, generator=gen) < 0.7,
                rows.pos % 8, (rows.pos // 16) * 16 + 8, torch.randn(n, 6, generator=gen),
                torch.randn(n, 2, 3, generator=gen), 5)
        want = focus.compaction(*args)
        with warnings.catch_warnings(record=True) as caught, torch._dynamo.config.patch(error_on_recompile=seed > 0):
            warnings.simplefilter("always")
            got = fused(*args)
        assert not [c for c in caught if "plain version" in str(c.message)], counts  # it really ran compiled
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            assert torch.equal(a, b), counts


@pytest.mark.slow
def test_fused_selection_equals_the_plain_one(net):
    """The selection through torch.compile (what runs inside the graph on CUDA) keeps the same rows."""
    rows, ids, col, is_mask, target, progress, confidence = step_inputs(net, [8, 3, 5, 8], 5, seed=0)
    cache = filled_cache(net.config, 5, 96, seed=5)
    conf_row = confidence[rows.seq, col]
    with torch.no_grad():
        x, q0, k0, q1, k1 = focus.early_layers(net, net.embed_tokens(ids), rows, cache)
        args = (q0, k0, q1, k1, rows.line, rows.place, is_mask, col, target[rows.seq], progress[rows.seq], conf_row,
                len(rows.active), rows.q_max, 0.25, 0.25, "delta")
        want = focus.selection_on_rows(*args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = kernels.fused(focus.selection_on_rows)(*args)
    assert not [c for c in caught if "plain version" in str(c.message)]  # it really ran compiled
    assert got.tolist() == want.tolist() and not want.all()


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3), (4, 1), (2, 2)])
def test_flex_attention_of_ragged_rows_matches_the_naive_one(heads, kv_heads):
    """kernels.flex_rows (FlexAttention; unfused here on the CPU, compiled inside the CUDA graphs) gives
    cached_attention's result: each row reads its own sequence's keys, up to its own key end."""
    cfg = tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads)
    cache = filled_cache(cfg, 4, 16, seed=2)
    rows = model.Rows.build(torch.tensor([0, 0, 0, 2, 3, 3]), torch.tensor([4, 6, 7, 3, 9, 11]),
                            torch.tensor([8, 8, 7, 4, 12, 12]), num_slots=4)
    q = torch.randn(6, heads, cfg.head_dim, generator=torch.Generator().manual_seed(3))
    keys, values = cache.read(0, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": the point here
        from torch.nn.attention.flex_attention import flex_attention
        got = kernels.flex_rows(q, keys, values, rows.line, rows.place, rows.key_end, rows.q_max, 0.3, flex_attention)
    torch.testing.assert_close(got, naive_cached_attention(q, 0, rows, cache, 0.3), atol=1e-5, rtol=1e-5)


def test_ragged_attention_is_the_plain_one_off_cuda(net):
    rows = model.Rows.build(torch.tensor([0, 0, 1]), torch.tensor([4, 5, 4]), torch.tensor([6, 6, 5]), num_slots=2)
    cache = filled_cache(net.config, 2, 8, seed=4)
    q = torch.randn(3, net.config.num_attention_heads, net.config.head_dim)
    with kernels.fast_paths(net):
        attend = net.layers[0].self_attn.attend
        assert attend is not model.cached_attention  # swapped in...
        got = attend(q, 0, rows, cache, 0.5)
    assert torch.equal(got, model.cached_attention(q, 0, rows, cache, 0.5))  # ...and plain on the CPU


def reference_varlen(q, k, v, cu_q, cu_k, key_len, max_q, max_k, scale):
    """What flash attention's variable-length forward computes, one sequence at a time in float64: sequence b's
    queries q[cu_q[b]:cu_q[b+1]] (at most max_q, or the kernel would skip some) attend to k[cu_k[b]:][:key_len[b]]
    (at most max_k); kv head = query head // (heads / kv_heads)."""
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    per_kv = q.shape[1] // k.shape[1]
    for b in range(len(key_len)):
        q0, q1, k0, n = cu_q[b].item(), cu_q[b + 1].item(), cu_k[b].item(), key_len[b].item()
        assert q1 - q0 <= max_q and n <= max_k
        if q1 == q0:
            continue
        keys, values = (t[k0:k0 + n].double().repeat_interleave(per_kv, 1) for t in (k, v))  # (n, heads, d)
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", q[q0:q1].double(), keys) * scale, -1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", weights, values)
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 3), (4, 1), (2, 2)])
@pytest.mark.parametrize("in_graph", [False, True])
def test_varlen_attention_of_ragged_rows_matches_the_plain_one(heads, kv_heads, in_graph):
    """kernels.varlen_rows (the rows packed one sequence per (line, kv head), keys read in place from the cache)
    gives cached_attention's result, through a float64 stand-in for flash attention's varlen kernel: with
    slots without rows, the lines of a graph's slot grid (line = slot, the spare slot's padding rows all at
    place 0, key end 1) and of an eager step (lines = active slots only)."""
    cfg = tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads)
    cache = filled_cache(cfg, 4, 16, seed=2)
    seq, pos, key_end = [0, 0, 0, 2, 3, 3], [4, 6, 7, 3, 9, 11], [8, 8, 8, 4, 12, 12]
    if in_graph:  # five padding rows in the spare slot (4), more than a line's rows, as kernels._Graph.fill lays them
        seq, pos, key_end = seq + [4] * 5, pos + [0] * 5, key_end + [1] * 5
    rows = model.Rows.build(torch.tensor(seq), torch.tensor(pos), torch.tensor(key_end), num_slots=5)
    if in_graph:
        rows = dataclasses.replace(rows, line=rows.seq, active=torch.arange(5), q_max=4, kv_max=16,
                                   place=torch.where(rows.seq == 4, 0, rows.place), _layouts={})
    q = torch.randn(rows.num_rows, heads, cfg.head_dim, generator=torch.Generator().manual_seed(3))
    with kernels.graph_shapes() if in_graph else contextlib.nullcontext():
        got = kernels.varlen_rows(q, 0, rows, cache, 0.3, reference_varlen)
    torch.testing.assert_close(got, float64_attention(q, rows, cache, 0.3), atol=1e-9, rtol=1e-9)  # padding rows too: they see the spare's key 0


def test_rows_know_whether_their_sequences_share_a_key_end():
    """varlen attention gives one key end per sequence: a decode step's rows have it, a prefill's do not."""
    step = model.Rows.build(torch.tensor([0, 0, 2]), torch.tensor([4, 5, 9]), torch.tensor([6, 6, 10]), num_slots=3)
    prefill = model.Rows.build(torch.tensor([0, 0, 1]), torch.tensor([3, 4, 2]), torch.tensor([4, 8, 4]), num_slots=3)
    assert step.key_end_per_seq and not prefill.key_end_per_seq


def test_attention_kernel_is_varlen_for_ragged_half_precision_decode_rows_on_cuda(request):
    ragged = model.Rows.build(torch.tensor([0, 0, 1]), torch.tensor([4, 5, 4]), torch.tensor([6, 6, 5]), num_slots=2)
    dense = model.Rows.build(torch.tensor([0, 0, 1, 1]), torch.tensor([4, 5, 4, 5]), torch.tensor([6] * 4), num_slots=2)
    prefill = model.Rows.build(torch.tensor([0, 0]), torch.tensor([3, 4]), torch.tensor([4, 8]), num_slots=2)
    cache = type("Cache", (), {"k": torch.zeros(2, 3, 2, 16, 8)})
    q = type("Q", (), {"shape": (3, 4, 8), "dtype": torch.bfloat16, "device": torch.device("cuda")})
    pick = functools.partial(kernels.attention_kernel, q=q, cache=cache)
    assert pick(ragged) == "varlen"                       # the default
    assert pick(dense) == "mask"                          # no mask needed: SDPA's own flash kernel
    assert pick(prefill) == "mask"                        # a key end per row: SDPA with a mask
    assert kernels.attention_kernel(ragged, type("Q", (), {**vars(q), "device": torch.device("cpu")}), cache) == "mask"
    assert kernels.attention_kernel(ragged, type("Q", (), {**vars(q), "dtype": torch.float32}), cache) == "mask"
    assert kernels.attention_kernel(ragged, type("Q", (), {**vars(q), "shape": (3, 4, 12)}), cache) == "mask"
    request.addfinalizer(lambda: kernels.use_attention("varlen"))
    kernels.use_attention("mask")
    assert pick(ragged) == "mask"
    kernels.use_attention("flex")
    assert pick(ragged) == "mask"                         # outside a graph (the prefill): it would compile per shape
    with kernels.graph_shapes():
        assert pick(ragged) == ("flex" if kernels.compiled_flex() is not None else "mask")
        assert pick(dense) == "mask"
    with pytest.raises(ValueError, match="one of varlen, flex, mask"):
        kernels.use_attention("sdpa")


def ragged_case_on_cuda(cfg):
    """Ragged decode rows in bf16 on CUDA (slot 1 has none), their cache, queries, and the float64 answer."""
    on_gpu = functools.partial(torch.tensor, device="cuda")
    rows = model.Rows.build(on_gpu([0, 0, 0, 2, 3, 3]), on_gpu([4, 6, 7, 3, 9, 11]), on_gpu([8, 8, 8, 4, 12, 12]),
                            num_slots=4)
    cache = filled_cache(cfg, 4, 16, seed=5)
    cache.k, cache.v = cache.k.cuda().bfloat16(), cache.v.cuda().bfloat16()
    q = torch.randn(6, cfg.num_attention_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    return rows, cache, q


def float64_attention(q, rows, cache, scale):
    as_float64 = type("Cache", (), {"k": cache.k.double(), "v": cache.v.double()})
    return naive_cached_attention(q.double(), 0, rows, as_float64, scale)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_varlen_attention_replays_in_a_cuda_graph(net):
    """Captured once (its layout made inside the capture, as the decode graphs make it), replayed on new queries."""
    rows, cache, q = ragged_case_on_cuda(net.config)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), kernels.graph_shapes():  # warm-up outside the capture
        kernels.varlen_rows(q, 0, rows, cache, 0.3, kernels.flash_varlen)
    torch.cuda.current_stream().wait_stream(side)
    rows._layouts.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), kernels.graph_shapes():
        out = kernels.varlen_rows(q, 0, rows, cache, 0.3, kernels.flash_varlen)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out.double(), float64_attention(q, rows, cache, 0.3), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("kind", ["varlen", "flex"])
def test_ragged_attention_on_cuda_matches_the_plain_one(net, request, kind):
    rows, cache, q = ragged_case_on_cuda(net.config)
    kernels.use_attention(kind)
    request.addfinalizer(lambda: kernels.use_attention("varlen"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kernels.graph_shapes():
            assert kernels.attention_kernel(rows, q, cache) == kind
            got = kernels.ragged_attention(model.cached_attention, q, 0, rows, cache, 0.3)
    assert not [c for c in caught if "unavailable" in str(c.message)]
    torch.testing.assert_close(got.double(), float64_attention(q, rows, cache, 0.3), atol=2e-2, rtol=2e-2)


def test_flex_uses_its_general_kernel_where_the_short_query_one_stacks_128_rows():
    """flex decoding stacks heads_per_kv x q_max query rows per kv head; from 128 on it is the slow case."""
    assert kernels.flex_kernel_options(2, 32) is None                      # SDAR-1.7B, full block: 64 rows
    assert kernels.flex_kernel_options(4, 16) is None                      # SDAR-8B, kept rows: 64
    assert kernels.flex_kernel_options(4, 32) == {"FORCE_USE_FLEX_ATTENTION": True}   # SDAR-8B, full block
    assert kernels.flex_kernel_options(2, 64) == {"FORCE_USE_FLEX_ATTENTION": True}


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("heads,wide", [(16, 5), (16, 12), (16, 30), (32, 12)])
@pytest.mark.parametrize("kind", ["mask", "varlen"])
def test_ragged_attention_in_bf16_on_cuda_matches_float64_at_a_served_shape(heads, wide, kind):
    """model.cached_attention in bf16 on CUDA (SDPA with a mask), and kernels.varlen_rows (flash attention's
    varlen kernel, inside a graph's shapes), against float64, at a
    served FOCUS step's shape: 256 sequences and the spare slot, 8 kv heads of 128, keys up to 768; `wide`
    sequences have 32 rows, the others 1-14. (On an H200, torch 2.11, the same rows through two narrower grids
    differed from this one grid by up to 3 for 12 and 30 such sequences, and not at all for 5:
    results/profiles/h200-split-attention-2026-12-01.log. Which one was wrong is what this test says.)"""
    gen, rnd = torch.Generator().manual_seed(0), random.Random(1)
    k, v = (torch.randn(1, 257, 8, 1024, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    cache = model.KVCache.__new__(model.KVCache)
    cache.k, cache.v, cache.max_len = k, v, 1024
    seq, pos, end = [], [], []
    for s in range(256):
        cols = sorted(rnd.sample(range(32), 32 if s < wide else rnd.randint(1, 14)))
        seq += [s] * len(cols)
        pos += [512 + c for c in cols]
        end += [512 + cols[-1] + 1] * len(cols)
    on_gpu = functools.partial(torch.tensor, device="cuda")
    rows = model.Rows.build(on_gpu(seq + [256]), on_gpu(pos + [0]), on_gpu(end + [1]), num_slots=257)
    rows = dataclasses.replace(rows, kv_max=768)  # keys padded as a graph pads them
    q = torch.randn(rows.num_rows, heads, 128, generator=gen).to("cuda", torch.bfloat16)
    if kind == "mask":
        got = model.cached_attention(q, 0, rows, cache, 128 ** -0.5).double()
    else:
        with kernels.graph_shapes():
            got = kernels.varlen_rows(q, 0, rows, cache, 128 ** -0.5, kernels.flash_varlen).double()
    want = torch.empty_like(got)
    for s in range(257):  # float64, one sequence at a time
        r = (rows.seq == s).nonzero().squeeze(1)
        keys, values = (t[0, s, :, :768].double().repeat_interleave(heads // 8, 0) for t in (k, v))
        scores = torch.einsum("rhd,hkd->hrk", q[r].double(), keys) * 128 ** -0.5
        scores = scores.masked_fill(torch.arange(768, device="cuda") >= rows.key_end[r, None], float("-inf"))
        want[r] = torch.einsum("hrk,hkd->rhd", torch.softmax(scores, -1), values)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("mode", [{}, {"focus": True, "alpha": 1.0}], ids=["full-block", "focus"])
def test_a_cuda_step_waits_for_the_device_only_at_its_reads(monkeypatch, mode):
    """With --compile on CUDA, a step and the end of a step (Decoder.step, Decoder.finish_blocks) wait for the
    device only where they read the host on purpose (.tolist(): the plan after an admission, FOCUS's compaction,
    the end of the step). Any other wait (an item(), a copy of a Python number into an indexed assignment, ...)
    raises under torch.cuda's sync debug mode. The second run replays the first one's graphs: no capture."""
    from conftest import MASK_ID
    net = random_model(tiny_config(num_hidden_layers=3), seed=1).cuda()
    prompts = [[17, 42, 99, 150, 201], [8, 9, 10, 11, 12, 13, 14, 15], [250, 251, 252], list(range(60, 71))]
    opts = decoder.Options(max_new_tokens=12, block_size=8, batch_size=2, compile=True, **mode)
    first = generate.generate_ids(net, prompts, MASK_ID, [5], opts)     # graphs captured, functions compiled

    def read(real):
        def call(self, *args, **kwargs):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return real(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return call

    def checked(real):
        def call(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return real(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return call
    monkeypatch.setattr(torch.Tensor, "tolist", read(torch.Tensor.tolist))
    for name in ("step", "finish_blocks"):
        monkeypatch.setattr(decoder.Decoder, name, checked(getattr(decoder.Decoder, name)))
    assert generate.generate_ids(net, prompts, MASK_ID, [5], opts) == first
