"""The decoder: the state of a batch of sequences being decoded, one block at a time, all on the device.

One step (Decoder.step): plan the rows to compute (the delayed cache's rules), run the forward (plain, or
FOCUS), sample and unmask by the rule, then the bookkeeping (cache flags, statistics). After a step,
finish_blocks commits finished blocks, starts new ones, ends sequences at EOS or the token budget and plans the
next step: one host read for all of it.
generate.py's generate_ids drives it: admission of prompts into free cache slots, the steps, the results.

Words: a cache slot holds one sequence (S slots, one row of every (S, block) tensor here); a block position
(`col`, 0..block-1) is a token's place in its block; a row is one token a step computes.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch

import focus
import kernels
from model import KVCache, Rows, layout_sizes

STRATEGIES = ("threshold", "static", "sequential")
ENDINGS = ("length", "eos", "repeats")  # why a sequence ended: its token budget, an EOS token, --stop-repeats
RANKINGS, TARGETS = focus.RANKINGS, focus.TARGETS  # (inside Options the name `focus` is a field)
MAX_BLOCK_SIZE = 256  # a step computes up to a whole block and a block takes up to block-size steps
MAX_ALPHA = 1e6       # FOCUS's target alpha x tokens per step is a count of tokens: kept far from int64's end
MAX_INT = 2**63 - 1   # int64: a seed, and any count that reaches a tensor
PREFILL_GRAPH_ROWS = 4096  # --compile: a prefill of at most this many rows runs as a CUDA graph (Decoder.admit)


def option(default, help: str, choices: tuple | None = None):
    """A field of Options: its default, its --help line and, for a name, the values it may take."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Options:
    """Decoding options: the one place they are declared and checked. generate.py builds its command line from
    these fields (flag --max-new-tokens for max_new_tokens, default and choices from here), and every Options
    is checked when it is made, so a bad value fails at once with a one-line ValueError."""
    max_new_tokens: int = option(256, "tokens to generate per prompt at most")
    block_size: int | None = option(None, f"tokens per block (default: the checkpoint's; at most {MAX_BLOCK_SIZE}; "
                                          "the last block ends at --max-new-tokens)")
    strategy: str = option("threshold", "unmasking rule, see decoder.unmask()", STRATEGIES)
    threshold: float = option(0.9, "threshold rule: unmask every masked token with p >= threshold")
    tokens_per_step: int = option(1, "static and sequential rules: tokens unmasked per step")
    temperature: float = option(0.0, "0: greedy")
    top_k: int = option(0, "sample from the k most likely tokens (0: all)")
    top_p: float = option(1.0, "sample from the smallest set of tokens whose probability reaches top-p")
    delayed_cache: bool = option(True, "stop recomputing decoded tokens whose right neighbour is decoded")
    focus: bool = option(False, "FOCUS eviction after layer 1 (needs the delayed cache)")
    alpha: float = option(1.5, "FOCUS: keep about alpha x (average tokens decoded per step)")
    focus_rank: str = option("delta", "FOCUS: ranking score: the delta (the paper), an ablation control or, beyond "
                                      "the paper, another predictor (focus.ranking_score)", RANKINGS)
    focus_target: str = option("reference", "FOCUS: how many to keep, the reference's alpha x average or, beyond "
                                            "the paper, raised to the tokens near the threshold, or doubled after a "
                                            "step that decoded all it kept", TARGETS)
    compile: bool = option(False, "fast paths (kernels.py): on CUDA each step's layers as CUDA graphs; "
                                  "RMSNorm, RoPE and SwiGLU through torch.compile; MoE experts as "
                                  "batched matrix products")
    exact_commit: bool = option(False, "the commit step recomputes the whole block (exact committed keys/values)")
    stop_repeats: int = option(0, "stop after this many identical consecutive blocks (0: off)")
    eos_early_stop: bool = option(False, "end a sequence as soon as it decodes an EOS with nothing masked before "
                                         "it, not when its block is done (LLaDA2.0's generate; the same tokens)")
    batch_size: int = option(32, "sequences decoded together")
    seed: int = option(0, "sampling seed")

    def __post_init__(self):
        self.check()

    def check(self):
        """Raise ValueError with a one-line message for a bad value. Run when an Options is made and again by
        generate_ids, since a field can be changed after that."""
        for f in fields(self):  # numpy's and other number types become plain int and float
            setattr(self, f.name, _checked(f.name, getattr(self, f.name), f.type, f.metadata["choices"]))
        for name in ("max_new_tokens", "batch_size", "tokens_per_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if self.block_size is not None and not 0 < self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block-size must be in 1..{MAX_BLOCK_SIZE}, got {self.block_size}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature and top-k must be >= 0 and top-p in (0, 1], got {self.temperature}, "
                             f"{self.top_k} and {self.top_p}")
        if self.strategy == "threshold" and self.tokens_per_step != 1:
            raise ValueError(f"tokens-per-step {self.tokens_per_step} needs --strategy static or sequential (the "
                             "threshold rule decodes by confidence)")
        if not 1 <= self.alpha <= MAX_ALPHA:  # checked with or without --focus: a wrong value is still wrong
            raise ValueError(f"alpha must be in [1, {MAX_ALPHA:g}] (from the block size on FOCUS keeps every token), "
                             f"got {self.alpha}")
        if self.focus and not self.delayed_cache:
            raise ValueError("FOCUS runs on top of the delayed cache; drop --no-delayed-cache or --focus")
        if not self.focus and self.alpha != Options.alpha:
            raise ValueError(f"alpha {self.alpha} needs --focus (without it nothing is evicted)")
        if not self.focus and self.focus_rank != "delta":
            raise ValueError(f"focus-rank {self.focus_rank} needs --focus (without it nothing is ranked)")
        if not self.focus and self.focus_target != "reference":
            raise ValueError(f"focus-target {self.focus_target} needs --focus (without it nothing is evicted)")
        if self.stop_repeats == 1 or self.stop_repeats < 0:
            raise ValueError(f"stop-repeats must be 0 (off) or at least 2, got {self.stop_repeats}")
        if self.stop_repeats > self.max_new_tokens:  # n equal blocks take at least n new tokens
            raise ValueError(f"stop-repeats {self.stop_repeats} can never stop a sequence of at most max-new-tokens "
                             f"{self.max_new_tokens} tokens; lower it")
        if self.seed < 0:
            raise ValueError(f"seed must be in 0..2^63-1, got {self.seed}")


