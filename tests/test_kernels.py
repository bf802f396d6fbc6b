"""kernels.py's fast paths against the plain code they replace.

- graphed(fn): a step's ragged rows padded to a bucket (padding rows in the spare cache slot) compute what the
  plain forward computes, and write the same keys and values; checked on CPU through capture=False (the same
  buffers run eagerly), and on CUDA with the graphs themselves.
- fusable: RMSNorm, RoPE and SwiGLU compiled give the plain functions' numbers.
- generation with --compile (fused functions, and CUDA graphs on a GPU) gives the plain path's tokens.
"""
from __future__ import annotations

import random
import warnings

import pytest
import torch

import focus
import generate
import kernels
import model
from conftest import random_model, tiny_config

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
                                                 ([8] * 5, None, None), ([8] * 5, None, [16] * 5)])
def test_padded_layers_equal_the_plain_layers(net, counts, slots, starts):
    """decode_layers on the padded buffers (capture=False) == on the ragged rows: the same outputs, and the same
    keys and values in every sequence's slot; the padding touches only the spare slot. The last case is dense
    (every slot, the same rows and keys): no padding and no attention mask."""
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
        want = focus.late_layers(net, want[0][keep], want[3][keep], kept, plain_cache)
        got = kernels.graphed(focus.late_layers, capture=False)(net, got[0][keep], got[3][keep], kept, padded_cache)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_cache.k[:, :num_slots], plain_cache.k[:, :num_slots], atol=1e-5, rtol=0)


def test_a_dropped_cache_frees_its_graphs(net):
    """The graphs live in a store keyed weakly by their cache; they must not keep it (and its memory) alive."""
    import gc
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


def test_reused_hands_back_the_same_object_for_equal_arguments():
    made = []

    def make(*args):
        made.append(args)
        return object()

    a = kernels.reused(make, 1, "x")
    assert kernels.reused(make, 1, "x") is a
    b = kernels.reused(make, 2, "x")
    assert b is not a and len(made) == 2


def test_fused_functions_match_the_plain_ones():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, 16, generator=gen)
    w = torch.randn(16, generator=gen)
    cos, sin = model.rope_tables(torch.arange(5), 8, 10000.0, torch.float32)
    with warnings.catch_warnings(record=True) as caught, kernels.fast_paths():
        warnings.simplefilter("always")
        fused = (model.rms_norm(x, w, 1e-6), model.apply_rope(x, cos, sin), model.swiglu(x, w))
    assert not [c for c in caught if "plain version" in str(c.message)]  # it really ran compiled
    plain = (model.rms_norm(x, w, 1e-6), model.apply_rope(x, cos, sin), model.swiglu(x, w))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


PROMPTS = [[random.Random(i).randint(10, 299) for _ in range(n)] for i, n in enumerate((5, 9, 12, 3))]


def generate_all(net, device, **opts):
    net = net.to(device)
    with torch.no_grad():
        out = generate.generate_ids(net, PROMPTS, 3, [2], generate.Options(max_new_tokens=20, batch_size=3, **opts))
    return [ids for ids, _ in out]


@pytest.mark.parametrize("mode", [dict(delayed_cache=False), dict()])  # FOCUS: test_focus_rules.py
def test_compile_generates_the_plain_tokens_on_cpu(net, mode):
    assert generate_all(net, "cpu", compile=True, **mode) == generate_all(net, "cpu", **mode)


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
@pytest.mark.parametrize("mode", [dict(delayed_cache=False), dict(), dict(focus=True, alpha=1.0)])
def test_cuda_graphs_generate_the_plain_tokens(net, mode):
    """On CUDA, --compile runs the steps' layers as CUDA graphs; greedy tokens equal the plain CUDA path's."""
    plain = generate_all(net, "cuda", **mode)
    graphed = generate_all(net, "cuda", compile=True, **mode)
    again = generate_all(net, "cuda", compile=True, **mode)  # the graphs captured by the first run, replayed
    assert graphed == plain and again == plain
    assert any(store["graphs"] for store in kernels._STORES.values())
