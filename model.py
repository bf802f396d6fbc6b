"""The SDAR block-diffusion transformer (Qwen3 architecture) and its decode cache. Checkpoints: checkpoint/.

One network class covers three checkpoint types: dense SDAR (Qwen3 layers), SDAR-MoE (Qwen3-MoE layers:
`MoE` in place of `MLP` where the config says) and LLaDA2.0 (the same with a grouped sigmoid router, a
shared expert and RoPE on half of each head).

Three ways to run it, from slow-and-obvious to fast:
- `model(input_ids, block_size=32)`: the spec form. Logits for every position of a full sequence under
  block-causal attention: position p is in block p // block_size and sees its whole block and every
  earlier block. Every faster path is tested against it.
- `model.forward_rows(ids, rows, cache)`: the decode path. Only the listed token rows are computed; their
  keys and values are written in place into a preallocated KV cache and the rows attend to the cache.
- `focus.forward_focus(...)`: the same rows, with FOCUS evicting tokens after layer 1.
This file is the plain PyTorch a reader follows. kernels.py holds the fast paths of `--compile`, each tested
against it: the decode layers as CUDA graphs (`graphs=True` of forward_rows and focus.forward_focus), and
fused versions of the small functions that modules call through an attribute (RMSNorm.norm, Attention.apply_rope,
MLP.act, Experts.act, MoE.run_experts), which `with kernels.fast_paths(model):` swaps in.

Unlike an autoregressive model there is no shift: the logits at a masked position are the distribution of
the token at that same position.

Letters in shape comments: T rows computed by a step, A sequences with rows (active), S cache slots,
R rows that get logits, E experts, N tokens routed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class ModelConfig:
    # Field names are the checkpoint's own (config.json of SDAR / Qwen3).
    vocab_size: int = 4096
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = "sdar"
    torch_dtype: str = "bfloat16"
    block_size: int = 32
    mask_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Mixture of experts (model_type sdar_moe: Qwen3-MoE; llada2_moe: LLaDA2.0). 0 experts: a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False          # top-k weights renormalised to sum to 1
    decoder_sparse_step: int = 1          # sdar_moe: layer i is MoE when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] | None = None  # ... and i is not listed here
    first_k_dense_replace: int = 0        # llada2_moe: the first k layers are dense
    num_shared_experts: int = 0           # experts every token goes through, beside the routed ones
    score_function: str = "softmax"       # router: softmax (Qwen3-MoE) or sigmoid (LLaDA2.0)
    moe_router_enable_expert_bias: bool = False  # a per-expert bias added to the scores for the choice only
    n_group: int = 1                      # group-limited routing: experts in n_group groups, tokens use the
    topk_group: int = 1                   # topk_group best groups (by the sum of each group's top 2 scores)
    routed_scaling_factor: float = 1.0
    partial_rotary_factor: float = 1.0    # RoPE on the first head_dim x factor dimensions only
    block_size_named = True  # not a field: False where a checkpoint's files name no block_size (checkpoint.read_config)

    MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers", "first_k_dense_replace", "num_shared_experts",
                  "score_function", "moe_router_enable_expert_bias", "n_group", "topk_group",
                  "routed_scaling_factor", "partial_rotary_factor")

    def is_moe_layer(self, i: int) -> bool:
        if self.num_experts == 0:
            return False
        if self.model_type == "llada2_moe":
            return i >= self.first_k_dense_replace
        return i not in (self.mlp_only_layers or []) and (i + 1) % self.decoder_sparse_step == 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.num_experts == 0:
            d = {k: v for k, v in d.items() if k not in self.MOE_FIELDS}
        d["architectures"] = [{"sdar": "SDARForCausalLM", "sdar_moe": "SDARMoeForCausalLM",
                               "llada2_moe": "LLaDA2MoeModelLM"}.get(self.model_type, "SDARForCausalLM")]
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.norm = rms_norm  # kernels.fast_paths swaps in a fused version

    def forward(self, x):
        return self.norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    """Qwen3's RMSNorm: normalised in fp32, rounded back to x's dtype, then scaled."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_tables(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin for rotary embeddings at the given positions: two tensors (*positions.shape, rotary_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32) / rotary_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., rotary_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (..., heads, head_dim); cos, sin: (..., rotary_dim). The Qwen 'rotate half' convention on the first
    rotary_dim dimensions of each head; the rest pass unchanged (partial RoPE, LLaDA2.0: half of them)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    half = rot // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # per head, before RoPE (Qwen3)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.apply_rope = apply_rope  # kernels.fast_paths swaps in a fused version
        self.attend = cached_attention  # kernels.fast_paths: flash attention's varlen kernel for ragged rows (CUDA)

    def qkv(self, x, cos, sin):
        """x: (..., hidden) -> q (..., heads, head_dim), k and v (..., kv_heads, head_dim); q, k post-norm, post-RoPE."""
        lead = x.shape[:-1]
        q = self.q_norm(self.q_proj(x).view(*lead, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(*lead, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(*lead, self.n_kv_heads, self.head_dim)
        return self.apply_rope(q, cos, sin), self.apply_rope(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = swiglu  # kernels.fast_paths swaps in a fused version

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


def swiglu(gate, up):
    """SwiGLU's gating: silu(gate) * up."""
    return F.silu(gate) * up


class Router(nn.Module):
    """Picks num_experts_per_tok experts per token and their weights, in fp32.

    Qwen3-MoE: softmax over all experts, top-k, optionally renormalised. LLaDA2.0: sigmoid scores; the
    choice adds a learned per-expert bias and is limited to the topk_group best of n_group groups (a group
    scores the sum of its two best experts); the weights are the unbiased scores of the chosen experts,
    renormalised and multiplied by routed_scaling_factor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        self.expert_bias = (nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
                            if cfg.moe_router_enable_expert_bias else None)

    def forward(self, x):
        """x (N, hidden) -> weights (N, k) fp32 and expert ids (N, k)."""
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())                     # (N, experts)
        scores = logits.sigmoid() if c.score_function == "sigmoid" else logits.softmax(-1)
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
        if c.n_group > 1:
            groups = choice.view(len(x), c.n_group, -1)                        # (N, groups, experts per group)
            best = groups.topk(2, dim=-1).values.sum(-1).topk(c.topk_group, dim=-1).indices
            allowed = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = groups.masked_fill(~allowed[..., None], float("-inf")).flatten(1)
        experts = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, experts)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, experts


class Experts(nn.Module):
    """num_experts SwiGLU MLPs with their weights stacked: gate_proj and up_proj (E, inner, hidden), down_proj
    (E, hidden, inner). Checkpoints hold one tensor per expert (experts.{e}.gate_proj.weight, ...), which
    checkpoint/ reads into and writes from the slices."""

    def __init__(self, num_experts: int, hidden_size: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(num_experts, inner, hidden_size) * hidden_size ** -0.5)
        self.up_proj = nn.Parameter(torch.randn(num_experts, inner, hidden_size) * hidden_size ** -0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden_size, inner) * inner ** -0.5)
        self.act = swiglu  # kernels.fast_paths swaps in a fused version

    def forward(self, e: int, x):
        """Expert e on rows x (n, hidden) -> (n, hidden)."""
        return F.linear(self.act(F.linear(x, self.gate_proj[e]), F.linear(x, self.up_proj[e])), self.down_proj[e])


def experts_loop(experts: Experts, x, expert, token, weight):
    """The routed experts' weighted sum for every token, (N, hidden) fp32: each expert runs once, on all of
    its tokens. x (N, hidden); expert, token, weight (N * k,): the (token, expert) pairs sorted by expert."""
    counts = torch.bincount(expert, minlength=experts.gate_proj.shape[0]).tolist()  # one host sync
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, (rows, w) in enumerate(zip(token.split(counts), weight.split(counts))):
        if len(rows):
            out.index_add_(0, rows, experts(e, x[rows]).float() * w[:, None])
    return out


class MoE(nn.Module):
    """Mixture-of-experts MLP: each token goes through its k routed experts (SwiGLU MLPs of
    moe_intermediate_size), weighted by the router, plus the shared experts if any.

    Dispatch: the (token, expert) pairs are sorted by expert, so each expert runs once on all of its tokens
    (experts_loop: a loop over experts, never over tokens). With `--compile` all experts run in two batched
    matrix products instead (kernels.batched_experts), with the same result. An evicted FOCUS
    token is not among the rows at all, so it skips the experts of later layers like everything else."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        self.run_experts = experts_loop  # kernels.fast_paths swaps in kernels.batched_experts

    def forward(self, x):
        lead, hidden = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, hidden)
        weights, experts = self.gate(x)                                       # (N, k) each
        expert, order = experts.flatten().sort(stable=True)                   # pairs grouped by expert
        token = order // experts.shape[1]
        weight = weights.flatten()[order]
        out = self.run_experts(self.experts, x, expert, token, weight).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(*lead, hidden)


class Block(nn.Module):
    """One decoder layer, split where FOCUS needs to step in: qkv() then finish()."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def qkv(self, x, cos, sin):
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

    def attend(self, q, layer: int, rows: "Rows", cache: "KVCache"):
        """The rows' queries q (T, heads, head_dim) over the cache of layer `layer` (cached_attention)."""
        return self.self_attn.attend(q, layer, rows, cache, self.self_attn.scale)

    def finish(self, x, attn):
        """x: residual stream (..., hidden); attn: attention output (..., heads, head_dim)."""
        x = x + self.self_attn.o_proj(attn.flatten(-2))
        return x + self.mlp(self.post_attention_layernorm(x))


def block_causal_mask(positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """(S, S) bool, True where query i may attend key j: key's block <= query's block."""
    blocks = positions // block_size
    return blocks[None, :] <= blocks[:, None]


# ---------------------------------------------------------------------------------------------------
# Decode path: a preallocated KV cache and packed rows.

class KVCache:
    """Keys and values of every layer for `batch` sequence slots of up to `max_len` positions.

    Preallocated once; a step writes its rows' keys/values in place at their positions. The active block
    lives in the cache too: positions a step does not compute keep what an earlier step wrote there
    (the delayed cache and FOCUS rely on that).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def write(self, layer: int, rows: "Rows", k, v):
        """k, v: (T, kv_heads, head_dim) for the T rows."""
        self.k[layer, rows.seq, :, rows.pos] = k
        self.v[layer, rows.seq, :, rows.pos] = v

    def read(self, layer: int, rows: "Rows"):
        """The keys and values the rows' sequences may read: (A, kv_heads, kv_max, head_dim) each."""
        if rows.all_slots:  # the active sequences are slots 0..A-1: a view, no copy
            return self.k[layer, :len(rows.active), :, :rows.kv_max], self.v[layer, :len(rows.active), :, :rows.kv_max]
        return self.k[layer, rows.active, :, :rows.kv_max], self.v[layer, rows.active, :, :rows.kv_max]


@dataclass
class Rows:
    """The tokens one forward pass computes, packed over the batch: T rows, ordered by sequence then position.

    For attention the rows are laid out padded, one line per active sequence: row r sits at
    (line[r], place[r]) of an (A, q_max) grid, and sees the cached keys at positions < key_end[r].
    """
    seq: torch.Tensor      # (T,) cache slot of each row's sequence
    pos: torch.Tensor      # (T,) absolute position
    line: torch.Tensor     # (T,) the grid line of the row's sequence: its index among the active ones
    place: torch.Tensor    # (T,) the row's index within its sequence
    key_end: torch.Tensor  # (T,) the row attends to keys at positions < key_end
    active: torch.Tensor   # (A,) cache slots of the sequences with rows, ascending
    q_max: int
    kv_max: int
    all_slots: bool        # the active sequences are exactly cache slots 0..A-1
    dense: bool            # every sequence has q_max rows and one shared key_end: no mask needed
    key_end_per_seq: bool  # all rows of a sequence share their key_end (a decode step's block; not a prefill)
    _layouts: dict = field(default_factory=dict, repr=False)  # attention masks (or layouts), made once a step

    @property
    def num_rows(self) -> int:
        return self.seq.shape[0]

    @staticmethod
    def build(seq, pos, key_end, num_slots: int) -> "Rows":
        """seq, pos, key_end: (T,) with rows grouped by sequence (seq ascending), T >= 1. Syncs once with the host,
        for the layout's sizes (a decode step reads them ahead instead: Rows.lay_out, RowsAhead.sized)."""
        if len(seq) == 0:
            raise ValueError("Rows.build: no rows (a step computes at least one row of each live sequence)")
        ahead = Rows.lay_out(seq, pos, key_end, num_slots)
        ends_max = key_end.new_zeros(num_slots).scatter_reduce(0, seq, key_end, "amax")
        ends_min = key_end.new_zeros(num_slots).scatter_reduce(0, seq, key_end, "amin", include_self=False)
        return ahead.sized(len(seq), layout_sizes(ahead.counts, ends_max, ends_min).tolist())

    @staticmethod
    def lay_out(seq, pos, key_end, num_slots: int) -> "RowsAhead":
        """build's device side, no host sync. The rows may be followed by padding rows in slot num_slots, so that a
        step's rows are laid out before the host knows how many there are (Decoder.plan_on_device): padding
        comes last, so the rows before it get the layout they would get alone."""
        counts, line, place = ragged_layout(seq, num_slots + 1)
        counts = counts[:num_slots]
        active = torch.nonzero_static(counts > 0, size=num_slots).squeeze(1)   # the first n_active are the slots
        return RowsAhead(seq, pos, line, place, key_end, active, counts)

    def attention_mask(self, heads_per_kv: int):
        """(A, 1, heads_per_kv * q_max, kv_max) bool, True where a query may read a key; None when dense. Built
        on the first layer that asks and reused by every later one."""
        if self.dense:
            return None
        if heads_per_kv not in self._layouts:
            ends = torch.ones(len(self.active), self.q_max, dtype=torch.long, device=self.pos.device)  # padding: key 0
            ends[self.line, self.place] = self.key_end
            mask = torch.arange(self.kv_max, device=self.pos.device) < ends[:, None, :, None]  # (A, 1, q_max, kv_max)
            self._layouts[heads_per_kv] = mask.repeat(1, 1, heads_per_kv, 1)
        return self._layouts[heads_per_kv]

    def take(self, keep: torch.Tensor, key_end: torch.Tensor, num_slots: int) -> "Rows":
        """The subset of rows at indices `keep` (ascending), with new key ends."""
        return Rows.build(self.seq[keep], self.pos[keep], key_end, num_slots)


class RowsAhead(NamedTuple):
    """Rows laid out on the device (Rows.lay_out) before the host knows their sizes: the first T of each (T, at
    most the padded count) are the rows'; active holds the slots with rows first."""
    seq: torch.Tensor
    pos: torch.Tensor
    line: torch.Tensor
    place: torch.Tensor
    key_end: torch.Tensor
    active: torch.Tensor
    counts: torch.Tensor   # (S,) rows per slot

    def sized(self, num_rows: int, sizes) -> Rows:
        """The Rows of the first num_rows rows, given layout_sizes' list: slices (views), no kernel runs."""
        n_active, q_max, c_min, kv_max, k_min, uneven = sizes
        return Rows(self.seq[:num_rows], self.pos[:num_rows], self.line[:num_rows], self.place[:num_rows],
                    self.key_end[:num_rows], self.active[:n_active], q_max, kv_max,
                    all_slots=n_active == len(self.counts), dense=(q_max == c_min and kv_max == k_min),
                    key_end_per_seq=not uneven)


def layout_sizes(counts, key_end_max, key_end_min):
    """What Rows.build reads from the host, as one (6,) tensor, from each slot's row count and the largest and
    smallest key end of its rows (S,) each: the sequences with rows, the most rows and the fewest (of those with
    any), the largest and smallest key end, and whether some sequence's rows end at different keys. A caller that
    must sync anyway reads them in the same sync (Decoder.plan, focus.compact_step)."""
    present = counts > 0
    most = torch.iinfo(counts.dtype).max
    return torch.stack([present.sum(), counts.max(), counts.masked_fill(~present, most).min(),
                        key_end_max.masked_fill(~present, 0).max(), key_end_min.masked_fill(~present, most).min(),
                        ((key_end_max != key_end_min) & present).any()])


def ragged_layout(seq: torch.Tensor, num_slots: int):
    """For rows grouped by sequence, seq (T,) ascending over cache slots 0..num_slots-1 -> each slot's row count
    (S,), and each row's cell in a padded (slots with rows x most rows) grid: its line (T,), its slot's index
    among the slots with rows, and its place in the line (T,). No host sync."""
    counts = torch.zeros(num_slots, dtype=torch.long, device=seq.device).index_add_(0, seq, torch.ones_like(seq))
    line = ((counts > 0).cumsum(0) - 1)[seq]
    starts = counts.cumsum(0) - counts                                      # each slot's first row
    place = torch.arange(len(seq), device=seq.device) - starts[seq]
    return counts, line, place


def cached_attention(q, layer: int, rows: Rows, cache: KVCache, scale: float):
    """q: (T, heads, head_dim) -> (T, heads, head_dim). Keys/values for this step must be in the cache.

    Grouped-query attention without copying the cache: the query heads that share a kv head are stacked
    along the query axis, so each kv head is read once, as is, by whichever SDPA kernel runs."""
    n_active, kv_heads = len(rows.active), cache.k.shape[2]
    heads_per_kv = q.shape[1] // kv_heads                    # query heads per kv head (GQA)
    keys, values = cache.read(layer, rows)                   # (A, kv_heads, kv_max, head_dim) each
    grid = q.new_zeros(n_active, rows.q_max, *q.shape[1:])   # (A, q_max, heads, head_dim)
    grid[rows.line, rows.place] = q
    grid = grid.view(n_active, rows.q_max, kv_heads, heads_per_kv, -1).permute(0, 2, 3, 1, 4)
    grid = grid.reshape(n_active, kv_heads, heads_per_kv * rows.q_max, -1)  # head h = kv head h // heads_per_kv
    mask = rows.attention_mask(heads_per_kv)
    out = F.scaled_dot_product_attention(grid, keys, values, attn_mask=mask, scale=scale)
    out = out.view(n_active, kv_heads, heads_per_kv, rows.q_max, -1).permute(0, 3, 1, 2, 4)  # (A, q_max, kv, per kv, d)
    return out.reshape(n_active, rows.q_max, q.shape[1], -1)[rows.line, rows.place]


# ---------------------------------------------------------------------------------------------------

class SDAR(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, positions):
        c = self.config
        return rope_tables(positions, c.rotary_dim, c.rope_theta, self.embed_tokens.weight.dtype)

    def forward(self, input_ids, block_size: int | None = None, position_ids=None, attn_mask=None):
        """The spec form. input_ids (B, S) -> logits (B, S, vocab).

        Either block_size (block-causal attention over positions 0..S-1) or an explicit attn_mask
        (bool, (S, S) or (B, S, S), True = may attend) with position_ids (B, S), as training uses.
        """
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        if attn_mask is None:
            attn_mask = block_causal_mask(torch.arange(S, device=input_ids.device), block_size or self.config.block_size)
        mask = attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask  # broadcast over heads
        cos, sin = self.rope(position_ids)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            q, k, v = layer.qkv(x, cos, sin)  # (B, S, heads, head_dim)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask, scale=layer.self_attn.scale, enable_gqa=True)
            x = layer.finish(x, attn.transpose(1, 2))
        return self.lm_head(self.norm(x))

    def forward_rows(self, input_ids, rows: Rows, cache: KVCache, logits_for=None, graphs: bool = False,
                     grid: str = "slots"):
        """The decode path. input_ids (T,) at rows -> logits (R, vocab) for the rows indexed by logits_for
        (all rows when None). Every layer writes the rows' keys/values into the cache, then attends.
        graphs: the layers as a CUDA graph (kernels.graphed, with its attention `grid`; on CUDA, for a cache
        with a spare slot)."""
        layers = kernels.graphed(SDAR.decode_layers, grid=grid) if graphs else SDAR.decode_layers
        x = layers(self, self.embed_tokens(input_ids), rows, cache, 0, len(self.layers))
        return self.logits(x, logits_for)

    def decode_layers(self, x, rows: Rows, cache: KVCache, start: int, stop: int):
        """Layers start..stop-1 of the decode path on the rows' hidden states x (T, hidden) -> (T, hidden).
        (kernels.graphed runs this as a CUDA graph.)"""
        cos, sin = self.rope(rows.pos)
        for i in range(start, stop):
            x = self.layer_rows(i, x, cos, sin, rows, cache)
        return x

    def layer_rows(self, i: int, x, cos, sin, rows: Rows, cache: KVCache):
        layer = self.layers[i]
        q, k, v = layer.qkv(x, cos, sin)
        cache.write(i, rows, k, v)
        return layer.finish(x, layer.attend(q, i, rows, cache))

    def logits(self, x, index=None):
        if index is not None:
            x = x[index]
        return self.lm_head(self.norm(x))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """The paper's per-layer cost for one query token, 8h^2 + 4 d_ff h + 4 h L, summed over layers,
    with the projections counted at their real (GQA) sizes: 2 * (params of q,k,v,o) + 6 h d_ff + 4 H d L.
    An MoE layer counts the experts a token goes through (k routed + shared) and the router."""
    h, d = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    proj = 2 * (h * d * 2 + h * kv * 2)
    moe = 6 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.num_shared_experts) + 2 * h * cfg.num_experts
    mlp = sum(moe if cfg.is_moe_layer(i) else 6 * h * cfg.intermediate_size for i in range(cfg.num_hidden_layers))
    return cfg.num_hidden_layers * (proj + 4 * d * context) + mlp
