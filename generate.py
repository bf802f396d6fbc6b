"""Batched block-diffusion generation and the command line.

    python generate.py --prompt "What is 17 plus 25?"

How a sequence is decoded (SDAR's scheme; the comments name the reference's rule where one applies):
1. The prompt's whole blocks are prefilled into the KV cache. The last partial block is the first active
   block: its prompt tokens stay, the rest of it is filled with mask tokens.
2. Each step runs the active block's tokens that still need computing, through the model, and unmasks some
   masked tokens by a rule (dynamic threshold, static top-k or sequential).
3. Once no mask is left, the block is checked for stops; if generation goes on, one more step (the commit)
   refreshes its keys/values, and a new block of masks starts at the next position.
A finished sequence's cache slot is given to the next prompt waiting (continuous batching).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import focus
import kernels
from checkpoint import CheckpointError, load, resolve_device
from model import KVCache, Rows

DEFAULT_MODEL = Path(__file__).resolve().parent / "checkpoints" / "sdar-tiny"
STRATEGIES = ("threshold", "static", "sequential")
RANKINGS = focus.RANKINGS  # (inside Options the name `focus` is a field)
MAX_BLOCK_SIZE = 256  # a step computes up to a whole block and a block takes up to block-size steps


def option(default, help: str, choices: tuple | None = None):
    """A field of Options: its default, its --help line and, for a name, the values it may take."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Options:
    """Decoding options: the one place they are declared and checked. The command line is built from these
    fields (flag --max-new-tokens for max_new_tokens, default and choices from here), and every Options is
    checked when it is made, so a bad value fails at once with a one-line ValueError."""
    max_new_tokens: int = option(256, "tokens to generate per prompt at most")
    block_size: int | None = option(None, f"tokens per block (default: the checkpoint's; at most {MAX_BLOCK_SIZE}; "
                                          "the last block ends at --max-new-tokens)")
    strategy: str = option("threshold", "unmasking rule, see unmask()", STRATEGIES)
    threshold: float = option(0.9, "threshold rule: unmask every masked token with p >= threshold")
    tokens_per_step: int = option(1, "static and sequential rules: tokens unmasked per step")
    temperature: float = option(0.0, "0: greedy")
    top_k: int = option(0, "sample from the k most likely tokens (0: all)")
    top_p: float = option(1.0, "sample from the smallest set of tokens whose probability reaches top-p")
    delayed_cache: bool = option(True, "stop recomputing decoded tokens whose right neighbour is decoded")
    focus: bool = option(False, "FOCUS eviction after layer 1 (needs the delayed cache)")
    alpha: float = option(1.5, "FOCUS: keep about alpha x (average tokens decoded per step)")
    compile: bool = option(False, "fast paths (kernels.py): FOCUS's importance and compaction through "
                                  "torch.compile, MoE experts as batched matrix products")
    focus_rank: str = option("delta", "FOCUS: ranking score, the delta or an ablation control", RANKINGS)
    exact_commit: bool = option(False, "the commit step recomputes the whole block (exact committed keys/values)")
    stop_repeats: int = option(0, "stop after this many identical consecutive blocks (0: off)")
    batch_size: int = option(32, "sequences decoded together")
    chat: bool = option(True, "wrap prompts in the checkpoint's chat template")
    seed: int = option(0, "sampling seed")
    progress: bool = option(False, "tqdm bar over the prompts")
    show: bool = option(False, "FOCUS: print the first sequence's block at every step")

    def __post_init__(self):
        """Raise ValueError with a one-line message for a bad value."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type, f.metadata["choices"])
        for name in ("max_new_tokens", "batch_size", "tokens_per_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.block_size is not None and not 0 < self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block-size must be in 1..{MAX_BLOCK_SIZE}, got {self.block_size}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature and top-k must be >= 0 and top-p in (0, 1], got {self.temperature}, "
                             f"{self.top_k} and {self.top_p}")
        if self.focus and self.alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {self.alpha}")
        if self.focus and not self.delayed_cache:
            raise ValueError("FOCUS runs on top of the delayed cache; drop --no-delayed-cache or --focus")
        if self.stop_repeats == 1 or self.stop_repeats < 0:
            raise ValueError(f"stop-repeats must be 0 (off) or at least 2, got {self.stop_repeats}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_type(name: str, value, kind: str, choices):
    """kind is the field's annotation as written: int, int | None, float, bool or str."""
    if value is None and kind.endswith("| None"):
        return
    if kind.startswith("int") and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{_flag(name)} must be an integer, got {value!r}")
    if kind == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
        raise ValueError(f"{_flag(name)} must be a finite number, got {value!r}")
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{_flag(name)} must be True or False, got {value!r}")
    if kind == "str" and value not in choices:
        raise ValueError(f"unknown {_flag(name)} {value!r}; use one of {', '.join(choices)}")