def flag(name: str) -> str:
    """An option's command-line spelling, without the dashes: max_new_tokens -> max-new-tokens."""
    return name.replace("_", "-")


def _checked(name: str, value, kind: str, choices):
    """value, of the right type (an integer of any type as int, a real number as float), or a ValueError. kind is
    the field's annotation as written: int, int | None, float, bool or str."""
    if value is None and kind.endswith("| None"):
        return value
    if kind.startswith("int"):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # numpy.int64 too
            raise ValueError(f"{flag(name)} must be an integer, got {value!r}")
        if abs(int(value)) > MAX_INT:  # past int64 a tensor op or the seed overflows
            raise ValueError(f"{flag(name)} must be below 2^63, got {value}")
        return int(value)
    if kind == "float":
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not _finite(value):  # numpy.float32 too
            raise ValueError(f"{flag(name)} must be a finite number, got {value!r}")
        return float(value)
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{flag(name)} must be True or False, got {value!r}")
    if kind == "str" and value not in choices:
        raise ValueError(f"unknown {flag(name)} {value!r}; use one of {', '.join(choices)}")
    return value


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


class StepRecord(NamedTuple):
    """What the last step did, per cache slot and block position, each (S, block) bool (--show, replay)."""
    computed: torch.Tensor       # rows computed in layers 0-1
    kept: torch.Tensor           # rows computed in layers 2..L too (FOCUS evicts the others)
    decoded: torch.Tensor        # masked tokens the step unmasked
    masked_before: torch.Tensor  # still masked when the step began


