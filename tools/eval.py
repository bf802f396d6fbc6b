"""Exact-match accuracy on held-out problems, how many tokens each step decodes, and what it costs.

    python tools/eval.py                                 # 500 held-out problems, default decoding, shipped model
    python tools/eval.py --focus --alpha 1.5             # the same with FOCUS
    python tools/eval.py --update-card                   # also append the results to the model card
    python tools/eval.py --study --output study.json     # the model card's study row: modes, phrasings, predictors
    python tools/eval.py --frontier --output f.json      # accuracy against compute: threshold and alpha sweeps
    python tools/eval.py --ablation --output a.json      # FOCUS with the delta replaced by controls
    python tools/eval.py --workloads arith,multistep,story,long -n 64 --output w.json   # the named workloads
    python tools/eval.py --oracle arith,long -n 64 --output o.json   # every ranking against the full model's choice

Two held-out sets, neither ever trained on: in-template questions (data.make_problems("heldout")) and a
whole family of question phrasings (data.make_problems("heldout-phrasing")). The named workloads
(workloads.py: arith, multistep, story, long) add long answers: for each, the full block, the delayed cache
and FOCUS side by side, with the tokens generated, blocks per sequence, tokens decoded per step beside the
paper's, and quality (exact answers; for stories, agreement with the full block).

Compute is counted in row-layers per generated token: each step computes `computed` rows in layers 0-1
and `computed_deep` rows in layers 2..L, so a step costs 2 x computed + (L - 2) x computed_deep.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

try:  # torch takes seconds to import: a Ctrl-C meanwhile ends the command with one line, not a traceback
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules, one folder up
    import analysis
    import data
    import plots
    import workloads
    from partial import PartialJSON, error_line
    from decoder import Options, flag
    from generate import (DEFAULT_MODEL, ArgumentParser, Result, add_options, generate, options_from,
                          command, interrupted_status, out_of_memory, out_of_memory_message, print_notes, say,
                          show, start_command)
    from checkpoint import CheckpointError, inside_file, load, resolve_device
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("interrupted before any work began", file=sys.stderr)
    sys.exit(130)


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


SWEEP_SETS = ("focus", "delayed_cache", "alpha", "focus_rank", "focus_target", "exact_commit")  # what modes set


def sweep(model, tok, problems, entries, base: Options, phrasings=None, finished=None) -> list[dict]:
    """Each entry on the same problems; finished(rows), if given, after each one."""
    rows = []
    for name, options in entries:
        opts = asdict(base) | options
        row, _ = evaluate(model, tok, problems, **opts)
        row["mode"], row["options"] = name, options
        if phrasings:
            row["heldout_phrasing"], _ = evaluate(model, tok, phrasings, **opts)
        rows.append(row)
        if finished:
            finished(rows)
        extra = f", held-out phrasings {row['heldout_phrasing']['accuracy']:.1%}" if phrasings else ""
        print(f"  {name:32s} {row['accuracy']:6.1%}{extra}  steps {row['steps']}  row-layers/token "
              f"{row['row_layers_per_token']:.1f}  ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return rows


def study(model, tok, args, base: Options, finished=None) -> dict:
    """Everything one row of the model card's study table needs."""
    problems = data.make_problems("heldout", args.num_problems)
    phrasings = data.make_problems("heldout-phrasing", args.num_problems)
    rows = sweep(model, tok, problems, STUDY_MODES, base, phrasings, finished)
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


WORKLOAD_MODES = STUDY_MODES[:3]  # full block (first: the stories' reference), delayed cache, FOCUS 1.5


