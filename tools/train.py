"""Train a small SDAR-layout model the way SDAR models are made: autoregressive first, then block diffusion.

    python tools/train.py --out checkpoints/my-model --ar-minutes 3 --minutes 3.5   # both phases (GPU)
    python tools/train.py --out checkpoints/my-model --resume                       # continue, in either phase
    python tools/train.py --out /tmp/random-sdar --steps 0 --ar-steps 0             # untrained, real tokenizer

Why two phases. SDAR models are not trained from scratch: they are autoregressive Qwen3 models continued
with the block-diffusion objective (LLaDA2.0 likewise starts from an autoregressive model). The network is
the same in both phases; only the attention mask and the target change. The autoregressive past is what
FOCUS stands on: a model trained from scratch as a diffusion model answers well, but the attention of its
layers 0 and 1 does not point at the tokens about to be decoded, and FOCUS then evicts the wrong ones
(see the model card's study and walkthrough.md, section 3).

Phase 1, autoregressive (`--ar-steps`, `--ar-minutes`, `--ar-lr`, `--ar-warmup`), then phase 2, block
diffusion (`--steps`, `--minutes`, `--lr`, `--warmup`): their objectives are in tools/objectives.py.

Each phase has its own AdamW, warm-up and cosine decay to 10%. With --minutes (or --ar-minutes) a phase
ends on time and the clock drives its decay. OUT/train_state.pt holds the weights, the optimizer, the phase
and the step, so --resume continues wherever the run stopped.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import sys
import time
import warnings
from pathlib import Path

try:  # torch takes seconds to import: a Ctrl-C meanwhile ends the command with one line, not a traceback
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules, one folder up
    import data
    from checkpoint import (CheckpointError, first_line, inside_file, load_state, read_config, resolve_device,
                            save)
    from checkpoint.folder import MAX_JSON_BYTES, read_bytes
    from generate import ArgumentParser, command, interrupted_status, say, start_command
    from model import SDAR, ModelConfig, num_params
    from objectives import ar_loss_fn, loss_fn

    # Shapes within the 32 MB (16M parameters in bf16) budget of the shipped model, and one larger (10x384: 17.3M
    # parameters, 35 MB) for the study; "2x64" is for smoke tests.
    SHAPES = {
        "8x384": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=64),
        "12x320": dict(hidden_size=320, intermediate_size=896, num_hidden_layers=12, num_attention_heads=5,
                       num_key_value_heads=1, head_dim=64),
        "10x384": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=6,
                       num_key_value_heads=2, head_dim=64),
        "2x64": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32),
    }
    BLOCK_SIZE = 32
    PHASES = ("ar", "diffusion")
    HISTORY_KEYS = ("commands", "step", "elapsed_phase", "settings", "log", "steps", "elapsed", "batch_size",
                    "seq_len")  # what a resumed run reads of a state's history (older ones lack shape, mix)
    MAX_SEQ_LEN = 2048          # the model's context (max_position_embeddings)
    MAX_PROBLEMS = 5_000_000
    ROOT = Path(__file__).resolve().parents[1]
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("interrupted before any work began", file=sys.stderr)
    sys.exit(130)


# ---------------------------------------------------------------------------------------------------
# Data: token rows of `seq_len`, each a pack of examples that start on block boundaries.

# Data mixes (--mix), in examples per training problem (--problems): the share of the problems that are
# multi-step word problems, chat stories and plain long stories, and short plain stories. "short" is the data
# of the models trained before the long families; "long" adds them and trains docstrings as documents of
# several paragraphs (data.documents says why); "long-heavy" trades short problems and stories for long answers.
MIXES = {
    "short": dict(multistep=0.0, long_chats=0.0, long_plain=0.0, short_stories=0.25, documents=False),
    "long": dict(multistep=0.2, long_chats=0.075, long_plain=0.03, short_stories=0.15, documents=True),
    "long-heavy": dict(multistep=0.4, long_chats=0.15, long_plain=0.06, short_stories=0.1, documents=True),
}


def build_examples(tok, num_problems: int, seed: int, mix: str = "long") -> list[tuple[list[int], int]]:
    """(token ids, number of leading prompt tokens that are never noised) for every training example."""
    share = MIXES[mix]
    im_end, eot = tok.token_to_id(data.EOS_TOKEN), tok.token_to_id(data.END_OF_TEXT)
    multistep = int(num_problems * share["multistep"])
    chats = [(p.question, p.solution) for p in data.make_problems("train", num_problems - multistep)]
    chats += [(p.question, p.solution) for p in data.make_problems("train", multistep, family="multistep")]
    docstrings, stories = data.natural_text(), data.stories(int(num_problems * share["short_stories"]), seed)
    paragraphs = docstrings + stories
    chats += data.continuation_samples(paragraphs, seed)
    chats += data.story_samples(int(num_problems * share["long_chats"]), seed)
    if share["documents"]:
        # four cuttings: the same docstrings start documents in four sets of places
        paragraphs = [d for k in range(4) for d in data.documents(docstrings, seed + k)] + stories
    paragraphs += data.long_texts(int(num_problems * share["long_plain"]), seed)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the same ids without offsets, 2-3x faster
    prompts = encode([data.chat_prompt(q) for q, _ in chats])
    answers = encode([a for _, a in chats])
    examples = [(p.ids + a.ids + [im_end, eot], len(p.ids)) for p, a in zip(prompts, answers)]
    examples += [(e.ids + [eot], 0) for e in encode(paragraphs)]  # plain text, all trainable
    random.Random(seed).shuffle(examples)
    return examples


def pack(examples, seq_len: int, block_size: int, pad_id: int):
    """Greedy packing. Returns ids, doc (which example a position belongs to), pos (position inside its
    example) and trainable, each (rows, seq_len). Examples are padded with end-of-text to a whole block;
    the padding is trainable so the model learns to close an answer's last block."""
    ids_rows, doc_rows, pos_rows, train_rows = [], [], [], []
    ids, doc, pos, train = [], [], [], []
    d = 0
    for example, n_prompt in examples:
        example = example[:seq_len]
        n = math.ceil(len(example) / block_size) * block_size
        if len(ids) + n > seq_len:
            for rows, cur, fill in ((ids_rows, ids, pad_id), (doc_rows, doc, -1), (pos_rows, pos, 0), (train_rows, train, 0)):
                rows.append(cur + [fill] * (seq_len - len(cur)))
            ids, doc, pos, train, d = [], [], [], [], 0
        ids += example + [pad_id] * (n - len(example))
        doc += [d] * n
        pos += range(n)
        train += [0] * min(n_prompt, len(example)) + [1] * (n - min(n_prompt, len(example)))
        d += 1
    for rows, cur, fill in ((ids_rows, ids, pad_id), (doc_rows, doc, -1), (pos_rows, pos, 0), (train_rows, train, 0)):
        rows.append(cur + [fill] * (seq_len - len(cur)))
    as_t = lambda rows: torch.from_numpy(np.array(rows, dtype=np.int64))
    return as_t(ids_rows), as_t(doc_rows), as_t(pos_rows), as_t(train_rows).bool()


