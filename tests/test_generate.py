"""The decode loop: unmasking rules, sampling, generate_ids end to end on a tiny checkpoint (against a slow
loop over the spec form, across batchings, stops, the delayed cache and prompt alignment) and the command line."""
import collections
import json
import math

import pytest
import torch

import generate
from checkpoint import CHATML
import model
from conftest import MASK_ID, assert_one_line_error, random_model, takes_a_number_from_the_host, tiny_config
from decoder import sample, unmask
from generate import Options, generate_ids

BS = 4
PROMPTS = [[17, 42, 99, 150, 201], [8, 9, 10, 11, 12, 13, 14, 15], [250, 251, 252], list(range(60, 71))]  # 5, 8, 3, 11


def run(net, prompts, eos_ids=(), step_hook=None, **opts):
    """generate_ids with blocks of 4 and no EOS unless given -> [(ids, stats)]."""
    opts.setdefault("block_size", BS)
    return generate_ids(net, [list(p) for p in prompts], MASK_ID, list(eos_ids), Options(**opts), step_hook=step_hook)


# ---------------------------------------------------------------------------------------------------
# unmask(): which masked slots a step decodes.

CONF = torch.tensor([[0.95, 0.50, 0.99, 0.92, 0.30, 0.97],
                     [0.20, 0.60, 0.40, 0.10, 0.55, 0.05],
                     [0.99, 0.99, 0.99, 0.99, 0.99, 0.99],
                     [0.30, 0.90, 0.10, 0.80, 0.20, 0.70]])
CAND = torch.tensor([[1, 1, 0, 1, 1, 0],
                     [1, 1, 1, 1, 1, 1],
                     [0, 0, 0, 0, 0, 0],
                     [1, 0, 1, 0, 0, 1]], dtype=torch.bool)


def chosen_columns(mask):
    return [row.nonzero().squeeze(1).tolist() for row in mask]


def test_unmask_threshold():
    got = unmask(CONF, CAND, "threshold", 0.9, k=1)
    # row 0: candidates >= 0.9 (0.99 and 0.97 are not candidates); row 1: none reaches it, so the top-1 alone;
    # row 2: no candidate, nothing; row 3: top-1 candidate only (0.9 and 0.8 are not candidates).
    assert chosen_columns(got) == [[0, 3], [1], [], [5]]
    assert chosen_columns(unmask(CONF, CAND, "threshold", 0.92, k=1))[0] == [0, 3]  # >= threshold
    assert chosen_columns(unmask(CONF, CAND, "threshold", 1.0, k=1)) == [[0], [1], [], [5]]


def test_unmask_static():
    assert chosen_columns(unmask(CONF, CAND, "static", 0.9, k=2)) == [[0, 3], [1, 4], [], [0, 5]]
    assert chosen_columns(unmask(CONF, CAND, "static", 0.9, k=3)) == [[0, 1, 3], [1, 2, 4], [], [0, 2, 5]]
    # more than the candidates: all of them; more than the block: no error
    assert chosen_columns(unmask(CONF, CAND, "static", 0.9, k=10)) == [[0, 1, 3, 4], list(range(6)), [], [0, 2, 5]]


def test_unmask_sequential():
    assert chosen_columns(unmask(CONF, CAND, "sequential", 0.9, k=1)) == [[0], [0], [], [0]]
    assert chosen_columns(unmask(CONF, CAND, "sequential", 0.9, k=2)) == [[0, 1], [0, 1], [], [0, 2]]
    assert chosen_columns(unmask(CONF, CAND, "sequential", 0.9, k=9)) == chosen_columns(CAND)


# ---------------------------------------------------------------------------------------------------
# sample(): token and confidence.

LOGITS = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3


def test_sample_greedy_is_argmax_with_its_probability():
    token, conf = sample(LOGITS, 0.0, 0, 1.0)
    assert torch.equal(token, LOGITS.argmax(-1))
    torch.testing.assert_close(conf, LOGITS.softmax(-1).amax(-1))


def test_sample_top_k_1_and_tiny_top_p_are_greedy():
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(sample(LOGITS, 0.8, 1, 1.0, gen)[0], LOGITS.argmax(-1))
        assert torch.equal(sample(LOGITS, 1.5, 0, 1e-6, gen)[0], LOGITS.argmax(-1))


def test_sample_confidence_is_the_probability_at_the_temperature():
    token, conf = sample(LOGITS, 2.0, 0, 1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(conf, (LOGITS / 2.0).softmax(-1).gather(1, token[:, None]).squeeze(1))


def test_sample_is_deterministic_for_a_seed():
    draws = [sample(LOGITS, 1.0, 0, 1.0, torch.Generator().manual_seed(s))[0] for s in (7, 7, 8, 9)]
    assert torch.equal(draws[0], draws[1])
    assert not (torch.equal(draws[0], draws[2]) and torch.equal(draws[0], draws[3]))


def test_sample_top_k_and_top_p_keep_the_right_sets():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, 2, 1.0, gen)[0].tolist()) == {1, 3}
    assert set(sample(logits, 1.0, 0, 0.8, gen)[0].tolist()) == {1, 3}        # 0.5 + 0.3 reaches 0.8
    assert set(sample(logits, 1.0, 0, 0.81, gen)[0].tolist()) == {1, 2, 3}    # the smallest set reaching it


# ---------------------------------------------------------------------------------------------------
# generate_ids against a slow loop over the spec form (no delayed cache: every step computes the whole block).