class Plan(NamedTuple):
    """A step's rows, planned before its forward (Decoder.plan)."""
    process: torch.Tensor   # (S, block) bool: the block positions computed
    seq: torch.Tensor       # (T,) the rows' cache slots, ascending ...
    col: torch.Tensor       # (T,) ... and block positions
    rows: Rows
    ids: torch.Tensor       # (T,) the rows' tokens
    is_mask_row: torch.Tensor  # (T,) bool: the row's token is masked
    last_col: torch.Tensor  # (S,) each slot's last computed block position, up to which attention reaches
    target: torch.Tensor    # (S,) FOCUS: how many masked tokens each sequence keeps (zeros without FOCUS)
    num_masked: int         # masked rows among the T
    evicting: bool          # FOCUS: some sequence has more masked rows than its target (rule 1)


# ---------------------------------------------------------------------------------------------------
# Sampling and unmasking rules.

def sample(logits, temperature: float, top_k: int, top_p: float, generator=None):
    """logits (R, vocab) -> token (R,) and its confidence (R,): the probability of the chosen token."""
    if temperature == 0:
        conf, token = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return token, conf
    # Shifted so the best logit is 0 before dividing, and the temperature kept where float32 neither
    # overflows nor flushes it to zero: outside [1e-30, 1e30] the distribution is already one-hot on the
    # best tokens, or uniform, to float32's precision.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / min(max(temperature, 1e-30), 1e30)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest set reaching top_p ...
        drop[:, 0] = False                        # ... which always holds the best token (top_p may round to 0)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    token = torch.multinomial(probs.nan_to_num(1.0), 1, generator=generator).squeeze(-1)  # NaN rows: see conf
    return token, probs.gather(-1, token[:, None]).squeeze(-1)


