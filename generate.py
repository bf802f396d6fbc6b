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
The per-step state, the rules and the decoding options are decoder.py's; this file drives them
(generate_ids), and holds the Python API (generate) and the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import math
import numbers
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

try:  # torch takes seconds to import: a Ctrl-C meanwhile ends the command with one line, not a traceback
    import torch

    import kernels
    from checkpoint import CheckpointError, load, resolve_device
    from decoder import MAX_INT, Decoder, Options, flag
    from files import ResultsFile, check_output, file_name, prompt_problem, read_prompts
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("interrupted before generation began", file=sys.stderr)
    sys.exit(130)

DEFAULT_MODEL = Path(__file__).resolve().parent / "checkpoints" / "sdar-tiny"


@dataclass
class Result:
    prompt: str
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)  # per step: computed, computed_deep, decoded, ...; finish_reason


# ---------------------------------------------------------------------------------------------------
# The API.

def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt; the prompt's text never becomes special tokens (Tokenizer.encode_prompt)."""
    for i, p in enumerate(prompts, 1):
        problem = prompt_problem(p)
        if problem:
            raise ValueError(f"prompt {i} {problem}")
    return [tokenizer.encode_prompt(p, chat) for p in prompts]


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[list[int]], mask_id: int, eos_ids: list[int], opts: Options,
                 clock: dict | None = None, step_hook=None, on_result=None, decoder=Decoder, show: bool = False,
                 show_progress: bool = False):
    """Token-level generation. Returns, per prompt, (generated ids, stats dict of per-step lists).

    clock, if given, receives the seconds spent in prefill and in decode steps (device synchronised);
    step_hook(decoder) is called before every step (tools/analysis.py uses it); on_result(index, ids, stats)
    as each prompt finishes, in the order they finish (--output streams them); decoder: the Decoder class
    (tools/replay.py replays recorded schedules through a subclass); show: print the first sequence's block
    after every step (--show); show_progress: a tqdm bar over the prompts."""
    check_model(model)
    if not isinstance(opts, Options):
        raise ValueError(f"opts must be a decoder.Options, got a {type(opts).__name__}")
    opts.check()  # again: a field may have been changed since the Options was made
    cfg, bs = model.config, opts.block_size or model.config.block_size
    if not isinstance(prompt_ids, (list, tuple)):  # a tensor of ids too (before its truth value, an error)
        raise ValueError(f"prompt_ids must be a list of lists of token ids, got a {type(prompt_ids).__name__}")
    if not prompt_ids:
        raise ValueError("no prompts given")
    if not _token_id(mask_id, cfg.vocab_size):
        raise ValueError(f"mask_id must be a token id below the vocabulary size {cfg.vocab_size}, got {mask_id!r}")
    if not isinstance(eos_ids, (list, tuple)) or not all(_token_id(i, MAX_INT + 1, low=-MAX_INT) for i in eos_ids):
        raise ValueError(f"eos_ids must be a list of token ids (an id no token has, such as -1, never ends a "
                         f"sequence), got {eos_ids!r}")
    if mask_id in eos_ids:  # never an output, it would never end a sequence
        raise ValueError(f"eos_ids {eos_ids!r} hold mask_id {mask_id}, which is never generated; leave it out")
    for i, ids in enumerate(prompt_ids):
        if not isinstance(ids, (list, tuple)) or not all(_token_id(t, cfg.vocab_size) for t in ids):
            raise ValueError(f"prompt {i + 1} must be a list of token ids below the vocabulary size {cfg.vocab_size}")
        if not ids:
            raise ValueError(f"prompt {i + 1} is empty; give some text")
        if len(ids) + opts.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i + 1} has {len(ids)} tokens; with --max-new-tokens {opts.max_new_tokens} "
                             f"that exceeds the model's context of {cfg.max_position_embeddings}: shorten the prompt "
                             "or lower --max-new-tokens")
    # numpy's integers as plain ints
    mask_id, eos_ids, prompt_ids = int(mask_id), [int(i) for i in eos_ids], [[int(t) for t in p] for p in prompt_ids]
    if opts.stop_repeats > -(-opts.max_new_tokens // bs):  # never that many blocks: off, without the checks
        opts = dataclasses.replace(opts, stop_repeats=0)
    max_len = max(math.ceil((len(p) + opts.max_new_tokens) / bs) * bs + bs for p in prompt_ids)
    slots = min(opts.batch_size, len(prompt_ids))
    dec = decoder(model, mask_id, eos_ids, opts, slots, max_len)
    queue = list(range(len(prompt_ids)))
    owner = [-1] * slots
    results = [None] * len(prompt_ids)
    history = {i: {k: [] for k in ("block", "computed", "computed_deep", "decoded", "target", "context")}
               for i in queue}
    bar = _progress_bar(len(prompt_ids)) if show_progress and not show else None
    color = sys.stderr.isatty()
    if show:
        print(show_legend(color), file=sys.stderr)

    def fill(free):
        take = [(s, queue.pop(0)) for s in free[:len(queue)]]
        for s, r in take:
            owner[s] = r
        if take:
            with _timed(clock, "prefill_s", dec.device):
                dec.admit([s for s, _ in take], [prompt_ids[r] for _, r in take])

    try:
        with kernels.fast_paths(model, opts.compile):   # --compile: the fused functions (kernels.py)
            fill(list(range(slots)))
            while any(o >= 0 for o in owner):
                if step_hook is not None:
                    step_hook(dec)
                with _timed(clock, "decode_s", dec.device):
                    stats = dec.step()                                    # (S,) tensors, on the device
                    committing = stats.pop("committing")
                    if show and owner[0] == 0:  # --show: the block before it moves on (one host read more)
                        shown = show_line(dec, {k: v.tolist() for k, v in stats.items()}, 0,
                                          len(history[0]["decoded"]) + 1, color)
                    ended, stats = dec.finish_blocks(committing, stats)   # one host read a step: both
                if any(stats["not_finite"]):
                    raise ValueError("the model's logits are not finite (NaN or inf): its weights or config overflow "
                                     f"in {model.embed_tokens.weight.dtype}; check the checkpoint")
                if show and owner[0] == 0:
                    print(shown, file=sys.stderr)
                for s, r in enumerate(owner):
                    if r >= 0:
                        for k in history[r]:
                            history[r][k].append(stats[k][s])
                free = []
                starts = [len(prompt_ids[owner[s]]) for s, _, _ in ended]
                outputs = (torch.cat([dec.tokens[s, a:end] for (s, end, _), a in zip(ended, starts)]).tolist()
                           if ended else [])                               # the ended sequences' tokens: one read
                at = 0
                for (s, end, why), start in zip(ended, starts):
                    r = owner[s]
                    history[r]["finish_reason"] = why
                    results[r] = (outputs[at:at + end - start], history[r])
                    at += end - start
                    if on_result is not None:
                        on_result(r, *results[r])
                    owner[s] = -1
                    free.append(s)
                    if bar:
                        bar.update(1)
                fill(free)
    except BaseException:  # a failure or an interrupt: the bar goes, so its one line is all the terminal shows
        if bar:
            bar.leave = False
        raise
    finally:
        if bar:
            bar.close()
    return results


def _token_id(t, vocab_size: int, low: int = 0) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool) and low <= t < vocab_size