# ---------------------------------------------------------------------------------------------------
# The training loop, one phase at a time.

def phase_settings(args, phase: str) -> dict:
    if phase == "ar":
        return dict(steps=args.ar_steps, minutes=args.ar_minutes, lr=args.ar_lr, warmup=args.ar_warmup)
    return dict(steps=args.steps, minutes=args.minutes, lr=args.lr, warmup=args.warmup)


def learning_rate(step: int, done: float, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% as `done` goes from 0 to 1."""
    return lr * min(1, (step + 1) / max(warmup, 1)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1))))


def new_optimizer(model, lr: float, device: str):
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)


def run_phase(phase, model, opt, tensors, args, cfg, history, device, state_path, rng_state=None):
    """Train `phase` from history["step"] to its step or time limit. Saves the state (random generators
    included) every 2,000 steps and on an interrupt, so --resume continues exactly where it stopped."""
    from tqdm import tqdm
    s = phase_settings(args, phase)
    rng = {"data": torch.Generator().manual_seed(args.seed + PHASES.index(phase)),
           "noise": torch.Generator(device=device).manual_seed(args.seed)}
    for name, saved_state in (rng_state or {}).items():
        rng[name].set_state(saved_state.cpu())  # loaded onto the device; generators take CPU bytes
    elapsed, t_start = history["elapsed_phase"], time.time()
    model.train()
    bar = tqdm(range(history["step"], s["steps"]), initial=history["step"], total=s["steps"], mininterval=5, desc=phase)
    try:
        for step in bar:
            spent = elapsed + time.time() - t_start
            done = max(step / s["steps"], spent / (s["minutes"] * 60) if s["minutes"] else 0)
            try:
                loss, ce, lr = train_step(phase, model, opt, tensors, args.batch_size, cfg,
                                          learning_rate(step, done, s["lr"], s["warmup"]), rng, device)
            except Diverged as e:  # nothing is saved: the states written before stay as they were
                flag = "--ar-lr" if phase == "ar" else "--lr"
                raise Diverged(f"{phase} step {step + 1}: the loss is {e}; training stopped before that step changed "
                               f"the weights and saved nothing; lower {flag} (it was {s['lr']})") from None
            if step % 50 == 0 or step == s["steps"] - 1:
                history["log"][phase].append({"step": step, "loss": loss.item(), "ce": ce.item(), "lr": lr})
                bar.set_postfix(loss=f"{history['log'][phase][-1]['loss']:.3f}")
            history.update(step=step + 1, elapsed_phase=elapsed + time.time() - t_start)
            if (step + 1) % 2000 == 0:
                save_state(state_path, model, opt, history, rng)
            if s["minutes"] and history["elapsed_phase"] > s["minutes"] * 60:
                print(f"{phase}: time limit of {s['minutes']} minutes reached after step {step + 1}", flush=True)
                break
    except BaseException as e:
        bar.leave = False  # the bar goes, so the error's one line is what the terminal shows
        if isinstance(e, KeyboardInterrupt):
            save_state(state_path, model, opt, history, rng)
        raise
    finally:
        bar.close()
    model.eval()
    history["steps"][phase], history["elapsed"][phase] = history["step"], history["elapsed_phase"]


class Diverged(Exception):
    """A loss or gradient that is not finite: the learning rate is too high for the run."""


def train_step(phase, model, opt, tensors, batch_size: int, cfg, lr: float, rng: dict, device: str):
    """One optimizer step on a random batch of packed rows. Returns the loss, the cross-entropy and the lr."""
    for g in opt.param_groups:
        g["lr"] = lr
    idx = torch.randint(0, len(tensors[0]), (batch_size,), generator=rng["data"])
    batch = [t[idx].to(device, non_blocking=True) for t in tensors]
    kind = torch.device(device).type
    with torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
        if phase == "ar":
            loss, ce = ar_loss_fn(model, *batch)
        else:
            loss, ce = loss_fn(model, *batch, cfg.block_size, cfg.mask_token_id, generator=rng["noise"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if not torch.isfinite(loss + norm):  # one sync a step: a NaN or inf step would turn every weight to NaN
        raise Diverged(f"{loss.item():g}" if not torch.isfinite(loss) else f"{loss.item():g} but the gradient is "
                       f"{norm.item():g}")
    opt.step()
    return loss, ce, lr


def save_state(path: Path, model, opt, history: dict, rng: dict | None = None):
    tmp = path.with_suffix(".tmp")
    rng_state = {k: g.get_state() for k, g in (rng or {}).items()}
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "history": json.dumps(history),
                "rng": rng_state}, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous state intact


# ---------------------------------------------------------------------------------------------------

def write_model_card(out: Path, cfg: ModelConfig, n_params: int, history: dict):
    lines = [
        f"# {out.name}", "",
        "A small block-diffusion language model in the SDAR layout (Qwen3 architecture, block-causal attention),",
        "made as SDAR models are made: trained autoregressively first, then continued with the block-diffusion",
        "objective, by `train.py` of this repository on data the script builds offline.", "",
        "## Architecture", "",
        f"{n_params / 1e6:.1f}M parameters; {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value heads of {cfg.head_dim}, "
        f"MLP {cfg.intermediate_size}, vocabulary {cfg.vocab_size} (byte-level BPE), block size {cfg.block_size}, "
        "tied embeddings, weights in bfloat16.", "",
        "## Training", "",
        "Commands, in order:", "", "```bash", *[f"python tools/train.py {c}" for c in history["commands"]], "```", "",
    ]
    for phase, title in (("ar", "Phase 1, autoregressive (next-token cross-entropy, causal inside each example)"),
                         ("diffusion", "Phase 2, block diffusion (masked-token cross-entropy weighted by 1/t)")):
        log, p = history["log"][phase], history["settings"][phase]
        if not log:
            lines += [f"- {title}: skipped.", ""]
            continue
        lines += [f"- {title}: {history['steps'][phase]:,} steps of batch {history['batch_size']} x "
                  f"{history['seq_len']} tokens in {history['elapsed'][phase] / 60:.1f} min, AdamW lr {p['lr']} "
                  f"(warm-up {p['warmup']}, cosine decay to 10%), final loss {log[-1]['loss']:.3f}.", ""]
    lines += [
        "## Data", "",
        "- Generated tasks (data.py, seeded): multi-step arithmetic word problems with worked solutions, list",
        "  manipulation, in the ChatML chat format. Two held-out sets are never trained on: in-template questions",
        "  (a disjoint question space) and one whole family of question phrasings (data.HELDOUT_PHRASING).",
        "- Natural text: docstrings of the Python standard library (PSF License), read from the running Python's",
        "  own source files, and generated short stories (data.py).",
        f"- Mix `{history.get('mix', 'short')}` (train.py MIXES): `long` mixes add multi-step word problems with worked",
        "  solutions (3-6 steps, tools/multistep.py), stories and descriptions of several paragraphs",
        "  (tools/longstories.py) and docstrings joined into documents of several paragraphs.", "",
        "## Evaluation", "",
        "See the results below (written by `python tools/eval.py`).", "",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = ArgumentParser(description="Train a small SDAR-layout model: autoregressive, then block diffusion.")
    p.add_argument("--out", type="path", required=True,
                   help="checkpoint folder to write (a new one, unless --resume or --overwrite)")
    p.add_argument("--shape", default="8x384", choices=SHAPES, help="layers x hidden size")
    p.add_argument("--ar-steps", type=int, default=100_000, help="phase 1 (autoregressive): at most this many steps")
    p.add_argument("--ar-minutes", type=float, default=3.0, help="phase 1: stop after this many minutes (0: no limit)")
    p.add_argument("--ar-lr", type=float, default=2e-3)
    p.add_argument("--ar-warmup", type=int, default=300)
    p.add_argument("--steps", type=int, default=100_000, help="phase 2 (block diffusion): at most this many steps")
    p.add_argument("--minutes", type=float, default=3.5, help="phase 2: stop after this many minutes (0: no limit)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--problems", type=int, default=200_000, help="training problems")
    p.add_argument("--mix", default="long", choices=MIXES, help="training data, see MIXES: "
                   "long (default), long-heavy, or short (the data before the long families)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing, non-empty OUT")
    p.add_argument("--init-from", type="path", help="start from this checkpoint folder's weights and tokenizer")
    p.add_argument("--shard-mb", type=float, default=15, help="shard weights into files of at most this size")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def check_args(args) -> Path:
    """One-line errors for bad values; returns the output folder. Never writes into an existing checkpoint
    unless asked to (--resume or --overwrite)."""
    for name in ("ar_steps", "steps", "ar_warmup", "warmup"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "seq_len", "problems", "vocab_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**63:  # torch's seed is 64 bits
        raise ValueError(f"--seed must be in 0..2^63-1, got {args.seed}")
    for name in ("ar_minutes", "minutes", "ar_lr", "lr", "shard_mb"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    for name in ("ar_lr", "lr"):  # above, the weights turn to NaN; past float32's range AdamW's step fails
        if getattr(args, name) > 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at most 1 (AdamW moves every weight by about the "
                             f"learning rate a step), got {getattr(args, name)}")
    if args.shard_mb > 1 << 20:  # past float's range in bytes, the save after the training would fail
        raise ValueError(f"--shard-mb must be at most 1,048,576 (a shard of 1 TB), got {args.shard_mb}")
    if args.seq_len % BLOCK_SIZE:
        raise ValueError(f"--seq-len must be a multiple of the block size {BLOCK_SIZE}, got {args.seq_len}")
    if args.seq_len > MAX_SEQ_LEN:  # the two-copy diffusion mask is (2 seq_len)^2 per row of the batch
        raise ValueError(f"--seq-len must be at most {MAX_SEQ_LEN} (the model's context), got {args.seq_len}")
    if args.problems > MAX_PROBLEMS:
        raise ValueError(f"--problems must be at most {MAX_PROBLEMS:,} (the examples are held in memory), "
                         f"got {args.problems:,}")
    if args.batch_size > 4096 or args.vocab_size > 1 << 20:
        raise ValueError("--batch-size must be at most 4096 and --vocab-size at most 1,048,576")
    least = 256 + len(data.SPECIAL_TOKENS)  # byte-level BPE: every byte, and the special tokens
    if args.vocab_size < least:  # the tokenizer would get `least` tokens without a word
        raise ValueError(f"--vocab-size must be at least {least} (the 256 bytes and {least - 256} special tokens), "
                         f"got {args.vocab_size}")
    for name in ("out", "init_from"):
        if getattr(args, name) == "":  # Path("") is the current folder
            raise ValueError(f"--{name.replace('_', '-')} is empty; name a folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder")
    real, results, shipped = out.resolve(), (ROOT / "results").resolve(), (ROOT / "checkpoints").resolve()
    # --overwrite reaches neither, nor a folder inside them, nor one holding them (the project's own README.md)
    if real == results or (args.overwrite and any(real == d or d in real.parents or real in d.parents
                                                  for d in (results, shipped))):
        raise ValueError(f"--out {out} is, is in or holds the project's results or a shipped checkpoint; train into a "
                         "new folder and copy it there by hand")
    if args.init_from is not None and args.resume:  # resumed, a run goes on from its own weights and tokenizer
        raise ValueError("--init-from goes without --resume (a resumed run continues from its own state)")
    if args.init_from is not None and Path(args.init_from).resolve() == out.resolve():
        raise ValueError(f"--init-from {args.init_from} is the --out folder: the run would write over the checkpoint "
                         "it starts from; train into a new folder")
    if args.resume and not (out / "train_state.pt").exists():
        raise ValueError(f"--resume: {out / 'train_state.pt'} does not exist; start without --resume")
    if args.resume and not (out / "tokenizer.json").exists():
        raise ValueError(f"--resume: {out / 'tokenizer.json'} is missing; the run cannot go on without the "
                         "tokenizer it was trained with")
    if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise ValueError(f"--out {out} already holds files; choose a new folder, or pass --resume to continue "
                         "its training or --overwrite to replace it")
    if args.init_from and not os.path.isdir(args.init_from):  # not "no tokenizer.json there" for a typo
        problem = "is not a folder" if os.path.lexists(args.init_from) else "does not exist"
        raise ValueError(f"--init-from {args.init_from} {problem}; name a checkpoint folder")
    if args.init_from and not (Path(args.init_from) / "tokenizer.json").exists():
        raise ValueError(f"--init-from {args.init_from}: no tokenizer.json there")
    if args.resume or args.init_from:  # regular files inside their folder: a fifo would hang the read
        flag, folder, names = (("--resume", out, ("train_state.pt", "tokenizer.json")) if args.resume else
                               ("--init-from", Path(args.init_from), ("tokenizer.json",)))
        for name in names:
            try:
                inside_file(folder.resolve(), name)
            except CheckpointError as e:
                raise ValueError(f"{flag}: {e}") from None
    return out


def read_state(path: Path, device: str):
    """train_state.pt -> (its dict, the run's history); a file that is not one is a one-line CheckpointError."""
    try:
        with warnings.catch_warnings():  # torch warns of a pickle protocol it then refuses: the error says why
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location=device, weights_only=True)
        history = json.loads(saved["history"])
        if not (isinstance(history, dict) and history.get("phase") in (*PHASES, "done") and
                all(k in history for k in HISTORY_KEYS) and isinstance(saved.get("model"), dict)
                and all(type(history.get(k, 1)) is int and history.get(k, 1) > 0 for k in ("block_size", "context"))
                and isinstance(saved.get("optimizer"), dict) and isinstance(saved.get("rng"), dict)):
            raise ValueError("not a training state of this script")
        return saved, history
    except pickle.UnpicklingError:  # weights_only: torch's message runs for lines; what it means is short
        raise CheckpointError(f"--resume: {path} is not a training state this script wrote (UnpicklingError: not a "
                              "pickle of tensors and plain data, so it is not unpickled); start a new folder") from None
    except Exception as e:  # a cut file, another program's file, a JSON that is not ours
        raise CheckpointError(f"--resume: {path} is not a training state this script wrote "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); start a "
                              "new folder") from None


