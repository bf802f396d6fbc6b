"""Train a small SDAR-layout block-diffusion model from scratch, on data this script builds offline.

    python train.py --out checkpoints/sdar-tiny                  # the shipped model (GPU: ~9 min on an H100)
    python train.py --out /tmp/random-sdar --steps 0             # an untrained model with the real tokenizer
    python train.py --out DIR --resume                           # continue from DIR/train_state.pt

The objective (block diffusion, as BD3-LM and SDAR train): a sequence is cut into blocks of `block_size`.
Each block of a noised copy gets its own noise level t ~ U(eps, 1) and each of its trainable tokens is
replaced by the mask token with probability t. The model sees, in one pass, the noised copy and the clean
copy side by side: a noised block attends to itself (both directions) and to the clean copy's earlier
blocks; the clean copy is block-causal. The loss is the cross-entropy on the masked positions weighted by
1/t, the masked-diffusion ELBO weight (MDLM; SDAR's trainer divides by the same p_mask), averaged over the
trainable tokens, so that every noise level contributes to the bound in proportion.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
from model import SDAR, ModelConfig, load_state, num_params, save

TINY = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, block_size=32)


# ---------------------------------------------------------------------------------------------------
# Data: token rows of `seq_len`, each a pack of examples that start on block boundaries.

def build_examples(tok, num_problems: int, seed: int) -> list[tuple[list[int], int]]:
    """(token ids, number of leading prompt tokens that are never noised) for every training example."""
    im_end, eot = tok.token_to_id(data.EOS_TOKEN), tok.token_to_id(data.END_OF_TEXT)
    chats = [(p.question, p.solution) for p in data.make_problems("train", num_problems)]
    paragraphs = data.natural_text() + data.stories(num_problems // 4, seed)
    chats += data.continuation_samples(paragraphs, seed)
    prompts = tok.encode_batch([data.chat_prompt(q) for q, _ in chats])
    answers = tok.encode_batch([a for _, a in chats])
    examples = [(p.ids + a.ids + [im_end, eot], len(p.ids)) for p, a in zip(prompts, answers)]
    examples += [(e.ids + [eot], 0) for e in tok.encode_batch(paragraphs)]  # plain text, all trainable
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


def two_copy_mask(doc, pos, block_size: int):
    """(B, 2S, 2S) bool for [noised copy, clean copy], as BD3-LM/SDAR train. Within one example:
    noised block -> same noised block (both directions) and earlier clean blocks; clean -> clean block-causal.
    Padding positions (doc -1) only see themselves, so no row is empty."""
    blk = pos // block_size
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    same_blk = same_doc & (blk[:, :, None] == blk[:, None, :])
    earlier = same_doc & (blk[:, None, :] < blk[:, :, None])
    causal = same_blk | earlier
    eye = torch.eye(doc.shape[1], dtype=torch.bool, device=doc.device)[None] & (doc[:, :, None] < 0)
    top = torch.cat([same_blk | eye, earlier], dim=2)
    bottom = torch.cat([torch.zeros_like(causal), causal | eye], dim=2)
    return torch.cat([top, bottom], dim=1)


def noise(ids, doc, pos, trainable, block_size: int, mask_id: int, eps: float = 1e-3, generator=None):
    """Mask each trainable token with its block's probability t ~ U(eps, 1). Returns noised ids, the masked
    positions and t per position."""
    B, S = ids.shape
    t = eps + (1 - eps) * torch.rand(B, S // block_size + 1, device=ids.device, generator=generator)
    # one t per (row, example, block): key the block by its start in the row
    start = torch.arange(S, device=ids.device) - pos % block_size
    t = t.gather(1, (start // block_size).expand(B, S))
    masked = trainable & (torch.rand(B, S, device=ids.device, generator=generator) < t)
    return torch.where(masked, mask_id, ids), masked, t


def loss_fn(model, ids, doc, pos, trainable, block_size, mask_id, generator=None):
    noised, masked, t = noise(ids, doc, pos, trainable, block_size, mask_id, generator=generator)
    x = torch.cat([noised, ids], 1)
    positions = torch.cat([pos, pos], 1)
    hidden = model_hidden(model, x, positions, two_copy_mask(doc, pos, block_size))
    h = hidden[:, :ids.shape[1]][masked]                       # (masked tokens, hidden)
    logits = model.lm_head(model.norm(h)).float()
    ce = F.cross_entropy(logits, ids[masked], reduction="none")
    loss = (ce / t[masked]).sum() / trainable.sum().clamp(min=1)
    return loss, ce.mean()


def model_hidden(model, input_ids, position_ids, mask):
    """The spec forward without the head (so logits are made only for masked positions)."""
    cos, sin = model.rope(position_ids)
    x = model.embed_tokens(input_ids)
    for layer in model.layers:
        q, k, v = layer.qkv(x, cos, sin)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask[:, None], scale=layer.self_attn.scale, enable_gqa=True)
        x = layer.finish(x, attn.transpose(1, 2))
    return x


# ---------------------------------------------------------------------------------------------------

def write_model_card(out: Path, args, cfg: ModelConfig, n_params: int, log: list):
    lines = [
        f"# {out.name}", "",
        "A small block-diffusion language model in the SDAR layout (Qwen3 architecture, block-causal attention),",
        "trained from scratch by `train.py` of this repository on data the script builds offline.", "",
        "## Architecture", "",
        f"{n_params / 1e6:.1f}M parameters; {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value heads of {cfg.head_dim}, "
        f"MLP {cfg.intermediate_size}, vocabulary {cfg.vocab_size} (byte-level BPE), block size {cfg.block_size}, "
        "tied embeddings, weights in bfloat16.", "",
        "## Training", "",
        f"Command: `python train.py {' '.join(args.argv)}`", "",
        f"{log[-1]['step'] + 1 if log else 0} steps of batch {args.batch_size} x {args.seq_len} tokens, AdamW lr {args.lr} "
        f"(warm-up {args.warmup}, cosine decay), seed {args.seed}. Final training loss: "
        f"{log[-1]['loss']:.3f} (masked-token cross-entropy {log[-1]['ce']:.3f})." if log else "Untrained.", "",
        "## Data", "",
        "- Generated tasks (data.py, seeded): multi-step arithmetic word problems with worked solutions, list",
        "  manipulation, in the ChatML chat format; the held-out split is a disjoint question space never trained on.",
        "- Natural text: docstrings of the Python standard library (PSF License), read from the running Python's",
        "  own source files, and generated short stories (data.py).", "",
        "## Evaluation", "",
        "See the results appended below (written by `python eval.py`).", "",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description="Train a small SDAR-layout block-diffusion model.")
    p.add_argument("--out", default="checkpoints/sdar-tiny")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--minutes", type=float, default=0, help="stop after this many minutes (0: no limit)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--problems", type=int, default=200_000, help="training problems per family mix")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--init-from", help="start from this checkpoint folder's weights and tokenizer")
    p.add_argument("--shard-mb", type=float, default=15, help="shard weights into files of at most this size")
    args = p.parse_args()
    import sys
    args.argv = sys.argv[1:]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    if args.init_from:  # continue from a checkpoint's weights and tokenizer, with a fresh optimizer
        from tokenizers import Tokenizer as HFTokenizer
        tok = HFTokenizer.from_file(str(Path(args.init_from) / "tokenizer.json"))
    else:
        texts = [data.chat_sample(p.question, p.solution) for p in data.make_problems("train", min(args.problems, 20000))]
        texts += data.natural_text() + data.stories(5000, args.seed)
        tok = data.train_tokenizer(texts, args.vocab_size)
    data.write_tokenizer_files(tok, out, block_size=TINY["block_size"])
    mask_id, pad_id = tok.token_to_id(data.MASK_TOKEN), tok.token_to_id(data.END_OF_TEXT)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), mask_token_id=mask_id, **TINY)
    model = SDAR(cfg).to(device)
    _init(model)
    if args.init_from:
        load_state(model, Path(args.init_from), device, torch.float32)
    print(f"tokenizer ready ({time.time() - t0:.0f} s); model {num_params(model) / 1e6:.1f}M parameters", flush=True)

    start_step, elapsed, log = 0, 0.0, []
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")
    state_path = out / "train_state.pt"
    if args.resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_step, elapsed, log = state["step"], state["elapsed"], json.loads(state["log"])
        print(f"resumed at step {start_step}", flush=True)

    if args.steps > start_step:
        examples = build_examples(tok, args.problems, args.seed)
        ids, doc, pos, trainable = pack(examples, args.seq_len, cfg.block_size, pad_id)
        print(f"{len(examples)} examples packed into {len(ids)} rows of {args.seq_len} ({time.time() - t0:.0f} s)", flush=True)
        train(model, opt, (ids, doc, pos, trainable), args, cfg, start_step, elapsed, log, device, state_path)

    save(model, out, max_shard_bytes=int(args.shard_mb * 2**20) if args.shard_mb else None)
    write_model_card(out, args, cfg, num_params(model), log)
    print(f"wrote {out} ({time.time() - t0:.0f} s)", flush=True)


def _init(model):
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)


def train(model, opt, tensors, args, cfg, start_step, elapsed, log, device, state_path):
    from tqdm import tqdm
    ids, doc, pos, trainable = tensors
    gen = torch.Generator().manual_seed(args.seed + start_step)
    dgen = torch.Generator(device=device).manual_seed(args.seed + start_step)
    use_bf16 = device == "cuda"
    model.train()
    t_start = time.time()
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, mininterval=5)
    for step in bar:
        # Cosine decay to 10% over the run; with --minutes the run ends on time, so the clock sets the progress.
        done = step / args.steps
        if args.minutes:
            done = max(done, (elapsed + time.time() - t_start) / (args.minutes * 60))
        lr = args.lr * min(1, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(ids), (args.batch_size,), generator=gen)
        batch = [t[idx].to(device, non_blocking=True) for t in (ids, doc, pos, trainable)]
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
            loss, ce = loss_fn(model, *batch, cfg.block_size, cfg.mask_token_id, generator=dgen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": loss.item(), "ce": ce.item(), "lr": lr})
            bar.set_postfix(loss=f"{log[-1]['loss']:.3f}", ce=f"{log[-1]['ce']:.3f}")
        if args.minutes and elapsed + time.time() - t_start > args.minutes * 60:
            print(f"time limit of {args.minutes} minutes reached after step {step + 1}", flush=True)
            break
    model.eval()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                "elapsed": elapsed + time.time() - t_start, "log": json.dumps(log)}, state_path)


if __name__ == "__main__":
    main()
