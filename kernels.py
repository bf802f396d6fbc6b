"""The fused fast paths, in one place. The plain PyTorch functions they speed up live where a reader
expects them (focus.py) and stay the reference; each fast path is tested against its plain function.

- compiled(fn): fn through `torch.compile` (no Triton needed on CPU: Inductor emits C++). FOCUS uses it for
  the token importance (score, pool, softmax and sum fused) and for the compaction's gathers after layer 1
  (focus.forward_focus(compiled=True), `generate.py --compile`). Where compilation is not available the
  plain function runs and a warning says so.

Tests: tests/test_focus_rules.py::test_compiled_importance_matches_plain (the functions) and
tests/test_focus_rules.py::test_compiled_focus_generates_the_same_tokens (greedy generation, end to end).
"""
from __future__ import annotations

import warnings

import torch

_COMPILED = {}


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
