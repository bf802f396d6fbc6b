"""Record the decoding dynamics of a real model and replay them on a real-size one.

A model with random weights decodes one token per step, so timing it says nothing about how many steps each
mode takes: on a trained model FOCUS takes more steps than the delayed cache (a step decodes only what it
kept), and every mode decodes several tokens in some steps. So bench.py --real-size also:
1. records, from a decode of a trained model (the shipped one by default), the schedule of each mode: per
   sequence and step, which block positions the step decoded, and for FOCUS which rows it kept in layers
   2..L (`record`);
2. replays those schedules on the real-size model (`replay`): the decoder runs as usual (its rows follow
   from the delayed-cache rules, FOCUS still computes importance and runs the selection, every step samples),
   but which positions are decoded, which rows are kept and when a sequence ends come from the schedule. A
   queue of more schedules than slots is served as a server would: a slot whose sequence ends takes the next;
   `serve` times such a run (bench.py's serving benchmark).
A replayed sequence has a random prompt of the benchmark's context length, aligned in its block as the
recorded prompt was, so its blocks hold the same masked positions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

import focus
import kernels
from decoder import ENDINGS, Decoder, Options
from generate import generate_ids
from model import flops_per_token
from shapes import sync


@dataclass
class Schedule:
    """One recorded sequence: per step, the block positions decoded and those kept in layers 2..L (every
    computed position when nothing was evicted), and the positions computed (for checking a replay)."""
    prompt_offset: int          # the prompt's length modulo the block size
    tokens: int                 # tokens generated
    budget: int                 # the recording's max_new_tokens, which bounds the last block as it did then
    decoded: list[list[int]]
    kept: list[list[int]]
    computed: list[list[int]]


def record(model, prompt_ids: list[list[int]], mask_id: int, eos_ids: list[int], opts: Options) -> list[Schedule]:
    """Decode every prompt at once (one cache slot each, so slot i is prompt i) and record its schedule."""
    steps, decoder = [], []

    def hook(dec):
        decoder[:] = [dec]
        if hasattr(dec, "last_step"):
            steps.append(dec.last_step)

    out = generate_ids(model, prompt_ids, mask_id, eos_ids, replace(opts, batch_size=len(prompt_ids)), step_hook=hook)
    steps.append(decoder[0].last_step)
    bs = decoder[0].block_size
    schedules = []
    for slot, (prompt, (ids, stats)) in enumerate(zip(prompt_ids, out)):
        n = len(stats["decoded"])                        # the slot was live for its first n steps

        def positions(grids):
            return [grid[slot].nonzero().squeeze(1).tolist() for grid in grids]
        schedules.append(Schedule(len(prompt) % bs, len(ids), opts.max_new_tokens,
                                  decoded=positions(s.decoded for s in steps[:n]),
                                  kept=positions(s.kept for s in steps[:n]),
                                  computed=positions(s.computed for s in steps[:n])))
    return schedules


class ReplayDecoder(Decoder):
    """A Decoder whose decisions (positions decoded, rows kept, the end of a sequence) come from schedules
    (the class attribute `schedules`); the computation is the usual one. The k-th sequence admitted follows
    schedules[k], whichever slot it lands in (generate_ids admits prompts in order), so a queue longer than the
    batch refills the slots as sequences end, as a server does. The schedules sit on the device as
    (schedules, steps, block) grids, so a replayed step adds no host work."""
    schedules: list[Schedule] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        distinct = list({id(s): s for s in self.schedules}.values())   # a queue may repeat a schedule
        index = {id(s): i for i, s in enumerate(distinct)}
        length = max(len(s.decoded) for s in distinct)
        decoded_at = torch.zeros(len(distinct), length, self.block_size, dtype=torch.bool)
        kept_at, computed_at = torch.zeros_like(decoded_at), torch.zeros_like(decoded_at)
        for i, sched in enumerate(distinct):
            for t, (decoded, kept, computed) in enumerate(zip(sched.decoded, sched.kept, sched.computed)):
                decoded_at[i, t, decoded] = True
                kept_at[i, t, kept] = True
                computed_at[i, t, computed] = True
        self.decoded_at, self.kept_at, self.computed_at = (grid.to(self.device)
                                                           for grid in (decoded_at, kept_at, computed_at))
        self.length = torch.tensor([len(s.decoded) for s in distinct], device=self.device)
        self.tokens_out = torch.tensor([s.tokens for s in distinct], device=self.device)
        self.queue = [index[id(s)] for s in self.schedules]                  # admission order -> schedule
        self.admitted = 0
        self.which = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)  # each slot's schedule
        self.t = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)      # and its step in it
        self.diverged = torch.zeros(self.num_slots, dtype=torch.bool, device=self.device)  # from its schedule

    def admit(self, slots: list[int], prompts: list[list[int]]):
        super().admit(slots, prompts)
        slots_t = torch.tensor(slots, device=self.device)
        self.which[slots_t] = torch.tensor(self.queue[self.admitted:self.admitted + len(slots)], device=self.device)
        self.t.index_fill_(0, slots_t, 0)
        self.admitted += len(slots)

    def _now(self, grids):
        """(S, block): this step's row of each slot's schedule grid (nothing for ended sequences)."""
        length = self.length[self.which]
        now = grids[self.which, self.t.clamp(max=grids.shape[1] - 1)]
        return now & (self.live & (self.t < length))[:, None]

    def forward(self, ids, plan, is_mask_row):
        """FOCUS as the decoder runs it (the selection included, so a step costs the same), then the recorded
        kept rows instead of the selection's. A step where nobody evicts evicted nothing when recorded either:
        the targets and mask sets follow the schedule."""
        o = self.opts
        if not o.focus or not plan.evicting:
            return super().forward(ids, plan, is_mask_row)
        rows, col = plan.rows, plan.col
        kept = self._now(self.kept_at)[rows.seq, col]
        selected = focus.select_step(self.model, ids, rows, self.cache, is_mask_row, col, self.progress, plan.target,
                                     o.focus_rank, self.generator, o.compile, self.confidence, self.block_start,
                                     recorded_kept=kept)
        out = focus.finish_step(self.model, selected, rows, self.cache, is_mask_row, col, self.block_start,
                                o.compile)
        self.progress = torch.maximum(self.progress, out.rightmost_kept)
        return out.logits, out.logit_rows, out.kept

    def choose(self, logits, seq, col):
        _, token_grid = super().choose(logits, seq, col)      # sampled as usual, so the step costs the same
        return self._now(self.decoded_at) & self.masked, token_grid

    def step(self) -> dict:
        live = self.live.clone()
        stats = super().step()
        # The rows computed, those kept and the positions decoded are the recorded ones, or the replay is not a
        # replay (read once, at the end of the run: no host sync here).
        last = self.last_step
        for grid, recorded in ((last.computed, self.computed_at), (last.kept, self.kept_at),
                               (last.decoded, self.decoded_at)):
            self.diverged |= (grid != self._now(recorded)).any(1)
        self.t += live
        return stats

    def endings(self, committed):
        """The decoder's own endings (the budget), which come where the recording's did or the sequence diverged,
        and the recorded ones: a sequence ends at the step its recording ended (at its EOS)."""
        stop, end, why = super().endings(committed)
        length = self.length[self.which]
        self.diverged |= stop & (self.t < length)
        over = self.live & (self.t >= length)
        self.live &= ~over
        end = torch.where(over, self.prompt_len + self.tokens_out[self.which], end)
        return stop | over, end, torch.where(over, ENDINGS.index("eos"), why)


def replay(model, schedules: list[Schedule], context: int, opts: Options, clock: dict | None = None,
           step_hook=None, on_result=None, seed: int = 0):
    """Run len(schedules) sequences on `model` through opts.batch_size slots (continuous batching: a slot
    whose sequence ends takes the next one, its prefill included), each with a random prompt of about
    `context` tokens, following its schedule, at the schedules' token budget (not opts'). Returns
    generate_ids' outputs (random tokens, real step structure)."""
    cfg = model.config
    bs = opts.block_size or cfg.block_size
    budgets = {s.budget for s in schedules}
    if len(budgets) != 1:
        raise ValueError(f"schedules recorded at different token budgets {sorted(budgets)}: replay one recording")
    # The recording's budget, not opts': it bounds each last block as it did when recorded (a smaller one would
    # cut the block short, so its rows, and the kept ones, would no longer be the recorded ones).
    opts = replace(opts, max_new_tokens=budgets.pop())
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, cfg.vocab_size, (context // bs * bs + s.prompt_offset,), generator=g).tolist()
               for s in schedules]
    decoders = []

    def hook(dec):
        decoders[:] = [dec]
        if step_hook is not None:
            step_hook(dec)
    decoder = type("Replay", (ReplayDecoder,), {"schedules": schedules})
    out = generate_ids(model, prompts, cfg.mask_token_id, [-1], opts, clock=clock, step_hook=hook,
                       on_result=on_result, decoder=decoder)
    if decoders and bool(decoders[0].diverged.any()):
        raise RuntimeError("the replay left its schedules (rows computed or kept, or positions decoded, differ from "
                           "the recording's): a bug in replay.py or the decoder")
    return out