@dataclass
class Result:
    prompt: str
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)  # per step: computed, computed_deep, decoded, target


# ---------------------------------------------------------------------------------------------------
# Sampling and unmasking rules.

def sample(logits, temperature: float, top_k: int, top_p: float, generator=None):
    """logits (R, vocab) -> token (R,) and its confidence (R,): the probability of the chosen token."""
    if temperature == 0:
        conf, token = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return token, conf
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, probs.gather(-1, token[:, None]).squeeze(-1)


def unmask(conf, candidate, strategy: str, threshold: float, k: int):
    """Which masked slots to decode this step. conf (B, block) confidences; candidate (B, block) bool: masked
    slots that got logits this step (unprocessed or evicted slots never are). -> (B, block) bool.

    threshold:  every candidate with conf >= threshold, and always the single most confident one
                (the reference's low_confidence_dynamic).
    static:     the k most confident candidates (low_confidence_static).
    sequential: the k leftmost candidates.
    """
    conf = conf.masked_fill(~candidate, -1.0)
    if strategy == "sequential":
        return candidate & (candidate.cumsum(1) <= k)
    top1 = torch.zeros_like(candidate).scatter_(1, conf.argmax(1, keepdim=True), True) & candidate
    if strategy == "threshold":
        return (candidate & (conf >= threshold)) | top1
    k = min(k, conf.shape[1])
    chosen = torch.zeros_like(candidate).scatter_(1, torch.topk(conf, k, dim=1).indices, True)
    return chosen & candidate


# ---------------------------------------------------------------------------------------------------
# The decoder: per-slot state for a batch of sequences, all on the device.