def read_tokenizer(path: Path, flag: str):
    """The tokenizer.json of --resume's or --init-from's folder; one that cannot be read is a CheckpointError."""
    from tokenizers import Tokenizer as HFTokenizer
    try:  # read as checkpoint.Tokenizer reads it: a byte-order mark is no error
        tok = HFTokenizer.from_str(read_bytes(path, MAX_JSON_BYTES).decode("utf-8-sig"))
    except CheckpointError as e:
        raise CheckpointError(f"{flag}: {e}") from None
    except Exception as e:  # the tokenizers package's own errors, bad UTF-8
        raise CheckpointError(f"{flag}: {path} cannot be read as a tokenizer ({first_line(e)})") from None
    missing = [t for t in data.SPECIAL_TOKENS if tok.token_to_id(t) is None]  # the mask, padding and ends
    if missing:
        raise CheckpointError(f"{flag}: {path} has no token {', '.join(missing)}, which the training data uses")
    return tok


@command
def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code
    try:
        out = check_args(args)
        device = resolve_device(args.device)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {out}: cannot make the folder ({e.strerror or e}); choose one you can write")
    except (ValueError, OSError) as e:  # OSError: a name too long for the file system
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(args, out, device)
    except (CheckpointError, Diverged, OSError) as e:  # OSError: a full disk, a folder that went away
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or kill -TERM / SIGHUP (generate.start_command)
        state = out / "train_state.pt"
        say(f"interrupted; training so far is saved in {state} (continue with --resume)" if state.exists()
            else "interrupted before the first training step; nothing was saved")
        return interrupted_status(e)
    return 0


