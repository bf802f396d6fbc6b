"""The fast paths of `--compile`, in one place. The plain PyTorch code they speed up lives where a reader expects
it (model.py, focus.py) and stays the reference; each fast path is tested against it (tests/test_kernels.py,
tests/test_moe.py::test_batched_experts_match_the_loop). The decoder asks for them explicitly, with the one
option `compile`:

- fast_paths(model): inside the block, the model's small functions run fused. Modules call them through an
  attribute (RMSNorm.norm, Attention.apply_rope, MLP.act, Experts.act: model.py's plain functions), which is
  swapped for the function compiled by `torch.compile` (Inductor fuses its element-wise steps into one kernel;
  on CPU it emits C++), MoE.run_experts for batched_experts and Attention.attend for ragged_attention. Where
  compilation is not available the plain function runs, with a warning.

- graphed(fn): the layers of a decode step as CUDA graphs (CUDA only; elsewhere fn runs as it is), asked for
  by `graphs=True` of model.forward_rows and focus.forward_focus. A step's rows are ragged (each sequence
  computes its own number of block positions), a graph's shapes are fixed, so the rows are padded to a few
  buckets (rows in all, rows per sequence, keys per sequence) and one graph is captured per bucket, on first
  use, then replayed. Padding rows write their keys and values into a spare cache slot that no sequence reads. A
  plain step runs layers 0..L-1 as one graph. A FOCUS step runs two: layers 0-1 with the whole selection
  (importance, delta, target rules, in focus.py's static-shape form on the graph's padded grid) and the
  compaction's device side (focus.compaction), both fused by torch.compile (fused(fn)); then, after the host
  reads the kept count, layer 1's attention and layers 2..L on the kept rows, as the reference implementation
  splits it. The logits are computed outside, for the masked rows only. A small
  prefill (a few prompts refilling the slots of ended sequences) runs as a graph too, its attention grid with a
  line per prompt instead of one per cache slot (grid="sequences"), captured the second time its shape is met (a
  shape met once runs as it is).

- ragged_attention: under fast_paths, ragged rows in half precision on CUDA attend through flash attention's
  variable-length kernel (each sequence's rows packed, its keys read in place up to its key end; no padded grid,
  no mask) instead of SDPA with a mask over a padded grid; use_attention("flex") or ("mask") for the others
  (bench.py --attention).

- reused_cache(model, make, *args): the decoder's KV cache, made once and handed to the next decoder of the same
  shape, so that the graphs captured on it (which hold its addresses) serve later runs too; release(model)
  frees it (and its graphs), as does dropping the model.

- batched_experts: a mixture-of-experts layer's experts in two batched matrix products over a padded
  (experts x rows) grid, instead of model.experts_loop. (MoE layers sync with the host to route, so MoE
  models run without graphs.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
import weakref
from typing import NamedTuple

import torch

# ---------------------------------------------------------------------------------------------------
# Fused small functions.

SWAPPABLE = ("norm", "apply_rope", "act", "run_experts", "attend")  # module attributes holding a plain function
_FAST_OF, _PLAIN_OF = {}, {}                              # plain function <-> its fast version
_FUSED = {}                                               # fused(fn): fn compiled


@contextlib.contextmanager
def fast_paths(model, on: bool = True):
    """Inside the block, `model` calls the fast versions of its small functions (on=False: the plain ones).
    The attributes are put back on the way out."""
    swapped = []
    for module in model.modules():
        for name in SWAPPABLE:
            fn = module.__dict__.get(name)
            if fn is None:
                continue
            plain = _PLAIN_OF.get(fn, fn)
            want = _fast_version(name, plain) if on else plain
            if want is not fn:
                swapped.append((module, name, fn))
                setattr(module, name, want)
    try:
        yield
    finally:
        for module, name, fn in reversed(swapped):
            setattr(module, name, fn)


def _fast_version(name: str, plain):
    if plain not in _FAST_OF:
        fast = (batched_experts if name == "run_experts" else functools.partial(ragged_attention, plain)
                if name == "attend" else compiled(plain))
        _FAST_OF[plain], _PLAIN_OF[fast] = fast, plain
    return _FAST_OF[plain]


def fused(fn):
    """compiled(fn), made once per function (focus.selection_on_rows inside the first graph of a FOCUS step)."""
    if fn not in _FUSED:
        _FUSED[fn] = compiled(fn)
    return _FUSED[fn]


def compiled(fn):
    """torch.compile(fn, dynamic=True), falling back to fn (with one warning) where compilation fails."""
    name = fn.__name__
    try:
        fast = torch.compile(fn, dynamic=True)
    except Exception as e:  # e.g. torch.compile unsupported on this Python
        warnings.warn(f"torch.compile unavailable for {name} ({type(e).__name__}); using the plain version")
        return fn
    state = {"fn": fast}

    @functools.wraps(fn)
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
# Attention of ragged rows.

def ragged_attention(plain, q, layer: int, rows, cache, scale: float):
    """model.cached_attention (`plain`), or a kernel that serves the same rows faster on CUDA in half precision.
    The plain path lays the rows on an (A, q_max) grid and gives SDPA an (A, queries, keys) mask, which sends it
    to a masked kernel over the whole grid; served, a FOCUS step's kept rows fill about a fifth of it (a sequence
    at its block's first step keeps all 32). use_attention() picks (see attention_kernel):
    - "varlen" (the default): flash attention's variable-length kernel on the rows as they are packed, each
      sequence's keys read in place from the cache up to its key end: no grid, no mask (varlen_rows);
    - "flex": FlexAttention, each row's key end applied to the scores, compiled per graph shape (flex_rows);
    - "mask": the plain path."""
    kind = attention_kernel(rows, q, cache)
    try:
        if kind == "varlen":
            return varlen_rows(q, layer, rows, cache, scale, flash_varlen)
        if kind == "flex":
            keys, values = cache.read(layer, rows)
            return flex_rows(q, keys, values, rows.line, rows.place, rows.key_end, rows.q_max, scale, compiled_flex())
    except Exception as e:  # the kernel is not built into this torch, or refuses this GPU
        warnings.warn(f"{kind} attention unavailable ({type(e).__name__}: {e}); using SDPA with a mask")
        _ATTENTION["kind"] = "mask"
    return plain(q, layer, rows, cache, scale)


def attention_kernel(rows, q, cache) -> str:
    """Which kernel ragged_attention runs for these rows: "mask" (the plain path) unless the rows are ragged (dense
    ones need no mask: SDPA's flash kernel), on CUDA, in half precision; then use_attention's choice where it
    applies. varlen: every row of a sequence has the same key end (a decode step; a prefill's rows end at their
    own blocks), head_dim a multiple of 8 up to 256, the cache's offsets within int32. flex: inside a graph's
    function only (it compiles per shape; the graphs' shapes come from a few buckets)."""
    kind = _ATTENTION["kind"]
    if kind == "mask" or rows.dense or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return "mask"
    if kind == "varlen":
        dim = q.shape[-1]
        fits = dim % 8 == 0 and dim <= 256 and cache.k[0].numel() // dim < 2 ** 31
        return "varlen" if rows.key_end_per_seq and fits else "mask"
    return "flex" if _IN_GRAPH[0] > 0 and compiled_flex() is not None else "mask"


_ATTENTION = {"kind": "varlen"}
ATTENTION_KERNELS = ("varlen", "flex", "mask")


def use_attention(kind: str):
    """The kernel for ragged rows under fast_paths on CUDA: "varlen" (the default), "flex" or "mask" (SDPA with a
    mask, the plain path). Serving SDAR-8B on an H200, FlexAttention made every mode's steps 19-48% slower than
    the mask; results/README.md has varlen's measurements."""
    if kind not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kind!r}: one of {', '.join(ATTENTION_KERNELS)}")
    _ATTENTION["kind"] = kind


def varlen_rows(q, layer: int, rows, cache, scale: float, attend):
    """cached_attention's result through a variable-length attention kernel (`attend`: flash_varlen, or a slow
    reference in the tests). q (T, heads, head_dim) -> (T, heads, head_dim). The batch is one short sequence per
    (line, kv head): that kv head's query heads stacked over the line's rows, so each kv head's keys are read once
    for all its query heads (as cached_attention stacks them). The keys stay where they are: the layer's cache
    (slots, kv_heads, len, head_dim) seen as (slots * kv_heads * len, 1, head_dim), where the keys of (slot, kv
    head h) start at row (slot * kv_heads + h) * len; each sequence reads its first key_end of them."""
    heads, dim = q.shape[1:]
    if ("varlen", heads) not in rows._layouts:  # made by the first layer, reused by the others
        rows._layouts["varlen", heads] = varlen_layout(rows, heads, cache.k.shape[2], cache.max_len)
    order, cu_q, cu_k, key_len, max_q = rows._layouts["varlen", heads]
    packed = q.new_empty(q.shape[0] * heads, 1, dim)
    packed[order] = q.reshape(-1, 1, dim)
    keys, values = cache.k[layer].view(-1, 1, dim), cache.v[layer].view(-1, 1, dim)  # no copy
    out = attend(packed, keys, values, cu_q, cu_k, key_len, max_q, rows.kv_max, scale)
    return out[order].view(q.shape)


def varlen_layout(rows, heads: int, kv_heads: int, cache_len: int):
    """varlen_rows' batch. Returns order (T * heads,): where (row, head) sits among the packed queries; cu_q
    (A * kv_heads + 1,) int32: each sequence's first packed query, then the total; cu_k (A * kv_heads + 1,)
    int32: each sequence's first key row in the cache (the last entry unused); key_len (A * kv_heads,) int32:
    its key end; max_q: a bound on a sequence's packed queries. No host sync."""
    per_kv = heads // kv_heads
    n_lines, dev = len(rows.active), rows.seq.device
    counts = torch.zeros(n_lines, dtype=torch.long, device=dev).index_add_(0, rows.line, torch.ones_like(rows.line))
    starts = counts.cumsum(0) - counts                                     # each line's first row
    rank = torch.arange(rows.num_rows, device=dev) - starts[rows.line]     # each row's index in its line (not
    head = torch.arange(heads, device=dev)                                 # .place: a graph's padding rows have 0)
    # (line, kv head h) holds query heads h*per_kv.. stacked: query head j of row r at heads*start + j*count + rank
    order = (heads * starts[rows.line, None] + head * counts[rows.line, None] + rank[:, None]).flatten()
    kv = torch.arange(kv_heads, device=dev)
    first_query = heads * starts[:, None] + kv * per_kv * counts[:, None]  # (A, kv_heads)
    first_key = (rows.active[:, None] * kv_heads + kv) * cache_len         # (A, kv_heads)
    total = torch.full((1,), rows.num_rows * heads, device=dev)            # (not torch.tensor: a graph can't copy)
    cu_q = torch.cat([first_query.flatten(), total]).to(torch.int32)
    cu_k = torch.cat([first_key.flatten(), total]).to(torch.int32)
    key_end = torch.zeros(n_lines, dtype=torch.long, device=dev).scatter_(0, rows.line, rows.key_end)
    key_len = key_end[:, None].expand(n_lines, kv_heads).flatten().to(torch.int32)
    # In a graph the padding rows (fewer than a bucket step) all sit in the spare slot's line.
    most_rows = max(rows.q_max, _bucket_step(rows.num_rows)) if _IN_GRAPH[0] else rows.q_max
    return order, cu_q, cu_k, key_len, max(per_kv * most_rows, 2)  # (1 would take flash's one-query path)


def flash_varlen(q, k, v, cu_q, cu_k, key_len, max_q: int, max_k: int, scale: float):
    """Flash attention's variable-length forward (aten's FlashAttention-2), no mask: sequence b's queries are
    q[cu_q[b]:cu_q[b+1]] and its keys k[cu_k[b]:cu_k[b] + key_len[b]] (with seqused_k only cu_k's starts are
    read, so the sequences may sit anywhere in k, in any order). q (Q, heads, d); k, v (K, kv_heads, d)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                   scale=scale, seqused_k=key_len)[0]


@contextlib.contextmanager
def graph_shapes():
    """Inside: a graph's function runs (its warm-up, its capture, or capture=False), on its bucketed shapes."""
    _IN_GRAPH[0] += 1
    try:
        yield
    finally:
        _IN_GRAPH[0] -= 1


_IN_GRAPH = [0]


def flex_rows(q, keys, values, line, place, key_end, q_max: int, scale: float, attend):
    """cached_attention's result by FlexAttention (`attend`: flex_attention, compiled or not). q (T, heads,
    head_dim) at (line, place) of an (A, q_max) query grid; keys, values (A, kv_heads, kv_max, head_dim); row r
    reads the keys at positions < key_end[r]. (Only flex_attention is compiled: with the grid's scatter inside
    the compiled function, torch 2.11's result was wrong.)"""
    grid = q.new_zeros(keys.shape[0], q_max, *q.shape[1:])           # (A, q_max, heads, head_dim)
    grid[line, place] = q
    ends = torch.ones(keys.shape[0], q_max, dtype=key_end.dtype, device=q.device)  # padding places: key 0
    ends[line, place] = key_end

    def within_key_end(score, seq, head, query, key):
        return torch.where(key < ends[seq, query], score, -float("inf"))
    out = attend(grid.transpose(1, 2), keys, values, score_mod=within_key_end, scale=scale, enable_gqa=True,
                 kernel_options=flex_kernel_options(q.shape[1] // keys.shape[1], q_max))
    return out.transpose(1, 2)[line, place]


def flex_kernel_options(heads_per_kv: int, q_max: int):
    """FlexAttention's kernel for short queries (flex decoding) stacks a kv head's query heads x q_max rows in
    one tile. On an H200 (torch 2.11) it was 1.3-2x faster than SDPA with a mask up to 64 stacked rows and
    12-35x slower from 128 on (SDAR-8B's 4 heads x 32 rows: 21 ms a layer against SDPA's 1.8, the stall of
    results/README.md); there the general kernel runs (1.6 ms)."""
    return {"FORCE_USE_FLEX_ATTENTION": True} if heads_per_kv * q_max >= 128 else None


def compiled_flex():
    """flex_attention compiled, made on first use (importing torch.compile's machinery takes seconds); None where
    this torch has no FlexAttention or no torch.compile. Static shapes (dynamic shapes ran 2-4x slower): one
    compilation per shape the graphs meet, which their buckets bound to a few dozen, so dynamo's default limit
    of 8 recompilations is raised."""
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        except Exception:
            _FLEX["fn"] = None
    return _FLEX["fn"]


_FLEX = {}


# ---------------------------------------------------------------------------------------------------
# CUDA graphs of a decode step's layers.

_GRAPHED = {}
_STORES = weakref.WeakKeyDictionary()  # KV cache -> its graphs and their memory pool
_CACHES = weakref.WeakKeyDictionary()  # model -> (arguments, the KV cache made with them)
KEY_STEP = 256                         # keys per sequence are padded to a multiple of this
_CAPTURE_SECONDS = {"slots": 0.0, "sequences": 0.0}  # wall time spent capturing graphs (warm-up, capture), by grid


def reused_cache(model, make, *args):
    """make(*args), or the cache that the last call for this model made with equal arguments (one kept per
    model, for as long as the model lives or until release(model))."""
    last = _CACHES.get(model)
    if last is None or last[0] != args:
        _CACHES.pop(model, None)  # free the old one (and its graphs) before making the new one
        _CACHES[model] = last = (args, make(*args))
    return last[1]


def graph_count() -> int:
    """CUDA graphs captured and alive (bench.py reports those captured inside a timed run)."""
    return sum(sum(g.graph is not None for g in store["graphs"].values()) for store in _STORES.values())


def capture_seconds(grid: str | None = None) -> float:
    """Seconds spent capturing CUDA graphs so far, of one grid ("slots": decode steps, "sequences": prefills) or
    all (bench.py reports the share of a timed run)."""
    return _CAPTURE_SECONDS[grid] if grid else sum(_CAPTURE_SECONDS.values())


def release(model):
    """Free the KV cache kept for `model` (and the graphs captured on it)."""
    _CACHES.pop(model, None)


def graphed(fn, capture: bool = True, grid: str = "slots"):
    """fn(model, x, rows, cache, *extra) with CUDA graphs, on CUDA. rows is a model.Rows; cache a model.KVCache
    whose last slot is spare (no sequence uses it); x and the tensors among extra have one entry per row; the
    other values among extra (ints, strings), and the padded shapes, pick the graph. Returns what fn returns,
    one entry per row (an output wrapped in Whole is returned as it is: e.g. per slot, or a NamedTuple of
    tensors): the graph's own buffers, valid until any graph of the same cache runs (they share one
    memory pool, so a graph captured later may hold its outputs where an earlier one keeps its scratch: copy
    what must outlive the next graph). Off CUDA, and for MoE models (their routing syncs with the host), fn
    runs as is. capture=False: the same padded buffers, run eagerly on any device (what a graph computes; for
    tests).

    grid: the attention grid's lines. "slots" (a decode step): one line per cache slot, so a line is its slot
    and the keys are read in place. "sequences" (a prefill: a few sequences of many rows each): one line per
    sequence with rows (their number padded to a power of two) and one for the padding rows, the keys of
    those sequences gathered."""
    if (fn, capture, grid) not in _GRAPHED:
        _GRAPHED[fn, capture, grid] = functools.partial(_graphed_call, fn, capture, grid)
    return _GRAPHED[fn, capture, grid]


def captures(model, device) -> bool:
    """Does graphed() capture CUDA graphs for this model on this device? (CUDA, and not a mixture of experts.)"""
    return torch.device(device).type == "cuda" and not model.config.num_experts


def _graphed_call(fn, capture: bool, grid: str, model, x, rows, cache, *extra):
    args = (x, rows, cache, *extra)
    if capture and not captures(model, rows.pos.device):
        return fn(model, *args)
    spare = cache.k.shape[1] - 1
    # Padded shape: rows in all (buckets), rows per sequence (powers of two), keys (multiples of KEY_STEP),
    # and with grid="sequences" the sequences (powers of two). Every slot with the same rows and keys, and no
    # row padded (lockstep batches: probes, equal prompts): the exact key count, so no attention mask is
    # needed and SDPA's flash kernel runs (one graph per context length).
    padded_rows, per_seq = _bucket(rows.num_rows), 1 << (rows.q_max - 1).bit_length()
    lines = 1 << (len(rows.active) - 1).bit_length() if grid == "sequences" else None
    dense = (lines is None and rows.dense and len(rows.active) == spare
             and (padded_rows, per_seq) == (rows.num_rows, rows.q_max))
    keys = rows.kv_max if dense else min(cache.max_len, -(-rows.kv_max // KEY_STEP) * KEY_STEP)
    shape = (padded_rows, per_seq, keys, lines)
    key = (fn, capture, dense, shape, rows.key_end_per_seq,  # (one key end per sequence: varlen attention)
           tuple(a for a in extra if not isinstance(a, torch.Tensor)),
           tuple((a.shape[1:], a.dtype) for a in args if isinstance(a, torch.Tensor)))
    store = _STORES.setdefault(cache, {"pool": torch.cuda.graph_pool_handle() if capture else None, "graphs": {},
                                       "met": set()})
    graph = store["graphs"].get(key)
    if graph is None and capture and lines is not None and key not in store["met"]:
        store["met"].add(key)  # a prefill's shape is captured when it comes back; met once, it runs as it is
        return fn(model, *args)
    if graph is None or graph.model() is not model:
        graph = store["graphs"][key] = _Graph(fn, model, args, rows, cache, shape, dense, store["pool"], capture)
    return graph.run(args, rows)


def _bucket(n: int) -> int:
    """n rounded up to a step of max(8, 2^(floor(log2 n) - 3)): at most 1/8 of a bucket is padding."""
    step = _bucket_step(n)
    return -(-n // step) * step


def _bucket_step(n: int) -> int:
    return max(8, 1 << max(n.bit_length() - 4, 0))


class _Graph:
    """One captured graph: static input buffers (the padded rows and row tensors), the graph, its outputs."""

    def __init__(self, fn, model, args, rows, cache, shape, dense: bool, pool, capture: bool = True):
        padded, per_seq, keys, self.lines = shape
        dev = rows.pos.device
        self.spare = cache.k.shape[1] - 1
        # The four row tensors in one buffer, filled by one copy (and their padding by one more); the line apart.
        self.row_buffer = torch.zeros(4, padded, dtype=torch.long, device=dev)
        self.seq, self.pos, self.place, self.key_end = self.row_buffer.unbind(0)
        self.row_padding = torch.tensor([[self.spare], [0], [0], [1]], device=dev)   # spare slot, position 0, 1 key
        self.line = torch.zeros(padded, dtype=torch.long, device=dev)
        if self.lines is None:  # every cache slot has a line (line = slot), the spare one too unless dense
            layout = dict(line=self.seq, active=torch.arange(self.spare if dense else self.spare + 1, device=dev),
                          all_slots=True)
        else:                   # a line per sequence, then one for the padding rows (lines without rows: unused)
            self.active = torch.full((self.lines + 1,), self.spare, dtype=torch.long, device=dev)
            layout = dict(line=self.line, active=self.active, all_slots=False)
        self.rows = dataclasses.replace(rows, seq=self.seq, pos=self.pos, place=self.place, key_end=self.key_end,
                                        q_max=per_seq, kv_max=keys, dense=dense, _layouts={}, **layout)
        # The cache only weakly: it keys the store this graph lives in, which must not keep it alive.
        self.args = [self.rows if a is rows else a.new_zeros((padded, *a.shape[1:])) if isinstance(a, torch.Tensor)
                     else weakref.proxy(a) if a is cache else a for a in args]
        self.model = weakref.ref(model)
        self.fn, self.graph = fn, None
        if not capture:
            return
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.fill(args, rows)
        side = torch.cuda.Stream()  # warm-up outside the capture: compilation, library workspaces
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), graph_shapes():
            fn(model, *self.args)
        torch.cuda.current_stream().wait_stream(side)
        self.rows._layouts.clear()  # the attention mask (or layout) is made from the buffers inside the graph, not kept
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), graph_shapes():
            out = fn(model, *self.args)
        self.out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        torch.cuda.synchronize()
        _CAPTURE_SECONDS["slots" if self.lines is None else "sequences"] += time.perf_counter() - t0

    def fill(self, args, rows):
        """Copy a step's rows and row tensors into the buffers; padding rows go to the spare slot, position 0,
        where they see one key."""
        n = rows.num_rows
        self.row_buffer[:, :n] = torch.stack([rows.seq, rows.pos, rows.place, rows.key_end])
        self.row_buffer[:, n:] = self.row_padding
        if self.lines is not None:  # padding rows in the last line
            self.line[:n], self.line[n:] = rows.line, self.lines
            self.active[:len(rows.active)] = rows.active
        for buf, a in zip(self.args, args):
            if isinstance(a, torch.Tensor):
                buf[:n] = a

    def run(self, args, rows):
        self.fill(args, rows)
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:  # capture=False: the padded computation, eagerly
            self.rows._layouts.clear()
            with graph_shapes():
                out = self.fn(self.model(), *self.args)
            out = (out,) if isinstance(out, torch.Tensor) else out
        out = tuple(o if isinstance(o, Whole) else o[:rows.num_rows] for o in out)
        return out[0] if len(out) == 1 else out


class Whole(NamedTuple):
    """A graphed function's output that is not one entry per row, returned whole (not cut to the rows)."""
    value: object


# ---------------------------------------------------------------------------------------------------
# Mixture of experts.

def batched_experts(experts, x, expert, token, weight):
    """model.experts_loop's result, (N, hidden) fp32, from two batched matrix products. x (N, hidden); expert,
    token, weight (N * k,): the (token, expert) pairs sorted by expert, with their router weights. Each expert's
    rows go to its line of a zero-padded (E, most rows of any expert, hidden) grid, then one batched SwiGLU."""
    num_experts = experts.gate_proj.shape[0]
    counts = torch.bincount(expert, minlength=num_experts)
    first = torch.cumsum(counts, 0) - counts
    place = torch.arange(len(expert), device=x.device) - first[expert]   # the pair's place in its expert's line
    grid = x.new_zeros(num_experts, int(counts.max()), x.shape[1])
    grid[expert, place] = x[token]
    h = torch.nn.functional.silu(grid @ experts.gate_proj.transpose(1, 2)) * (grid @ experts.up_proj.transpose(1, 2))
    y = (h @ experts.down_proj.transpose(1, 2))[expert, place]            # (N * k, hidden)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y.float() * weight[:, None])