def check_model(model, tokenizer=None, with_tokenizer: bool = False):
    """A ValueError for arguments that are not a model (and, with_tokenizer, a tokenizer), e.g. the two
    swapped."""
    if with_tokenizer and hasattr(model, "encode_prompt") and hasattr(tokenizer, "forward_rows"):
        raise ValueError("model and tokenizer are swapped: call generate(model, tokenizer, prompts)")
    if not (hasattr(model, "forward_rows") and hasattr(model, "config")):
        raise ValueError(f"model must be an SDAR model (checkpoint.load returns model, tokenizer), got a "
                         f"{type(model).__name__}")
    if with_tokenizer and not hasattr(tokenizer, "encode_prompt"):
        raise ValueError(f"tokenizer must be a checkpoint.Tokenizer, got a {type(tokenizer).__name__}")


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
    step_record = dec.last_step
    chars = []
    for p, k, c, m in zip(*(t[slot].tolist() for t in (step_record.computed, step_record.kept, step_record.decoded,
                                                      step_record.masked_before))):
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
    """On a terminal only: written to a file or a pipe, a bar is a log of frames around the one line that
    matters."""
    from tqdm import tqdm
    return tqdm(total=total, unit="seq", file=sys.stderr, disable=not sys.stderr.isatty())


def generate(model, tokenizer, prompts: list[str], opts: Options | None = None, on_result=None, chat: bool = True,
             show: bool = False, show_progress: bool = False, **options) -> list[Result]:
    """Generate a completion for every prompt.

        model, tok = checkpoint.load("checkpoints/sdar-tiny")   # import checkpoint
        results = generate(model, tok, ["What is 17 plus 25?"], max_new_tokens=64, threshold=0.9)
        results[0].text, results[0].token_ids, results[0].stats["decoded"]

    Decoding options are the fields of `decoder.Options`, given as keywords or as one `Options` (already
    checked when made). chat: wrap each prompt in the checkpoint's chat template; show, show_progress: as
    generate_ids. Stats hold one entry per step of the sequence: the block's positions (block; the last
    block ends at the budget), tokens computed (layers 0-1), computed_deep (layers 2..L), decoded, the FOCUS
    retain target and the context length; stats["finish_reason"] says why the sequence ended (decoder.ENDINGS:
    "eos", "length" for the token budget, "repeats"). on_result(index, result), if given, is called as each
    prompt finishes. Bad prompts or options raise a one-line ValueError.
    """
    check_model(model, tokenizer, with_tokenizer=True)
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got a {type(prompts).__name__}"
                         + (": wrap a single prompt in a list" if isinstance(prompts, str) else ""))
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt")
    for name, value in (("chat", chat), ("show", show), ("show_progress", show_progress)):
        if not isinstance(value, bool):  # chat="no" would be true
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if on_result is not None and not callable(on_result):
        raise ValueError(f"on_result must be a function of (index, result), got a {type(on_result).__name__}")
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; see decoder.Options")
    if opts is not None and not isinstance(opts, Options):
        raise ValueError(f"opts must be a decoder.Options (or give options as keywords), got a {type(opts).__name__}")
    if opts is not None and options:
        raise ValueError("give options either as one decoder.Options or as keywords, not both")
    opts = opts if opts is not None else Options(**options)
    ids = encode_prompts(tokenizer, prompts, chat)

    done = {}

    def finished(i, token_ids, stats):
        done[i] = Result(prompts[i], tokenizer.decode(token_ids), token_ids, stats)
        if on_result is not None:
            on_result(i, done[i])

    generate_ids(model, ids, tokenizer.mask_id, tokenizer.eos_ids, opts, on_result=finished, show=show,
                 show_progress=show_progress)
    return [done[i] for i in range(len(prompts))]