def spec_generate(net, prompt, eos_ids, strategy="threshold", threshold=0.9, k=1, max_new_tokens=16, bs=BS):
    """The decode loop written plainly: the active block starts at P // bs * bs and ends bs later or at the
    token budget P + max_new_tokens, whichever comes first; each step runs the spec form over everything up to
    the block's end and unmasks by the rule; after a fully decoded block, stop at EOS or when the budget is
    reached, otherwise a commit step (decodes nothing) and the next block."""
    tokens, P = list(prompt), len(prompt)
    start, limit, decoded, computed = P // bs * bs, P + max_new_tokens, [], []
    while True:
        end = min(start + bs, limit)
        tokens += [MASK_ID] * (end - len(tokens))
        while MASK_ID in tokens[start:end]:
            with torch.no_grad():
                logits = net(torch.tensor([tokens[:end]]), block_size=bs)[0, start:end].double()
            logits[:, MASK_ID] = -math.inf
            conf, best = logits.softmax(-1).max(-1)
            cand = [j for j in range(end - start) if tokens[start + j] == MASK_ID]
            if strategy == "threshold":
                chosen = {j for j in cand if conf[j] >= threshold} | {max(cand, key=lambda j: conf[j])}
            elif strategy == "static":
                chosen = sorted(cand, key=lambda j: -conf[j])[:k]
            else:
                chosen = cand[:k]
            for j in chosen:
                tokens[start + j] = int(best[j])
            decoded.append(len(chosen))
            computed.append(end - start)
        eos = [p for p in range(max(start, P), end) if tokens[p] in eos_ids]
        if eos:
            return tokens[P:min(eos[0], limit)], decoded, computed
        if end >= limit:
            return tokens[P:end], decoded, computed
        decoded.append(0)
        computed.append(bs)
        start = end


@pytest.mark.parametrize("strategy,k", [("threshold", 1), ("static", 2), ("sequential", 1), ("sequential", 3)])
def test_generate_matches_the_spec_form_loop(loaded, strategy, k):
    net, _ = loaded
    results = run(net, PROMPTS, strategy=strategy, tokens_per_step=k, threshold=0.6, max_new_tokens=14,
                  delayed_cache=False)
    for prompt, (ids, stats) in zip(PROMPTS, results):
        want_ids, want_decoded, want_computed = spec_generate(net, prompt, (), strategy, 0.6, k, max_new_tokens=14)
        assert ids == want_ids
        assert stats["decoded"] == want_decoded
        assert stats["computed"] == want_computed


def test_generate_is_not_trivial(loaded):
    """Guards the other tests: the tiny model's output varies with the prompt and within a sequence."""
    net, _ = loaded
    outs = [ids for ids, _ in run(net, PROMPTS, max_new_tokens=12)]
    assert len({tuple(o) for o in outs}) == len(outs)
    assert all(len(set(o)) >= 3 for o in outs)
    assert any(max(s["decoded"]) > 1 for _, s in run(net, PROMPTS, max_new_tokens=12))  # steps decode several


# ---------------------------------------------------------------------------------------------------
# Batching: a ragged batch, and fewer slots than prompts (slot reuse), give what each prompt gives alone.

@pytest.mark.parametrize("delayed_cache", [True, False], ids=["delayed", "full-block"])
def test_batching_invariance(loaded, delayed_cache):
    net, _ = loaded
    opts = dict(max_new_tokens=13, delayed_cache=delayed_cache, threshold=0.7)
    alone = [run(net, [p], batch_size=1, **opts)[0] for p in PROMPTS]
    for batch_size in (4, 2, 3):
        batched = run(net, PROMPTS, batch_size=batch_size, **opts)
        for i, (a, b) in enumerate(zip(alone, batched)):
            assert b[0] == a[0], f"prompt {i}, batch_size {batch_size}"
            assert b[1] == a[1], f"prompt {i}, batch_size {batch_size}"


def test_batching_invariance_with_eos_ending_sequences_early(loaded):
    """Sequences that stop at EOS free their slot mid-run; the next prompt takes it."""
    net, _ = loaded
    free_run = run(net, PROMPTS, max_new_tokens=16)
    eos = free_run[0][0][5]  # ends prompt 0 early, maybe others too
    alone = [run(net, [p], eos_ids=[eos], max_new_tokens=16)[0] for p in PROMPTS]
    assert len(alone[0][0]) <= 5
    assert run(net, PROMPTS, eos_ids=[eos], batch_size=2, max_new_tokens=16) == alone


# ---------------------------------------------------------------------------------------------------
# Stops: EOS, the token budget, repeated blocks.

