"""Real models' shapes (config.json fields), for timing at real size with random weights (tools/bench.py
--real-size): SDAR-1.7B, SDAR-8B (the paper's model), LLaDA2.0-mini (the paper's mixture-of-experts model),
and tiny versions for quick checks; the probe that times one decode forward at such a shape, and the profile of
whole decode steps."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils import _pytree as pytree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules, one folder up
import focus
import kernels
from generate import generate_ids
from model import SDAR, KVCache, ModelConfig, Rows, flops_per_token

SDAR_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                 block_size=32, mask_token_id=151669, max_position_embeddings=32768)
# The paper's model: SDAR-8B-Chat (Qwen3-8B's shape).
SDAR_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
               block_size=32, mask_token_id=151669, max_position_embeddings=32768)
# The paper's second model (mixture of experts, 16B parameters, 1.4B active): LLaDA2.0-mini's config.json.
LLADA2_MINI = dict(model_type="llada2_moe", vocab_size=157184, hidden_size=2048, intermediate_size=5120,
                   num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                   rope_theta=600000.0, partial_rotary_factor=0.5, tie_word_embeddings=False, block_size=32,
                   mask_token_id=156895, max_position_embeddings=16384, num_experts=256, num_experts_per_tok=8,
                   moe_intermediate_size=512, num_shared_experts=1, first_k_dense_replace=1, n_group=8,
                   topk_group=4, routed_scaling_factor=2.5, score_function="sigmoid",
                   moe_router_enable_expert_bias=True, norm_topk_prob=True)
TINY_REAL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, block_size=32, mask_token_id=3,
                 max_position_embeddings=4096)
TINY_MOE = {**LLADA2_MINI, **TINY_REAL, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "n_group": 4, "topk_group": 2}
REAL_SIZE = {"sdar-1.7b": SDAR_1_7B, "sdar-8b": SDAR_8B, "llada2-mini": LLADA2_MINI, "tiny": TINY_REAL,
             "tiny-moe": TINY_MOE}


def random_model(shape: dict, device, dtype):
    """Random weights of a real model's shape, made directly in `dtype` on `device` (no fp32 copy first)."""
    cfg = ModelConfig(**shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = SDAR(cfg)
    finally:
        torch.set_default_dtype(default)
    for p in model.parameters():
        if p.dim() >= 2:  # projections and stacked experts
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# One decode forward at real size, timed (bench.py --parts probe).

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, n=10):
    fn()
    sync(device)
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@torch.inference_mode()
def step_probe(model, batch: int, context: int, device, graphs: bool = False) -> list[dict]:
    """One decode forward with Q rows per sequence after a context of `context` tokens, as compute-bound.md;
    graphs: the layers as CUDA graphs, as the decoder's steps run with --compile."""
    cfg, bs = model.config, model.config.block_size
    cache = KVCache(cfg, batch + 1, context + bs, device, model.embed_tokens.weight.dtype)  # + the spare slot
    seq = torch.arange(batch, device=device).repeat_interleave(context)
    pos = torch.arange(context, device=device).repeat(batch)
    for chunk in range(0, batch, 16):  # prefill in chunks to bound the attention grid
        sel = (seq >= chunk) & (seq < chunk + 16)
        model.forward_rows(torch.randint(10, cfg.vocab_size, (int(sel.sum()),), device=device),
                           Rows.build(seq[sel], pos[sel], (pos[sel] // bs + 1) * bs, batch), cache, logits_for=pos[:0])
    out = []
    for q in (32, 16, 8, 4):
        seq = torch.arange(batch, device=device).repeat_interleave(q)
        pos = context + torch.arange(q, device=device).repeat(batch)
        rows = Rows.build(seq, pos, torch.full_like(pos, context + q), batch)
        ids = torch.randint(10, cfg.vocab_size, (len(seq),), device=device)
        ms = time_it(lambda: model.forward_rows(ids, rows, cache, logits_for=pos[:0], graphs=graphs), device) * 1e3
        flops = len(seq) * flops_per_token(cfg, context + q)
        out.append({"batch": batch, "context": context, "Q": q, "ms": ms, "tflops": flops / ms / 1e9})
    # A FOCUS step: 32 masked rows per sequence in layers 0-1, about 4 kept after layer 1.
    seq = torch.arange(batch, device=device).repeat_interleave(bs)
    col = torch.arange(bs, device=device).repeat(batch)
    rows = Rows.build(seq, context + col, torch.full_like(col, context + bs), batch)
    ids = torch.randint(10, cfg.vocab_size, (len(seq),), device=device)
    start = torch.full((batch,), context, device=device)
    progress, target = torch.full((batch,), bs - 1, device=device), torch.full((batch,), 4, device=device)
    is_mask = torch.ones_like(col, dtype=torch.bool)
    run = lambda: focus.forward_focus(model, ids, rows, cache, is_mask, col, start, progress, target, graphs=graphs)
    ms = time_it(run, device) * 1e3
    kept = int(run().kept.sum()) / batch
    # What its row counts predict: 2 layers at 32 rows and L-2 at `kept` rows (per-layer times from the plain
    # forwards above, interpolated in Q), plus the logits of the kept masked rows, which the plain forwards skip.
    per_layer = {r["Q"]: r["ms"] / cfg.num_hidden_layers for r in out}
    hidden = torch.randn(round(kept * batch), cfg.hidden_size, device=device, dtype=model.embed_tokens.weight.dtype)
    logits_ms = time_it(lambda: model.logits(hidden), device) * 1e3
    early_predicted = 2 * per_layer[32]
    late_predicted = (cfg.num_hidden_layers - 2) * interpolate(per_layer, kept) + logits_ms
    predicted = early_predicted + late_predicted
    # Its parts, timed apart: layers 0-1 with the selection (the first graph); the rest (compaction, the kept
    # rows' layout, the second graph, the logits); and the second graph alone, on inputs laid out once.
    select = lambda: focus.select_step(model, ids, rows, cache, is_mask, col, progress, target, graphs=graphs,
                                       block_start=start)
    early_ms = time_it(select, device) * 1e3
    # (the first graph's outputs, copied: each timed run of the second graph may overwrite the first's buffers)
    selected = select()
    if selected.compacted is not None:
        selected = dataclasses.replace(selected, compacted=pytree.tree_map(torch.clone, selected.compacted))
    late_ms = time_it(lambda: focus.finish_step(model, selected, rows, cache, is_mask, col, start, graphs),
                      device) * 1e3
    _, late_rows, x, q1, _, _ = focus.compact_step(selected, selected.kept, rows, is_mask, col, start)
    late = kernels.graphed(focus.late_layers) if graphs else focus.late_layers
    graph_ms = time_it(lambda: late(model, x, late_rows, cache, q1), device) * 1e3
    out.append({"batch": batch, "context": context, "Q": f"focus 32->{kept:.1f}", "ms": ms, "kept_per_seq": kept,
                "predicted_ms": predicted, "logits_ms": logits_ms, "over_prediction": ms / predicted,
                "early_ms": early_ms, "early_predicted_ms": early_predicted, "late_ms": late_ms,
                "late_predicted_ms": late_predicted, "late_layers_ms": graph_ms,
                "late_layers_predicted_ms": late_predicted - logits_ms, "late_keys": late_rows.kv_max})
    return out


def interpolate(points: dict, q: float) -> float:
    """Piecewise-linear value at q of {Q: value} (clamped to the ends)."""
    qs = sorted(points)
    q = min(max(q, qs[0]), qs[-1])
    hi = next(x for x in qs if x >= q)
    lo = max(x for x in qs if x <= q)
    return points[lo] if hi == lo else points[lo] + (points[hi] - points[lo]) * (q - lo) / (hi - lo)


def profile_step(model, name: str, opts, context: int, device) -> dict:
    """Where a decode step's time goes: opts.max_new_tokens of random-weight decoding of opts.batch_size sequences
    (mode `name`, prompts of `context` tokens) under torch.profiler, after a warm-up; the profiler starts at the
    first decode step, so the prefill is left out. Per step: the wall time, the GPU's busy time (kernels, those
    inside CUDA graphs too), kernel and graph launches and host syncs, and the operators with the most GPU time."""
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(10, vocab, (context,), generator=g).tolist() for _ in range(opts.batch_size)]
    generate_ids(model, prompts, model.config.mask_token_id, [-1], opts)   # warm-up: graphs captured
    clock = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof, started = profile(activities=activities), []

    def start(dec):  # before each decode step: the first one starts the profiler
        if not started:
            sync(device)
            prof.start()
            started.append(True)
    out = generate_ids(model, prompts, model.config.mask_token_id, [-1], opts, clock=clock, step_hook=start)
    sync(device)
    prof.stop()
    steps = len(out[0][1]["decoded"])
    # Every figure read from the events is the GPU's (kernel time, launches, syncs): on a CPU they are all zero, and
    # parsing the recording of an eager step takes seconds, so it is skipped there.
    events = prof.key_averages() if device.type == "cuda" else []

    def device_us(e):
        return getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)

    def calls(key):
        return sum(e.count for e in events if e.key == key) / steps
    top = sorted(events, key=device_us, reverse=True)[:8]
    return {"mode": name, "batch": opts.batch_size, "context": context, "ms_per_step": clock["decode_s"] / steps * 1e3,
            "gpu_busy_ms_per_step": sum(device_us(e) for e in events) / steps / 1e3,
            "kernel_launches_per_step": calls("cudaLaunchKernel") + calls("cuLaunchKernel") + calls("cuLaunchKernelEx"),
            "graph_launches_per_step": calls("cudaGraphLaunch"), "syncs_per_step": calls("cudaStreamSynchronize"),
            "top_gpu_ms_per_step": {e.key[:60]: round(device_us(e) / steps / 1e3, 3) for e in top if device_us(e)}}
