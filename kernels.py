"""The batched forms of FOCUS's hot operations, plain and fused.

- The mask sets of a whole ragged batch are laid out on one padded grid (A sequences x m slots), so the
  importance of every sequence is computed by one batched call (focus.token_importance).
- After layer 1, compaction gathers the kept rows of the running state: the residual stream, the layer-1
  queries, and the rotary tables (positions, per-sequence counts and indices are rebuilt by Rows.take).

The plain PyTorch versions are the reference. `focus_functions(compiled=True)` wraps the same functions in
`torch.compile` (no Triton needed on CPU: Inductor emits C++), which fuses the score, pool, softmax and sum
of the importance, and the gathers of the compaction. If compilation is not available the plain versions
run and a warning says so. tests/test_focus_rules.py::test_compiled_importance_matches_plain checks that both
give the same results.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from model import ragged_layout


@dataclass
class Grid:
    active: torch.Tensor  # (A,) cache slots with a non-empty mask set
    group: torch.Tensor   # (M,) each masked row's line on the grid
    slot: torch.Tensor    # (M,) and its column (its rank in the mask set)
    valid: torch.Tensor   # (A, m) bool


def grid(seq_of_row: torch.Tensor) -> Grid:
    """Layout of M masked rows, grouped by sequence in set order, on an (A, m) grid."""
    active, counts, group, slot = ragged_layout(seq_of_row)
    width = int(counts.max()) if len(counts) else 0
    valid = torch.arange(width, device=seq_of_row.device) < counts[:, None]
    return Grid(active, group, slot, valid)


def to_grid(x: torch.Tensor, g: Grid, fill=0):
    """x (M, ...) -> (A, m, ...), padding filled with `fill`."""
    out = x.new_full((g.valid.shape[0], g.valid.shape[1], *x.shape[1:]), fill)
    out[g.group, g.slot] = x
    return out


def ragged_importance(q, k, g: Grid, scale: float, importance_fn):
    """Importance of every masked row of the batch: q (M, heads, head_dim), k (M, kv_heads, head_dim) -> (A, m)."""
    return importance_fn(to_grid(q, g), to_grid(k, g), g.valid, scale)


def compact(keep, *tensors):
    """Order-preserving gather of the kept rows: keep (K,) ascending row indices; tensors (T, ...) each."""
    return tuple(t.index_select(0, keep) for t in tensors)


def _with_fallback(fn, name: str):
    """torch.compile(fn), falling back to fn (with one warning) where compilation fails."""
    try:
        compiled = torch.compile(fn, dynamic=True)
    except Exception as e:  # e.g. torch.compile unsupported on this Python
        warnings.warn(f"torch.compile unavailable for {name} ({type(e).__name__}); using the plain version")
        return fn
    state = {"fn": compiled}

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


def focus_functions(compiled: bool = False):
    """The functions focus.forward_focus calls: grid layout, importance over the grid, compaction."""
    import focus
    importance_fn, compact_fn = focus.token_importance, compact
    if compiled:
        importance_fn = _with_fallback(importance_fn, "token_importance")
        compact_fn = _with_fallback(compact_fn, "compact")
    return SimpleNamespace(
        grid=grid, to_grid=to_grid, compact=compact_fn,
        importance=lambda q, k, g, scale: ragged_importance(q, k, g, scale, importance_fn))
