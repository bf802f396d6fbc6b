"""The SDAR network: the spec form against a literal reference, block-causal masking, and the cached decode path
(forward_rows over packed Rows and a KVCache) against the spec form."""
import dataclasses
import math

import pytest
import torch

import model
from conftest import random_model, tiny_config

ATOL = 1e-5  # fp32, logits of size ~10


def random_ids(batch, length, seed=0, vocab=300):
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# An independent, literal SDAR forward: float64, one position and one head at a time.

def reference_forward(net: model.SDAR, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    cfg = net.config
    w = {name: t.detach().double() for name, t in net.state_dict().items()}
    n_heads, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    heads_per_kv = n_heads // n_kv

    def rms_norm(x, weight):
        return weight * x / torch.sqrt((x * x).mean() + cfg.rms_norm_eps)

    def rope(x, pos):  # rotate-half: pairs (i, i + d/2) turn by pos * theta^(-2i/d)
        half = d // 2
        angle = pos * cfg.rope_theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
        x1, x2 = x[:half], x[half:]
        return torch.cat([x1 * torch.cos(angle) - x2 * torch.sin(angle), x2 * torch.cos(angle) + x1 * torch.sin(angle)])

    out = []
    for seq in ids.tolist():
        S = len(seq)
        x = [w["embed_tokens.weight"][t].clone() for t in seq]
        for layer in range(cfg.num_hidden_layers):
            p = f"layers.{layer}."
            q, k, v = [], [], []
            for i in range(S):
                h = rms_norm(x[i], w[p + "input_layernorm.weight"])
                qi = (w[p + "self_attn.q_proj.weight"] @ h).view(n_heads, d)
                ki = (w[p + "self_attn.k_proj.weight"] @ h).view(n_kv, d)
                q.append([rope(rms_norm(qi[hd], w[p + "self_attn.q_norm.weight"]), i) for hd in range(n_heads)])
                k.append([rope(rms_norm(ki[g], w[p + "self_attn.k_norm.weight"]), i) for g in range(n_kv)])
                v.append((w[p + "self_attn.v_proj.weight"] @ h).view(n_kv, d))
            new_x = []
            for i in range(S):
                allowed = [j for j in range(S) if j // block_size <= i // block_size]
                heads_out = []
                for hd in range(n_heads):
                    g = hd // heads_per_kv
                    scores = torch.stack([q[i][hd] @ k[j][g] / math.sqrt(d) for j in allowed])
                    probs = torch.softmax(scores, 0)
                    heads_out.append(sum(pj * v[j][g] for pj, j in zip(probs, allowed)))
                y = x[i] + w[p + "self_attn.o_proj.weight"] @ torch.cat(heads_out)
                h = rms_norm(y, w[p + "post_attention_layernorm.weight"])
                gate, up = w[p + "mlp.gate_proj.weight"] @ h, w[p + "mlp.up_proj.weight"] @ h
                new_x.append(y + w[p + "mlp.down_proj.weight"] @ (gate * torch.sigmoid(gate) * up))
            x = new_x
        head = w["embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
        out.append(torch.stack([head @ rms_norm(xi, w["norm.weight"]) for xi in x]))
    return torch.stack(out)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_spec_form_matches_literal_reference(tied):
    cfg = tiny_config(tie_word_embeddings=tied, rope_theta=500.0, rms_norm_eps=1e-5)
    net = random_model(cfg, seed=1)
    if not tied:
        assert net.lm_head.weight is not net.embed_tokens.weight
    ids = random_ids(2, 10, seed=3)
    with torch.no_grad():
        got = net(ids, block_size=3)
    want = reference_forward(net, ids, block_size=3)
    assert got.shape == (2, 10, cfg.vocab_size)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Block-causal attention in the spec form.

def test_spec_form_matches_transformers_qwen3(tmp_path):
    """The files checkpoint.save writes, read by transformers' Qwen3ForCausalLM under a 4D block-causal mask
    (additive: 0 or -inf), gives our logits. Skipped without transformers (an optional test dependency)."""
    transformers = pytest.importorskip("transformers")
    import json
    from checkpoint import save
    net = random_model(tiny_config(tie_word_embeddings=False), seed=8)
    save(net, tmp_path, dtype=torch.float32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    hf = transformers.Qwen3ForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").float().eval()
    ids = random_ids(2, 11, seed=9)
    allowed = model.block_causal_mask(torch.arange(11), 4)
    additive = torch.zeros(11, 11).masked_fill(~allowed, float("-inf")).expand(2, 1, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(net(ids, block_size=4), hf(input_ids=ids, attention_mask=additive).logits,
                                   atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def net():
    return random_model(tiny_config(), seed=2)


def test_changing_a_later_block_leaves_earlier_blocks_unchanged(net):
    bs, ids = 4, random_ids(1, 14, seed=4)
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1 - 4) % 296 + 4  # block 2
    with torch.no_grad():
        a, b = net(ids, block_size=bs), net(changed, block_size=bs)
    torch.testing.assert_close(a[0, :8], b[0, :8], atol=ATOL, rtol=0)
    assert (a[0, 8:] - b[0, 8:]).abs().amax(-1).min() > 1e-3  # its own block and the later ones do see it


def test_changing_a_token_changes_every_position_of_its_block(net):
    bs, ids = 4, random_ids(1, 12, seed=5)
    for p in range(4, 8):  # each position of block 1, the last one included: earlier positions see it too
        changed = ids.clone()
        changed[0, p] = (changed[0, p] + 7 - 4) % 296 + 4
        with torch.no_grad():
            a, b = net(ids, block_size=bs), net(changed, block_size=bs)
        torch.testing.assert_close(a[0, :4], b[0, :4], atol=ATOL, rtol=0)
        assert (a[0, 4:8] - b[0, 4:8]).abs().amax(-1).min() > 1e-3, f"position {p}"


def test_block_size_defaults_to_config(net):
    ids = random_ids(1, 10, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(net(ids), net(ids, block_size=net.config.block_size))
        assert not torch.allclose(net(ids, block_size=2), net(ids, block_size=4), atol=1e-3)


# ---------------------------------------------------------------------------------------------------
# The decode path: Rows, KVCache, forward_rows.

def cat_rows(parts):
    """parts: [(slot, positions, key_ends)] in ascending slot order -> seq, pos, key_end tensors."""
    seq = torch.tensor([s for s, pos, _ in parts for _ in pos])
    pos = torch.tensor([p for _, ps, _ in parts for p in ps])
    key_end = torch.tensor([e for _, _, es in parts for e in es])
    return seq, pos, key_end


def decode_blockwise(net, sequences, slots, num_slots, prompt_lens, bs):
    """Run sequences through the decode path the way the engine does: prefill the prompt's whole blocks, then
    one block per call for every sequence at once. Returns {slot: {position: logits}}."""
    cache = model.KVCache(net.config, num_slots, 64, "cpu", torch.float32)
    logits = {s: {} for s in slots}
    tokens = dict(zip(slots, sequences))

    def run(parts):
        seq, pos, key_end = cat_rows(parts)
        rows = model.Rows.build(seq, pos, key_end, num_slots)
        ids = torch.stack([tokens[s][p] for s, p in zip(seq.tolist(), pos.tolist())])
        out = net.forward_rows(ids, rows, cache)
        assert out.shape == (len(seq), net.config.vocab_size)
        for s, p, row in zip(seq.tolist(), pos.tolist(), out):
            logits[s][p] = row
        return rows

    with torch.no_grad():
        run([(s, range(n // bs * bs), [(p // bs + 1) * bs for p in range(n // bs * bs)])
             for s, n in zip(slots, prompt_lens) if n >= bs])
        starts = {s: n // bs * bs for s, n in zip(slots, prompt_lens)}
        while True:
            parts = [(s, range(starts[s], starts[s] + bs), [starts[s] + bs] * bs)
                     for s, t in zip(slots, sequences) if starts[s] + bs <= len(t)]
            if not parts:
                break
            run(parts)
            for s, *_ in parts:
                starts[s] += bs
    return logits


@pytest.mark.parametrize("slots,num_slots", [([0, 1, 2], 3), ([0, 2, 3], 4)], ids=["all-slots", "some-slots"])
def test_decode_path_matches_spec_form_over_several_blocks(net, slots, num_slots):
    bs = 4
    prompt_lens = [5, 8, 3]               # mid-block, aligned, shorter than a block
    total_lens = [16, 20, 12]             # three more blocks each, ending at different positions
    sequences = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(total_lens)]
    got = decode_blockwise(net, sequences, slots, num_slots, prompt_lens, bs)
    for slot, ids, n in zip(slots, sequences, prompt_lens):
        with torch.no_grad():
            want = net(ids[None], block_size=bs)[0]
        first = n // bs * bs
        assert sorted(p for p in got[slot] if p >= first) == list(range(first, len(ids)))
        for p in range(first, len(ids)):
            torch.testing.assert_close(got[slot][p], want[p], atol=ATOL, rtol=0, msg=f"slot {slot} position {p}")


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 1)])
def test_decode_path_matches_spec_form_for_other_head_groupings(heads, kv_heads):
    net = random_model(tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads), seed=3)
    sequences = [random_ids(1, 13, seed=30)[0], random_ids(1, 10, seed=31)[0]]
    got = decode_blockwise(net, sequences, [0, 1], 2, [6, 2], 4)
    for slot, ids in enumerate(sequences):
        with torch.no_grad():
            want = net(ids[None], block_size=4)[0]
        for p in range(4 if slot == 0 else 0, len(ids) // 4 * 4):
            torch.testing.assert_close(got[slot][p], want[p], atol=ATOL, rtol=0)


@pytest.mark.parametrize("bs", [4, 8])
def test_decode_path_batch_of_equal_sequences_is_dense(net, bs):
    ids = random_ids(2, 3 * bs, seed=7)
    got = decode_blockwise(net, list(ids), [0, 1], 2, [bs, bs], bs)
    with torch.no_grad():
        want = net(ids, block_size=bs)
    for b in range(2):
        for p in range(bs, 3 * bs):
            torch.testing.assert_close(got[b][p], want[b, p], atol=ATOL, rtol=0)


def test_recomputing_some_rows_of_a_block_reads_the_others_from_the_cache(net):
    """The delayed-cache situation: a block is computed in full, then only some of its rows are recomputed; their
    keys/values are rewritten and the others come from the cache, so their logits still equal the spec form."""
    bs, num_slots = 4, 2
    ids = [random_ids(1, 12, seed=20)[0], random_ids(1, 8, seed=21)[0]]
    cache = model.KVCache(net.config, num_slots, 32, "cpu", torch.float32)

    def forward(parts, logits_for=None):
        seq, pos, key_end = cat_rows(parts)
        tokens = torch.stack([ids[s][p] for s, p in zip(seq.tolist(), pos.tolist())])
        return net.forward_rows(tokens, model.Rows.build(seq, pos, key_end, num_slots), cache, logits_for)

    with torch.no_grad():
        # sequence 0: blocks 0-1 as context, block 2 (8..11) active; sequence 1: block 0, block 1 (4..7) active
        forward([(s, range(len(ids[s])), [(p // bs + 1) * bs for p in range(len(ids[s]))]) for s in (0, 1)])
        subset = {0: [9, 11], 1: [4, 6]}
        for s, ps in subset.items():  # stale values where the recomputed rows must write before attending
            cache.k[:, s, :, ps] = 100.0
            cache.v[:, s, :, ps] = -100.0
        cache.k[:, :, :, 12:] = float("nan")  # beyond every key_end: never read
        out = forward([(0, subset[0], [12, 12]), (1, subset[1], [8, 8])], logits_for=torch.tensor([1, 2]))
        want0, want1 = net(ids[0][None], block_size=bs)[0], net(ids[1][None], block_size=bs)[0]
    assert out.shape == (2, net.config.vocab_size)
    torch.testing.assert_close(out[0], want0[11], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], want1[4], atol=ATOL, rtol=0)


def test_forward_rows_writes_keys_and_values_at_the_rows_positions(net):
    cfg = net.config
    cache = model.KVCache(cfg, 3, 16, "cpu", torch.float32)
    seq, pos, key_end = cat_rows([(1, [0, 1, 2, 3], [4] * 4)])
    with torch.no_grad():
        net.forward_rows(random_ids(1, 4, seed=8)[0], model.Rows.build(seq, pos, key_end, 3), cache)
    written = cache.k.abs().sum(dim=(0, 2, 4)) > 0  # (slot, position)
    expected = torch.zeros(3, 16, dtype=torch.bool)
    expected[1, :4] = True
    assert torch.equal(written, expected)
    assert cache.k.shape == (cfg.num_hidden_layers, 3, cfg.num_key_value_heads, 16, cfg.head_dim)


# ---------------------------------------------------------------------------------------------------
# Rows and cached_attention.

def test_rows_build_ragged_layout():
    seq = torch.tensor([0, 0, 0, 2, 2, 3])
    pos = torch.tensor([4, 5, 6, 8, 9, 0])
    key_end = torch.tensor([7, 7, 7, 12, 12, 4])
    rows = model.Rows.build(seq, pos, key_end, num_slots=4)
    assert rows.active.tolist() == [0, 2, 3]
    assert rows.line.tolist() == [0, 0, 0, 1, 1, 2]
    assert rows.place.tolist() == [0, 1, 2, 0, 1, 0]
    assert (rows.q_max, rows.kv_max, rows.num_rows) == (3, 12, 6)
    assert rows.all_slots is False and rows.dense is False
    taken = rows.take(torch.tensor([1, 2, 5]), torch.tensor([6, 6, 2]), num_slots=4)
    assert taken.pos.tolist() == [5, 6, 0] and taken.active.tolist() == [0, 3]
    assert (taken.line.tolist(), taken.place.tolist(), taken.q_max, taken.kv_max) == ([0, 0, 1], [0, 1, 0], 2, 6)


def test_rows_build_dense_only_with_equal_counts_and_key_ends():
    seq, pos = torch.tensor([0, 0, 1, 1]), torch.tensor([4, 5, 4, 5])
    dense = model.Rows.build(seq, pos, torch.tensor([8, 8, 8, 8]), num_slots=2)
    assert dense.dense and dense.all_slots and dense.q_max == 2 and dense.kv_max == 8
    assert not model.Rows.build(seq, pos, torch.tensor([8, 8, 6, 6]), num_slots=2).dense
    assert not model.Rows.build(torch.tensor([0, 0, 0, 1]), pos, torch.tensor([8] * 4), num_slots=2).dense
    assert not model.Rows.build(seq, pos, torch.tensor([8] * 4), num_slots=3).all_slots


def naive_cached_attention(q, layer, rows, cache, scale):
    """One query row and one head at a time, straight from the cache. q: (T, heads, head_dim)."""
    heads, kv_heads = q.shape[1], cache.k.shape[2]
    out = torch.zeros_like(q)
    for r in range(q.shape[0]):
        s, end = rows.seq[r], rows.key_end[r]
        for h in range(heads):
            g = h // (heads // kv_heads)
            keys, values = cache.k[layer, s, g, :end], cache.v[layer, s, g, :end]
            out[r, h] = torch.softmax(keys @ q[r, h] * scale, 0) @ values
    return out


def filled_cache(cfg, num_slots, max_len, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = model.KVCache(cfg, num_slots, max_len, "cpu", torch.float32)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    return cache


def test_cached_attention_dense_and_masked_paths_agree():
    cfg = tiny_config()
    cache = filled_cache(cfg, 3, 16, seed=0)
    seq, pos = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]), torch.tensor([8, 9, 10] * 3)
    rows = model.Rows.build(seq, pos, torch.full((9,), 11), num_slots=3)
    assert rows.dense and rows.all_slots
    q = torch.randn(9, cfg.num_attention_heads, cfg.head_dim, generator=torch.Generator().manual_seed(1))
    scale = cfg.head_dim ** -0.5
    want = naive_cached_attention(q, 1, rows, cache, scale)
    for variant in (rows, dataclasses.replace(rows, dense=False), dataclasses.replace(rows, all_slots=False),
                    dataclasses.replace(rows, dense=False, all_slots=False)):
        got = model.cached_attention(q, 1, variant, cache, scale)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (6, 3), (4, 1), (2, 2)])
def test_cached_attention_ragged_rows_match_naive_gqa(heads, kv_heads):
    cfg = tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads)
    cache = filled_cache(cfg, 4, 16, seed=2)
    seq = torch.tensor([0, 0, 0, 2, 3, 3])
    pos = torch.tensor([4, 6, 7, 3, 9, 11])
    rows = model.Rows.build(seq, pos, torch.tensor([8, 8, 8, 4, 12, 12]), num_slots=4)
    assert not rows.dense and not rows.all_slots
    q = torch.randn(6, heads, cfg.head_dim, generator=torch.Generator().manual_seed(3))
    got = model.cached_attention(q, 0, rows, cache, 0.3)
    torch.testing.assert_close(got, naive_cached_attention(q, 0, rows, cache, 0.3), atol=1e-5, rtol=1e-5)


def test_block_causal_mask():
    mask = model.block_causal_mask(torch.arange(6), 2)
    want = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, want)



def test_rows_build_refuses_no_rows():
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="no rows"):
        model.Rows.build(empty, empty, empty, num_slots=2)
