"""replay.py: schedules recorded from one model, replayed on another of a different size, give back exactly
the recorded steps (rows computed, rows kept, positions decoded) and lengths, in every mode."""
from dataclasses import replace

import pytest
import torch

import kernels
import replay
from conftest import random_model, tiny_config
from generate import Options

PROMPTS = [[17, 42, 99, 150, 201], [8, 9, 10, 11, 12, 13, 14, 15], [250, 251, 252], list(range(60, 71))]
MODES = {"full": dict(delayed_cache=False), "delayed": dict(), "focus": dict(focus=True, alpha=1.0),
         "focus, lower threshold": dict(focus=True, alpha=1.5, threshold=0.5)}


@pytest.mark.parametrize("mode", list(MODES))
def test_replay_follows_the_recorded_schedule(loaded, mode):
    net, tok = loaded
    opts = Options(**{"max_new_tokens": 14, "threshold": 0.7, **MODES[mode]})
    eos = [int(net(torch.tensor([PROMPTS[0]]), block_size=4)[0, -1].argmax())]  # ends some sequences early
    with torch.no_grad():
        schedules = replay.record(net, PROMPTS, tok.mask_id, eos, opts)
    assert any(s.tokens < 14 for s in schedules) and any(s.tokens == 14 for s in schedules)
    assert any(len(d) > 1 for s in schedules for d in s.decoded)           # some steps decode several
    if opts.focus:
        assert any(len(k) < len(c) for s in schedules for k, c in zip(s.kept, s.computed))  # and some evict
    other = random_model(tiny_config(hidden_size=48, num_hidden_layers=3, mask_token_id=3), seed=9)
    steps, last = [], {}

    def hook(dec):
        last["dec"] = dec
        if hasattr(dec, "last_step"):
            steps.append(dec.last_step)
    with torch.no_grad():
        out = replay.replay(other, schedules, 9, opts, step_hook=hook)
    steps.append(last["dec"].last_step)
    for slot, (sched, (ids, stats)) in enumerate(zip(schedules, out)):
        assert len(ids) == sched.tokens and len(stats["decoded"]) == len(sched.decoded)
        for t in range(len(sched.decoded)):
            got = [grid[slot].nonzero().squeeze(1).tolist() for grid in steps[t][:3]]
            assert got == [sched.computed[t], sched.kept[t], sched.decoded[t]], f"slot {slot} step {t}"


def test_a_queue_longer_than_the_batch_refills_the_slots(loaded):
    """Continuous batching: 8 sequences (the schedules twice) through 3 slots; each sequence, whichever slot it
    lands in, takes its own schedule's steps (rows computed, kept and decoded per step) and length."""
    net, tok = loaded
    opts = Options(max_new_tokens=14, threshold=0.7, focus=True, alpha=1.0)
    eos = [int(net(torch.tensor([PROMPTS[0]]), block_size=4)[0, -1].argmax())]
    with torch.no_grad():
        schedules = replay.record(net, PROMPTS, tok.mask_id, eos, opts)
    assert len({len(s.decoded) for s in schedules}) > 1   # sequences end at different steps: slots refill unevenly
    queue = schedules + schedules[::-1]
    other = random_model(tiny_config(hidden_size=48, num_hidden_layers=3, mask_token_id=3), seed=9)
    admitted = []
    with torch.no_grad():
        out = replay.replay(other, queue, 9, replace(opts, batch_size=3),
                            step_hook=lambda dec: admitted.append(dec.admitted))
    assert admitted[0] == 3 and admitted[-1] == len(queue)
    for sched, (ids, stats) in zip(queue, out):
        assert len(ids) == sched.tokens
        assert stats["computed"] == [len(c) for c in sched.computed]
        assert stats["computed_deep"] == [len(k) for k in sched.kept]
        assert stats["decoded"] == [len(d) for d in sched.decoded]


