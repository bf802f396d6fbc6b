"""Exact-match accuracy on held-out problems, how many tokens each step decodes, and what it costs.

    python tools/eval.py                                 # 500 held-out problems, default decoding, shipped model
    python tools/eval.py --focus --alpha 1.5             # the same with FOCUS
    python tools/eval.py --update-card                   # also append the results to the model card
    python tools/eval.py --study --output study.json     # the model card's study row: modes, phrasings, predictors
    python tools/eval.py --frontier --output f.json      # accuracy against compute: threshold and alpha sweeps
    python tools/eval.py --ablation --output a.json      # FOCUS with the delta replaced by controls

Two held-out sets, neither ever trained on: in-template questions (data.make_problems("heldout")) and a
whole family of question phrasings (data.make_problems("heldout-phrasing")).

Compute is counted in row-layers per generated token: each step computes `computed` rows in layers 0-1
and `computed_deep` rows in layers 2..L, so a step costs 2 x computed + (L - 2) x computed_deep.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules, one folder up
import analysis
import data
import plots
from decoder import Options
from generate import DEFAULT_MODEL, ArgumentParser, add_options, generate, options_from
from checkpoint import CheckpointError, load, resolve_device


def decode_stats(results, num_layers: int) -> dict:
    """Tokens decoded per denoising step over all sequences (commit steps, which decode nothing, excluded),
    tokens computed per step (layers 0-1 and 2..L), and row-layers per generated token."""
    decoded = np.array([d for r in results for d in r.stats["decoded"] if d > 0])
    steps = sum(len(r.stats["decoded"]) for r in results)
    computed = sum(sum(r.stats["computed"]) for r in results)
    deep = sum(sum(r.stats["computed_deep"]) for r in results)
    tokens = sum(len(r.token_ids) for r in results)
    return {"decoded_mean": float(decoded.mean()), "decoded_std": float(decoded.std()),
            "decoded_median": float(np.median(decoded)), "steps": steps,
            "computed_per_step": computed / steps, "computed_deep_per_step": deep / steps,
            "row_layers_per_token": (2 * computed + (num_layers - 2) * deep) / max(tokens, 1)}


def evaluate(model, tok, problems, show_progress: bool = False, **options) -> tuple[dict, list]:
    t0 = time.perf_counter()
    results = generate(model, tok, [p.question for p in problems], show_progress=show_progress, **options)
    elapsed = time.perf_counter() - t0
    correct = [data.extract_answer(r.text) == p.answer for r, p in zip(results, problems)]
    families = sorted({p.family for p in problems})
    out = {"n": len(problems), "accuracy": float(np.mean(correct)),
           "by_family": {f: float(np.mean([c for c, p in zip(correct, problems) if p.family == f])) for f in families},
           "tokens": sum(len(r.token_ids) for r in results), "seconds": elapsed}
    out.update(decode_stats(results, model.config.num_hidden_layers))
    out["tokens_per_second"] = out["tokens"] / elapsed
    return out, results


# ---------------------------------------------------------------------------------------------------
# Sweeps: each entry is (name, options); every one runs on the same problems.

STUDY_MODES = [("full block", dict(delayed_cache=False)), ("delayed cache", {}),
               ("FOCUS 1.5", dict(focus=True, alpha=1.5)),
               ("delayed cache, exact commit", dict(exact_commit=True)),
               ("FOCUS 1.5, exact commit", dict(focus=True, alpha=1.5, exact_commit=True))]
FRONTIER = ([("full block", dict(delayed_cache=False))]
            + [(f"delayed cache {t}", dict(threshold=t)) for t in (0.7, 0.8, 0.85, 0.9, 0.95, 0.97)]
            + [(f"FOCUS {a} at {t}", dict(focus=True, alpha=a, threshold=t)) for t in (0.9, 0.8) for a in (1.0, 1.5, 2.0, 3.0)])
ABLATION = [("delayed cache", {})] + [(f"FOCUS 1.5 by {r}", dict(focus=True, alpha=1.5, focus_rank=r))
                                      for r in ("delta", "random", "negated-delta", "leftmost", "after-decoded")]


def sweep(model, tok, problems, entries, base: Options, phrasings=None) -> list[dict]:
    rows = []
    for name, options in entries:
        opts = asdict(base) | options
        row, _ = evaluate(model, tok, problems, **opts)
        row["mode"], row["options"] = name, options
        if phrasings:
            row["heldout_phrasing"], _ = evaluate(model, tok, phrasings, **opts)
        rows.append(row)
        extra = f", held-out phrasings {row['heldout_phrasing']['accuracy']:.1%}" if phrasings else ""
        print(f"  {name:32s} {row['accuracy']:6.1%}{extra}  steps {row['steps']}  row-layers/token "
              f"{row['row_layers_per_token']:.1f}  ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return rows


def study(model, tok, args, base: Options) -> dict:
    """Everything one row of the model card's study table needs."""
    problems = data.make_problems("heldout", args.num_problems)
    phrasings = data.make_problems("heldout-phrasing", args.num_problems)
    rows = sweep(model, tok, problems, STUDY_MODES, base, phrasings)
    by = {r["mode"]: r for r in rows}
    probe = analysis.predictor_probe(model, tok, problems[:args.probe_problems], base.max_new_tokens,
                                     base.threshold, base.batch_size)
    return {"modes": rows, "predictors": probe,
            "focus_steps_over_delayed": by["FOCUS 1.5"]["steps"] / by["delayed cache"]["steps"]}