class Decoder:
    def __init__(self, model, mask_id: int, eos_ids: list[int], opts: Options, num_slots: int, max_len: int):
        self.model, self.opts, self.mask_id = model, opts, mask_id
        dev = model.embed_tokens.weight.device
        self.device = dev
        bs = self.block_size = opts.block_size or model.config.block_size
        self.cache = KVCache(model.config, num_slots, max_len, dev, model.embed_tokens.weight.dtype)
        self.eos = torch.tensor(eos_ids or [-1], device=dev)
        self.cols = torch.arange(bs, device=dev)
        S = self.num_slots = num_slots
        self.tokens = torch.full((S, max_len), mask_id, dtype=torch.long, device=dev)
        self.prompt_len = torch.zeros(S, dtype=torch.long, device=dev)
        self.block_start = torch.zeros(S, dtype=torch.long, device=dev)
        self.limit = torch.zeros(S, dtype=torch.long, device=dev)         # prompt length + max_new_tokens
        self.inside = torch.zeros(S, bs, dtype=torch.bool, device=dev)    # block slots before the limit
        self.masked = torch.zeros(S, bs, dtype=torch.bool, device=dev)    # MASKED slots of the active block
        self.uncached = torch.ones(S, bs, dtype=torch.bool, device=dev)   # delayed cache: still recomputed
        self.warm = torch.ones(S, dtype=torch.bool, device=dev)           # first step of a block computes all
        self.live = torch.zeros(S, dtype=torch.bool, device=dev)
        self.progress = torch.full((S,), -1, dtype=torch.long, device=dev)  # FOCUS block progress
        self.decoded_sum = torch.zeros(S, device=dev)                     # FOCUS avg tokens decoded per step
        self.decoded_steps = torch.zeros(S, device=dev)
        self.generator = torch.Generator(device=dev).manual_seed(opts.seed)

    # -- admission and prefill ------------------------------------------------------------------------
    def admit(self, slots: list[int], prompts: list[list[int]]):
        """Put prompts into free slots and prefill their whole blocks into the cache."""
        bs = self.block_size
        rows_seq, rows_pos = [], []
        for slot, ids in zip(slots, prompts):
            n = len(ids)
            self.tokens[slot].fill_(self.mask_id)
            self.tokens[slot, :n] = torch.tensor(ids, device=self.device)
            start = n // bs * bs
            self.prompt_len[slot], self.block_start[slot] = n, start
            self.limit[slot] = n + self.opts.max_new_tokens
            rows_seq += [slot] * start
            rows_pos += range(start)
        slots_t = torch.tensor(slots, device=self.device)
        self._new_block(slots_t)
        # The first active block holds the prompt's tail: those slots are not masked.
        self.masked[slots_t] &= (self.block_start[slots_t, None] + self.cols) >= self.prompt_len[slots_t, None]
        self.live[slots_t] = True
        if rows_seq:
            seq = torch.tensor(rows_seq, device=self.device)
            pos = torch.tensor(rows_pos, device=self.device)
            order = torch.argsort(seq, stable=True)
            seq, pos = seq[order], pos[order]
            rows = Rows.build(seq, pos, (pos // bs + 1) * bs, self.num_slots)  # block-causal prefill
            self.model.forward_rows(self.tokens[seq, pos], rows, self.cache, logits_for=pos[:0])

    def _new_block(self, slots):
        # The last block ends at the token budget: slots past it are not part of the sequence, so a run's
        # cost follows max_new_tokens, not the block size.
        self.inside[slots] = (self.block_start[slots, None] + self.cols) < self.limit[slots, None]
        self.masked[slots] = self.inside[slots]
        self.uncached[slots] = self.inside[slots]
        self.warm[slots] = True
        self.progress[slots] = -1
        self.decoded_sum[slots] = 0
        self.decoded_steps[slots] = 0

    # -- one step -------------------------------------------------------------------------------------
    def processing(self):
        """(S, block) bool: which block positions this step computes (delayed cache, reference rules)."""
        if not self.opts.delayed_cache:
            process = self.inside.clone()
        else:
            process = self.masked | self.uncached       # masked slots are never cached
            process |= self.warm[:, None]               # warm-up: the block's first step computes all
            process |= ~process.any(1, keepdim=True)    # nothing left to compute: compute all
            if self.opts.exact_commit:                  # commit step: the whole block, so the keys/values
                process |= ~self.masked.any(1, keepdim=True)  # it leaves in the cache are exact
        return process & self.inside & self.live[:, None]

    def rows(self, process):
        """The step's rows, ordered by slot then position: slot (T,), block position (T,), their Rows, and
        each slot's last computed block position (S,), up to which attention reaches in the block."""
        seq, col = process.nonzero(as_tuple=True)
        last_col = torch.where(process, self.cols, -1).amax(1)
        key_end = (self.block_start + last_col + 1)[seq]
        return seq, col, Rows.build(seq, self.block_start[seq] + col, key_end, self.num_slots), last_col

    def step(self) -> dict:
        """One diffusion step for every live sequence. Returns per-slot statistics of the step."""
        o = self.opts
        # 1. Plan: the rows this step computes.
        process = self.processing()
        seq, col, rows, last_col = self.rows(process)
        pos = rows.pos
        ids = self.tokens[seq, pos]
        is_mask_row = self.masked[seq, col]
        masked_in = self.masked.clone()

        target = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)
        if o.focus:
            avg = torch.where(self.decoded_steps > 0, self.decoded_sum / self.decoded_steps.clamp(min=1), 1.0)
            target = focus.retain_target(avg, self.masked.sum(1) * self.live, o.alpha)
        # 2. Forward.
        logits, logit_rows, kept = self.forward(ids, rows, is_mask_row, col, target)

        # 3. Sample and unmask.
        chosen, token_grid = self.choose(logits, seq[logit_rows], col[logit_rows])

        # 4. Bookkeeping. Write decoded tokens into the sequence; the block loses those masks.
        idx = (self.block_start[:, None] + self.cols).clamp(max=self.tokens.shape[1] - 1)  # (S, block) positions
        self.tokens.scatter_(1, idx, torch.where(chosen, token_grid, self.tokens.gather(1, idx)))
        self.masked &= ~chosen

        # Delayed cache, from the step's INPUT mask: a slot is cached once it and its right neighbour were
        # both decoded (the block's last slot needs only itself), so a fresh token is recomputed once.
        decoded_in = ~masked_in
        right = torch.cat([decoded_in[:, 1:], torch.ones_like(decoded_in[:, :1])], 1)
        self.uncached &= ~(decoded_in & right & self.live[:, None])
        self.warm &= ~self.live

        kept_grid = torch.zeros_like(process)
        kept_grid[seq, col] = kept
        self.last_step = (process, kept_grid, chosen, masked_in)  # for --show and bench.py's analysis
        n_decoded = chosen.sum(1)
        self.decoded_sum += n_decoded
        self.decoded_steps += n_decoded > 0                       # steps that decode nothing do not count
        computed = process.sum(1)
        deep = torch.zeros_like(computed).index_add_(0, seq, kept.long())
        return {"block": self.inside.sum(1) * self.live, "computed": computed, "computed_deep": deep,
                "decoded": n_decoded, "target": target,
                "context": self.block_start + last_col + 1, "committing": self.live & ~masked_in.any(1)}

    def choose(self, logits, seq, col):
        """Sample the masked rows that reached the last layer (logits (R, vocab) at slots seq, block positions
        col) and pick which to unmask by the rule. Returns chosen (S, block) bool and the tokens (S, block)."""
        o = self.opts
        logits[:, self.mask_id] = float("-inf")                  # the mask token is never an output
        token, conf = sample(logits, o.temperature, o.top_k, o.top_p, self.generator)
        cand = torch.zeros_like(self.masked)
        cand[seq, col] = True
        conf_grid = torch.zeros(self.masked.shape, device=self.device)
        conf_grid[seq, col] = conf
        token_grid = torch.full_like(self.masked, self.mask_id, dtype=torch.long)
        token_grid[seq, col] = token
        return unmask(conf_grid, cand, o.strategy, o.threshold, o.tokens_per_step), token_grid

    def forward(self, ids, rows, is_mask_row, col, target):
        """The step's forward: the one place a decode step runs the model. Returns the logits of the masked
        rows computed to the last layer (R, vocab), their indices among the step's rows (R,), and which rows
        reached layers 2..L (T,) bool. Plain: every row through every layer. FOCUS: every row through layers
        0-1, then the kept rows only (focus.forward_focus), which also advances the block's progress."""
        if not self.opts.focus:
            logit_rows = is_mask_row.nonzero().squeeze(1)
            logits = self.model.forward_rows(ids, rows, self.cache, logits_for=logit_rows)
            return logits, logit_rows, torch.ones_like(is_mask_row)
        out = focus.forward_focus(self.model, ids, rows, self.cache, is_mask_row, col, self.block_start,
                                  self.progress, target, self.opts.focus_rank, self.generator, self.opts.compile)
        self.progress = torch.maximum(self.progress, out.rightmost_kept)
        return out.logits, out.logit_rows, out.kept

    def finish_blocks(self, committed) -> list[tuple[int, int]]:
        """After a step: blocks that were committed this step start a new block or end their sequence.
        Returns (slot, end position) of the sequences that ended. A block is checked for stops as soon as it
        is fully decoded, so an ending sequence skips its commit step."""
        bs, o = self.block_size, self.opts
        done_block = self.live & ~self.masked.any(1) & ~committed
        # Blocks committed this step: move on.
        if committed.any():
            c = committed.nonzero().squeeze(1)
            self.block_start[c] += bs
            self._new_block(c)
        if not done_block.any():
            return []
        idx = self.block_start[:, None] + self.cols                         # (S, block) positions
        block = self.tokens.gather(1, idx)
        is_eos = torch.isin(block, self.eos) & (idx >= self.prompt_len[:, None])
        first_eos = torch.where(is_eos, idx, self.tokens.shape[1]).amin(1)
        end = torch.minimum(first_eos, self.limit)
        stop = done_block & ((first_eos < self.tokens.shape[1]) | (self.block_start + bs >= self.limit))
        if o.stop_repeats >= 2:
            repeated = done_block & self._repeats(block)
            stop |= repeated
            end = torch.where(repeated, torch.minimum(end, self.block_start + bs), end)
        ended = stop.nonzero().squeeze(1)
        self.live[ended] = False
        return list(zip(ended.tolist(), end[ended].tolist()))

    def _repeats(self, block):
        """(S,) bool: the current block equals each of the previous stop_repeats-1 blocks, all generated."""
        n, bs = self.opts.stop_repeats, self.block_size
        same = self.block_start - (n - 1) * bs >= self.prompt_len
        for k in range(1, n):
            start = (self.block_start - k * bs).clamp(min=0)
            prev = self.tokens.gather(1, start[:, None] + self.cols)
            same &= (prev == block).all(1)
        return same


# ---------------------------------------------------------------------------------------------------
# The API.

def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt; the prompt's text never becomes special tokens (Tokenizer.encode_prompt)."""
    for i, p in enumerate(prompts, 1):
        problem = prompt_problem(p)
        if problem:
            raise ValueError(f"prompt {i} {problem}")
    return [tokenizer.encode_prompt(p, chat) for p in prompts]


def prompt_problem(prompt) -> str | None:
    """What is wrong with a prompt, as the end of a sentence, or None."""
    if not isinstance(prompt, str):
        return f"is a {type(prompt).__name__}, not text"
    if not prompt.strip():
        return "is empty; give some text"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: from JSON "\ud800", or undecodable command-line bytes
        return f"is not valid Unicode ({e.reason} at character {e.start + 1}); save it as UTF-8"
    return None


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[list[int]], mask_id: int, eos_ids: list[int], opts: Options,
                 clock: dict | None = None, step_hook=None, on_result=None, decoder=Decoder):
    """Token-level generation. Returns, per prompt, (generated ids, stats dict of per-step lists).

    clock, if given, receives the seconds spent in prefill and in decode steps (device synchronised);
    step_hook(decoder) is called before every step (bench.py's analysis uses it); on_result(index, ids, stats)
    as each prompt finishes, in the order they finish (generate.py's --output streams them); decoder: the
    Decoder class (replay.py's replays recorded schedules through a subclass)."""
    cfg, bs = model.config, opts.block_size or model.config.block_size
    if not prompt_ids:
        raise ValueError("no prompts given")
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i + 1} is empty; give some text")
        if len(ids) + opts.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i + 1} has {len(ids)} tokens; with --max-new-tokens {opts.max_new_tokens} "
                             f"that exceeds the model's context of {cfg.max_position_embeddings}: shorten the prompt "
                             "or lower --max-new-tokens")
    max_len = max(math.ceil((len(p) + opts.max_new_tokens) / bs) * bs + bs for p in prompt_ids)
    slots = min(opts.batch_size, len(prompt_ids))
    dec = decoder(model, mask_id, eos_ids, opts, slots, max_len)
    queue = list(range(len(prompt_ids)))
    owner = [-1] * slots
    results = [None] * len(prompt_ids)
    history = {i: {k: [] for k in ("block", "computed", "computed_deep", "decoded", "target", "context")}
               for i in queue}
    bar = _progress_bar(len(prompt_ids)) if opts.progress and not opts.show else None
    color = sys.stderr.isatty()
    if opts.show:
        print(show_legend(color), file=sys.stderr)

    def fill(free):
        take = [(s, queue.pop(0)) for s in free[:len(queue)]]
        for s, r in take:
            owner[s] = r
        if take:
            with _timed(clock, "prefill_s", dec.device):
                dec.admit([s for s, _ in take], [prompt_ids[r] for _, r in take])

    try:
        with kernels.fast_paths(opts.compile):   # --compile: e.g. MoE experts batched (kernels.py)
            fill(list(range(slots)))
            while any(o >= 0 for o in owner):
                if step_hook is not None:
                    step_hook(dec)
                with _timed(clock, "decode_s", dec.device):
                    stats = dec.step()
                    committing = stats.pop("committing")                  # (S,) bool, stays on the device
                    stats = dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one sync a step
                for s, r in enumerate(owner):
                    if r >= 0:
                        for k in history[r]:
                            history[r][k].append(stats[k][s])
                if opts.show and owner[0] == 0:
                    print(show_line(dec, stats, 0, len(history[0]["decoded"]), color), file=sys.stderr)
                ended = dec.finish_blocks(committing)
                free = []
                for s, end in ended:
                    r = owner[s]
                    start = len(prompt_ids[r])
                    results[r] = (dec.tokens[s, start:end].tolist(), history[r])
                    if on_result is not None:
                        on_result(r, *results[r])
                    owner[s] = -1
                    free.append(s)
                    if bar:
                        bar.update(1)
                fill(free)
    finally:  # also on an interrupt: the bar's line ends before anything else is printed
        if bar:
            bar.close()
    return results