def train(args, out: Path, device: str):
    torch.manual_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)   # main made it; train() can be called on its own too
    t0 = time.time()
    state_path = out / "train_state.pt"
    saved = None
    block_size, context = BLOCK_SIZE, MAX_SEQ_LEN  # the model's: train.py's, or --init-from's (kept)
    if args.resume:
        tok = read_tokenizer(out / "tokenizer.json", "--resume")
        saved, history = read_state(state_path, device)
        if history.get("shape", args.shape) != args.shape:
            raise CheckpointError(f"--resume: {state_path} was trained with --shape {history['shape']}, "
                                  f"not {args.shape}; pass --shape {history['shape']}")
        if history.get("mix", "short") != args.mix:  # runs from before --mix trained on the "short" data
            raise CheckpointError(f"--resume: {state_path} was trained with --mix {history.get('mix', 'short')}, "
                                  f"not {args.mix}; pass --mix {history.get('mix', 'short')}")
        block_size, context = history.get("block_size", block_size), history.get("context", context)
    elif args.init_from:  # continue from a checkpoint's weights and tokenizer, with a fresh optimizer
        tok = read_tokenizer(Path(args.init_from) / "tokenizer.json", "--init-from")
        given = read_config(Path(args.init_from).resolve())[0]
        wrong = next((k for k, v in SHAPES[args.shape].items() if getattr(given, k) != v), None)
        if wrong:  # its weights would not fit: named here, not as a tensor's shape "config.json implies"
            raise CheckpointError(f"--init-from {args.init_from}: its config.json has {wrong} {getattr(given, wrong)}, "
                                  f"--shape {args.shape} has {SHAPES[args.shape][wrong]}; pass the --shape it was "
                                  "trained with")
        built = ModelConfig(vocab_size=tok.get_vocab_size())  # what this script builds, past --shape
        for k in ("vocab_size", "model_type", "tie_word_embeddings", "attention_bias", "rope_theta", "rms_norm_eps"):
            if getattr(given, k) != getattr(built, k):  # its weights would load into another model, or a tensor dropped
                raise CheckpointError(f"--init-from {args.init_from}: its config.json has {k} {getattr(given, k)!r}, "
                                      f"the model train.py builds has {getattr(built, k)!r}"
                                      f"{' (its tokenizer.json)' if k == 'vocab_size' else ''}; start from a "
                                      "checkpoint train.py wrote")
        block_size, context = given.block_size, given.max_position_embeddings  # were reset to train.py's
    else:
        texts = [data.chat_sample(p.question, p.solution) for p in data.make_problems("train", min(args.problems, 20000))]
        texts += data.natural_text() + data.stories(5000, args.seed)
        if args.mix != "short":  # the long families too, the same sample for every mix that has them
            texts += [data.chat_sample(p.question, p.solution)
                      for p in data.make_problems("train", min(args.problems, 5000), family="multistep")]
            texts += [data.chat_sample(q, a) for q, a in data.story_samples(min(args.problems, 3000), args.seed)]
        tok = data.train_tokenizer(texts, args.vocab_size)
    if args.seq_len % block_size or args.seq_len > context:  # check_args checked train.py's own
        source = f"--init-from {args.init_from}" if args.init_from else f"--resume: {state_path}"
        raise CheckpointError(f"{source}: its block_size {block_size} and context (max_position_embeddings) "
                              f"{context}, which the training keeps, do not fit --seq-len {args.seq_len}: pass a "
                              f"multiple of {block_size} of at most {context}")
    data.write_tokenizer_files(tok, out, block_size=block_size)
    mask_id, pad_id = tok.token_to_id(data.MASK_TOKEN), tok.token_to_id(data.END_OF_TEXT)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), mask_token_id=mask_id, block_size=block_size,
                      max_position_embeddings=context, **SHAPES[args.shape])
    model = SDAR(cfg).to(device)
    _init(model)
    if args.init_from:
        load_state(model, Path(args.init_from), device, torch.float32)
    print(f"tokenizer ready ({time.time() - t0:.0f} s); model {num_params(model) / 1e6:.1f}M parameters", flush=True)

    if not args.resume:
        history = {"commands": [], "phase": PHASES[0], "step": 0, "elapsed_phase": 0.0, "settings": {},
                   "log": {p: [] for p in PHASES}, "steps": {p: 0 for p in PHASES}, "elapsed": {p: 0.0 for p in PHASES},
                   "batch_size": args.batch_size, "seq_len": args.seq_len, "shape": args.shape, "mix": args.mix,
                   "block_size": block_size, "context": context}
    else:
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as e:
            raise CheckpointError(f"--resume: {state_path} does not hold weights of this model "
                                  f"({str(e).splitlines()[0][:120]}); start a new folder") from None
        print(f"resumed in phase {history['phase']} at step {history['step']}", flush=True)
    history["commands"].append(" ".join(args.argv))

    tensors = None
    todo = PHASES[PHASES.index(history["phase"]):] if history["phase"] in PHASES else ()
    for phase in todo:
        s = phase_settings(args, phase)
        history["settings"][phase] = {"lr": s["lr"], "warmup": s["warmup"]}
        opt = new_optimizer(model, s["lr"], device)          # each phase starts with a fresh AdamW ...
        if saved is not None and history["step"] > 0:        # ... unless it resumes mid-phase
            try:
                opt.load_state_dict(saved["optimizer"])
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise CheckpointError(f"--resume: {state_path} does not hold the optimizer of this model "
                                      f"({first_line(e)}); start a new folder") from None
        if s["steps"] > history["step"]:
            if tensors is None:
                examples = build_examples(tok, args.problems, args.seed, args.mix)
                tensors = pack(examples, args.seq_len, cfg.block_size, pad_id)
                print(f"{len(examples)} examples packed into {len(tensors[0])} rows of {args.seq_len} "
                      f"({time.time() - t0:.0f} s)", flush=True)
            rng_state = saved["rng"] if saved is not None and history["step"] > 0 else None
            run_phase(phase, model, opt, tensors, args, cfg, history, device, state_path, rng_state)
        later = PHASES.index(phase) + 1
        history.update(phase=PHASES[later] if later < len(PHASES) else "done", step=0, elapsed_phase=0.0)
        save_state(state_path, model, opt, history)
        saved = None

    save(model, out, max_shard_bytes=int(args.shard_mb * 2**20) if args.shard_mb else None)
    write_model_card(out, cfg, num_params(model), history)
    print(f"wrote {out} ({time.time() - t0:.0f} s)", flush=True)


def _init(model):
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)


if __name__ == "__main__":
    start_command()
    sys.exit(main())