def test_eos_truncates_and_stops_at_its_block(loaded):
    net, _ = loaded
    prompt = PROMPTS[0]                                   # P = 5: first block 4..7, then 8..11, 12..15, ...
    free_ids, free_stats = run(net, [prompt], max_new_tokens=20)[0]
    i = next(i for i in range(4, 20) if free_ids[i] not in free_ids[:i])  # first occurrence, past block 1
    unused = next(t for t in range(4, 300) if t not in free_ids)          # a second EOS id that never shows up
    ids, stats = run(net, [prompt], eos_ids=[unused, free_ids[i]], max_new_tokens=20)[0]
    assert ids == free_ids[:i]
    # the sequence ends right after the step that completes the EOS block: no commit step for it
    block_end = ((len(prompt) + i) // BS + 1) * BS
    done = [n for n, total in enumerate(torch.tensor(free_stats["decoded"]).cumsum(0).tolist())
            if total == block_end - len(prompt)][0]
    assert stats["decoded"] == free_stats["decoded"][:done + 1]
    assert (stats.pop("finish_reason"), free_stats.pop("finish_reason")) == ("eos", "length")
    assert {k: v[:done + 1] for k, v in free_stats.items()} == stats


@pytest.mark.parametrize("mode", [dict(strategy="sequential"), dict(delayed_cache=False, strategy="sequential"),
                                  dict(focus=True, alpha=1.0)])
def test_eos_early_stop_gives_the_same_tokens_in_fewer_steps(loaded, mode):
    """eos_early_stop ends a sequence once its EOS is decoded with nothing masked before it: the same tokens,
    the same steps up to that point, none after; the normal run goes on until the EOS's block is done."""
    net, _ = loaded
    free = run(net, PROMPTS, max_new_tokens=24, **mode)
    eos = [ids[6] for ids, _ in free]                     # a token each sequence decodes early in its run
    normal = run(net, PROMPTS, eos_ids=eos, max_new_tokens=24, **mode)
    early = run(net, PROMPTS, eos_ids=eos, max_new_tokens=24, eos_early_stop=True, **mode)
    fewer = 0
    for (ids_n, st_n), (ids_e, st_e) in zip(normal, early):
        assert ids_e == ids_n
        n = len(st_e["decoded"])
        assert {k: v[:n] for k, v in st_n.items() if k != "finish_reason"} == \
            {k: v for k, v in st_e.items() if k != "finish_reason"}
        assert st_e["finish_reason"] == st_n["finish_reason"]
        fewer += n < len(st_n["decoded"])
    assert fewer > 0


def test_eos_inside_the_prompt_does_not_stop(loaded):
    net, _ = loaded
    free_ids, _ = run(net, [PROMPTS[0]], max_new_tokens=10)[0]
    eos = next(t for t in range(4, 300) if t not in free_ids)
    prompt = PROMPTS[0][:4] + [eos]                       # the EOS id sits in the first active block
    free = run(net, [prompt], max_new_tokens=10)[0]
    assert eos not in free[0]
    assert run(net, [prompt], eos_ids=[eos], max_new_tokens=10)[0] == free


@pytest.mark.parametrize("max_new_tokens", [1, 3, 4, 9, 12])
@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[1]], ids=["P5", "P8"])
def test_budget_stop_and_step_structure(loaded, prompt, max_new_tokens):
    """One token a step: each block is its masked slots' steps plus a commit step, except the last block, which
    ends at the budget, so a run takes max_new_tokens decoding steps whatever the block size."""
    net, _ = loaded
    ids, stats = run(net, [prompt], strategy="sequential", tokens_per_step=1, max_new_tokens=max_new_tokens)[0]
    assert len(ids) == max_new_tokens and stats["finish_reason"] == "length"
    P, limit = len(prompt), len(prompt) + max_new_tokens
    want, start = [], P // BS * BS
    while True:
        want += [1] * (min(start + BS, limit) - max(start, P))  # the last block ends at the budget
        if start + BS >= limit:
            break
        want.append(0)
        start += BS
    assert stats["decoded"] == want


def test_a_large_block_costs_only_the_budget(loaded):
    """Block 64, budget 3: at most 3 steps (each decodes at least one token), each computing at most the prompt's
    tail and the 3 budget slots, not the 64-slot block."""
    net, _ = loaded
    for prompt in PROMPTS:
        (ids, stats), = run(net, [prompt], block_size=64, max_new_tokens=3, delayed_cache=False)
        assert len(ids) == 3
        assert 1 <= len(stats["decoded"]) <= 3
        assert stats["computed"] == stats["block"] == [len(prompt) + 3] * len(stats["decoded"])


def constant_model(token):
    """Every position predicts `token` with probability ~1: layers add nothing, every embedding is about u, and the
    head's row for `token` is 3u."""
    net = random_model(tiny_config(tie_word_embeddings=False), seed=5)
    with torch.no_grad():
        for layer in net.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        net.norm.weight.fill_(1.0)
        u = torch.ones(net.config.hidden_size)
        net.embed_tokens.weight.mul_(0.1).add_(u)
        net.lm_head.weight.mul_(0.1)
        net.lm_head.weight[token] = 3 * u
    return net


def test_eos_at_the_first_generated_token():
    net = constant_model(100)
    (ids, stats), = run(net, [PROMPTS[0]], eos_ids=[100], max_new_tokens=40)
    assert ids == [] and stats["decoded"] == [3] and stats["finish_reason"] == "eos"


@pytest.mark.parametrize("repeats", [2, 3])
@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[1], [5, 6, 7, 8, 100], [5, 6, 7, 8, 100, 100, 100, 100]],
                         ids=["P5", "P8", "P5-tail-repeats", "P8-block-repeats"])