# ---------------------------------------------------------------------------------------------------
# Command line.

def _stop(signum, frame):
    """kill -TERM or a closed terminal (SIGHUP) raises Ctrl-C's KeyboardInterrupt, whose handling keeps what
    finished, with the signal's number."""
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise KeyboardInterrupt(signum)


def start_command():
    """What each command does first when run as a script: a stderr closed at start (2>&-) takes its lines to
    /dev/null instead of crashing at the first; SIGTERM and SIGHUP stop it as Ctrl-C does, unless ignored (nohup)."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    for signum in filter(None, (signal.SIGTERM, getattr(signal, "SIGHUP", None))):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, _stop)


def interrupted_status(e: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by Ctrl-C or by _stop's signal: 128 + the signal's number."""
    return 128 + (e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT)


def command(main):
    """A command's main: an interrupt it does not handle itself (its argument checks, its start-up, its last
    prints) is one line and the interrupted status, not a traceback."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt as e:
            say("interrupted")
            return interrupted_status(e)
    return run


def say(line: str):
    """A line on stderr. A terminal that went away (SIGHUP: EIO) changes neither the exit status nor the output:
    the line is dropped, and stderr goes to /dev/null from here on."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        _to_devnull(sys.stderr)


def _to_devnull(stream):
    try:  # the flush at exit would fail again (and exit 120)
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