def run_workloads(model, tok, names: list[str], n: int, base: Options, modes=WORKLOAD_MODES,
                  max_new_tokens: int | None = None, finished=None) -> list[dict]:
    """Every mode on every named workload: its first n prompts, at its token budget unless max_new_tokens."""
    rows = []
    for name in names:
        w = workloads.workload(name, n)
        budget = {"max_new_tokens": max_new_tokens or w.max_new_tokens}
        reference = None
        for mode, options in modes:
            t0 = time.perf_counter()
            results = generate(model, tok, w.prompts, **(asdict(base) | budget | options))
            ids = [r.token_ids for r in results]
            reference = reference or ids
            row = {"workload": name, "mode": mode, "options": options, "n": len(w.prompts),
                   "seconds": time.perf_counter() - t0, "tokens_mean": float(np.mean([len(i) for i in ids])),
                   # a block ends in a commit step, which decodes nothing, except the last one
                   "blocks_per_sequence": float(np.mean([r.stats["decoded"].count(0) + 1 for r in results])),
                   "ended_at_eos": float(np.mean([r.stats["finish_reason"] == "eos" for r in results])),
                   "accuracy": workloads.accuracy(w, [r.text for r in results]),
                   "agreement": workloads.agreement(w, ids, reference)}
            row.update(decode_stats(results, model.config.num_hidden_layers))
            rows.append(row)
            if finished:
                finished(rows)
            print(f"  {name:9s} {mode:14s} {row['tokens_mean']:6.1f} tokens, {row['steps']} steps "
                  f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        delayed = next(r for r in rows if r["workload"] == name and r["mode"] == "delayed cache")
        for r in rows[-len(modes):]:
            r["steps_over_delayed"] = r["steps"] / delayed["steps"]
    return rows


def workload_table(rows: list[dict]) -> str:
    paper = " / ".join(str(v) for v in workloads.PAPER_DECODED_PER_STEP)
    lines = [f"| workload | mode | tokens generated | blocks per sequence | ended at EOS | decoded/step mean / sd / "
             f"median (paper {paper}) | steps | steps / DC | row-layers per token | accuracy | stories: identical "
             "to full block / shared prefix |", "|" + " --- |" * 11]
    for r in rows:
        agree = r["agreement"]
        lines.append(f"| {r['workload']} | {r['mode']} | {r['tokens_mean']:.1f} | {r['blocks_per_sequence']:.1f} | "
                     f"{r['ended_at_eos']:.0%} | {r['decoded_mean']:.2f} / {r['decoded_std']:.2f} / "
                     f"{r['decoded_median']:.0f} | {r['steps']} | {r['steps_over_delayed']:.2f} | "
                     f"{r['row_layers_per_token']:.1f} | "
                     + (f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "-") + " | "
                     + (f"{agree['identical']:.0%} / {agree['shared_prefix']:.0%}" if agree else "-") + " |")
    return "\n".join(lines)


# The ranking study: every ranking with the reference's target and rules, and the oracles (analysis.oracle_probe).
RANKING_STUDY = ([("delayed cache", {}, None)]
                 + [(f"FOCUS 1.5 by {r}", dict(focus=True, alpha=1.5, focus_rank=r), None) for r in analysis.STUDIED]
                 + [(f"FOCUS 1.5 by {r}, near-threshold target", dict(focus=True, alpha=1.5, focus_rank=r,
                                                                      focus_target="near-threshold"), None)
                    for r in ("delta", "delta+confidence")]
                 + [(f"FOCUS 1.5 by {r}, saturation target", dict(focus=True, alpha=1.5, focus_rank=r,
                                                                  focus_target="saturation"), None)
                    for r in ("delta", "delta+position")]
                 # a larger alpha: more kept a step, fewer steps
                 + [(f"FOCUS {a} by {r}" + (", saturation target" if t else ""),
                     dict(focus=True, alpha=a, focus_rank=r, **t), None)
                    for a in (3.0, 4.0) for r, t in (("delta", {}), ("delta+position", {}),
                                                     ("delta+position", {"focus_target": "saturation"}))]
                 + [("oracle ranking", dict(focus=True, alpha=1.5, focus_rank="confidence"), "ranking"),
                    ("oracle ranking and target", dict(focus=True, alpha=1.5, focus_rank="confidence"),
                     "ranking+target")])


def run_oracle(model, tok, names: list[str], n: int, base: Options, entries=RANKING_STUDY,
               max_new_tokens: int | None = None, finished=None) -> list[dict]:
    """Each ranking (and the oracles) on each named workload: steps against the delayed cache's, the recall of
    the kept set against the tokens the full model would decode, misses by ranking and by cap, compute and
    quality (analysis.oracle_probe)."""
    rows = []
    for name in names:
        w = workloads.workload(name, n)
        budget = {"max_new_tokens": max_new_tokens or w.max_new_tokens}
        reference = None
        for mode, options, oracle in entries:
            t0 = time.perf_counter()
            opts = Options(**(asdict(base) | budget | options))
            probe, out = analysis.oracle_probe(model, tok, w.prompts, opts, oracle)
            results = [Result(p, tok.decode(ids), ids, stats) for p, (ids, stats) in zip(w.prompts, out)]
            ids = [r.token_ids for r in results]
            reference = reference or ids
            row = {"workload": name, "mode": mode, "options": options, "oracle": oracle, "n": len(w.prompts),
                   "seconds": time.perf_counter() - t0, **probe,
                   "accuracy": workloads.accuracy(w, [r.text for r in results]),
                   "agreement_with_delayed_cache": workloads.agreement(w, ids, reference)}
            row.update(decode_stats(results, model.config.num_hidden_layers))
            rows.append(row)
            if finished:
                finished(rows)
            print(f"  {name:9s} {mode:34s} {row['steps']} steps, recall {row['recall']:.2f} "
                  f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
        for r in rows[-len(entries):]:
            r["steps_over_delayed"] = r["steps"] / rows[-len(entries)]["steps"]
            r["row_layers_over_delayed"] = r["row_layers_per_token"] / rows[-len(entries)]["row_layers_per_token"]
    return rows


def oracle_table(rows: list[dict]) -> str:
    lines = ["| workload | ranking | steps / DC | decoded/step | recall of decodable tokens | missed: ranking / cap "
             "| row-layers per token | accuracy | stories: shared prefix with DC |", "|" + " --- |" * 9]
    for r in rows:
        agree = r["agreement_with_delayed_cache"]
        lines.append(f"| {r['workload']} | {r['mode']} | {r['steps_over_delayed']:.2f} | {r['decoded_mean']:.2f} | "
                     + (f"{r['recall']:.2f} | {r['missed_by_ranking']} / {r['missed_by_cap']}" if r["decodable"]
                        else "- | -")
                     + f" | {r['row_layers_per_token']:.1f} | "
                     + (f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "-") + " | "
                     + (f"{agree['shared_prefix']:.0%}" if agree else "-") + " |")
    return "\n".join(lines)


def predictor_table(probe: dict) -> str:
    lines = ["| score | AUC per step | precision of top-k | most confident token kept | decoded tokens kept |",
             "|" + " --- |" * 5]
    for name, v in probe.items():
        if isinstance(v, dict):
            lines.append(f"| {name} | {v['auc_per_step']:.3f} | {v['precision_top_k']:.3f} | "
                         f"{analysis.figure(v['top1_kept'])} | {analysis.figure(v['decoded_kept'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description="Accuracy and decoding statistics on held-out problems.")
    p.add_argument("--model", type="path", default=str(DEFAULT_MODEL))
    p.add_argument("-n", "--num-problems", type=int, help="problems (default 500), or prompts per workload (64)")
    p.add_argument("--split", default="heldout", choices=("heldout", "heldout-phrasing"))
    add_options(p, ["batch_size", "max_new_tokens", "threshold", "delayed_cache", "focus", "alpha", "focus_rank",
                    "focus_target", "exact_commit", "eos_early_stop"])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--update-card", action="store_true", help="append the results to the model card README.md")
    p.add_argument("--show-failures", type=int, default=0, help="print this many wrong answers")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--study", action="store_true", help="modes x both held-out sets, and the predictor analysis")
    what.add_argument("--frontier", action="store_true", help="accuracy against compute: threshold and alpha sweeps")
    what.add_argument("--ablation", action="store_true", help="FOCUS ranked by the delta and by controls")
    what.add_argument("--workloads", metavar="NAMES", help="comma-separated named workloads: "
                      f"{', '.join(workloads.WORKLOADS)}; modes side by side on each")
    what.add_argument("--fit-probe", action="store_true", help="fit focus.py's probe ranking on -n training "
                      "problems (and half as many multi-step problems and stories) and print its weights")
    what.add_argument("--oracle", metavar="NAMES", help="named workloads: every FOCUS ranking and the oracles "
                      "against what the full model would decode at each step")
    p.add_argument("--only", metavar="TEXT", help="--oracle: only the entries whose name holds TEXT (and the "
                   "delayed cache, the unit)")
    p.add_argument("--probe-problems", type=int,
                   help="--study: problems for the predictor analysis, the first of the study's (default 200)")
    p.add_argument("--output", type="path",
                   help="--study, --frontier, --ablation, --workloads, --oracle: write the JSON here (a new file)")
    p.add_argument("--plot", type="path", metavar="JSON",
                   help="only draw the accuracy-compute plot of a --frontier file")
    p.set_defaults(max_new_tokens=None)  # --workloads: each workload's own budget unless given
    args = p.parse_args(argv)
    p.alone(args, "plot", "only draws the plot of a results file")  # --model, --device, --dtype too: it loads nothing
    return args


@command
def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code
    if args.plot is not None:
        return plots.plot_command(args.plot, plots.plot_frontier)
    sweeping = args.study or args.frontier or args.ablation or args.workloads or args.oracle
    out = card = None
    try:
        for name, what in (("output", "a file name"), ("workloads", "workload names"), ("oracle", "workload names"),
                           ("only", "part of an entry's name")):
            if getattr(args, name) == "":  # not a silent run of something else (--only "": every entry)
                raise ValueError(f"--{name} is empty; give {what}")
        device = resolve_device(args.device)
        if args.num_problems is None:
            args.num_problems = 64 if args.workloads or args.oracle or args.fit_probe else 500
        if not 0 < args.num_problems <= data.MAX_PROBLEMS:
            raise ValueError(f"--num-problems must be in 1..{data.MAX_PROBLEMS:,}, got {args.num_problems}")
        if args.show_failures < 0:
            raise ValueError(f"--show-failures must be 0 or more, got {args.show_failures}")
        if args.probe_problems is not None and not args.study:
            raise ValueError("--probe-problems goes with --study")
        if (args.probe_problems or 0) > args.num_problems:  # the analysis takes the first of the study's problems
            raise ValueError(f"--probe-problems {args.probe_problems} is more than the {args.num_problems} problems of "
                             "the study, which the analysis reads; lower it or raise --num-problems")
        args.probe_problems = 200 if args.probe_problems is None else args.probe_problems
        if args.probe_problems <= 0:  # --study's predictor analysis needs a problem (checked before the sweep)
            raise ValueError(f"--probe-problems must be positive, got {args.probe_problems}")
        if args.split != "heldout" and (args.study or args.workloads or args.oracle or args.fit_probe):
            raise ValueError("--split goes with the plain evaluation, --frontier or --ablation (--study runs both "
                             "sets; --workloads, --oracle and --fit-probe have their own prompts)")
        names = (args.workloads or args.oracle).split(",") if args.workloads or args.oracle else []
        budget = args.max_new_tokens  # None: each workload's own budget (0 is refused by Options below)
        if args.max_new_tokens is None:
            args.max_new_tokens = Options.max_new_tokens
        for name in names:
            if name not in workloads.WORKLOADS:
                raise ValueError(f"unknown workload {name!r}; use one of {', '.join(workloads.WORKLOADS)}")
        if len(set(names)) < len(names):
            raise ValueError(f"--{'workloads' if args.workloads else 'oracle'} names a workload twice: "
                             f"{','.join(names)}")
        if (args.update_card or args.show_failures) and (sweeping or args.fit_probe):
            raise ValueError("--update-card and --show-failures go with the plain evaluation (no --study, --frontier, "
                             "--ablation, --workloads, --oracle or --fit-probe)")
        if args.output and not sweeping:
            raise ValueError("--output goes with --study, --frontier, --ablation, --workloads or --oracle")
        if args.frontier and args.output and Path(args.output).suffix.lower() == ".png":  # its plot's name: the plot
            raise ValueError(f"--output {args.output}: the frontier's plot would replace it; name a .json file")
        if args.frontier and args.output and os.path.lexists(Path(args.output).with_suffix(".png")):
            raise ValueError(f"--output {args.output}: its plot {Path(args.output).with_suffix('.png')} exists and "
                             "would be replaced; move it away or name another file")
        if args.only is not None and not args.oracle:
            raise ValueError("--only goes with --oracle")
        entries = [e for e in RANKING_STUDY if e[0] == "delayed cache" or (args.only or "") in e[0]]
        if len(entries) == 1:
            raise ValueError(f"--only {args.only!r} matches no entry of the ranking study; give part of a name, "
                             f"e.g. {RANKING_STUDY[1][0]!r} or 'saturation'")
        opts = options_from(args)
        if sweeping:  # a sweep runs its own modes: a mode flag would change some of them and not others
            mode = [f"--{'no-' if getattr(opts, k) is False else ''}{flag(k)}" for k in SWEEP_SETS
                    if getattr(opts, k) != getattr(Options, k)]
            if args.frontier and opts.threshold != Options.threshold:
                mode.append("--threshold")
            if mode:
                raise ValueError(f"{', '.join(mode)} would change some of the sweep's modes and not others; a sweep "
                                 "runs its own modes (drop it, or evaluate one mode without the sweep)")
        command = "python tools/eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
        meta = {"command": command.strip(), "device": device, "model": args.model}
        out = PartialJSON(args.output) if args.output else None  # before the model: a bad --output fails at once
        if args.update_card:  # a file of the checkpoint folder: no link out of it, no folder, checked before any work
            folder = Path(args.model).resolve()
            card = inside_file(folder, "README.md", required=False) or folder / "README.md"
        model, tok = load(args.model, device=device, dtype=args.dtype)
        print_notes(model, tok, args.model, opts.block_size)
        if args.fit_probe:
            probe_opts = Options(**(asdict(opts) | {"max_new_tokens": budget or 512}))
            weights, bias, n = analysis.fit_probe(model, tok, analysis.probe_prompts(args.num_problems), probe_opts)
            show(f"PROBE_WEIGHTS = {tuple(weights)}\nPROBE_BIAS = {bias}  # {n:,} masked tokens: {command}")
            return 0
        if sweeping:
            def finished(key):
                return (lambda rows: out.save({key: rows, **meta})) if out else None
            if args.study:
                res = study(model, tok, args, opts, finished("modes"))
                report = table(res["modes"]) + "\n\n" + predictor_table(res["predictors"])
            elif args.workloads:
                res = {"workloads": run_workloads(model, tok, names, args.num_problems, opts, max_new_tokens=budget,
                                                  finished=finished("workloads"))}
                report = workload_table(res["workloads"])
            elif args.oracle:
                res = {"oracle": run_oracle(model, tok, names, args.num_problems, opts, entries, budget,
                                            finished=finished("oracle"))}
                report = oracle_table(res["oracle"])
            else:
                problems = data.make_problems(args.split, args.num_problems)
                res = {"modes": sweep(model, tok, problems, FRONTIER if args.frontier else ABLATION, opts,
                                      finished=finished("modes"))}
                report = table(res["modes"])
            res.update(meta)
            if out:
                out.commit(res)
                out = None
                if args.frontier:
                    plots.plot_frontier(Path(args.output))
            show(report)
            return 0
        problems = data.make_problems(args.split, args.num_problems)
        res, results = evaluate(model, tok, problems, show_progress=True, **asdict(opts))
    except (CheckpointError, ValueError) as e:
        print(error_line(e, out), file=sys.stderr)
        out = None
        return 2
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        kept = "; " + out.abandon() if out else ""
        print(out_of_memory_message(e, "--batch-size or --num-problems") + kept, file=sys.stderr)
        out = None
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or kill -TERM / SIGHUP (generate.start_command)
        say(f"interrupted; {out.abandon() if out else 'no --output was asked for'}")
        return interrupted_status(e)
    finally:
        if out:  # an error after the output was made: keep what finished
            out.abandon()
    for r, pr in zip(results, problems):
        if args.show_failures and data.extract_answer(r.text) != pr.answer:
            show(f"--- {pr.question}\nexpected {pr.answer}, got:\n{r.text}\n")
            args.show_failures -= 1
    res.update({"command": command.strip(), "device": device})
    show(json.dumps(res, indent=2))
    if card:
        try:
            with open(card, "a") as f:
                f.write(f"\n### `{res['command']}` ({device})\n\n"
                        f"- exact-match accuracy: {res['accuracy']:.1%} on {res['n']} {args.split} problems "
                        f"({', '.join(f'{k} {v:.1%}' for k, v in res['by_family'].items())})\n"
                        f"- tokens decoded per step: mean {res['decoded_mean']:.2f}, sd {res['decoded_std']:.2f}, "
                        f"median {res['decoded_median']:.0f} (paper, SDAR-8B: 2.24 / 3.34 / 1)\n"
                        f"- tokens computed per step: {res['computed_per_step']:.1f} in layers 0-1, "
                        f"{res['computed_deep_per_step']:.1f} in layers 2..L (block of 32); "
                        f"{res['row_layers_per_token']:.1f} row-layers per generated token\n")
        except OSError as e:
            print(f"error: cannot write the model card {card}: {e.strerror or e}; the results are above",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    start_command()
    sys.exit(main())