def test_stop_repeats_counts_generated_blocks_only(prompt, repeats):
    net = constant_model(100)
    P = len(prompt)
    first_generated_block = -(-P // BS) * BS              # blocks holding prompt tokens never count
    end = first_generated_block + repeats * BS
    (ids, stats), = run(net, [prompt], max_new_tokens=40, stop_repeats=repeats)
    assert ids == [100] * (end - P) and stats["finish_reason"] == "repeats"
    (ids, stats), = run(net, [prompt], max_new_tokens=40)
    assert ids == [100] * 40 and stats["finish_reason"] == "length"


def expected_repeat_stop(prompt_len, ids, repeats, bs=BS):
    """Where stop_repeats ends a sequence whose free run is `ids`: after the first block that equals each of the
    repeats - 1 blocks before it, all of them made of generated tokens only."""
    first = -(-prompt_len // bs) * bs - prompt_len         # index in ids of the first fully generated block
    blocks = [ids[i:i + bs] for i in range(first, len(ids) - bs + 1, bs)]
    for j in range(repeats - 1, len(blocks)):
        if all(blocks[j - r] == blocks[j] for r in range(1, repeats)):
            return ids[:first + (j + 1) * bs]
    return ids


@pytest.mark.parametrize("repeats", [2, 3])
def test_stop_repeats_on_free_runs(loaded, repeats):
    net, _ = loaded
    prompts = [torch.randint(4, 300, (8,), generator=torch.Generator().manual_seed(s)).tolist() for s in (2, 3, 8, 10)]
    prompts += [[5, 6, 7, 8, 9]]
    free = [ids for ids, _ in run(net, prompts, max_new_tokens=40)]
    want = [expected_repeat_stop(len(p), ids, repeats) for p, ids in zip(prompts, free)]
    assert [ids for ids, _ in run(net, prompts, max_new_tokens=40, stop_repeats=repeats)] == want
    # guards the test itself: with 2, some of these runs stop early and one does not; none has 3 equal blocks
    assert [len(w) < 40 for w in want] == ([True, False, True, True, True] if repeats == 2 else [False] * 5)


@pytest.mark.parametrize("max_new_tokens", [9, 10, 11, 12])
def test_stop_repeats_never_exceeds_the_budget(max_new_tokens):
    """P = 5: blocks 8..11 and 12..15 repeat, so the repeat stop ends at 16 (11 tokens) unless the budget is less."""
    net = constant_model(100)
    (ids, stats), = run(net, [PROMPTS[0]], max_new_tokens=max_new_tokens, stop_repeats=2)
    assert ids == [100] * min(max_new_tokens, 11)
    assert stats["finish_reason"] == ("repeats" if max_new_tokens > 11 else "length")


def test_the_mask_token_is_never_generated():
    net = constant_model(MASK_ID)  # the model's favourite output is the mask token itself
    (ids, stats), = run(net, [PROMPTS[0]], max_new_tokens=12)
    assert len(ids) == 12 and MASK_ID not in ids
    assert sum(stats["decoded"]) == 12  # every masked slot of blocks 4..7, 8..11, 12..15, 16 (the budget) decoded


def test_seeded_sampling(loaded):
    net, _ = loaded
    opts = dict(max_new_tokens=12, temperature=2.0, top_k=50)
    a = [ids for ids, _ in run(net, PROMPTS[:2], seed=3, **opts)]
    assert a == [ids for ids, _ in run(net, PROMPTS[:2], seed=3, **opts)]
    others = [[ids for ids, _ in run(net, PROMPTS[:2], seed=s, **opts)] for s in (4, 5, 6)]
    assert any(o != a for o in others)
    assert a != [ids for ids, _ in run(net, PROMPTS[:2], **dict(opts, temperature=0.0))]


def test_generate_checks_prompts_and_options(loaded):
    net, _ = loaded
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        run(net, [[5, 6], []])
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        run(net, [[5] * 500], max_new_tokens=13)
    with pytest.raises(ValueError, match="threshold"):
        run(net, [[5]], threshold=0.0)


# ---------------------------------------------------------------------------------------------------
# The delayed cache and prompt alignment, observed at the model: which rows each step computes.

class Recorder:
    """Wraps model.forward_rows and the step hook: for every step, the decoder's state before it and the rows the
    step's forward pass computed; prefill calls are kept apart."""

    def __init__(self, net, monkeypatch):
        self.steps, self.prefills, self.pending = [], [], None
        original = net.forward_rows

        def forward_rows(ids, rows, cache, logits_for=None, graphs=False, grid="slots"):
            call = dict(ids=ids.tolist(), seq=rows.seq.tolist(), pos=rows.pos.tolist(), key_end=rows.key_end.tolist())
            if self.pending is not None:
                self.pending["rows"], self.pending = call, None
            else:
                self.prefills.append(call)
            return original(ids, rows, cache, logits_for, graphs, grid)

        monkeypatch.setattr(net, "forward_rows", forward_rows)

    def hook(self, dec):
        self.pending = dict(masked=dec.masked.clone(), block_start=dec.block_start.clone(), live=dec.live.clone())
        self.steps.append(self.pending)

    def computed(self, step, slot):
        """(block-local columns, ids, key ends) of the rows of `slot` in step `step`."""
        s = self.steps[step]
        rows = [(p - int(s["block_start"][slot]), i, e)
                for q, p, i, e in zip(s["rows"]["seq"], s["rows"]["pos"], s["rows"]["ids"], s["rows"]["key_end"])
                if q == slot]
        return [c for c, _, _ in rows], [i for _, i, _ in rows], [e for _, _, e in rows]


def reference_processing(recorder, slot, limit, bs=BS):
    """The reference's delayed-cache rule (focus-algorithm.md section 2), replayed on each step's input mask:
    the first step of a block computes every position, later steps the uncached ones (all if none); after a step,
    position i is cached iff i and i + 1 were both decoded in that step's input (the last position: i alone).
    The last block ends at the token budget `limit`: its positions past the budget do not exist."""
    expected, block, uncached, warm = [], None, None, True
    for s in recorder.steps:
        if not s["live"][slot]:
            expected.append([])
            continue
        if int(s["block_start"][slot]) != block:
            block, warm = int(s["block_start"][slot]), True
            size = min(bs, limit - block)
            uncached = [True] * size
        decoded_in = [not m for m in s["masked"][slot].tolist()[:size]]
        process = list(range(size)) if warm or not any(uncached) else [i for i in range(size) if uncached[i]]
        expected.append(process)
        for i in range(size):
            if decoded_in[i] and (i == size - 1 or decoded_in[i + 1]):
                uncached[i] = False
        warm = False
    return expected


@pytest.mark.parametrize("strategy,k", [("threshold", 1), ("sequential", 1), ("static", 2)])
def test_delayed_cache_follows_the_reference_rule(loaded, monkeypatch, strategy, k):
    net, _ = loaded
    rec = Recorder(net, monkeypatch)
    prompts = [PROMPTS[0], PROMPTS[1]]
    results = run(net, prompts, strategy=strategy, tokens_per_step=k, threshold=0.7, max_new_tokens=14,
                  step_hook=rec.hook)
    fewer = 0
    for slot, (ids, stats) in enumerate(results):
        expected = reference_processing(rec, slot, limit=len(prompts[slot]) + 14)
        n_steps = len(stats["computed"])
        for step in range(n_steps, len(rec.steps)):  # an ended sequence computes nothing
            assert expected[step] == rec.computed(step, slot)[0] == []
        for step in range(n_steps):
            cols, in_ids, key_ends = rec.computed(step, slot)
            assert cols == expected[step], f"slot {slot} step {step}"
            assert stats["computed"][step] == len(cols)
            masked = rec.steps[step]["masked"][slot].tolist()
            # masked slots carry the mask id, decoded ones (recomputed before they are cached) their token
            assert [i == MASK_ID for i in in_ids] == [masked[c] for c in cols]
            # attention reaches the last computed position of the block
            assert key_ends == [int(rec.steps[step]["block_start"][slot]) + cols[-1] + 1] * len(cols)
            assert len(cols) >= sum(masked)
            fewer += len(cols) < BS
        assert sum(stats["decoded"]) == len(ids) == 14  # the budget, no more
    assert fewer > 0


def test_sequential_decoding_caches_each_token_two_steps_after_it_is_decoded(loaded, monkeypatch):
    """One token a step, left to right: the token decoded at step t is computed again at t + 1 (with its real id)
    and at t + 2 (the first step whose input also has its right neighbour decoded), then it is cached."""
    net, _ = loaded
    rec = Recorder(net, monkeypatch)
    (ids, stats), = run(net, [PROMPTS[1]], strategy="sequential", max_new_tokens=8, step_hook=rec.hook)
    assert stats["decoded"] == [1, 1, 1, 1, 0, 1, 1, 1, 1]
    assert [rec.computed(s, 0)[0] for s in range(9)] == [
        [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3], [2, 3],   # block 8..11, then its commit step
        [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3]]           # block 12..15, the last: no commit
    assert rec.computed(3, 0)[1][0] == ids[1]  # column 1, decoded at step 1, enters step 3 as its token


def block_sizes(prompt, stats, max_new_tokens):
    """Per step, the size of the step's block: BS, but the last block ends at the budget."""
    limit = len(prompt) + max_new_tokens
    last_commit = max([i for i, d in enumerate(stats["decoded"]) if d == 0], default=-1)
    last_size = limit - (limit - 1) // BS * BS
    return [BS] * (last_commit + 1) + [last_size] * (len(stats["decoded"]) - last_commit - 1)


def test_without_delayed_cache_every_step_computes_the_block(loaded):
    net, _ = loaded
    sizes = []
    for prompt, (ids, stats) in zip(PROMPTS, run(net, PROMPTS, max_new_tokens=14, delayed_cache=False)):
        assert stats["computed"] == block_sizes(prompt, stats, 14) == stats["computed_deep"] == stats["block"]
        sizes += stats["computed"]
    assert min(sizes) < BS  # some prompt's last block is cut by the budget


def test_with_delayed_cache_blocks_start_with_a_full_step(loaded):
    net, _ = loaded
    for prompt, (ids, stats) in zip(PROMPTS, run(net, PROMPTS, max_new_tokens=14)):
        sizes = block_sizes(prompt, stats, 14)
        first_steps = [0] + [i + 1 for i, d in enumerate(stats["decoded"]) if d == 0]  # after each commit step
        assert all(stats["computed"][i] == sizes[i] for i in first_steps)
        assert sum(c < s for c, s in zip(stats["computed"], sizes)) > 0
        assert all(1 <= c <= s for c, s in zip(stats["computed"], sizes))


@pytest.mark.parametrize("P", [5, 6, 7, 8, 3, 12])
def test_prompt_alignment(loaded, monkeypatch, P):
    """P % bs != 0: the first active block starts at P // bs * bs and holds the prompt's tail; P % bs == 0: a fresh
    block of masks at P. Whole prompt blocks are prefilled before, block-causally."""
    net, _ = loaded
    rec = Recorder(net, monkeypatch)
    prompt = list(range(40, 40 + P))
    (ids, stats), = run(net, [prompt], max_new_tokens=6, step_hook=rec.hook)
    start = P // BS * BS
    prefilled = [p for call in rec.prefills for p in call["pos"]]
    assert prefilled == list(range(start))
    assert [e for call in rec.prefills for e in call["key_end"]] == [(p // BS + 1) * BS for p in range(start)]
    cols, in_ids, _ = rec.computed(0, 0)
    assert cols == list(range(BS)) and stats["computed"][0] == BS
    assert in_ids == prompt[start:] + [MASK_ID] * (start + BS - P)
    assert stats["context"][0] == start + BS
    assert len(ids) == 6
    assert sum(stats["decoded"]) == 6                              # the last block ends at the budget


# ---------------------------------------------------------------------------------------------------
# The API and the command line.

def test_generate_api(loaded):
    net, tok = loaded
    results = generate.generate(net, tok, ["What is 17 plus 25?", "Hello"], max_new_tokens=6, block_size=BS)
    assert [r.prompt for r in results] == ["What is 17 plus 25?", "Hello"]
    ids = generate.encode_prompts(tok, ["What is 17 plus 25?"], chat=True)[0]
    assert ids == tok.encode(CHATML.format(prompt="What is 17 plus 25?"))
    (want, stats), = generate_ids(net, [ids], tok.mask_id, tok.eos_ids, Options(max_new_tokens=6, block_size=BS))
    assert results[0].token_ids == want and results[0].stats == stats
    assert results[0].text == tok.decode(want)
    with pytest.raises(ValueError, match="unknown option.*max_tokens"):
        generate.generate(net, tok, ["Hi"], max_tokens=5)


def cli(capsys, *argv):
    code = generate.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(capsys, argv, *words):
    code, out, err = cli(capsys, *argv)
    assert_one_line_error(code, err, words)


BAD_OPTIONS = [
    (["--max-new-tokens", "0"], "max-new-tokens must be positive"),
    (["--max-new-tokens", "-3"], "max-new-tokens must be positive"),
    (["--block-size", "0"], "block-size must be in 1..256"),
    (["--batch-size", "0"], "batch-size must be positive"),
    (["--tokens-per-step", "0"], "tokens-per-step must be positive"),
    (["--threshold", "0"], "threshold must be in (0, 1]"),
    (["--threshold", "1.5"], "threshold must be in (0, 1]"),
    (["--strategy", "random"], "invalid choice: 'random'"),
    (["--top-p", "0"], "top-p"),
    (["--temperature", "-1"], "temperature"),
    (["--stop-repeats", "1"], "stop-repeats"),
    (["--focus", "--no-delayed-cache"], "delayed cache"),
    (["--device", "tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize("extra,words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_cli_bad_options(capsys, checkpoint, extra, words):
    assert_cli_error(capsys, ["--model", str(checkpoint.path), "--prompt", "Hi", *extra], words)


def test_cli_missing_checkpoint(capsys, tmp_path):
    assert_cli_error(capsys, ["--model", str(tmp_path / "nothing"), "--prompt", "Hi"], "nothing", "does not exist")


def test_cli_no_prompt(capsys, checkpoint):
    assert_cli_error(capsys, ["--model", str(checkpoint.path)], "--prompt")


def test_cli_empty_prompt(capsys, checkpoint):
    assert_cli_error(capsys, ["--model", str(checkpoint.path), "--prompt", "  "], "prompt 1 is empty")


def test_cli_prompt_longer_than_the_context(capsys, make_checkpoint):
    path = make_checkpoint(max_position_embeddings=64).path
    assert_cli_error(capsys, ["--model", str(path), "--prompt", "the quick brown fox " * 20, "--max-new-tokens", "8"],
                     "exceeds the model's context of 64")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_cli_cuda_without_cuda(capsys, checkpoint):
    assert_cli_error(capsys, ["--model", str(checkpoint.path), "--prompt", "Hi", "--device", "cuda"],
                     "no CUDA device")


def test_cli_prompts_file_missing(capsys, checkpoint, tmp_path):
    assert_cli_error(capsys, ["--model", str(checkpoint.path), "--prompts-file", str(tmp_path / "p.jsonl")],
                     "cannot read prompts file", "p.jsonl")


@pytest.mark.parametrize("line3,words", [('{"prompt": "x"', ("line 3", "not valid JSON")),
                                         ('{"text": "x"}', ("line 3", '"prompt"')),
                                         ('["x"]', ("line 3",))])
def test_cli_prompts_file_bad_line(capsys, checkpoint, tmp_path, line3, words):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"}\n' + line3 + "\n")
    assert_cli_error(capsys, ["--model", str(checkpoint.path), "--prompts-file", str(f)], *words)


def test_cli_prompts_file_without_prompts(capsys, checkpoint, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n\n")
    assert_cli_error(capsys, ["--model", str(checkpoint.path), "--prompts-file", str(f)], "holds no prompts")


def test_cli_good_run(capsys, checkpoint, tmp_path):
    prompts, out_file = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text('{"prompt": "What is 17 plus 25?"}\n\n{"prompt": "The lazy dog", "id": 2}\n')
    code, out, err = cli(capsys, "--model", str(checkpoint.path), "--prompts-file", str(prompts), "--output",
                         str(out_file), "--max-new-tokens", "6", "--block-size", "4", "--device", "cpu")
    assert code == 0, err
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["What is 17 plus 25?", "The lazy dog"]   # prompt order
    assert [r["index"] for r in lines] == [0, 1]
    assert not (tmp_path / "out.jsonl.partial").exists()
    for r in lines:
        assert set(r) == {"index", "prompt", "text", "stats"} and isinstance(r["text"], str)
        assert len(r["stats"]["decoded"]) == len(r["stats"]["computed"]) > 0
        assert f"### {r['prompt']}\n{r['text']}\n" in out
    assert "Traceback" not in err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("2 sequences, ") and summary.endswith(" tokens/s") and "(block size 4;" in summary


def test_cli_single_prompt_prints_its_text(capsys, checkpoint, loaded):
    code, out, err = cli(capsys, "--model", str(checkpoint.path), "--prompt", "Hello", "--max-new-tokens", "5",
                         "--no-chat")
    assert code == 0, err
    net, tok = loaded
    (ids, _), = generate_ids(net, [tok.encode("Hello")], tok.mask_id, tok.eos_ids, Options(max_new_tokens=5))
    assert out == tok.decode(ids) + "\n"
    assert err.strip().splitlines()[-1].startswith("1 sequences, ")


# ---------------------------------------------------------------------------------------------------
# Exact commit: the commit step recomputes the whole block, so committed keys/values are exact.

def committed_cache_error(net, prompt, **opts):
    """Largest difference between the keys/values a decode left for its committed blocks and those of one
    block-causal prefill of the same tokens (the exact values)."""
    seen = []
    (ids, _), = run(net, [prompt], max_new_tokens=14, step_hook=seen.append, **opts)
    dec = seen[-1]
    end = int(dec.block_start[0])                        # blocks before the active one were committed
    start = len(prompt) // BS * BS                       # prompt blocks: prefilled exactly either way
    assert end > start + BS
    ref = model.KVCache(net.config, 1, dec.cache.max_len, "cpu", torch.float32)
    pos = torch.arange(end)
    with torch.no_grad():
        net.forward_rows(dec.tokens[0, :end], model.Rows.build(torch.zeros_like(pos), pos, (pos // BS + 1) * BS, 1),
                         ref, logits_for=pos[:0])
    return max((dec.cache.k[:, 0, :, start:end] - ref.k[:, 0, :, start:end]).abs().max().item(),
               (dec.cache.v[:, 0, :, start:end] - ref.v[:, 0, :, start:end]).abs().max().item())


def test_exact_commit_leaves_exact_keys_and_values(loaded):
    net, _ = loaded
    assert committed_cache_error(net, PROMPTS[1], exact_commit=True) < 1e-4
    assert committed_cache_error(net, PROMPTS[1], delayed_cache=False) < 1e-4     # the full block commits exactly too
    assert committed_cache_error(net, PROMPTS[1]) > 1e-2    # the delayed cache keeps keys computed beside masks


def test_exact_commit_costs_one_full_step_per_block(loaded):
    net, _ = loaded
    (ids, plain), = run(net, [PROMPTS[0]], max_new_tokens=14)
    (ids_x, exact), = run(net, [PROMPTS[0]], max_new_tokens=14, exact_commit=True)
    commits = [i for i, d in enumerate(exact["decoded"]) if d == 0]
    assert commits and all(exact["computed"][i] == BS for i in commits)
    assert any(plain["computed"][i] < BS for i, d in enumerate(plain["decoded"]) if d == 0)


PLAN_OPTIONS = [
    dict(batch_size=2), dict(batch_size=2, focus=True, alpha=1.0),
    dict(batch_size=3, focus=True, focus_target="saturation"),
    dict(batch_size=1, eos_early_stop=True), dict(batch_size=2, exact_commit=True, focus=True),
    dict(batch_size=2, strategy="static", tokens_per_step=2, stop_repeats=2), dict(batch_size=4, delayed_cache=False),
    dict(batch_size=2, block_size=1, max_new_tokens=5), dict(batch_size=2, temperature=1.0, top_k=5, seed=3)]


@pytest.mark.parametrize("opts", PLAN_OPTIONS)
def test_the_plan_read_ahead_is_the_plan_made_at_the_step(monkeypatch, opts):
    """The end of a step plans the next one (Decoder.finish_blocks); a plan made at the step itself, after any
    admission, gives the same run: the same tokens, statistics and endings, refills and EOS included."""
    import decoder
    net = random_model(tiny_config(num_hidden_layers=2), seed=4)
    opts = {"max_new_tokens": 14, **opts}
    generated = collections.Counter(t for ids, _ in run(net, PROMPTS, **opts) for t in ids)
    eos = [generated.most_common(2)[-1][0]]  # a token the runs generate: some sequences end at it
    ahead = run(net, PROMPTS, eos_ids=eos, **opts)
    assert "eos" in {stats["finish_reason"] for _, stats in ahead}
    finish = decoder.Decoder.finish_blocks

    def finish_then_forget(self, *args):
        out = finish(self, *args)
        self.planned_ahead = None  # every step plans itself
        return out
    monkeypatch.setattr(decoder.Decoder, "finish_blocks", finish_then_forget)
    assert run(net, PROMPTS, eos_ids=eos, **opts) == ahead


@pytest.mark.parametrize("opts", PLAN_OPTIONS)
def test_the_rows_laid_out_ahead_are_the_rows_built_from_the_plan(opts):
    """Decoder.plan_on_device lays out every block position's row before the host knows how many there are, the
    computed ones first, padding rows last (model.Rows.lay_out); the plan keeps the first num_rows. At every step
    of a run (refills, EOS endings, FOCUS), they equal Rows.build on exactly the computed positions, and so do
    the rows' tokens and mask flags."""
    net = random_model(tiny_config(num_hidden_layers=2), seed=4)
    checked = []

    def compare(dec):
        plan = dec.plan()
        seq, col = plan.process.nonzero().unbind(1)                       # by slot, then block position
        ends = dec.block_start + plan.last_col + 1
        want = model.Rows.build(seq, dec.block_start[seq] + col, ends[seq], dec.num_slots)
        for name in ("seq", "pos", "line", "place", "key_end", "active"):
            assert torch.equal(getattr(plan.rows, name), getattr(want, name)), name
        for name in ("q_max", "kv_max", "all_slots", "dense", "key_end_per_seq"):
            assert getattr(plan.rows, name) == getattr(want, name), name
        assert torch.equal(plan.col, col) and torch.equal(plan.seq, seq)
        assert torch.equal(plan.ids, dec.tokens[seq, want.pos]) and torch.equal(plan.is_mask_row, dec.masked[seq, col])
        checked.append(len(seq) < plan.process.numel())                  # padding rows followed them
    run(net, PROMPTS, eos_ids=[7], step_hook=compare, **{"max_new_tokens": 14, **opts})
    assert checked and (any(checked) or opts.get("block_size") == 1)    # (blocks of 1: every slot computes its one)


@pytest.mark.parametrize("mode", [{}, {"focus": True, "alpha": 1.0}], ids=["full-block", "focus"])
def test_a_step_reads_the_host_once_to_compact_and_once_to_finish(monkeypatch, mode):
    """Only what picks the shapes crosses to the host: the end of a step (Decoder.finish_blocks) reads which
    sequences ended, the step's statistics and the next step's plan (its row counts, whether FOCUS evicts and the
    layout's sizes) at once; FOCUS's compaction (focus.compact_step) reads once; the plan (Decoder.plan) reads
    only after a prompt was admitted; nothing else reads. A read: .tolist(), .item(), bool() of a tensor or
    .nonzero() (each waits for the device); one outside every watched call counts as a window of its own."""
    import decoder
    import focus
    windows = []  # [name, host reads, open, what it returned] of each call watched, and of each read outside one

    def counted(real):
        def read(self, *args, **kwargs):
            if windows and windows[-1][2]:
                windows[-1][1] += 1
            else:
                windows.append(["outside", 1, False, None])
            return real(self, *args, **kwargs)
        return read

    def watched(name, real):
        def call(*args, **kwargs):
            windows.append([name, 0, True, None])
            try:
                windows[-1][3] = real(*args, **kwargs)
                return windows[-1][3]
            finally:
                windows[-1][2] = False
        return call
    for name in ("tolist", "item", "__bool__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    for name in ("plan", "finish_blocks", "admit"):
        monkeypatch.setattr(decoder.Decoder, name, watched(name, getattr(decoder.Decoder, name)))
    for name in ("compact_step", "select_step"):
        monkeypatch.setattr(focus, name, watched(name, getattr(focus, name)))
    run(random_model(tiny_config(num_hidden_layers=3), seed=1), PROMPTS, max_new_tokens=12, block_size=8,
        batch_size=2, **mode)
    # Not counted: a prefill (admit), and the plain selection, which lays the mask sets out by their sizes (on CUDA
    # with --compile it runs inside a graph, focus.select_in_graph, where a read would fail the capture).
    steps = [w for w in windows if w[0] != "select_step"]
    assert {name for name, *_ in steps} == ({"plan", "finish_blocks", "outside", "admit"}
                                            | ({"compact_step"} if mode else set()))
    # The plan reads only after an admission: otherwise the end of the last step read it ahead.
    admitted, plan_reads = False, []
    for before, (name, reads, *_) in zip([None] + steps, steps):
        if name == "admit":
            admitted = True
        elif name == "plan":
            assert reads == admitted
            plan_reads.append(reads)
            admitted = False
        elif name == "outside":  # the tokens of the sequences that just ended, one read for all of them
            assert reads == 1 and before[0] == "finish_blocks" and before[3][0]
        else:
            assert reads == 1
    assert set(plan_reads) == {0, 1}
    for before, after in zip(steps, steps[1:]):  # every step that ended a sequence read its tokens
        if before[0] == "finish_blocks" and before[3][0]:
            assert after[0] == "outside"


@pytest.mark.parametrize("mode", [{}, {"focus": True, "alpha": 1.0}, {"focus": True, "focus_target": "saturation"}],
                         ids=["full-block", "focus", "focus-saturation"])
def test_no_indexed_assignment_takes_a_number_from_the_host(monkeypatch, mode):
    """`t[index] = True` or `t[i] = n` on a CUDA tensor makes the value on the host, copies it over and waits for
    the device to finish all it was given (PyTorch's indexed assignment; only slices, `t[a:b] = n`, fill without
    waiting, and so do a number of ints with slices that leaves more than one element), so a step that did it
    stalled behind its own graph. Every indexed assignment of a decode (admission,
    step, end of a step) takes a tensor of values, or uses index_fill_."""
    numbers_set = []
    real = torch.Tensor.__setitem__

    def setitem(self, index, value):
        if takes_a_number_from_the_host(self, index, value):
            numbers_set.append(index)
        return real(self, index, value)
    monkeypatch.setattr(torch.Tensor, "__setitem__", setitem)
    net = random_model(tiny_config(num_hidden_layers=3), seed=1)
    run(net, PROMPTS, eos_ids=[5], max_new_tokens=12, block_size=8, batch_size=2, stop_repeats=2, **mode)
    assert numbers_set == []


@pytest.mark.parametrize("mode", [{}, {"focus": True, "alpha": 1.0}], ids=["full-block", "focus"])
def test_after_a_read_no_kernel_runs_until_the_next_graph(monkeypatch, mode):
    """What the GPU waits on: after a host read, until the next forward starts, the device is idle. The plan read
    ahead (Decoder.plan, with no admission since) and FOCUS's compaction after its read (focus.compact_step) lay
    their rows out before the read, so after it they only slice: no operator but views runs there."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import decoder
    import focus
    state = {"watching": None}
    launched = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if state["watching"] and not func.is_view:
                launched.append((state["watching"], str(func)))
            return func(*args, **(kwargs or {}))
    plan, compact_step, tolist = decoder.Decoder.plan, focus.compact_step, torch.Tensor.tolist
    watched = collections.Counter()

    def planned(self):
        ahead = self.planned_ahead is not None
        state["watching"] = "plan" if ahead else None
        watched["plan"] += ahead
        try:
            return plan(self)
        finally:
            state["watching"] = None

    def compacted(*args):
        state["compacting"] = True
        try:
            return compact_step(*args)
        finally:
            state["compacting"] = state["watching"] = None

    def read(self):
        out = tolist(self)
        if state.get("compacting"):
            state["watching"] = "compact_step"
            watched["compact_step"] += 1
        return out
    monkeypatch.setattr(decoder.Decoder, "plan", planned)
    monkeypatch.setattr(focus, "compact_step", compacted)
    monkeypatch.setattr(torch.Tensor, "tolist", read)
    with Watch():
        run(random_model(tiny_config(num_hidden_layers=3), seed=1), PROMPTS, max_new_tokens=12, block_size=8,
            batch_size=2, **mode)
    assert watched["plan"] > 0 and (watched["compact_step"] > 0) == bool(mode)
    assert launched == []
