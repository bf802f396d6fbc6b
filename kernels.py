"""The fused fast paths, in one place. The plain PyTorch functions they speed up live where a reader
expects them (focus.py) and stay the reference; each fast path is tested against its plain function.

- compiled(fn): fn through `torch.compile` (no Triton needed on CPU: Inductor emits C++). FOCUS uses it for
  the token importance (score, pool, softmax and sum fused) and for the compaction's gathers after layer 1
  (focus.forward_focus(compiled=True), `generate.py --compile`). Where compilation is not available the
  plain function runs and a warning says so.

- batched_experts: a mixture-of-experts layer's experts in two batched matrix products over a padded
  (experts x rows) grid, instead of model.MoE's loop over experts (a few kernel launches per layer instead
  of several per expert; `--compile` turns it on).

Tests: tests/test_focus_rules.py::test_compiled_importance_matches_plain (the functions),
tests/test_focus_rules.py::test_compiled_focus_generates_the_same_tokens (greedy generation, end to end),
tests/test_moe.py::test_batched_experts_match_the_loop.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

_COMPILED = {}
_FAST = False


@contextlib.contextmanager
def fast_paths(on: bool = True):
    """Inside the block the model takes its fast paths (model.MoE: batched_experts); generate_ids enters it
    with --compile. FOCUS's compiled functions are asked for explicitly (focus.forward_focus(compiled=...))."""
    global _FAST
    before, _FAST = _FAST, on
    try:
        yield
    finally:
        _FAST = before


def fast_paths_on() -> bool:
    return _FAST


def compiled(fn):
    """torch.compile(fn), made once per function, falling back to fn (with one warning) where compilation fails."""
    if fn not in _COMPILED:
        _COMPILED[fn] = _with_fallback(fn)
    return _COMPILED[fn]


def _with_fallback(fn):
    name = fn.__name__
    try:
        fast = torch.compile(fn, dynamic=True)
    except Exception as e:  # e.g. torch.compile unsupported on this Python
        warnings.warn(f"torch.compile unavailable for {name} ({type(e).__name__}); using the plain version")
        return fn
    state = {"fn": fast}

    def call(*args):
        try:
            return state["fn"](*args)
        except Exception as e:
            if state["fn"] is fn:
                raise
            warnings.warn(f"torch.compile failed for {name} ({type(e).__name__}: {e}); using the plain version")
            state["fn"] = fn
            return fn(*args)
    return call


def batched_experts(experts, x, expert, token, weight):
    """The routed experts' weighted sum for every token, (N, hidden) fp32. x (N, hidden); expert, token,
    weight (N * k,): the (token, expert) pairs sorted by expert, with their router weights. Each expert's
    rows go to its line of a zero-padded (E, most rows of any expert, hidden) grid, then one batched SwiGLU."""
    num_experts = experts.gate_proj.shape[0]
    counts = torch.bincount(expert, minlength=num_experts)
    first = torch.cumsum(counts, 0) - counts
    place = torch.arange(len(expert), device=x.device) - first[expert]   # the pair's row in its expert's line
    grid = x.new_zeros(num_experts, int(counts.max()), x.shape[1])
    grid[expert, place] = x[token]
    h = torch.nn.functional.silu(grid @ experts.gate_proj.transpose(1, 2)) * (grid @ experts.up_proj.transpose(1, 2))
    y = (h @ experts.down_proj.transpose(1, 2))[expert, place]            # (N * k, hidden)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y.float() * weight[:, None])