SHOW_LEGEND = {"decoded": ("#", "32"), "kept": ("o", "33"), "evicted": ("x", "31"), "recomputed": ("+", "36"),
               "cached": (".", "2"), "skipped": ("_", "2")}


class _timed:
    """Adds the seconds of a `with` block to clock[key] (no-op when clock is None)."""

    def __init__(self, clock, key, device):
        self.clock, self.key, self.cuda = clock, key, device.type == "cuda"

    def __enter__(self):
        if self.clock is not None:
            self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.clock is not None:
            if self.cuda:
                torch.cuda.synchronize()
            self.clock[self.key] = self.clock.get(self.key, 0.0) + time.perf_counter() - self.t0


def show_line(dec: Decoder, stats: dict, slot: int, step: int, color: bool) -> str:
    """One sequence's block after a step, one character a slot: decoded this step, masked and kept in all
    layers, masked and evicted after layer 1, decoded earlier and recomputed, decoded earlier and cached."""
    process, kept, chosen, masked_in = (t[slot].tolist() for t in dec.last_step)
    chars = []
    for p, k, c, m in zip(process, kept, chosen, masked_in):
        kind = ("decoded" if c else "kept" if m and k else "evicted" if m and p else "skipped" if m
                else "recomputed" if p else "cached")
        ch, code = SHOW_LEGEND[kind]
        chars.append(f"\033[{code}m{ch}\033[0m" if color else ch)
    block = int(dec.block_start[slot]) // dec.block_size
    return (f"step {step:4d} block {block:3d} |{''.join(chars)}| computed {stats['computed'][slot]:2d}  "
            f"layers 2..L {stats['computed_deep'][slot]:2d}  target {stats['target'][slot]:2d}  "
            f"decoded {stats['decoded'][slot]}")


