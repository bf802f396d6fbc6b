"""The fast paths, in one place. The plain PyTorch code they speed up lives where a reader expects it (model.py,
focus.py) and stays the reference; each fast path is tested against it. `generate.py --compile` turns them on.

- fusable / compiled(fn): a small function through `torch.compile` (Inductor fuses its element-wise steps into
  one kernel; on CPU it emits C++). model.py marks RMSNorm, RoPE and SwiGLU `@fusable`: inside fast_paths()
  they run compiled. Where compilation is not available the plain function runs, with a warning. (FOCUS's
  importance and selection run plain: on the GPU a compiled call with dynamic shapes cost more host time,
  about 0.35 ms, than its kernels took.)

- graphed(fn): the layers of a decode step as CUDA graphs (CUDA only; elsewhere fn runs as it is). A step's
  rows are ragged (each sequence computes its own number of block positions), a graph's shapes are fixed,
  so the rows are padded to a few buckets (rows in all, rows per sequence, keys per sequence) and one graph
  is captured per bucket, on first use, then replayed. Padding rows write their keys and values into a
  spare cache slot that no sequence reads. A plain step runs layers 0..L-1 as one graph; a FOCUS step runs
  layers 0-1 as one graph and layer 1's attention and layers 2..L as another, around the selection, as the
  reference implementation does. The logits are computed outside, for the masked rows only.

- reused(make, *args): the decoder's KV cache, made once and handed to the next decoder of the same shape,
  so that the graphs captured on it (which hold its addresses) serve later runs too.

- batched_experts: a mixture-of-experts layer's experts in two batched matrix products over a padded
  (experts x rows) grid, instead of model.MoE's loop over experts. (MoE layers sync with the host, so MoE
  models run without graphs.)

Tests: tests/test_kernels.py (graph padding against the plain forward on CPU, the fused functions, greedy
generation with --compile on CPU, and with CUDA graphs where a GPU is present),
tests/test_moe.py::test_batched_experts_match_the_loop.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
import warnings

import torch

_COMPILED = {}
_FAST = False


@contextlib.contextmanager
def fast_paths(on: bool = True):
    """Inside the block the model takes its fast paths (@fusable functions compiled, model.MoE's experts
    batched); generate_ids enters it with --compile. The graphed layers are asked for explicitly
    (model.forward_rows(compiled=...), focus.forward_focus(compiled=...))."""
    global _FAST
    before, _FAST = _FAST, on
    try:
        yield
    finally:
        _FAST = before


def fast_paths_on() -> bool:
    return _FAST


def fusable(fn):
    """A small function of the model whose fast path is its compiled version: inside fast_paths() it runs
    through torch.compile (one fused kernel instead of one per element-wise step), elsewhere as written."""
    @functools.wraps(fn)
    def call(*args):
        return (compiled(fn) if _FAST else fn)(*args)
    return call


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


# ---------------------------------------------------------------------------------------------------
# CUDA graphs of a decode step's layers.

_GRAPHED = {}
_STORES = weakref.WeakKeyDictionary()  # KV cache -> its graphs and their memory pool
_REUSED = {}


def reused(make, *args):
    """make(*args), or the object that the last call with equal arguments made (one kept per `make`)."""
    key = tuple(a if isinstance(a, (int, float, str, torch.device, torch.dtype)) else repr(a) for a in args)
    last = _REUSED.get(make)
    if last is None or last[0] != key:
        _REUSED.pop(make, None)  # free the old one (and its graphs) before making the new one
        _REUSED[make] = last = (key, make(*args))
    return last[1]


def graphed(fn, capture: bool = True):
    """fn(model, *args) with CUDA graphs, on CUDA. args hold one Rows, one KVCache whose last slot is spare
    (no sequence uses it), tensors with one row per row of the Rows, and ints; the ints and the padded shapes
    pick the graph. Returns what fn returns, one row per row; these are the graph's own buffers, valid until
    the same graph runs again. Off CUDA, and for MoE models (their routing syncs with the host), fn runs as is.
    capture=False: the same padded buffers, run eagerly on any device (what a graph computes; for tests)."""
    if (fn, capture) not in _GRAPHED:
        _GRAPHED[fn, capture] = functools.partial(_graphed_call, fn, capture)
    return _GRAPHED[fn, capture]


def _graphed_call(fn, capture: bool, model, *args):
    from model import KVCache, Rows  # here: model.py imports this module
    rows = next(a for a in args if isinstance(a, Rows))
    cache = next(a for a in args if isinstance(a, KVCache))
    if capture and (rows.pos.device.type != "cuda" or model.config.num_experts):
        return fn(model, *args)
    # Every sequence with the same rows and keys, no padding: no attention mask, so SDPA's flash kernel runs.
    dense = rows.dense and len(rows.active) == cache.k.shape[1] - 1 and _bucket(rows.num_rows) == rows.num_rows
    if dense:
        shape = (rows.num_rows, rows.q_max, rows.kv_max)
    else:
        shape = (_bucket(rows.num_rows), 1 << (rows.q_max - 1).bit_length(),  # rows; rows per sequence, keys:
                 min(cache.max_len, -(-rows.kv_max // 256) * 256))              # powers of two, multiples of 256
    key = (fn, capture, id(model), dense, shape, tuple(a for a in args if isinstance(a, int)),
           tuple((a.shape[1:], a.dtype) for a in args if isinstance(a, torch.Tensor)))
    store = _STORES.setdefault(cache, {"pool": torch.cuda.graph_pool_handle() if capture else None, "graphs": {}})
    graph = store["graphs"].get(key)
    if graph is None or graph.model() is not model:
        graph = store["graphs"][key] = _Graph(fn, model, args, rows, cache, shape, dense, store["pool"], capture)
    return graph.run(args, rows)


def _bucket(n: int) -> int:
    """n rounded up to a step of max(8, 2^(floor(log2 n) - 3)): at most 1/8 of a bucket is padding."""
    step = max(8, 1 << max(n.bit_length() - 4, 0))
    return -(-n // step) * step


class _Graph:
    """One captured graph: static input buffers (the padded rows and row tensors), the graph, its outputs."""

    def __init__(self, fn, model, args, rows, cache, shape, dense: bool, pool, capture: bool = True):
        from model import Rows
        padded, per_seq, keys = shape
        dev = rows.pos.device
        self.spare = cache.k.shape[1] - 1
        self.seq, self.pos, self.slot, self.key_end = (torch.zeros(padded, dtype=torch.long, device=dev) for _ in range(4))
        # Every cache slot has a line of the attention grid (group = slot), the spare one too unless dense.
        lines = torch.arange(self.spare if dense else self.spare + 1, device=dev)
        self.rows = Rows(self.seq, self.pos, self.seq, self.slot, self.key_end, lines, per_seq, keys,
                         all_slots=True, dense=dense)
        # The cache only weakly: it keys the store this graph lives in, which must not keep it alive.
        self.args = [self.rows if a is rows else a.new_zeros((padded, *a.shape[1:])) if isinstance(a, torch.Tensor)
                     else weakref.proxy(a) if a is cache else a for a in args]
        self.model = weakref.ref(model)
        self.fn, self.graph = fn, None
        if not capture:
            return
        self.fill(args, rows)
        side = torch.cuda.Stream()  # warm-up outside the capture: compilation, library workspaces
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(model, *self.args)
        torch.cuda.current_stream().wait_stream(side)
        self.rows._masks.clear()  # the attention mask is made from the buffers inside the graph, not kept
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            out = fn(model, *self.args)
        self.out = (out,) if isinstance(out, torch.Tensor) else tuple(out)

    def fill(self, args, rows):
        """Copy a step's rows and row tensors into the buffers; padding rows go to the spare slot, position 0,
        where they see one key."""
        n = rows.num_rows
        for buf, value, pad in ((self.seq, rows.seq, self.spare), (self.pos, rows.pos, 0), (self.slot, rows.slot, 0),
                                (self.key_end, rows.key_end, 1)):
            buf[:n] = value
            buf[n:] = pad
        for buf, a in zip(self.args, args):
            if isinstance(a, torch.Tensor):
                buf[:n] = a

    def run(self, args, rows):
        self.fill(args, rows)
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:  # capture=False: the padded computation, eagerly
            self.rows._masks.clear()
            out = self.fn(self.model(), *self.args)
            out = (out,) if isinstance(out, torch.Tensor) else out
        out = tuple(o[:rows.num_rows] for o in out)
        return out[0] if len(out) == 1 else out


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
