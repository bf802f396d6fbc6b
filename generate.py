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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import focus
import kernels
from model import CheckpointError, KVCache, Rows, load

DEFAULT_MODEL = Path(__file__).resolve().parent / "checkpoints" / "sdar-tiny"
STRATEGIES = ("threshold", "static", "sequential")


@dataclass
class Options:
    max_new_tokens: int = 256
    block_size: int | None = None      # None: the checkpoint's block size
    strategy: str = "threshold"        # unmasking rule, see unmask()
    threshold: float = 0.9             # dynamic rule: unmask every masked token with p >= threshold
    tokens_per_step: int = 1           # static and sequential rules: tokens unmasked per step
    temperature: float = 0.0           # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    delayed_cache: bool = True         # stop recomputing decoded tokens whose right neighbour is decoded
    focus: bool = False                # FOCUS eviction after layer 1 (needs the delayed cache)
    alpha: float = 1.5                 # FOCUS: keep about alpha x (average tokens decoded per step)
    compile: bool = False              # FOCUS: fused kernels through torch.compile
    focus_rank: str = "delta"          # FOCUS: ranking score, the delta or an ablation control (focus.RANKINGS)
    exact_commit: bool = False         # commit step recomputes the whole block (exact committed keys/values)
    stop_repeats: int = 0              # stop after this many identical consecutive blocks (0: off)
    batch_size: int = 32
    chat: bool = True                  # wrap prompts in the checkpoint's chat template
    seed: int = 0
    progress: bool = False             # tqdm bar over the prompts
    show: bool = False                 # FOCUS: print one sequence's block at every step

    def check(self):
        """Raise ValueError with a one-line message for a bad value."""
        for name in ("max_new_tokens", "batch_size", "tokens_per_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"block-size must be positive, got {self.block_size}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature and top-k must be >= 0 and top-p in (0, 1]")
        if self.focus and self.alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {self.alpha}")
        if self.focus_rank not in focus.RANKINGS:
            raise ValueError(f"unknown focus-rank {self.focus_rank!r}; use one of {', '.join(focus.RANKINGS)}")
        if self.focus and not self.delayed_cache:
            raise ValueError("FOCUS runs on top of the delayed cache; drop --no-delayed-cache or --focus")
        if self.stop_repeats == 1 or self.stop_repeats < 0:
            raise ValueError("stop-repeats must be 0 (off) or at least 2")


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
        self.masked = torch.zeros(S, bs, dtype=torch.bool, device=dev)    # MASKED slots of the active block
        self.uncached = torch.ones(S, bs, dtype=torch.bool, device=dev)   # delayed cache: still recomputed
        self.warm = torch.ones(S, dtype=torch.bool, device=dev)           # first step of a block computes all
        self.live = torch.zeros(S, dtype=torch.bool, device=dev)
        self.progress = torch.full((S,), -1, dtype=torch.long, device=dev)  # FOCUS block progress
        self.decoded_sum = torch.zeros(S, device=dev)                     # FOCUS avg tokens decoded per step
        self.decoded_steps = torch.zeros(S, device=dev)
        self.generator = torch.Generator(device=dev).manual_seed(opts.seed)
        self.focus_fns = None
        if opts.focus:
            self.focus_fns = kernels.focus_functions(compiled=opts.compile)

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
            rows_seq += [slot] * start
            rows_pos += range(start)
        slots_t = torch.tensor(slots, device=self.device)
        self._new_block(slots_t)
        # The first active block holds the prompt's tail: those slots are not masked.
        self.masked[slots_t] = (self.block_start[slots_t, None] + self.cols) >= self.prompt_len[slots_t, None]
        self.live[slots_t] = True
        if rows_seq:
            seq = torch.tensor(rows_seq, device=self.device)
            pos = torch.tensor(rows_pos, device=self.device)
            order = torch.argsort(seq, stable=True)
            seq, pos = seq[order], pos[order]
            rows = Rows.build(seq, pos, (pos // bs + 1) * bs, self.num_slots)  # block-causal prefill
            self.model.forward_rows(self.tokens[seq, pos], rows, self.cache, logits_for=pos[:0])

    def _new_block(self, slots):
        self.masked[slots] = True
        self.uncached[slots] = True
        self.warm[slots] = True
        self.progress[slots] = -1
        self.decoded_sum[slots] = 0
        self.decoded_steps[slots] = 0

    # -- one step -------------------------------------------------------------------------------------
    def processing(self):
        """(S, block) bool: which block positions this step computes (delayed cache, reference rules)."""
        if not self.opts.delayed_cache:
            process = torch.ones_like(self.masked)
        else:
            process = self.masked | self.uncached       # masked slots are never cached
            process |= self.warm[:, None]               # warm-up: the block's first step computes all
            process |= ~process.any(1, keepdim=True)    # nothing left to compute: compute all
            if self.opts.exact_commit:                  # commit step: the whole block, so the keys/values
                process |= ~self.masked.any(1, keepdim=True)  # it leaves in the cache are exact
        return process & self.live[:, None]

    def rows(self, process):
        """The step's rows, ordered by slot then position: slot (T,), block position (T,), their Rows, and
        each slot's last computed block position (S,), up to which attention reaches in the block."""
        seq, col = process.nonzero(as_tuple=True)
        last_col = torch.where(process, self.cols, -1).amax(1)
        key_end = (self.block_start + last_col + 1)[seq]
        return seq, col, Rows.build(seq, self.block_start[seq] + col, key_end, self.num_slots), last_col

    def step(self) -> dict:
        """One diffusion step for every live sequence. Returns per-slot statistics of the step."""
        o, bs = self.opts, self.block_size
        process = self.processing()
        seq, col, rows, last_col = self.rows(process)
        pos = rows.pos
        ids = self.tokens[seq, pos]
        is_mask_row = self.masked[seq, col]
        masked_in = self.masked.clone()

        target = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)
        if self.focus_fns is not None:
            avg = torch.where(self.decoded_steps > 0, self.decoded_sum / self.decoded_steps.clamp(min=1), 1.0)
            target = focus.retain_target(avg, self.masked.sum(1) * self.live, o.alpha)
            out = focus.forward_focus(self.model, ids, rows, self.cache, is_mask_row, col, self.block_start,
                                      self.progress, target, self.focus_fns, o.focus_rank, self.generator)
            logits, logit_rows, kept = out.logits, out.logit_rows, out.kept
            self.progress = torch.maximum(self.progress, out.rightmost_kept)
        else:
            logit_rows = is_mask_row.nonzero().squeeze(1)
            logits = self.model.forward_rows(ids, rows, self.cache, logits_for=logit_rows)
            kept = torch.ones_like(is_mask_row)

        logits[:, self.mask_id] = float("-inf")                  # the mask token is never an output
        token, conf = sample(logits, o.temperature, o.top_k, o.top_p, self.generator)
        cand = torch.zeros_like(self.masked)
        cand[seq[logit_rows], col[logit_rows]] = True
        conf_grid = torch.zeros(self.masked.shape, device=self.device)
        conf_grid[seq[logit_rows], col[logit_rows]] = conf
        token_grid = torch.full_like(self.masked, self.mask_id, dtype=torch.long)
        token_grid[seq[logit_rows], col[logit_rows]] = token
        chosen = unmask(conf_grid, cand, o.strategy, o.threshold, o.tokens_per_step)

        # Write decoded tokens into the sequence; the block loses those masks.
        s_idx, c_idx = chosen.nonzero(as_tuple=True)
        self.tokens[s_idx, self.block_start[s_idx] + c_idx] = token_grid[s_idx, c_idx]
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
        return {"computed": computed, "computed_deep": deep, "decoded": n_decoded, "target": target,
                "context": self.block_start + last_col + 1, "committing": self.live & ~masked_in.any(1)}

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
        limit = self.prompt_len + o.max_new_tokens
        end = torch.minimum(first_eos, limit)
        stop = done_block & ((first_eos < self.tokens.shape[1]) | (self.block_start + bs >= limit))
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
    out = []
    for i, p in enumerate(prompts):
        if not p or not p.strip():
            raise ValueError(f"prompt {i + 1} is empty; give some text")
        out.append(tokenizer.encode(tokenizer.apply_chat_template(p) if chat else p))
    return out


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[list[int]], mask_id: int, eos_ids: list[int], opts: Options,
                 clock: dict | None = None, step_hook=None):
    """Token-level generation. Returns, per prompt, (generated ids, stats dict of per-step lists).

    clock, if given, receives the seconds spent in prefill and in decode steps (device synchronised);
    step_hook(decoder) is called before every step (bench.py's analysis uses it)."""
    opts.check()
    cfg, bs = model.config, opts.block_size or model.config.block_size
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i + 1} is empty; give some text")
        if len(ids) + opts.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i + 1} has {len(ids)} tokens; with --max-new-tokens {opts.max_new_tokens} "
                             f"that exceeds the model's context of {cfg.max_position_embeddings}: shorten the prompt "
                             "or lower --max-new-tokens")
    max_len = max(math.ceil((len(p) + opts.max_new_tokens) / bs) * bs + bs for p in prompt_ids)
    slots = min(opts.batch_size, len(prompt_ids))
    dec = Decoder(model, mask_id, eos_ids, opts, slots, max_len)
    queue = list(range(len(prompt_ids)))
    owner = [-1] * slots
    results = [None] * len(prompt_ids)
    history = {i: {"computed": [], "computed_deep": [], "decoded": [], "target": [], "context": []} for i in queue}
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

    fill(list(range(slots)))
    while any(o >= 0 for o in owner):
        if step_hook is not None:
            step_hook(dec)
        with _timed(clock, "decode_s", dec.device):
            stats = dec.step()
            stats = {k: v.tolist() for k, v in stats.items()}
        for s, r in enumerate(owner):
            if r >= 0:
                for k in history[r]:
                    history[r][k].append(stats[k][s])
        if opts.show and owner[0] == 0:
            print(show_line(dec, stats, 0, len(history[0]["decoded"]), color), file=sys.stderr)
        ended = dec.finish_blocks(torch.tensor(stats["committing"], device=dec.device))
        free = []
        for s, end in ended:
            r = owner[s]
            start = len(prompt_ids[r])
            results[r] = (dec.tokens[s, start:end].tolist(), history[r])
            owner[s] = -1
            free.append(s)
            if bar:
                bar.update(1)
        fill(free)
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