def show_legend(color: bool) -> str:
    items = [f"\033[{code}m{ch}\033[0m {name}" if color else f"{ch} {name}" for name, (ch, code) in SHOW_LEGEND.items()]
    return "legend: " + "  ".join(items)


def _progress_bar(total):
    from tqdm import tqdm
    return tqdm(total=total, unit="seq", file=sys.stderr)


def generate(model, tokenizer, prompts: list[str], opts: Options | None = None, on_result=None,
             **options) -> list[Result]:
    """Generate a completion for every prompt.

        model, tok = checkpoint.load("checkpoints/sdar-tiny")   # import checkpoint
        results = generate(model, tok, ["What is 17 plus 25?"], max_new_tokens=64, threshold=0.9)
        results[0].text, results[0].token_ids, results[0].stats["decoded"]

    Options are the fields of `Options`, given as keywords or as one `Options` (already checked when made).
    Stats hold one entry per step of the sequence: the block's positions (block; the last block ends at
    the budget), tokens computed (layers 0-1), computed_deep (layers 2..L), decoded, the FOCUS retain
    target and the context length. on_result(index, result), if given, is called as each
    prompt finishes. Bad prompts or options raise a one-line ValueError.
    """
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got a {type(prompts).__name__}"
                         + (": wrap a single prompt in a list" if isinstance(prompts, str) else ""))
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt")
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; see generate.Options")
    if opts is not None and (options or not isinstance(opts, Options)):
        raise ValueError("give options either as one generate.Options or as keywords, not both")
    opts = opts if opts is not None else Options(**options)
    ids = encode_prompts(tokenizer, prompts, opts.chat)

    done = {}

    def finished(i, token_ids, stats):
        done[i] = Result(prompts[i], tokenizer.decode(token_ids), token_ids, stats)
        if on_result is not None:
            on_result(i, done[i])

    generate_ids(model, ids, tokenizer.mask_id, tokenizer.eos_ids, opts, on_result=finished)
    return [done[i] for i in range(len(prompts))]