class _Once:
    """A flag that sets one value is given once: argparse would let a second --prompts-file replace the first, or
    --no-focus undo --focus."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} is given twice; give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _StoreOnce(_Once, argparse._StoreAction):
    pass


class _BooleanOnce(_Once, argparse.BooleanOptionalAction):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, `error: ...`, exit 2, like every other error here, and each
    flag that takes a value given at most once. type="path" marks a file or folder name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in (None, "store"):
            self.register("action", name, _StoreOnce)
        self.register("type", "path", file_name)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")

    def alone(self, args, name: str, does: str):
        """Flag `name` (dest), given, takes no other flag: `does` says what it does instead, so the others would be
        ignored without a word."""
        if getattr(args, name) is None:
            return
        others = [_spelling(a, getattr(args, a.dest)) for a in self._actions if a.option_strings and a.dest
                  not in ("help", name) and getattr(args, a.dest, a.default) != a.default]
        if others:
            self.error(f"--{name} {does}; drop {', '.join(others)}, which it would ignore")


def _spelling(action, value) -> str:
    """The flag as given: --focus or --no-focus by its value, else the long name."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return action.option_strings[0 if value else 1]
    return max(action.option_strings, key=len)


def add_options(p: argparse.ArgumentParser, names=None):
    """Flags for the fields of Options (all, or those named), with the dataclass's defaults and choices."""
    for f in fields(Options):
        if names is not None and f.name not in names:
            continue
        name, kw = "--" + flag(f.name), dict(default=f.default, help=f.metadata["help"])
        if f.type == "bool":
            p.add_argument(name, action=_BooleanOnce, **kw)
        else:
            kind = {"int": int, "int | None": int, "float": float, "str": str}[f.type]
            p.add_argument(name, type=kind, choices=f.metadata["choices"], **kw)


def options_from(args, **extra) -> Options:
    """The Options named by parsed flags (those add_options made), plus extra fields."""
    return Options(**{f.name: getattr(args, f.name) for f in fields(Options) if hasattr(args, f.name)}, **extra)