def generate(model, tokenizer, prompts: list[str], **options) -> list[Result]:
    """Generate a completion for every prompt.

        model, tok = model.load("checkpoints/sdar-tiny")
        results = generate(model, tok, ["What is 17 plus 25?"], max_new_tokens=64, threshold=0.9)
        results[0].text, results[0].token_ids, results[0].stats["decoded"]

    Options are the fields of `Options`. Stats hold one entry per step of the sequence: tokens computed
    (layers 0-1), computed_deep (layers 2..L), decoded, and the FOCUS retain target.
    """
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; see generate.Options")
    opts = Options(**options)
    opts.check()
    ids = encode_prompts(tokenizer, prompts, opts.chat)
    out = generate_ids(model, ids, tokenizer.mask_id, tokenizer.eos_ids, opts)
    return [Result(p, tokenizer.decode(t), t, s) for p, (t, s) in zip(prompts, out)]


# ---------------------------------------------------------------------------------------------------
# Command line.

def read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{path}, line {n}: expected an object with a string \"prompt\" field")
        prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Block-diffusion generation with an SDAR checkpoint (optionally FOCUS).")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompts-file", help="JSONL file, one {\"prompt\": ...} object per line")
    p.add_argument("--output", help="write results as JSONL: prompt, text, stats")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder (default: the shipped model)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--strategy", default="threshold", help="threshold | static | sequential")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--tokens-per-step", type=int, default=1, help="static / sequential: tokens unmasked per step")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--delayed-cache", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--focus", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--compile", action="store_true", help="FOCUS kernels through torch.compile")
    p.add_argument("--focus-rank", default="delta", help="FOCUS ranking score: " + " | ".join(focus.RANKINGS))
    p.add_argument("--exact-commit", action="store_true", help="the commit step recomputes the whole block")
    p.add_argument("--show", action="store_true", help="print the first sequence's block at every step")
    p.add_argument("--stop-repeats", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not args.prompt and not args.prompts_file:
            raise ValueError("give --prompt TEXT or --prompts-file FILE")
        prompts = (args.prompt or []) + (read_prompts(args.prompts_file) if args.prompts_file else [])
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        if device not in ("cpu",) and not device.startswith("cuda"):
            raise ValueError(f"unknown device {device!r}; use cpu, cuda or auto")
        opts = Options(max_new_tokens=args.max_new_tokens, block_size=args.block_size, strategy=args.strategy,
                       threshold=args.threshold, tokens_per_step=args.tokens_per_step, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, delayed_cache=args.delayed_cache, focus=args.focus,
                       alpha=args.alpha, compile=args.compile, focus_rank=args.focus_rank,
                       exact_commit=args.exact_commit, stop_repeats=args.stop_repeats,
                       batch_size=args.batch_size, chat=args.chat, seed=args.seed,
                       progress=len(prompts) > 1, show=args.show)
        opts.check()
        torch.manual_seed(args.seed)
        model, tok = load(args.model, device=device, dtype=args.dtype)
        t0 = time.perf_counter()
        results = generate(model, tok, prompts, **asdict(opts))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("error: out of memory; lower --batch-size or --max-new-tokens", file=sys.stderr)
        return 2
    for r in results:
        if len(results) > 1:
            print(f"### {r.prompt}")
        print(r.text)
    if args.output:
        with open(args.output, "w") as f:
            for r in results:
                f.write(json.dumps({"prompt": r.prompt, "text": r.text, "stats": r.stats}) + "\n")
    print(summary(results, elapsed, args.block_size or model.config.block_size), file=sys.stderr)
    return 0


def summary(results: list[Result], elapsed: float, block_size: int) -> str:
    """One line: tokens, steps, tokens computed per step against the full block, speed."""
    tokens = sum(len(r.token_ids) for r in results)
    steps = sum(len(r.stats["decoded"]) for r in results)
    decoded = sum(sum(r.stats["decoded"]) for r in results)
    early = sum(sum(r.stats["computed"]) for r in results) / max(steps, 1)
    deep = sum(sum(r.stats["computed_deep"]) for r in results) / max(steps, 1)
    return (f"{len(results)} sequences, {tokens} tokens, {steps} steps ({decoded / max(steps, 1):.2f} decoded/step); "
            f"computed/step: {early:.1f} in layers 0-1, {deep:.1f} in layers 2..L of a {block_size}-token block "
            f"({1 - deep / block_size:.0%} fewer); {elapsed:.2f} s, {tokens / elapsed:.1f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
