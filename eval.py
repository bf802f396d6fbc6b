"""Exact-match accuracy on held-out problems, and how many tokens each step decodes.

    python eval.py                                 # 500 held-out problems, default decoding, shipped model
    python eval.py --focus --alpha 1.5             # the same with FOCUS
    python eval.py --update-card                   # also append the results to the model card
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import data
from generate import DEFAULT_MODEL, Options, generate
from model import CheckpointError, load


def decode_stats(results) -> dict:
    """Tokens decoded per denoising step over all sequences (commit steps, which decode nothing, excluded),
    and tokens computed per step (layers 0-1 and 2..L)."""
    decoded = np.array([d for r in results for d in r.stats["decoded"] if d > 0])
    steps = sum(len(r.stats["decoded"]) for r in results)
    computed = sum(sum(r.stats["computed"]) for r in results)
    deep = sum(sum(r.stats["computed_deep"]) for r in results)
    return {"decoded_mean": float(decoded.mean()), "decoded_std": float(decoded.std()),
            "decoded_median": float(np.median(decoded)), "steps": steps,
            "computed_per_step": computed / steps, "computed_deep_per_step": deep / steps}


def evaluate(model, tok, problems, **options) -> dict:
    t0 = time.perf_counter()
    results = generate(model, tok, [p.question for p in problems], **options)
    elapsed = time.perf_counter() - t0
    correct = [data.extract_answer(r.text) == p.answer for r, p in zip(results, problems)]
    families = sorted({p.family for p in problems})
    out = {"n": len(problems), "accuracy": float(np.mean(correct)),
           "by_family": {f: float(np.mean([c for c, p in zip(correct, problems) if p.family == f])) for f in families},
           "tokens": sum(len(r.token_ids) for r in results), "seconds": elapsed}
    out.update(decode_stats(results))
    out["tokens_per_second"] = out["tokens"] / elapsed
    return out, results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Accuracy and decoding statistics on held-out problems.")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("-n", "--num-problems", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--delayed-cache", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--focus", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--update-card", action="store_true", help="append the results to the model card README.md")
    p.add_argument("--show-failures", type=int, default=0, help="print this many wrong answers")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        if args.num_problems <= 0:
            raise ValueError("--num-problems must be positive")
        model, tok = load(args.model, device=device, dtype=args.dtype)
        opts = Options(max_new_tokens=args.max_new_tokens, threshold=args.threshold, batch_size=args.batch_size,
                       delayed_cache=args.delayed_cache, focus=args.focus, alpha=args.alpha, progress=True)
        problems = data.make_problems("heldout", args.num_problems)
        res, results = evaluate(model, tok, problems, **asdict(opts))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r, pr in zip(results, problems):
        if args.show_failures and data.extract_answer(r.text) != pr.answer:
            print(f"--- {pr.question}\nexpected {pr.answer}, got:\n{r.text}\n")
            args.show_failures -= 1
    command = "python eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res.update({"command": command.strip(), "device": device})
    print(json.dumps(res, indent=2))
    if args.update_card:
        card = Path(args.model) / "README.md"
        with open(card, "a") as f:
            f.write(f"\n### `{res['command']}` ({device})\n\n"
                    f"- exact-match accuracy: {res['accuracy']:.1%} on {res['n']} held-out problems "
                    f"({', '.join(f'{k} {v:.1%}' for k, v in res['by_family'].items())})\n"
                    f"- tokens decoded per step: mean {res['decoded_mean']:.2f}, sd {res['decoded_std']:.2f}, "
                    f"median {res['decoded_median']:.0f} (paper, SDAR-8B: 2.24 / 3.34 / 1)\n"
                    f"- tokens computed per step: {res['computed_per_step']:.1f} in layers 0-1, "
                    f"{res['computed_deep_per_step']:.1f} in layers 2..L (block of 32)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