def test_the_replay_keeps_the_recordings_token_budget(loaded):
    """The token budget bounds a sequence's last block, so a replay runs at the recording's budget whatever the
    caller's opts say: a smaller one would cut the last blocks short (bench.py once passed the longest output
    + 1, and a replay of a sequence whose EOS came early in its last block lost that block's tail rows). Mixed
    budgets are refused."""
    net, tok = loaded
    opts = Options(max_new_tokens=14, threshold=0.7, focus=True, alpha=1.0)
    eos = [int(net(torch.tensor([PROMPTS[0]]), block_size=4)[0, -1].argmax())]
    with torch.no_grad():
        schedules = replay.record(net, PROMPTS, tok.mask_id, eos, opts)
    early = [s for s in schedules if s.tokens < 14]
    assert early and all(s.budget == 14 for s in schedules)
    other = random_model(tiny_config(hidden_size=48, num_hidden_layers=3, mask_token_id=3), seed=9)
    for budget in (1, max(s.tokens for s in early) + 1, 40):
        with torch.no_grad():
            out = replay.replay(other, early, 9, replace(opts, max_new_tokens=budget))
        for sched, (ids, stats) in zip(early, out):
            assert len(ids) == sched.tokens, budget
            assert stats["computed"] == [len(c) for c in sched.computed], budget
            assert stats["computed_deep"] == [len(k) for k in sched.kept], budget
    wrong = [replace(early[0], computed=[c[:-1] for c in early[0].computed])] + early[1:]
    with pytest.raises(RuntimeError, match="left its schedules"):   # a replay checks itself against its recording
        replay.replay(other, wrong, 9, opts)
    with pytest.raises(ValueError, match="different token budgets"):
        replay.replay(other, [schedules[0], replace(schedules[1], budget=20)], 9, opts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_focus_recording_with_cuda_graphs_keeps_rows_it_computed():
    """With --compile on CUDA a FOCUS step runs two graphs that share one memory pool; the selection's kept
    flags come out of the first and are read after the second has run. Recorded from the shipped model at the
    paper's pairing (threshold 0.8), every step must keep a subset of what it computed, and at least one row
    (on an H200 the second graph once overwrote the flags: 110 of the recording's steps kept nothing, and their
    replay stopped)."""
    import workloads
    from checkpoint import load
    from generate import DEFAULT_MODEL, encode_prompts
    net, tok = load(DEFAULT_MODEL, device="cuda")
    w = workloads.workload("long", 64)
    opts = Options(max_new_tokens=w.max_new_tokens, threshold=0.8, focus=True, alpha=1.5, batch_size=64,
                   compile=True)
    with torch.no_grad():
        schedules = replay.record(net, encode_prompts(tok, w.prompts, chat=True), tok.mask_id, tok.eos_ids, opts)
    kernels.release(net)
    steps = [(kept, computed) for s in schedules for kept, computed in zip(s.kept, s.computed)]
    assert [(k, c) for k, c in steps if not k or not set(k) <= set(c)] == []
    assert any(len(k) < len(c) for k, c in steps)   # FOCUS evicted


def test_serving_reports_the_prefill_it_ran(loaded, monkeypatch):
    """replay.serve reports the prefill's tokens (and its compute per second from them): every prompt's whole
    blocks, as Decoder.admit prefills them; here counted from the rows the prefills actually ran."""
    import model
    net, tok = loaded
    opts = Options(max_new_tokens=14, threshold=0.7, batch_size=3)
    with torch.no_grad():
        schedules = replay.record(net, PROMPTS, tok.mask_id, [], opts)
    other = random_model(tiny_config(hidden_size=48, num_hidden_layers=3, mask_token_id=3), seed=9)
    prefilled, real = [], model.SDAR.forward_rows

    def forward_rows(self, ids, rows, cache, **kwargs):
        if kwargs.get("grid") == "sequences":  # a prefill (admission), not a decode step
            prefilled.append(rows.num_rows)
        return real(self, ids, rows, cache, **kwargs)
    monkeypatch.setattr(model.SDAR, "forward_rows", forward_rows)
    with torch.no_grad():
        row = replay.serve(other, schedules + schedules, 9, opts)
    assert len(prefilled) > 1 and row["prefill_tokens"] == sum(prefilled) == 8 * 8   # 8 prompts of 2 whole blocks
    assert row["prefill_tflops"] > 0