def parse_args(argv=None):
    p = ArgumentParser(description="Block-diffusion generation with an SDAR checkpoint (optionally FOCUS).")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompts-file", type="path", help="JSONL file, one {\"prompt\": ...} object per line")
    p.add_argument("--output", type="path", help="write results as JSONL (index, prompt, text, stats) as each finishes")
    p.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")
    p.add_argument("--model", type="path", default=str(DEFAULT_MODEL),
                   help="checkpoint folder (default: the shipped model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, float64 or auto")
    add_options(p)
    p.add_argument("--chat", action=_BooleanOnce, default=True,
                   help="wrap prompts in the checkpoint's chat template")
    p.add_argument("--show", action="store_true", help="FOCUS: print the first sequence's block at every step")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code
    finished, results_file, total = [], None, None
    try:
        if args.prompts_file == "":  # not a silent run without it
            raise ValueError("--prompts-file is empty; name a JSONL file")
        if args.prompts_file == "-" and not os.path.exists("-"):  # read by many tools as stdin, here a file name
            raise ValueError("--prompts-file - names a file \"-\", which is not there; for standard input pass "
                             "--prompts-file /dev/stdin")
        if not args.prompt and args.prompts_file is None:
            raise ValueError("give --prompt TEXT or --prompts-file FILE")
        prompts = (args.prompt or []) + (read_prompts(args.prompts_file) if args.prompts_file else [])
        total = len(prompts)
        opts = options_from(args)
        if opts.temperature == 0 and (opts.top_k or opts.top_p < 1):  # greedy would ignore them without a word
            raise ValueError(f"--top-k and --top-p need a --temperature above 0 (at 0 decoding is greedy), got "
                             f"--top-k {opts.top_k} and --top-p {opts.top_p}")
        device = resolve_device(args.device)
        if args.output is not None:
            path = check_output(args.output, args.prompts_file, args.overwrite, args.model)
            results_file = ResultsFile(path, args.overwrite)
        torch.manual_seed(args.seed)
        model, tok = load(args.model, device=device, dtype=args.dtype)
        print_notes(model, tok, args.model, opts.block_size)
        t0 = time.perf_counter()

        def on_result(i, r):
            if results_file:
                results_file.add(i, r)
            finished.append(r)

        results = generate(model, tok, prompts, opts, on_result=on_result, chat=args.chat, show=args.show,
                           show_progress=len(prompts) > 1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if results_file:
            results_file.commit()
            results_file = None
    except KeyboardInterrupt as e:  # Ctrl-C, or kill -TERM / SIGHUP (start_command)
        print_results(finished, always_headed=True)
        say(interrupted_line(len(finished), total, results_file))
        return interrupted_status(e)
    except (CheckpointError, ValueError) as e:
        print_results(finished, always_headed=True)  # what finished before the error (none for bad input)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        print(out_of_memory_message(e, "--batch-size or --max-new-tokens, or use a smaller --dtype"), file=sys.stderr)
        return 2
    finally:
        if results_file:
            results_file.abandon()
    print_results(results)
    print(summary(results, elapsed, args.block_size or model.config.block_size), file=sys.stderr)
    return 0


def print_notes(model, tok, name: str, block_size: int | None):
    """Notes (not errors) for what a checkpoint leaves unsaid that changes every answer: eos, block size."""
    if not tok.eos_ids:
        print(f"note: {name} names no end-of-text token (eos_token_id): every answer runs to --max-new-tokens",
              file=sys.stderr)
    if not model.config.block_size_named and block_size is None:
        print(f"note: {name} names no block_size (config.json, generation_config.json): decoding uses blocks of "
              f"{model.config.block_size}; pass --block-size with the block size the model was trained with, or "
              "add it to config.json", file=sys.stderr)


def out_of_memory(e: BaseException) -> bool:
    """A failed allocation, on a GPU (torch.OutOfMemoryError) or on the CPU (MemoryError, or torch's
    RuntimeError from DefaultCPUAllocator)."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e) or \
        "DefaultCPUAllocator" in str(e)


def out_of_memory_message(e: BaseException, lower: str) -> str:
    """The one line a command prints for a failed allocation: what failed, and which options to lower."""
    return f"error: out of memory ({_first_line(e)}); lower {lower}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def show(text: str):
    """text on stdout (the commands' reports). A reader that went away (`| head -n 1`) ends the printing
    quietly."""
    try:
        print(text, flush=True)
    except OSError:  # a closed pipe, or a terminal gone (EIO): stdout goes nowhere from here on
        _to_devnull(sys.stdout)


def print_results(results: list[Result], always_headed: bool = False):
    """The texts on stdout, each under its prompt when there are several."""
    if results:
        show("\n".join((f"### {r.prompt}\n" if always_headed or len(results) > 1 else "") + r.text for r in results))


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
    start_command()
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit: a failed write (one line), not a killed process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sys.exit(main())