def serve(model, queue: list[Schedule], context: int, opts: Options) -> dict:
    """One timed serving run of `queue` (replay()), with a mark before every step: the time, and how many
    sequences were admitted so far. The steady window runs from the first step to the step after the last
    admission; its rate counts decoded positions, scaled to output tokens by the run's own ratio (the EOS
    padding of each last block is decoded but not output)."""
    device = model.embed_tokens.weight.device
    clock, marks = {}, []

    def mark(dec):
        sync(device)
        decoded = dec.last_step.decoded.sum() if hasattr(dec, "last_step") else 0   # read after the run, not here
        marks.append((time.perf_counter(), clock.get("prefill_s", 0.0), decoded, dec.admitted))

    graphs_before, grids = kernels.graph_count(), ("slots", "sequences")   # decode steps' graphs, prefills'
    capture_before = [kernels.capture_seconds(grid) for grid in grids]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = replay(model, queue, context, opts, clock=clock, step_hook=mark)
    sync(device)
    seconds = time.perf_counter() - t0
    capture_s, prefill_capture_s = (kernels.capture_seconds(g) - before for g, before in zip(grids, capture_before))
    tokens = sum(len(ids) for ids, _ in out)
    decoded = sum(sum(st["decoded"]) for _, st in out)
    steps = len(marks)
    # The prefill's compute: a prompt's whole blocks are prefilled (Decoder.admit), each block's rows attending to
    # the keys up to its end; replay() gives every prompt context // bs whole blocks.
    bs = opts.block_size or model.config.block_size
    prefill_tokens = len(queue) * (context // bs * bs)
    prefill_flops = len(queue) * sum(bs * flops_per_token(model.config, (k + 1) * bs) for k in range(context // bs))
    last = next(i for i, m in enumerate(marks) if m[3] == len(queue))  # the first step after the last admission
    end = max(last, 1)
    window = marks[end][0] - marks[0][0]
    window_decoded = int(sum(m[2] for m in marks[1:end + 1]))
    return {"queue": len(queue), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "prefill_s": clock["prefill_s"], "decode_s": clock["decode_s"],
            "prefill_share": clock["prefill_s"] / seconds, "decode_tokens_per_s": tokens / clock["decode_s"],
            "prefill_tokens": prefill_tokens, "prefill_tflops": prefill_flops / clock["prefill_s"] / 1e12,
            "steps": steps, "ms_per_step": clock["decode_s"] / steps * 1e3,
            "ms_per_step_without_capture": (clock["decode_s"] - capture_s) / steps * 1e3,
            "decoded_per_step": decoded / sum(len(st["decoded"]) for _, st in out),   # per sequence and step
            "steady_steps": end, "steady_tokens_per_s": window_decoded * tokens / decoded / window,
            "graphs_captured_while_timed": kernels.graph_count() - graphs_before,   # shapes the warm-up missed
            "capture_s": capture_s,                                                 # their capture, inside decode_s
            "prefill_capture_s": prefill_capture_s,                                 # the prefill's, inside prefill_s
            "graphs": kernels.graph_count(),                                        # alive, every mode's so far
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            "computed_deep_per_step": sum(sum(st["computed_deep"]) for _, st in out)
                                      / sum(len(st["computed_deep"]) for _, st in out)}