def table(rows: list[dict]) -> str:
    phr = any("heldout_phrasing" in r for r in rows)
    lines = ["| mode | accuracy | " + ("held-out phrasings | " if phr else "") + "steps | decoded/step mean / sd / median "
             "| computed/step L0-1 / L2..L | row-layers per token |", "|" + " --- |" * (6 + phr)]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['accuracy']:.1%} | " + (f"{r['heldout_phrasing']['accuracy']:.1%} | " if phr else "")
                     + f"{r['steps']} | {r['decoded_mean']:.2f} / {r['decoded_std']:.2f} / {r['decoded_median']:.0f} | "
                     f"{r['computed_per_step']:.1f} / {r['computed_deep_per_step']:.1f} | {r['row_layers_per_token']:.1f} |")
    return "\n".join(lines)


def predictor_table(probe: dict) -> str:
    lines = ["| score | AUC per step | precision of top-k | most confident token kept | decoded tokens kept |",
             "|" + " --- |" * 5]
    for name, v in probe.items():
        if isinstance(v, dict):
            lines.append(f"| {name} | {v['auc_per_step']:.3f} | {v['precision_top_k']:.3f} | {v['top1_kept']:.3f} "
                         f"| {v['decoded_kept']:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------

def check_new_file(output: str):
    """Before any work: results are never written over a file, nor lost to a missing folder."""
    path = Path(output)
    if path.exists():
        raise ValueError(f"--output {output} exists; results are never overwritten: name a new file")
    if not path.parent.is_dir():
        raise ValueError(f"--output {output}: the folder {path.parent} does not exist; create it first")


def parse_args(argv=None):
    p = ArgumentParser(description="Accuracy and decoding statistics on held-out problems.")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("-n", "--num-problems", type=int, default=500)
    p.add_argument("--split", default="heldout", choices=("heldout", "heldout-phrasing"))
    add_options(p, ["batch_size", "max_new_tokens", "threshold", "delayed_cache", "focus", "alpha", "focus_rank",
                    "exact_commit"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--update-card", action="store_true", help="append the results to the model card README.md")
    p.add_argument("--show-failures", type=int, default=0, help="print this many wrong answers")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--study", action="store_true", help="modes x both held-out sets, and the predictor analysis")
    what.add_argument("--frontier", action="store_true", help="accuracy against compute: threshold and alpha sweeps")
    what.add_argument("--ablation", action="store_true", help="FOCUS ranked by the delta and by controls")
    p.add_argument("--probe-problems", type=int, default=200, help="--study: problems for the predictor analysis")
    p.add_argument("--output", help="--study / --frontier / --ablation: write the JSON here (a new file)")
    p.add_argument("--plot", metavar="JSON", help="only draw the accuracy-compute plot of a --frontier file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code
    if args.plot:
        return plots.plot_command(args.plot, plots.plot_frontier)
    sweeping = args.study or args.frontier or args.ablation
    try:
        device = resolve_device(args.device)
        if args.num_problems <= 0:
            raise ValueError(f"--num-problems must be positive, got {args.num_problems}")
        if args.output:
            check_new_file(args.output)
        opts = options_from(args)
        model, tok = load(args.model, device=device, dtype=args.dtype)
        command = "python tools/eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
        if sweeping:
            if args.study:
                res = study(model, tok, args, opts)
                report = table(res["modes"]) + "\n\n" + predictor_table(res["predictors"])
            else:
                problems = data.make_problems(args.split, args.num_problems)
                res = {"modes": sweep(model, tok, problems, FRONTIER if args.frontier else ABLATION, opts)}
                report = table(res["modes"])
            res.update({"command": command.strip(), "device": device, "model": args.model})
            if args.output:
                with open(args.output, "x") as f:  # "x": a file made meanwhile is not overwritten either
                    f.write(json.dumps(res, indent=1) + "\n")
                if args.frontier:
                    plots.plot_frontier(Path(args.output))
            print(report)
            return 0
        problems = data.make_problems(args.split, args.num_problems)
        res, results = evaluate(model, tok, problems, show_progress=True, **asdict(opts))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r, pr in zip(results, problems):
        if args.show_failures and data.extract_answer(r.text) != pr.answer:
            print(f"--- {pr.question}\nexpected {pr.answer}, got:\n{r.text}\n")
            args.show_failures -= 1
    res.update({"command": command.strip(), "device": device})
    print(json.dumps(res, indent=2))
    if args.update_card:
        card = Path(args.model) / "README.md"
        with open(card, "a") as f:
            f.write(f"\n### `{res['command']}` ({device})\n\n"
                    f"- exact-match accuracy: {res['accuracy']:.1%} on {res['n']} {args.split} problems "
                    f"({', '.join(f'{k} {v:.1%}' for k, v in res['by_family'].items())})\n"
                    f"- tokens decoded per step: mean {res['decoded_mean']:.2f}, sd {res['decoded_std']:.2f}, "
                    f"median {res['decoded_median']:.0f} (paper, SDAR-8B: 2.24 / 3.34 / 1)\n"
                    f"- tokens computed per step: {res['computed_per_step']:.1f} in layers 0-1, "
                    f"{res['computed_deep_per_step']:.1f} in layers 2..L (block of 32); "
                    f"{res['row_layers_per_token']:.1f} row-layers per generated token\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
