"""Throughput, compute and decoding statistics of full block, delayed cache and FOCUS, in one run.

    python tools/bench.py                                   # shipped model, held-out problems, batch 32
    python tools/bench.py --batch-sizes 32,64 --num-prompts 128 --device cuda
    python tools/bench.py --real-size --device cuda         # SDAR-1.7B-shaped random weights: compute, and serving
    python tools/bench.py --real-size --real-size-config sdar-8b --device cuda --compile --parts replay  # the paper's model
    python tools/bench.py --real-size --real-size-config llada2-mini --device cuda --compile   # the MoE shape
    python tools/bench.py --plot results/cpu-2026-11-23.json  # PNGs from a results file (needs matplotlib)

Every ratio is measured inside one run, on the same prompts and machine. Results go to
results/<device>-<date>.json (or -2.json, -3.json, ...: a results file is never overwritten) with the command,
device, torch version and commit, and a Markdown table.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

try:  # torch takes seconds to import: a Ctrl-C meanwhile ends the command with one line, not a traceback
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules, one folder up
    import data
    import kernels
    import plots
    import replay
    import shapes
    import timeline
    import workloads
    from partial import PartialJSON, error_line, new_results_path
    from analysis import figure, predictor_probe
    from decoder import Options
    from generate import (DEFAULT_MODEL, ArgumentParser, add_options, encode_prompts, generate_ids,
                          command, interrupted_status, out_of_memory, out_of_memory_message, print_notes, say,
                          show, start_command)
    from checkpoint import CheckpointError, load, resolve_device
    from model import ModelConfig, flops_per_token

    MODES = {"full": dict(delayed_cache=False), "delayed": dict(), "focus-1.0": dict(focus=True, alpha=1.0),
             "focus-1.5": dict(focus=True, alpha=1.5), "focus-2.0": dict(focus=True, alpha=2.0),
             # The paper's pairing (its public scripts): FOCUS at threshold 0.8 with the delayed cache, against
             # the full block at the run's threshold. Every other mode uses the run's threshold.
             "paper-focus-1.5@0.8": dict(focus=True, alpha=1.5, threshold=0.8),
             # Beyond the paper: the step-penalty study's best rankings (focus.ranking_score) and target.
             "focus-1.5-delta+position": dict(focus=True, alpha=1.5, focus_rank="delta+position"),
             "focus-1.5-delta+confidence": dict(focus=True, alpha=1.5, focus_rank="delta+confidence"),
             "focus-1.5-delta+position-saturation": dict(focus=True, alpha=1.5, focus_rank="delta+position",
                                                         focus_target="saturation"),
             "focus-3.0-delta+position": dict(focus=True, alpha=3.0, focus_rank="delta+position"),
             "focus-4.0-delta+position": dict(focus=True, alpha=4.0, focus_rank="delta+position"),
             # LLaDA2.0's eos_early_stop (decoder.Options): the same tokens, the steps after the answer saved.
             "delayed-eos-early-stop": dict(eos_early_stop=True),
             "focus-1.5-eos-early-stop": dict(focus=True, alpha=1.5, eos_early_stop=True)}
    DEFAULT_MODES = ("full", "delayed", "focus-1.0", "focus-1.5", "focus-2.0", "paper-focus-1.5@0.8")
    PARTS = ("probe", "random", "replay", "profile")
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("interrupted before any work began", file=sys.stderr)
    sys.exit(130)


# ---------------------------------------------------------------------------------------------------
# Modes side by side.

def run_mode(model, prompts, mask_id, eos_ids, opts: Options, repeats: int):
    """Warm-up, then `repeats` timed runs; returns the median run's numbers and the last run's outputs."""
    generate_ids(model, warm_up(prompts, opts), mask_id, eos_ids, opts)
    times, clocks = [], []
    for _ in range(repeats):
        seconds, clock, out, peak = timed_run(model, prompts, mask_id, eos_ids, opts)
        times.append(seconds)
        clocks.append(clock)
    i = int(np.argsort(times)[len(times) // 2])
    return times[i], clocks[i], out, peak


def warm_up(batch: list, opts: Options) -> list:
    """What a warm-up run decodes: a few sequences; with --compile the whole batch, so that the timed runs
    replay the CUDA graphs captured on the same (reused) cache instead of capturing them."""
    return batch if opts.compile else batch[:min(len(batch), 4)]


def timed_run(model, prompts, mask_id, eos_ids, opts: Options):
    """One generation, timed (device synchronised): seconds, the prefill/decode clock, the outputs, and the
    peak GPU memory in MB (None on CPU)."""
    device = model.embed_tokens.weight.device
    clock = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    shapes.sync(device)
    t0 = time.perf_counter()
    out = generate_ids(model, prompts, mask_id, eos_ids, opts, clock=clock)
    shapes.sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return time.perf_counter() - t0, clock, out, peak


def summarise(out, seconds, clock, cfg: ModelConfig, block_size: int) -> dict:
    stats = [s for _, s in out]
    tokens = sum(len(ids) for ids, _ in out)
    steps = sum(len(s["decoded"]) for s in stats)
    decoded = np.array([d for s in stats for d in s["decoded"] if d > 0])  # commit steps decode nothing
    early = sum(sum(s["computed"]) for s in stats)
    deep = sum(sum(s["computed_deep"]) for s in stats)
    flops = 0.0
    for s in stats:  # the paper's per-layer cost per token, split at layer 2
        for c, d, ctx in zip(s["computed"], s["computed_deep"], s["context"]):
            per_layer = flops_per_token(cfg, ctx) / cfg.num_hidden_layers
            flops += per_layer * (2 * c + (cfg.num_hidden_layers - 2) * d)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "decode_s": clock.get("decode_s"), "prefill_s": clock.get("prefill_s"), "steps": steps,
            "computed_per_step": early / steps, "computed_deep_per_step": deep / steps,
            "decoded_mean": float(decoded.mean()), "decoded_sd": float(decoded.std()),
            "decoded_median": float(np.median(decoded)), "decoded_hist": np.bincount(decoded, minlength=block_size + 1).tolist(),
            "waste": 1 - decoded.sum() / early, "flops": flops, "achieved_tflops": flops / clock["decode_s"] / 1e12}


def mode_options(name: str, args, batch_size: int) -> Options:
    return Options(**{"max_new_tokens": args.max_new_tokens, "threshold": args.threshold, "batch_size": batch_size,
                      "compile": args.compile, **MODES[name]})


def row_layers_per_token(out, num_layers: int) -> float:
    """Compute in row-layers per generated token: steps x (2 x rows in layers 0-1 + (L-2) x rows kept)."""
    work = sum(2 * c + (num_layers - 2) * d for _, s in out for c, d in zip(s["computed"], s["computed_deep"]))
    return work / max(sum(len(ids) for ids, _ in out), 1)


def bench_modes(model, tok, problems, args) -> list[dict]:
    """Every mode on the same prompts. The modes take turns inside every repeat (A B C, A B C, ...), so a slow
    patch of the machine falls on all of them; each mode reports its median time and the spread."""
    prompts = encode_prompts(tok, [p.question for p in problems], chat=True)
    rows = []
    for bs in args.batch_sizes:
        opts = {name: mode_options(name, args, bs) for name in args.modes}
        for name in args.modes:  # warm-up
            generate_ids(model, warm_up(prompts, opts[name]), tok.mask_id, tok.eos_ids, opts[name])
        times = {name: [] for name in args.modes}
        runs = {}
        for _ in range(args.repeats):
            for name in args.modes:
                seconds, clock, out, peak = timed_run(model, prompts, tok.mask_id, tok.eos_ids, opts[name])
                times[name].append(seconds)
                runs.setdefault(name, []).append((seconds, clock, out, peak))
        base = None
        for name in args.modes:
            seconds, clock, out, peak = sorted(runs[name], key=lambda r: r[0])[len(runs[name]) // 2]  # median run
            row = {"mode": name, "batch_size": bs, "peak_mb": peak, "threshold": opts[name].threshold,
                   "times": times[name], "spread": (max(times[name]) - min(times[name])) / seconds}
            row.update(summarise(out, seconds, clock, model.config, model.config.block_size))
            row["row_layers_per_token"] = row_layers_per_token(out, model.config.num_hidden_layers)
            texts = [tok.decode(ids) for ids, _ in out]
            row["accuracy"] = float(np.mean([data.extract_answer(t) == p.answer for t, p in zip(texts, problems)]))
            base = base or row
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            # What the row-layer counts predict for the same ratio, and how much of it the engine delivers.
            row["predicted_speedup"] = base["row_layers_per_token"] / row["row_layers_per_token"]
            row["delivered"] = row["speedup"] / row["predicted_speedup"]
            row["deep_reduction_vs_full_block"] = 1 - row["computed_deep_per_step"] / model.config.block_size
            rows.append(row)
            print(f"  {name:20s} batch {bs:4d}: {row['tokens_per_s']:8.1f} tokens/s (spread {row['spread']:.0%})  "
                  f"x{row['speedup']:.2f} (row-layers predict x{row['predicted_speedup']:.2f})  "
                  f"acc {row['accuracy']:.3f}", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------------
# Real-size compute on random weights (the probe: shapes.step_probe).

def bench_real_size(args, device, save=lambda result: None) -> dict:
    """save(result) after every measurement, so a run stopped part-way (a time limit) keeps what finished."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = shapes.REAL_SIZE[args.real_size_config]
    replaying = args.replay_problems and "replay" in args.parts
    schedules = record_schedules(args, device, shape["block_size"]) if replaying else None
    model = shapes.random_model(shape, device, dtype)
    result = {"note": "random weights: every step decodes one token (nothing reaches the threshold), so this "
                      "measures compute per step, not decoding dynamics", "config": shape, "probe": [], "end_to_end": []}
    batches = [2] if args.real_size_config.startswith("tiny") else args.real_batches
    for b in batches if "probe" in args.parts else ():
        for ctx in args.contexts:
            with kernels.fast_paths(model, args.compile):
                rows = shapes.step_probe(model, b, ctx, device, args.compile)
            result["probe"] += rows
            save(result)
            for r in rows:
                predicted = (f" (row counts and logits predict {r['predicted_ms']:.1f} ms: x{r['over_prediction']:.2f}; "
                             f"layers 0-1 and selection {r['early_ms']:.1f} against {r['early_predicted_ms']:.1f}, "
                             f"the rest {r['late_ms']:.1f} against {r['late_predicted_ms']:.1f}, of which its graph "
                             f"{r['late_layers_ms']:.1f} against {r['late_layers_predicted_ms']:.1f} at "
                             f"{r['late_keys']} keys)" if "predicted_ms" in r else "")
                print(f"  probe batch {b} context {ctx} Q {r['Q']}: {r['ms']:.1f} ms{predicted}", file=sys.stderr)
    for b in batches if "random" in args.parts else ():
        for ctx in args.contexts:
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(10, shape["vocab_size"], (ctx,), generator=g).tolist() for _ in range(b)]
            base = None
            for name in ("full", "delayed", "focus-1.5"):
                opts = Options(max_new_tokens=64, batch_size=b, compile=args.compile, **MODES[name])
                seconds, clock, out, peak = run_mode(model, prompts, shape["mask_token_id"], [-1], opts, 1)
                tokens = sum(len(ids) for ids, _ in out)
                steps = len(out[0][1]["decoded"])
                row = {"mode": name, "batch": b, "context": ctx, "tokens_per_s": tokens / seconds,
                       "decode_tokens_per_s": tokens / clock["decode_s"], "steps": steps,
                       "ms_per_step": clock["decode_s"] / steps * 1e3, "peak_mb": peak,
                       "computed_per_step": float(np.mean(out[0][1]["computed"])),
                       "computed_deep_per_step": float(np.mean(out[0][1]["computed_deep"]))}
                base = base or row
                row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                result["end_to_end"].append(row)
                save(result)
                print(f"  e2e {name} batch {b} context {ctx}: {row['ms_per_step']:.1f} ms/step x{row['decode_speedup']:.2f}",
                      file=sys.stderr)
    if schedules:
        result["replayed"] = []
        bench_replay(model, schedules, args, batches, device, done=lambda row: (result["replayed"].append(row),
                                                                                 save(result)))
    if "profile" in args.parts:
        result["profile"] = []
        for name in ("full", "delayed", "focus-1.5"):
            opts = Options(max_new_tokens=32, batch_size=max(batches), compile=args.compile, **MODES[name])
            row = shapes.profile_step(model, name, opts, args.contexts[-1], device)
            result["profile"].append(row)
            save(result)
            print(f"  profile {name} batch {row['batch']} context {row['context']}: {row['ms_per_step']:.1f} ms/step, "
                  f"GPU busy {row['gpu_busy_ms_per_step']:.1f} ms, {row['kernel_launches_per_step']:.0f} kernel and "
                  f"{row['graph_launches_per_step']:.0f} graph launches, {row['syncs_per_step']:.0f} syncs",
                  file=sys.stderr)
    return result