def unmask(conf, candidate, strategy: str, threshold: float, k: int):
    """Which masked tokens to decode this step. conf (S, block) confidences; candidate (S, block) bool: masked
    tokens that got logits this step (unprocessed or evicted ones never do). -> (S, block) bool.

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
        # One cache slot more than sequences: the spare slot that a graphed step's padding rows write to.
        # With --compile on CUDA the cache (and the graphs captured on it) is reused by the next decoder.
        shape = (model.config, num_slots + 1, max_len, dev, model.embed_tokens.weight.dtype)
        self.cache = (kernels.reused_cache(model, KVCache, *shape) if opts.compile and dev.type == "cuda"
                      else KVCache(*shape))
        self.eos = torch.tensor(eos_ids or [-1], device=dev)
        self.cols = torch.arange(bs, device=dev)
        S = self.num_slots = num_slots
        self.tokens = torch.full((S, max_len), mask_id, dtype=torch.long, device=dev)
        self.prompt_len = torch.zeros(S, dtype=torch.long, device=dev)
        self.block_start = torch.zeros(S, dtype=torch.long, device=dev)
        self.limit = torch.zeros(S, dtype=torch.long, device=dev)         # prompt length + max_new_tokens
        self.inside = torch.zeros(S, bs, dtype=torch.bool, device=dev)    # block positions before the limit
        self.masked = torch.zeros(S, bs, dtype=torch.bool, device=dev)    # MASKED positions of the active block
        self.uncached = torch.ones(S, bs, dtype=torch.bool, device=dev)   # delayed cache: still recomputed
        self.warm = torch.ones(S, dtype=torch.bool, device=dev)           # first step of a block computes all
        self.live = torch.zeros(S, dtype=torch.bool, device=dev)
        self.progress = torch.full((S,), -1, dtype=torch.long, device=dev)  # FOCUS block progress
        self.decoded_sum = torch.zeros(S, device=dev)                     # FOCUS avg tokens decoded per step
        self.decoded_steps = torch.zeros(S, device=dev)
        self.confidence = torch.zeros(S, bs, device=dev)                  # at the last step that computed it
        self.last_target = torch.zeros(S, dtype=torch.long, device=dev)   # FOCUS's target at the last step
        self.saturated = torch.zeros(S, dtype=torch.bool, device=dev)     # and whether it capped the decoding
        self.generator = torch.Generator(device=dev).manual_seed(opts.seed)
        self.refilling = False                                            # admit: after the first fill
        self.planned_ahead = None                                         # plan(): the next step's, read ahead

    # -- admission and prefill ------------------------------------------------------------------------
    def admit(self, slots: list[int], prompts: list[list[int]]):
        """Put prompts into free slots and prefill their whole blocks into the cache."""
        bs = self.block_size
        self.planned_ahead = None                                         # planned without these prompts
        # Values reach the device as whole tensors: writing a Python number into one element (t[i] = n) copies it
        # from the host and waits for the device (PyTorch's indexed assignment), as many times as it is done.
        slots_t = torch.tensor(slots, device=self.device)
        lengths = torch.tensor([len(ids) for ids in prompts], device=self.device)
        padded = torch.full((len(prompts), max(map(len, prompts))), self.mask_id, dtype=torch.long)
        rows_seq, rows_pos = [], []
        for i, (slot, ids) in enumerate(zip(slots, prompts)):
            padded[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            start = len(ids) // bs * bs
            rows_seq += [slot] * start
            rows_pos += range(start)
        self.tokens.index_fill_(0, slots_t, self.mask_id)
        self.tokens[slots_t, :padded.shape[1]] = padded.to(self.device)
        self.prompt_len[slots_t] = lengths
        self.block_start[slots_t] = lengths // bs * bs
        self.limit[slots_t] = lengths + self.opts.max_new_tokens
        self._new_block(torch.zeros_like(self.live).index_fill_(0, slots_t, True))
        # The first active block holds the prompt's tail: those positions are not masked.
        self.masked[slots_t] &= (self.block_start[slots_t, None] + self.cols) >= self.prompt_len[slots_t, None]
        self.live.index_fill_(0, slots_t, True)
        if rows_seq:
            seq = torch.tensor(rows_seq, device=self.device)
            pos = torch.tensor(rows_pos, device=self.device)
            order = torch.argsort(seq, stable=True)
            seq, pos = seq[order], pos[order]
            rows = Rows.build(seq, pos, (pos // bs + 1) * bs, self.num_slots)  # block-causal prefill
            # With --compile a small refill (prompts taking the slots of ended sequences, as a server admits them)
            # runs as a CUDA graph: eagerly, one prompt of 512 tokens took 73-78 ms of host time at the SDAR-8B
            # shape where its kernels take 15-20; from 8 such prompts on, the kernels outlast the launches
            # (results/README.md, "Small prefills as CUDA graphs"). The first fill runs eagerly: a graph
            # captured for one use costs more than it saves.
            graphs = self.opts.compile and self.refilling and len(seq) <= PREFILL_GRAPH_ROWS
            self.model.forward_rows(self.tokens[seq, pos], rows, self.cache, logits_for=pos[:0], graphs=graphs,
                                    grid="sequences")
        self.refilling = True

    def _new_block(self, fresh):
        """fresh (S,) bool: these slots start the block at their block_start (all slots at once: no host sync).
        The last block ends at the token budget: positions past it are not part of the sequence, so a run's cost
        follows max_new_tokens, not the block size."""
        new = fresh[:, None]
        inside = (self.block_start[:, None] + self.cols) < self.limit[:, None]
        self.inside = torch.where(new, inside, self.inside)
        self.masked = torch.where(new, inside, self.masked)
        self.uncached = torch.where(new, inside, self.uncached)
        self.warm = self.warm | fresh
        self.progress = self.progress.masked_fill(fresh, -1)
        self.decoded_sum = self.decoded_sum.masked_fill(fresh, 0)
        self.decoded_steps = self.decoded_steps.masked_fill(fresh, 0)
        self.confidence = self.confidence.masked_fill(new, 0)
        self.saturated = self.saturated & ~fresh

    # -- one step -------------------------------------------------------------------------------------
    def processing(self):
        """(S, block) bool: which block positions this step computes (delayed cache, reference rules)."""
        if not self.opts.delayed_cache:
            process = self.inside.clone()
        else:
            process = self.masked | self.uncached       # masked tokens are never cached
            process |= self.warm[:, None]               # warm-up: the block's first step computes all
            process |= ~process.any(1, keepdim=True)    # nothing left to compute: compute all
            if self.opts.exact_commit:                  # commit step: the whole block, so the keys/values
                process |= ~self.masked.any(1, keepdim=True)  # it leaves in the cache are exact
        return process & self.inside & self.live[:, None]

    def plan(self) -> Plan:
        """The step's rows (processing(), ordered by slot then position) and FOCUS's target. What the host must know
        (the numbers of rows and of masked rows, whether FOCUS evicts (rule 1) and the rows' layout sizes) comes in
        one read, so the forward that follows neither syncs to learn its shapes nor to pick its path; the end of
        the last step read it ahead, with its own (finish_blocks), unless a prompt was admitted since."""
        if self.planned_ahead is None:
            on_device = self.plan_on_device()
            self.planned_ahead = on_device, on_device[-1].tolist()
        (process, target, last_col, col, ahead, ids, is_mask_row, _), (num_rows, num_masked, evicting, *sizes) = (
            self.planned_ahead)
        rows = ahead.sized(num_rows, sizes)                                 # the first num_rows: the step's rows
        return Plan(process, rows.seq, col[:num_rows], rows, ids[:num_rows], is_mask_row[:num_rows], last_col,
                    target, num_masked, bool(evicting))

    def plan_on_device(self):
        """plan's device side, no host read: the positions computed (S, block), the target (S,), each slot's last
        computed block position (S,); the step's rows laid out before the host knows how many there are (a row for
        every block position, the computed ones first): their block positions (S*block,), layout (model.RowsAhead),
        tokens and mask flags; and what the host reads, one (9,) tensor. Laid out here, behind the last step's
        graph, the rows cost no work between the read and the forward."""
        process = self.processing()
        target = self.retain_target() if self.opts.focus else torch.zeros_like(self.block_start)
        counts = process.sum(1)                                            # (S,) rows per slot
        mask_counts = (process & self.masked).sum(1)                       # (S,) masked rows per slot
        last_col = torch.where(process, self.cols, -1).amax(1)
        ends = self.block_start + last_col + 1                             # (S,) each slot's rows attend below
        evicting = focus.evicting(mask_counts, target).any()
        read = torch.cat([torch.stack([counts.sum(), mask_counts.sum(), evicting.long()]),
                          layout_sizes(counts, ends, ends)])
        # (S*block,) the computed positions by slot then block position, then padding rows in slot S (after every
        # real slot, so the rows keep their own layout), which read slot S-1's last position and are never used.
        S, bs = self.num_slots, self.block_size
        seq, col = torch.nonzero_static(process, size=S * bs, fill_value=S).unbind(1)
        slot, col = seq.clamp(max=S - 1), col.clamp(max=bs - 1)
        pos = self.block_start[slot] + col
        ahead = Rows.lay_out(seq, pos, ends[slot], S)
        return process, target, last_col, col, ahead, self.tokens[slot, pos], self.masked[slot, col], read

    def step(self) -> dict:
        """One diffusion step for every live sequence. Returns per-slot statistics of the step."""
        o = self.opts
        # 1. Plan: the rows this step computes.
        plan = self.plan()
        self.planned_ahead = None                                          # the state changes from here
        seq, col, process, target = plan.seq, plan.col, plan.process, plan.target
        ids, is_mask_row = plan.ids, plan.is_mask_row
        masked_in = self.masked.clone()

        # 2. Forward.
        logits, logit_rows, kept = self.forward(ids, plan, is_mask_row)

        # 3. Sample and unmask.
        chosen, token_grid = self.choose(logits, seq[logit_rows], col[logit_rows])

        # 4. Bookkeeping. Write decoded tokens into the sequence; the block loses those masks.
        idx = self.block_start[:, None] + self.cols                        # (S, block) positions
        self.tokens.scatter_(1, idx, torch.where(chosen, token_grid, self.tokens.gather(1, idx)))
        self.masked &= ~chosen

        # Delayed cache, from the step's INPUT mask: a position is cached once it and its right neighbour
        # were both decoded (the block's last position needs only itself), so a fresh token is recomputed once.
        decoded_in = ~masked_in
        right = torch.cat([decoded_in[:, 1:], torch.ones_like(decoded_in[:, :1])], 1)
        self.uncached &= ~(decoded_in & right & self.live[:, None])
        self.warm &= ~self.live

        kept_grid = torch.zeros_like(process)
        kept_grid[seq, col] = kept
        self.last_step = StepRecord(process, kept_grid, chosen, masked_in)
        n_decoded = chosen.sum(1)
        if o.focus_target == "saturation":  # its inputs: the cap bound if every kept masked token was decoded
            kept_masked = (kept_grid & masked_in).sum(1)
            self.saturated = (kept_masked < masked_in.sum(1)) & (n_decoded >= kept_masked) & (n_decoded > 0)
            self.last_target = target
        self.decoded_sum += n_decoded
        self.decoded_steps += n_decoded > 0                       # steps that decode nothing do not count
        computed = process.sum(1)
        deep = torch.zeros_like(computed).index_add_(0, seq, kept.long())
        return {"block": self.inside.sum(1) * self.live, "computed": computed, "computed_deep": deep,
                "decoded": n_decoded, "target": target,
                "context": self.block_start + plan.last_col + 1, "committing": self.live & ~masked_in.any(1),
                "not_finite": self.confidence.isnan().any(1)}   # NaN or inf logits gave a NaN confidence

    def retain_target(self):
        """(S,) how many masked tokens FOCUS keeps this step (focus.retain_target), from the running average
        of tokens decoded per step in the block (1 before any step counted)."""
        avg = torch.where(self.decoded_steps > 0, self.decoded_sum / self.decoded_steps.clamp(min=1), 1.0)
        target = focus.retain_target(avg, self.masked.sum(1) * self.live, self.opts.alpha)
        if self.opts.focus_target == "near-threshold":
            target = focus.near_threshold_target(target, self.confidence, self.masked & self.live[:, None],
                                                 self.opts.threshold)
        elif self.opts.focus_target == "saturation":
            target = focus.saturation_target(target, self.last_target, self.saturated & self.live,
                                             self.masked.sum(1) * self.live)
        return target

    def choose(self, logits, seq, col):
        """Sample the masked rows that reached the last layer (logits (R, vocab) at slots seq, block positions
        col) and pick which to unmask by the rule. Returns chosen (S, block) bool and the tokens (S, block)."""
        o = self.opts
        logits[:, self.mask_id] = float("-inf")                  # the mask token is never an output
        token, conf = sample(logits, o.temperature, o.top_k, o.top_p, self.generator)
        cand = torch.zeros_like(self.masked)
        cand[seq, col] = torch.ones_like(col, dtype=torch.bool)  # a tensor: `= True` would wait for the device
        conf_grid = torch.zeros(self.masked.shape, device=self.device)
        conf_grid[seq, col] = conf
        token_grid = torch.full_like(self.masked, self.mask_id, dtype=torch.long)
        token_grid[seq, col] = token
        self.confidence = torch.where(cand, conf_grid, self.confidence)
        return unmask(conf_grid, cand, o.strategy, o.threshold, o.tokens_per_step), token_grid

    def forward(self, ids, plan: Plan, is_mask_row):
        """The step's forward: the one place a decode step runs the model. ids, is_mask_row (T,) for the plan's
        rows. Returns the logits of the masked rows computed to the last layer (R, vocab), their indices among
        the step's rows (R,), and which rows reached layers 2..L (T,) bool. Plain: every row through every
        layer. FOCUS: every row through layers 0-1, then the kept rows only (focus.forward_focus), which also
        advances the block's progress. --compile: the same through kernels.py's fast paths (on CUDA, the layers
        as CUDA graphs)."""
        o = self.opts
        if not o.focus:
            logit_rows = torch.nonzero_static(is_mask_row, size=plan.num_masked).squeeze(1)
            logits = self.model.forward_rows(ids, plan.rows, self.cache, logits_for=logit_rows, graphs=o.compile)
            return logits, logit_rows, torch.ones_like(is_mask_row)
        out = focus.forward_focus(self.model, ids, plan.rows, self.cache, is_mask_row, plan.col, self.block_start,
                                  self.progress, plan.target, o.focus_rank, self.generator, o.compile,
                                  self.confidence, evicting=plan.evicting, num_masked=plan.num_masked)
        self.progress = torch.maximum(self.progress, out.rightmost_kept)
        return out.logits, out.logit_rows, out.kept

    def finish_blocks(self, committed, stats: dict | None = None) -> tuple[list[tuple[int, int, str]], dict]:
        """After a step: blocks that were committed this step start a new block or end their sequence.
        Returns (slot, end position, why: one of ENDINGS) of the sequences that ended, and `stats` (the step's
        (S,) statistics, if given) read as lists. Every slot is computed at once, on the device, and so is the
        next step's plan (plan_on_device; a prompt admitted before that step drops it); one host read takes
        them all."""
        stop, end, why = self.endings(committed)
        ahead = self.plan_on_device()                                       # the next step's plan
        per_slot = torch.stack([stop.long(), end, why, *(stats or {}).values()])    # (3 + statistics, S)
        read = torch.cat([per_slot.flatten(), ahead[-1]]).tolist()          # the one host read
        n = per_slot.numel()
        self.planned_ahead = ahead, read[n:]
        stops, ends, whys, *values = (read[i:i + self.num_slots] for i in range(0, n, self.num_slots))
        ended = [(s, e, ENDINGS[w]) for s, (hit, e, w) in enumerate(zip(stops, ends, whys)) if hit]
        return ended, dict(zip(stats or {}, values))

    def endings(self, committed):
        """The device side of finish_blocks: (S,) each of which sequences end, where (a position) and why (an
        index into ENDINGS). A block is checked for stops as soon as it is fully decoded, so an ending sequence
        skips its commit step; with eos_early_stop, as soon as an EOS is decoded with nothing masked before it
        (the tokens before it can no longer change, so the output is the same, and the steps that would decode
        the rest of the block are saved)."""
        bs, o = self.block_size, self.opts
        done_block = self.live & ~self.masked.any(1) & ~committed
        # Blocks committed this step: move on.
        self.block_start += bs * committed
        self._new_block(committed)
        idx = self.block_start[:, None] + self.cols                         # (S, block) positions
        block = self.tokens.gather(1, idx)
        is_eos = torch.isin(block, self.eos) & (idx >= self.prompt_len[:, None])
        first_eos = torch.where(is_eos, idx, self.tokens.shape[1]).amin(1)
        check = done_block
        if o.eos_early_stop:
            masked_before = (self.masked & (idx < first_eos[:, None])).any(1)
            check = check | (self.live & ~committed & (first_eos < self.limit) & ~masked_before)
        end = torch.minimum(first_eos, self.limit)
        why = (first_eos < self.limit).long()                              # ENDINGS: 1 eos, else 0 the budget
        stop = check & ((first_eos < self.tokens.shape[1]) | (self.block_start + bs >= self.limit))
        if o.stop_repeats >= 2:
            repeated = done_block & self._repeats(block)
            stop |= repeated
            why = torch.where(repeated & (self.block_start + bs < end), 2, why)
            end = torch.where(repeated, torch.minimum(end, self.block_start + bs), end)
        self.live &= ~stop
        return stop, end, why

    def _repeats(self, block):
        """(S,) bool: the current block equals each of the previous stop_repeats-1 blocks, all generated."""
        n, bs = self.opts.stop_repeats, self.block_size
        same = self.block_start - (n - 1) * bs >= self.prompt_len
        for k in range(1, n):
            start = (self.block_start - k * bs).clamp(min=0)
            prev = self.tokens.gather(1, start[:, None] + self.cols)
            same &= (prev == block).all(1)
        return same
