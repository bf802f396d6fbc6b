"""Plots of the tools' results files (needs matplotlib, which is optional: without it a plot is skipped with a
note). `python tools/bench.py --plot FILE` and `python tools/eval.py --plot FILE` draw them again."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from analysis import PREDICTORS


def pyplot():
    """matplotlib.pyplot drawing to files, or None, with the fix on stderr, where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None


def plot_command(path: str, draw) -> int:
    """--plot FILE of eval.py and bench.py: draw(Path) -> drawn. Exit 0 drawn, 1 without matplotlib, 2 for
    a missing file or one that is not a results file of the kind (draw raises ValueError)."""
    if not path or not Path(path).is_file():  # Path("") is the current folder
        what = ("is empty; name a results file" if not path else f"{path}: a folder" if Path(path).is_dir() else
                f"{path}: not a regular file" if Path(path).exists() else f"{path}: no such file")
        print(f"error: --plot {what}", file=sys.stderr)
        return 2
    try:
        return 0 if draw(Path(path)) else 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable (permissions), or gone since the check
        print(f"error: --plot {path}: cannot read it ({e.strerror or e})", file=sys.stderr)
        return 2


def _numbers(*values) -> bool:
    """Plain finite numbers (JSON reads NaN and Infinity, which would be drawn as nothing)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def plot_bench(path: Path) -> bool:
    """Results JSON -> PNGs beside it (needs matplotlib). A file with nothing to plot is a ValueError;
    without matplotlib it says so and returns False."""
    try:
        res = json.loads(path.read_text())
        modes, predictors = res.get("modes") or [], res.get("predictors") or {}
        curves = [p for name, p in predictors.items() if name in PREDICTORS and isinstance(p, dict)]
        ok = bool(modes or predictors) and all(  # every field the plots read, of its type
            isinstance(r, dict) and isinstance(r.get("mode"), str) and _numbers(r.get("batch_size"),
                                                                                r.get("tokens_per_s"))
            and _numbers(*r.get("decoded_hist", [])) for r in modes) and all(
            isinstance(p.get("roc"), list) and all(isinstance(xy, list) and len(xy) == 2 and _numbers(*xy)
                                                   for xy in p["roc"]) and _numbers(p.get("auc_pooled"))
            for p in curves)
    except (ValueError, RecursionError, AttributeError, TypeError):  # bad JSON or UTF-8, too deep, a 5000-digit number
        ok = False
    if not ok:
        raise ValueError(f"--plot {path}: not a results file of bench.py with throughput or predictor results")
    plt = pyplot()
    if plt is None:
        return False
    if modes:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode in dict.fromkeys(r["mode"] for r in modes):
            pts = [(r["batch_size"], r["tokens_per_s"]) for r in modes if r["mode"] == mode]
            ax.plot(*zip(*pts), marker="o", label=mode)
        ax.set(xlabel="batch size", ylabel="generated tokens/s", title=res.get("device", ""))
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".throughput.png"), dpi=120)
    delayed = next((r for r in modes if r["mode"] == "delayed" and "decoded_hist" in r), None)
    if delayed:  # a run without the delayed cache (--modes) has no histogram to draw
        fig, ax = plt.subplots(figsize=(5, 3.5))
        hist = np.array(delayed["decoded_hist"])
        ax.bar(range(len(hist)), hist / hist.sum())
        ax.set(xlabel="tokens decoded in a step", ylabel="fraction of steps", title="delayed cache, threshold 0.9")
        fig.tight_layout()
        fig.savefig(path.with_suffix(".decoded.png"), dpi=120)
    if predictors:
        fig, ax = plt.subplots(figsize=(4, 4))
        for name in (n for n in PREDICTORS if isinstance(predictors.get(n), dict)):  # older files: fewer
            p = predictors[name]
            ax.plot(*zip(*p["roc"]), label=f"{name} (AUC {p['auc_pooled']:.2f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="predicting 'decoded this step'")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".roc.png"), dpi=120)
    print(f"plots written next to {path}", file=sys.stderr)
    return True


def plot_frontier(path: Path) -> bool:
    """frontier JSON -> PNG beside it: accuracy against row-layers per generated token (needs matplotlib).
    A file that is not a frontier result is a ValueError; without matplotlib it says so and returns False."""
    try:
        rows = json.loads(path.read_text())["modes"]
        ok = all(isinstance(r, dict) and isinstance(r.get("mode"), str) and  # every field it reads, of its type
                 _numbers(r.get("accuracy"), r.get("row_layers_per_token")) for r in rows) and \
            any(r["mode"].startswith("delayed cache") for r in rows)
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(f"--plot {path}: not a results file of eval.py --frontier")
    if path.suffix.lower() == ".png":  # the plot's name (f.PNG too, where case is ignored): written over the results
        raise ValueError(f"--plot {path}: the plot would replace this file; rename it to .json")
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    curves = {"delayed cache (threshold sweep)": lambda r: r["mode"].startswith("delayed cache"),
              "FOCUS at 0.9 (alpha sweep)": lambda r: r["mode"].startswith("FOCUS") and r["mode"].endswith("at 0.9"),
              "FOCUS at 0.8 (alpha sweep)": lambda r: r["mode"].startswith("FOCUS") and r["mode"].endswith("at 0.8"),
              "full block, 0.9": lambda r: r["mode"] == "full block"}
    for label, keep in curves.items():
        pts = [(r["row_layers_per_token"], 100 * r["accuracy"], r["mode"]) for r in rows if keep(r)]  # sweep order
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for x, y, mode in pts:
            ax.annotate(mode.split()[-1] if not mode.startswith("FOCUS") else mode.split()[1], (x, y),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="row-layers per generated token (compute)", ylabel="accuracy on held-out problems (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    print(f"wrote {out}", file=sys.stderr)
    return True