REPLAY_MODES = ("full", "delayed", "focus-1.5", "paper-focus-1.5@0.8")


def record_schedules(args, device, block_size: int) -> dict:
    """Each replayed mode's schedules, from a decode of --model (the shipped model by default) on the first
    --replay-problems prompts of --replay-workload, at the workload's token budget (replay.record)."""
    ref, tok = load(args.model, device=device)
    if ref.config.block_size != block_size:
        raise ValueError(f"--model {args.model} has block size {ref.config.block_size}, the real-size shape "
                         f"{block_size}: its schedules do not fit; pass --replay-problems 0 or another --model")
    w = workloads.workload(args.replay_workload, args.replay_problems)
    prompts = encode_prompts(tok, w.prompts, chat=True)
    return {name: replay.record(ref, prompts, tok.mask_id, tok.eos_ids,
                                replace(mode_options(name, args, len(prompts)), max_new_tokens=w.max_new_tokens))
            for name in args.replay_modes}


def bench_replay(model, schedules: dict, args, batches, device, done=lambda row: None) -> list[dict]:
    """Serving: the real-size model decodes a queue of --queue-factor x batch sequences through `batch` slots
    (continuous batching: a slot whose sequence ends takes the next, its prefill included), each sequence
    following a schedule recorded from a trained model (replay.py: its steps, tokens decoded per step and
    length, at real-size cost). Reported per mode: output tokens/s over the whole run (the paper's measure),
    prefill and decode time apart, and the steady state: the rate while the queue still refills every slot.
    done(row) as each mode finishes. A mode that fails with an error of its own (not out of memory) leaves a row
    with its traceback, and the next mode runs."""
    rows = []
    for b in batches:
        for ctx in args.contexts:
            base = None
            for name in args.replay_modes:
                recorded = schedules[name]
                queue = [recorded[i % len(recorded)] for i in range(args.queue_factor * b)]
                opts = mode_options(name, args, b)   # (the token budget is the recording's: replay.replay)
                # warm-up: one batch's worth (with --compile it captures most graphs the timed run replays; those of
                # shapes it did not meet are captured while timed, counted and timed in the row), or the whole queue
                warm = queue if args.warm_up_queue else queue[:b] if opts.compile else queue[:min(b, 4)]
                try:
                    replay.replay(model, warm, ctx, opts)
                    with timeline.recorded(device) if args.timeline else contextlib.nullcontext({}) as seen:
                        row = replay.serve(model, queue, ctx, opts)
                except (RuntimeError, ValueError, IndexError) as e:
                    if out_of_memory(e):
                        raise
                    rows.append({"mode": name, "batch": b, "context": ctx, "error": traceback.format_exc()})
                    done(rows[-1])
                    print(f"  {name} concurrency {b} context {ctx} FAILED: {type(e).__name__}: {e} (the traceback is "
                          "in the results file)", file=sys.stderr)
                    continue
                row.update(mode=name, schedule="replayed", batch=b, context=ctx, threshold=opts.threshold)
                if args.timeline:  # (device ms / host ms a step, by call: tools/timeline.py)
                    row["timeline"] = seen["per_step"]
                    print("\n".join(f"    {line}" for line in timeline.lines(seen["per_step"])), file=sys.stderr)
                base = base or row
                row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
                row["steady_speedup"] = row["steady_tokens_per_s"] / base["steady_tokens_per_s"]
                rows.append(row)
                done(row)
                print(f"  served {name} concurrency {b} context {ctx}: {row['tokens_per_s']:.0f} tokens/s "
                      f"x{row['speedup']:.2f} (steady {row['steady_tokens_per_s']:.0f} x{row['steady_speedup']:.2f}), "
                      f"{row['ms_per_step']:.1f} ms/step, prefill {row['prefill_share']:.0%} "
                      f"({row['prefill_tflops']:.0f} TFLOP/s), "
                      f"{row['graphs_captured_while_timed']} graphs captured while timed in {row['capture_s']:.1f} s "
                      f"(and in the prefill {row['prefill_capture_s']:.1f} s)",
                      file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------------
# Output.

def table(rows: list[dict]) -> str:
    head = ("| mode | batch | threshold | tokens/s (spread) | x full | x predicted by row-layers | row-layers/token "
            "| steps | computed/step L0-1 | computed/step L2..L | decoded/step mean / sd / median | accuracy | peak MB |")
    lines = [head, "|" + " --- |" * 13]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['threshold']} | {r['tokens_per_s']:.1f} ({r['spread']:.0%}) "
                     f"| {r['speedup']:.2f} | {r['predicted_speedup']:.2f} | {r['row_layers_per_token']:.1f} | {r['steps']} "
                     f"| {r['computed_per_step']:.1f} | {r['computed_deep_per_step']:.1f} "
                     f"| {r['decoded_mean']:.2f} / {r['decoded_sd']:.2f} / {r['decoded_median']:.0f} "
                     f"| {r['accuracy']:.1%} | {_mb(r['peak_mb'])} |")
    return "\n".join(lines)