# ---------------------------------------------------------------------------------------------------
# Command line.

class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, `error: ...`, exit 2, like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_options(p: argparse.ArgumentParser, names=None):
    """Flags for the fields of Options (all, or those named), with the dataclass's defaults and choices."""
    for f in fields(Options):
        if names is not None and f.name not in names:
            continue
        flag, kw = "--" + _flag(f.name), dict(default=f.default, help=f.metadata["help"])
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            kind = {"int": int, "int | None": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=kind, choices=f.metadata["choices"], **kw)


def options_from(args, **extra) -> Options:
    """The Options named by parsed flags (those add_options made), plus extra fields."""
    return Options(**{f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)}, **extra)


def read_prompts(path: str) -> list[str]:
    """The prompts of a JSONL file; a bad line is named by its line number in the file."""
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read prompts file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text ({e.reason}); "
                         "save the file as UTF-8") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{path}, line {n}: expected an object with a string \"prompt\" field")
        problem = prompt_problem(obj["prompt"])
        if problem:
            raise ValueError(f"{path}, line {n}: the prompt {problem}")
        prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


class ResultsFile:
    """--output: one JSONL line per prompt, written and flushed as each finishes into OUTPUT.partial. Only
    when every prompt has finished does OUTPUT receive them all, in prompt order, by one rename; so an
    interrupted or failed run leaves OUTPUT as it was, and what finished in OUTPUT.partial."""

    def __init__(self, path: Path, overwrite: bool):
        self.path, self.partial, self.lines = path, path.with_name(path.name + ".partial"), {}
        try:
            self.file = open(self.partial, "w" if overwrite else "x", encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot write {self.partial}: {e.strerror}") from None

    def add(self, index: int, r: Result):
        line = json.dumps({"index": index, "prompt": r.prompt, "text": r.text, "stats": r.stats})
        self.file.write(line + "\n")
        self.file.flush()
        self.lines[index] = line

    def commit(self):
        self.file.close()
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.path.parent, prefix=f".{self.path.name}.",
                                         suffix=".tmp", delete=False) as tmp:
            tmp.write("".join(self.lines[i] + "\n" for i in sorted(self.lines)))
        os.replace(tmp.name, self.path)
        self.partial.unlink()

    def abandon(self):
        """The run did not finish: keep the partial file if it holds results, else remove it."""
        self.file.close()
        if not self.lines:
            self.partial.unlink(missing_ok=True)