def _mb(x):
    return "-" if x is None else f"{x:.0f}"


def real_size_table(res: dict) -> str:
    lines = []
    if res["probe"]:
        lines += ["| batch | context | Q | ms | TFLOP/s | FOCUS: predicted by its row counts, ms (x) |", "|" + " --- |" * 6]
    for r in res["probe"]:
        predicted = f"{r['predicted_ms']:.1f} (x{r['over_prediction']:.2f})" if "predicted_ms" in r else "-"
        lines.append(f"| {r['batch']} | {r['context']} | {r['Q']} | {r['ms']:.1f} | {r.get('tflops', float('nan')):.0f} "
                     f"| {predicted} |")
    if res["end_to_end"]:
        lines += ["", "| mode | batch | context | ms/step | decode tokens/s | x full | computed/step L2..L |",
                  "|" + " --- |" * 7]
    for r in res["end_to_end"]:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['context']} | {r['ms_per_step']:.1f} | "
                     f"{r['decode_tokens_per_s']:.0f} | {r['decode_speedup']:.2f} | {r['computed_deep_per_step']:.1f} |")
    if res.get("replayed"):
        lines += ["", "| mode | threshold | concurrency | context | sequences | tokens/s | x first mode | steady tokens/s "
                  "| x first mode | prefill s / decode s (graph capture s in each) | steps | decoded/step | ms/step (without capture) "
                  "| computed/step L2..L |",
                  "|" + " --- |" * 14]
        for r in res["replayed"]:
            if "error" in r:
                lines.append(f"| {r['mode']} | | {r['batch']} | {r['context']} | failed: "
                             f"{r['error'].strip().splitlines()[-1]} |" + " |" * 9)
                continue
            lines.append(f"| {r['mode']} | {r['threshold']} | {r['batch']} | {r['context']} | {r['queue']} "
                         f"| {r['tokens_per_s']:.0f} | {r['speedup']:.2f} | {r['steady_tokens_per_s']:.0f} "
                         f"| {r['steady_speedup']:.2f} | {r['prefill_s']:.1f} / {r['decode_s']:.1f} "
                         f"({r.get('prefill_capture_s', 0):.1f} / {r.get('capture_s', 0):.1f}) | {r['steps']} "
                         f"| {r['decoded_per_step']:.2f} | {r['ms_per_step']:.1f} "
                         f"({r.get('ms_per_step_without_capture', r['ms_per_step']):.1f}) | {r['computed_deep_per_step']:.1f} |")
    if res.get("profile"):
        lines += ["", "| mode | batch | context | ms/step | GPU busy ms/step | kernel launches | graph launches | syncs "
                  "| most GPU time (ms/step) |", "|" + " --- |" * 9]
        for r in res["profile"]:
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["top_gpu_ms_per_step"].items())[:4])
            lines.append(f"| {r['mode']} | {r['batch']} | {r['context']} | {r['ms_per_step']:.1f} "
                         f"| {r['gpu_busy_ms_per_step']:.1f} | {r['kernel_launches_per_step']:.0f} "
                         f"| {r['graph_launches_per_step']:.0f} | {r['syncs_per_step']:.0f} | {top} |")
    return "\n".join(lines)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    import os
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def commit() -> str | None:
    """The commit measured, with "+modified" where tracked files differ from it (a copy of a working tree)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        return head + ("+modified" if head and git("status", "--porcelain", "--untracked-files=no") else "") or None
    except OSError:
        return None


REAL_SIZE_ONLY = ("real_size_config", "replay_problems", "replay_workload", "replay_modes", "queue_factor",
                  "warm_up_queue", "timeline", "parts", "real_batches", "contexts")  # the flags only --real-size reads
SHIPPED_ONLY = ("batch_sizes", "num_prompts", "repeats", "modes", "dtype")  # and those it ignores (its dtype is fixed)


MAX_REAL_BATCH = 65536  # --real-batches: at ~0.12 GB of KV cache a sequence (SDAR-1.7B, context 512), 8 TB


def parse_args(argv=None):
    p = ArgumentParser(description="Full block vs delayed cache vs FOCUS, side by side.")
    p.add_argument("--model", type="path", default=str(DEFAULT_MODEL))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", default="32")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    add_options(p, ["threshold", "max_new_tokens", "compile"])
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--no-analysis", dest="analysis", action="store_false")
    p.add_argument("--real-size", action="store_true", help="random weights of a real model's shape (GPU)")
    p.add_argument("--real-size-config", default="sdar-1.7b", choices=list(shapes.REAL_SIZE),
                   help="the shape: SDAR-1.7B, SDAR-8B (the paper's model, 16 GB in bf16), LLaDA2.0-mini (MoE, "
                        "32 GB in bf16), or tiny ones for a quick check")
    p.add_argument("--replay-problems", type=int, default=64,
                   help="--real-size: also replay the schedules of a decode of --model on this many prompts of "
                        "--replay-workload (0: off)")
    p.add_argument("--replay-workload", default="long", choices=workloads.WORKLOADS,
                   help="--real-size: the workload whose schedules are replayed (workloads.py)")
    p.add_argument("--replay-modes", default=",".join(REPLAY_MODES),
                   help=f"--real-size: the modes served from recorded schedules (of {', '.join(MODES)})")
    p.add_argument("--queue-factor", type=int, default=4,
                   help="--real-size: each concurrency serves a queue of this many times as many sequences")
    p.add_argument("--warm-up-queue", action="store_true",
                   help="--real-size serving: warm up on the whole queue, not one batch's worth, so that every "
                        "CUDA graph the timed run needs is captured before it (a server's start-up; the run takes "
                        "about twice as long)")
    p.add_argument("--timeline", action="store_true",
                   help="--real-size serving: also time each served step call by call on the device's clock "
                        "(tools/timeline.py: where a step's time goes; its events add a little host time)")
    p.add_argument("--attention", choices=kernels.ATTENTION_KERNELS, default="varlen",
                   help="--compile on CUDA: the kernel for ragged rows' attention: flash attention's variable-length "
                        "kernel (varlen, the default), FlexAttention compiled per graph shape (flex; serving SDAR-8B "
                        "it was slower than the mask) or SDPA with a mask over a padded grid (mask, the plain path; "
                        "results/README.md)")
    p.add_argument("--parts", default="probe,random,replay",
                   help="--real-size: which measurements: probe (one forward per row count), random (every mode "
                        "on random-weight dynamics, one token a step), replay (serving recorded schedules), "
                        "profile (torch.profiler: where a step's time goes, per mode)")
    p.add_argument("--real-batches", default="32,64,128,256", help="--real-size: batches (concurrency when serving)")
    p.add_argument("--contexts", default="256,512")
    p.add_argument("--out", type="path", default="results")
    p.add_argument("--plot", type="path", metavar="JSON", help="only draw the plots of a results file")
    args = p.parse_args(argv)
    p.alone(args, "plot", "only draws the plots of a results file")  # --model, --device, --dtype too: it loads nothing
    given = [name for name in REAL_SIZE_ONLY if getattr(args, name) != p.get_default(name)]
    if given and not args.real_size:  # without it they would be ignored without a word
        p.error(f"--{given[0].replace('_', '-')} goes with --real-size")
    given = [name for name in SHIPPED_ONLY if getattr(args, name) != p.get_default(name)]
    if given and args.real_size:
        p.error(f"--{given[0].replace('_', '-')} goes without --real-size (it measures the shipped model's modes)")
    if args.attention != "varlen" and not args.compile:
        p.error("--attention goes with --compile (it picks a fast path's kernel)")
    for name in ("batch_sizes", "real_batches", "contexts"):
        setattr(args, name, positive_list(p, name, getattr(args, name)))
    for name, allowed in (("modes", MODES), ("replay_modes", MODES), ("parts", PARTS)):
        flag = "--" + name.replace("_", "-")
        values = getattr(args, name).split(",")
        for m in values:
            if m not in allowed:
                p.error(f"{flag}: unknown {'part' if name == 'parts' else 'mode'} {m!r}; use some of {', '.join(allowed)}")
        if len(set(values)) < len(values):
            p.error(f"{flag} names one twice: {','.join(values)}")
        setattr(args, name, values)
    for name in ("batch_sizes", "real_batches", "contexts"):
        if len(set(getattr(args, name))) < len(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} names a value twice")
    if args.replay_problems < 0:
        p.error(f"--replay-problems must be 0 (off) or positive, got {args.replay_problems}")
    for name in ("num_prompts", "repeats", "queue_factor"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name, most in (("num_prompts", data.MAX_PROBLEMS), ("replay_problems", data.MAX_PROBLEMS),
                       ("queue_factor", 1000), ("repeats", 1000)):  # more: hours to build, serve or repeat
        if getattr(args, name) > most:
            p.error(f"--{name.replace('_', '-')} must be at most {most:,}, got {getattr(args, name)}")
    if max(args.real_batches) > MAX_REAL_BATCH:
        p.error(f"--real-batches must be at most {MAX_REAL_BATCH:,} (the KV cache of more sequences fits no GPU at "
                f"these shapes), got {max(args.real_batches):,}")
    shape = shapes.REAL_SIZE[args.real_size_config]
    # after its context a part decodes a block (probe), 64 tokens (random), or a workload's 512 at most (replay)
    room = shape["block_size"] + (512 if "replay" in args.parts and args.replay_problems else 64)
    if args.real_size and max(args.contexts) + room > shape["max_position_embeddings"]:
        p.error(f"--contexts {max(args.contexts)}: the {args.real_size_config} shape's context of "
                f"{shape['max_position_embeddings']:,} tokens leaves no room for the {room} a part decodes after it")
    if args.plot == "":
        p.error("--plot is empty; name a results file")
    if not args.out:
        p.error("--out is empty; name a folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):   # os.path: no error for a long name
        p.error(f"--out {args.out} is a file; name a folder for the results")
    Options(threshold=args.threshold, max_new_tokens=args.max_new_tokens)  # the shared checks, before any work
    return args


def positive_list(p, name: str, text: str) -> list[int]:
    """"32,64" -> [32, 64]; a usage error naming the flag and the value otherwise."""
    flag = "--" + name.replace("_", "-")
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        p.error(f"{flag} takes comma-separated integers, got {text!r}")
    for v in values:
        if not 0 < v < 2**63:  # past int64 torch fails, and only once the model has loaded
            p.error(f"{flag}: every value must be in 1..2^63-1, got {v}")
    return values


@command
def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        device = torch.device(resolve_device(args.device))
        if args.real_size and device.type != "cuda" and not args.real_size_config.startswith("tiny"):
            raise ValueError(f"--real-size {args.real_size_config} needs a GPU (--device cuda): on a CPU it would run "
                             "for hours; the tiny shapes (--real-size-config tiny) check it runs")
        if args.attention != "varlen" and device.type != "cuda":  # the results would name a kernel that never ran
            raise ValueError(f"--attention {args.attention} picks a CUDA kernel; on {device.type} ragged rows always "
                             "use SDPA with a mask: drop --attention, or pass --device cuda")
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.plot is not None:
        return plots.plot_command(args.plot, plots.plot_bench)
    kernels.use_attention(args.attention)
    torch.manual_seed(0)
    res = {"command": "python tools/bench.py " + " ".join(sys.argv[1:] if argv is None else argv), "device": device_name(device),
           "torch": torch.__version__, "commit": commit(), "date": datetime.date.today().isoformat(),
           "threshold": args.threshold,
           "attention": args.attention if args.compile and device.type == "cuda" else "mask"}  # the kernel that runs
    out = None
    try:
        folder = Path(args.out)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {args.out}: cannot make the folder ({e.strerror or e}); name one you can write")
        kind = "cuda" if device.type == "cuda" else "cpu"
        out = PartialJSON(new_results_path(folder, f"{kind}{'-real-size' if args.real_size else ''}-{res['date']}"))
        return run(args, device, res, out)
    except (CheckpointError, ValueError, OSError) as e:
        print(error_line(e, out), file=sys.stderr)
        out = None
        return 2
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        kept = "; " + out.abandon() if out else ""
        print(out_of_memory_message(e, "--real-batches, --contexts or --batch-sizes") + kept, file=sys.stderr)
        out = None
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or kill -TERM / SIGHUP (generate.start_command)
        say(f"interrupted; {out.abandon() if out else 'nothing was written'}")
        out = None
        return interrupted_status(e)
    finally:
        if out:
            out.abandon()


def run(args, device, res: dict, out: PartialJSON) -> int:
    """The benchmark itself, saving into `out` what finished as it goes."""
    if args.real_size:
        res["real_size"] = bench_real_size(args, device, save=lambda result: out.save({**res, "real_size": result}))
        report = real_size_table(res["real_size"])
    else:
        model, tok = load(args.model, device=device, dtype=args.dtype)
        print_notes(model, tok, args.model, None)
        if model.embed_tokens.weight.dtype not in (torch.float16, torch.bfloat16):
            res["attention"] = "mask"  # the ragged kernels are half precision's (kernels.attention_kernel)
        problems = data.make_problems("heldout", args.num_prompts)
        res["modes"] = bench_modes(model, tok, problems, args)
        out.save(res)
        report = table(res["modes"])
        if args.analysis:
            res["predictors"] = predictor_probe(model, tok, problems, args.max_new_tokens, args.threshold,
                                                args.batch_sizes[0])
            full = next((r for r in res["modes"] if r["mode"] == "full"), None)
            report += "\n\n" + "\n".join(
                [f"- fraction of block compute on tokens not decoded that step (full block): {full['waste']:.1%}" if full else ""] +
                [f"- {n}: AUC {v['auc_per_step']:.3f} per step ({v['auc_pooled']:.3f} pooled), precision of top-k "
                 f"{v['precision_top_k']:.3f}, most confident token kept {figure(v['top1_kept'])}"
                 for n, v in res["predictors"].items() if isinstance(v, dict)])
    path = out.commit(res)
    show(f"\n{res['command']}  ({res['device']}, torch {res['torch']})\n\n{report}\n\nwrote {path}")
    if res.get("modes") or res.get("predictors"):  # a real-size run has no plots
        plots.plot_bench(path)
    failed = [r["mode"] for r in res.get("real_size", {}).get("replayed", []) if "error" in r]
    if failed:
        print(f"error: {', '.join(failed)} failed; their tracebacks are in {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    start_command()
    sys.exit(main())