def check_output(output: str, prompts_file: str | None, overwrite: bool) -> Path:
    """Refuse, before any work, an --output that could not be written or would destroy a file."""
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {output} is a folder; name a file in it")
    if not path.parent.is_dir():
        raise ValueError(f"--output {output}: the folder {path.parent} does not exist; create it first")
    if prompts_file and path.resolve() == Path(prompts_file).resolve():
        raise ValueError(f"--output {output} is the prompts file; name another file")
    partial = path.with_name(path.name + ".partial")
    if not overwrite:
        if path.exists():
            raise ValueError(f"--output {output} exists; name a new file, or pass --overwrite to replace it "
                             "once every prompt has finished")
        if partial.exists():
            raise ValueError(f"{partial} exists (results of an interrupted run?); move it away or pass --overwrite")
    return path


def parse_args(argv=None):
    p = ArgumentParser(description="Block-diffusion generation with an SDAR checkpoint (optionally FOCUS).")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompts-file", help="JSONL file, one {\"prompt\": ...} object per line")
    p.add_argument("--output", help="write results as JSONL (index, prompt, text, stats) as each finishes")
    p.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder (default: the shipped model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    add_options(p, [f.name for f in fields(Options) if f.name != "progress"])  # progress: set by the prompt count
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code
    finished, results_file, total = [], None, None
    try:
        if not args.prompt and not args.prompts_file:
            raise ValueError("give --prompt TEXT or --prompts-file FILE")
        prompts = (args.prompt or []) + (read_prompts(args.prompts_file) if args.prompts_file else [])
        total = len(prompts)
        opts = options_from(args, progress=len(prompts) > 1)
        device = resolve_device(args.device)
        if args.output:
            results_file = ResultsFile(check_output(args.output, args.prompts_file, args.overwrite), args.overwrite)
        torch.manual_seed(args.seed)
        model, tok = load(args.model, device=device, dtype=args.dtype)
        t0 = time.perf_counter()

        def on_result(i, r):
            if results_file:
                results_file.add(i, r)
            finished.append(r)

        results = generate(model, tok, prompts, opts, on_result=on_result)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if results_file:
            results_file.commit()
            results_file = None
    except KeyboardInterrupt:
        print("".join(f"### {r.prompt}\n{r.text}\n" for r in finished), end="")
        print(interrupted_line(len(finished), total, results_file), file=sys.stderr)
        return 130
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("error: out of memory; lower --batch-size or --max-new-tokens", file=sys.stderr)
        return 2
    finally:
        if results_file:
            results_file.abandon()
    for r in results:
        if len(results) > 1:
            print(f"### {r.prompt}")
        print(r.text)
    print(summary(results, elapsed, args.block_size or model.config.block_size), file=sys.stderr)
    return 0


def interrupted_line(n: int, total: int | None, results_file: ResultsFile | None) -> str:
    done = f"interrupted: {n} of {total} prompts finished" if total else "interrupted before generation began"
    if results_file and n:
        return f"{done}; their results are in {results_file.partial}"
    if n:
        return f"{done} (printed above; --output FILE keeps each result as it finishes)"
    return done


def summary(results: list[Result], elapsed: float, block_size: int) -> str:
    """One line: tokens, steps, tokens computed per step against the full block (the last block of a sequence
    ends at the token budget, so it can be shorter than block_size), speed."""
    tokens = sum(len(r.token_ids) for r in results)
    steps = sum(len(r.stats["decoded"]) for r in results)
    decoded = sum(sum(r.stats["decoded"]) for r in results)
    early = sum(sum(r.stats["computed"]) for r in results) / max(steps, 1)
    deep = sum(sum(r.stats["computed_deep"]) for r in results) / max(steps, 1)
    full = sum(sum(r.stats["block"]) for r in results) / max(steps, 1)
    return (f"{len(results)} sequences, {tokens} tokens, {steps} steps ({decoded / max(steps, 1):.2f} decoded/step); "
            f"computed/step: {early:.1f} in layers 0-1, {deep:.1f} in layers 2..L, against {full:.1f} for the whole "
            f"block (block size {block_size}; {1 - deep / max(full, 1):.0%} fewer); "
            f"{elapsed:.2f} s, {tokens / elapsed:.1f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
