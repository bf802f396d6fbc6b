"""The SDAR block-diffusion transformer (Qwen3 architecture) and its checkpoint.

Three ways to run it, from slow-and-obvious to fast:
- `model(input_ids, block_size=32)`: the spec form. Logits for every position of a full sequence under
  block-causal attention: position p is in block p // block_size and sees its whole block and every
  earlier block. Every faster path is tested against it.
- `model.forward_rows(ids, rows, cache)`: the decode path. Only the listed token rows are computed; their
  keys and values are written in place into a preallocated KV cache and the rows attend to the cache.
- `focus.forward_focus(...)`: the same rows, with FOCUS evicting tokens after layer 1.

Unlike an autoregressive model there is no shift: the logits at a masked position are the distribution of
the token at that same position.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read; the message names the problem and the fix."""


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

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise CheckpointError(f"config.json must hold a JSON object, not a {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type != "sdar":
            raise CheckpointError(f"config.json: model_type {model_type!r} is not supported; this loader "
                                  "reads dense SDAR checkpoints (model_type 'sdar')")
        if d.get("rope_scaling") not in (None, {}) and d["rope_scaling"].get("rope_type", "default") != "default":
            raise CheckpointError(f"config.json: rope_scaling {d['rope_scaling']} is not supported (plain RoPE only)")
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (silu only)")
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.check_values()
        if "head_dim" not in d:
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        return cfg

    def check_values(self):
        """A CheckpointError naming the field for a value of the wrong type or out of range, so that a bad
        config.json fails here and not as a ZeroDivisionError or IndexError deep in the model."""
        def bad(name, want):
            return CheckpointError(f"config.json: {name} must be {want}, got {getattr(self, name)!r}; fix the file")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "block_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a positive integer")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise bad(name, "a positive number")
        if not isinstance(self.torch_dtype, str):
            raise bad("torch_dtype", "a string such as \"bfloat16\"")
        for name in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.mask_token_id is not None and not (is_int(self.mask_token_id) and 0 <= self.mask_token_id < self.vocab_size):
            raise bad("mask_token_id", f"a token id below vocab_size {self.vocab_size}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if self.eos_token_id is not None and not all(is_int(e) and 0 <= e < self.vocab_size for e in eos):
            raise bad("eos_token_id", f"a token id (or a list of them) below vocab_size {self.vocab_size}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["architectures"] = ["SDARForCausalLM"]
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin for rotary embeddings at the given positions: two tensors (*positions.shape, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (..., heads, head_dim); cos, sin: (..., head_dim). The Qwen 'rotate half' convention."""
    half = x.shape[-1] // 2
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

    def qkv(self, x, cos, sin):
        """x: (..., hidden) -> q (..., heads, head_dim), k and v (..., kv_heads, head_dim); q, k post-norm, post-RoPE."""
        lead = x.shape[:-1]
        q = self.q_norm(self.q_proj(x).view(*lead, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(*lead, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(*lead, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    """One decoder layer, split where FOCUS needs to step in: qkv() then finish()."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def qkv(self, x, cos, sin):
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin)

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


@dataclass
class Rows:
    """The tokens one forward pass computes, packed over the batch: T rows, ordered by sequence then position.

    For attention the rows are laid out padded, one line per active sequence: row r sits at
    (group[r], slot[r]) of a (num_active, q_max) grid, and sees the cached keys at positions < key_end[r].
    """
    seq: torch.Tensor      # (T,) cache slot of each row
    pos: torch.Tensor      # (T,) absolute position
    group: torch.Tensor    # (T,) index of the row's sequence among the active ones
    slot: torch.Tensor     # (T,) index of the row within its sequence
    key_end: torch.Tensor  # (T,) the row attends to keys at positions < key_end
    active: torch.Tensor   # (A,) cache slots of the sequences with rows, ascending
    q_max: int
    kv_max: int
    all_slots: bool        # the active sequences are exactly cache slots 0..A-1 of A total
    dense: bool            # every sequence has q_max rows and one shared key_end: no mask needed

    @property
    def num_rows(self) -> int:
        return self.seq.shape[0]

    @staticmethod
    def build(seq, pos, key_end, num_slots: int) -> "Rows":
        """seq, pos, key_end: (T,) with rows grouped by sequence (seq ascending). Syncs once with the host."""
        active, counts, group, slot = ragged_layout(seq)
        q_max, kv_max, k_min, c_min = torch.stack([counts.max(), key_end.max(), key_end.min(), counts.min()]).tolist()
        return Rows(seq, pos, group, slot, key_end, active, q_max, kv_max,
                    all_slots=len(active) == num_slots, dense=(q_max == c_min and kv_max == k_min))

    def take(self, keep: torch.Tensor, key_end: torch.Tensor, num_slots: int) -> "Rows":
        """The subset of rows at indices `keep` (ascending), with new key ends."""
        return Rows.build(self.seq[keep], self.pos[keep], key_end, num_slots)


def ragged_layout(seq: torch.Tensor):
    """For rows grouped by sequence, seq (T,) ascending -> the sequences present (A,), their row counts (A,),
    and each row's place in a padded (A, max count) grid: group (T,) and slot (T,)."""
    active, counts = torch.unique_consecutive(seq, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(len(active), device=seq.device), counts)
    slot = torch.arange(len(seq), device=seq.device) - starts[group]
    return active, counts, group, slot


def cached_attention(q, layer: int, rows: Rows, cache: KVCache, scale: float):
    """q: (T, heads, head_dim) -> (T, heads, head_dim). Keys/values for this step must be in the cache.

    Grouped-query attention without copying the cache: the query heads that share a kv head are stacked
    along the query axis, so each kv head is read once, as is, by whichever SDPA kernel runs."""
    n_active, kv_heads = len(rows.active), cache.k.shape[2]
    group = q.shape[1] // kv_heads
    keys, values = cache.k[layer, :, :, :rows.kv_max], cache.v[layer, :, :, :rows.kv_max]
    if not rows.all_slots:
        keys, values = keys[rows.active], values[rows.active]  # (A, kv_heads, kv_max, head_dim)
    grid = q.new_zeros(n_active, rows.q_max, *q.shape[1:])   # (A, q_max, heads, head_dim)
    grid[rows.group, rows.slot] = q
    grid = grid.view(n_active, rows.q_max, kv_heads, group, -1).permute(0, 2, 3, 1, 4)
    grid = grid.reshape(n_active, kv_heads, group * rows.q_max, -1)  # head h = kv head h // group
    mask = None
    if not rows.dense:
        ends = torch.ones(n_active, rows.q_max, dtype=torch.long, device=q.device)  # padding rows see key 0
        ends[rows.group, rows.slot] = rows.key_end
        mask = torch.arange(rows.kv_max, device=q.device) < ends[:, None, :, None]  # (A, 1, q_max, kv_max)
        mask = mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(grid, keys, values, attn_mask=mask, scale=scale)
    out = out.view(n_active, kv_heads, group, rows.q_max, -1).permute(0, 3, 1, 2, 4)  # (A, q_max, kv, group, d)
    return out.reshape(n_active, rows.q_max, q.shape[1], -1)[rows.group, rows.slot]


# ---------------------------------------------------------------------------------------------------

class SDAR(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, positions):
        c = self.config
        return rope_tables(positions, c.head_dim, c.rope_theta, self.embed_tokens.weight.dtype)

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

    def forward_rows(self, input_ids, rows: Rows, cache: KVCache, logits_for=None):
        """The decode path. input_ids (T,) at rows -> logits (R, vocab) for the rows indexed by logits_for
        (all rows when None). Every layer writes the rows' keys/values into the cache, then attends."""
        cos, sin = self.rope(rows.pos)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = self.layer_rows(i, x, cos, sin, rows, cache)
        return self.logits(x, logits_for)

    def layer_rows(self, i: int, x, cos, sin, rows: Rows, cache: KVCache):
        layer = self.layers[i]
        q, k, v = layer.qkv(x, cos, sin)
        cache.write(i, rows, k, v)
        return layer.finish(x, cached_attention(q, i, rows, cache, layer.self_attn.scale))

    def logits(self, x, index=None):
        if index is not None:
            x = x[index]
        return self.lm_head(self.norm(x))


# ---------------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.json through the `tokenizers` package, plus what tokenizer_config.json and
# generation_config.json say (chat template, EOS ids, mask token).

CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
PLACEHOLDER = "\uE000prompt\uE000"  # private-use characters: no template or prompt text spells them


def _text_only(tok):
    """A copy of a `tokenizers` Tokenizer that never matches an added token: all of them are marked special,
    and special tokens are encoded as the text they spell (encode_special_tokens)."""
    from tokenizers import Tokenizer as HFTokenizer
    spec = json.loads(tok.to_str())
    for added in spec.get("added_tokens", []):
        added["special"] = True
    plain = HFTokenizer.from_str(json.dumps(spec))
    plain.encode_special_tokens = True
    return plain


class Tokenizer:
    def __init__(self, folder: Path, cfg: ModelConfig):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{folder / 'tokenizer.json'} cannot be read ({str(e).splitlines()[0][:200]})") from None
        tok_cfg = _read_json(folder / "tokenizer_config.json", required=False)
        gen_cfg = _read_json(folder / "generation_config.json", required=False)
        self.chat_template = tok_cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # some checkpoints keep named templates
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"   # current checkpoints keep it apart; it wins, as in transformers
        if jinja_file.exists():
            try:
                self.chat_template = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{jinja_file} cannot be read ({e})") from None
        self.enable_thinking = False  # Qwen3-style templates: no thinking block unless asked for
        self.plain = _text_only(self.tok)
        self.mask_id = self._mask_id(cfg, tok_cfg, gen_cfg)
        if not 0 <= self.mask_id < cfg.vocab_size:
            raise CheckpointError(f"mask token id {self.mask_id} is outside the vocabulary (vocab_size "
                                  f"{cfg.vocab_size}); fix mask_token_id in config.json or generation_config.json")
        eos = gen_cfg.get("eos_token_id", cfg.eos_token_id)
        if eos is None and isinstance(tok_cfg.get("eos_token"), str):
            eos = self.tok.token_to_id(tok_cfg["eos_token"])
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
        self.bos_token = tok_cfg.get("bos_token") if isinstance(tok_cfg.get("bos_token"), str) else None

    def _mask_id(self, cfg, tok_cfg, gen_cfg) -> int:
        if cfg.mask_token_id is not None:
            return cfg.mask_token_id
        if gen_cfg.get("mask_token_id") is not None:
            if not isinstance(gen_cfg["mask_token_id"], int):
                raise CheckpointError(f"generation_config.json: mask_token_id must be an integer, "
                                      f"got {gen_cfg['mask_token_id']!r}")
            return gen_cfg["mask_token_id"]
        name = tok_cfg.get("mask_token")
        name = name.get("content") if isinstance(name, dict) else name
        for candidate in (name, "<|MASK|>"):
            if candidate and self.tok.token_to_id(candidate) is not None:
                return self.tok.token_to_id(candidate)
        raise CheckpointError("no mask token: set mask_token_id in config.json or mask_token in tokenizer_config.json")

    def encode(self, text: str) -> list[int]:
        """Control text: special tokens spelled in it (`<|im_end|>`) become those tokens. Not for user text."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """User text: a special token spelled in it stays plain text, so a prompt cannot close its own turn,
        open an assistant turn or plant mask slots."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """A prompt's ids: with chat, the template's own markers are special tokens and the prompt is text."""
        if not chat:
            return self.encode_text(prompt)
        before, after = self.template_pieces()
        return self.encode(before) + self.encode_text(prompt) + self.encode(after)

    def template_pieces(self) -> tuple[str, str]:
        """The chat template rendered around a placeholder and split there: the text before and after the
        user's message."""
        rendered = self.apply_chat_template(PLACEHOLDER)
        if rendered.count(PLACEHOLDER) != 1:
            raise CheckpointError("the chat template does not show the user's message once, as given; "
                                  "fix chat_template in tokenizer_config.json or pass --no-chat")
        before, after = rendered.split(PLACEHOLDER)
        return before, after

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, prompt: str) -> str:
        """One user turn plus the assistant header. Renders the checkpoint's own Jinja template when jinja2
        is installed (in a sandbox: the template comes with the checkpoint), with the variables such
        templates read: messages, add_generation_prompt, enable_thinking (self.enable_thinking, False unless
        set), bos_token, eos_token. Without jinja2: the ChatML format that Qwen/SDAR chat checkpoints use."""
        if self.chat_template:
            try:
                from jinja2 import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                return CHATML.format(prompt=prompt)

            def raise_exception(message):  # templates call it to refuse a conversation
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                return env.from_string(self.chat_template).render(
                    messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                    enable_thinking=self.enable_thinking, bos_token=self.bos_token or "", eos_token="")
            except TemplateError as e:
                raise CheckpointError(f"the chat template cannot be rendered ({e}); fix it or pass --no-chat") from None
        return CHATML.format(prompt=prompt)


# ---------------------------------------------------------------------------------------------------
# Checkpoint: Hugging Face layout, safetensors only.

def _read_json(path: Path, required: bool = True) -> dict:
    if not path.exists():
        if required:
            raise CheckpointError(f"{path} is missing; a checkpoint folder needs config.json, "
                                  "model.safetensors (or shards with model.safetensors.index.json) and tokenizer.json")
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / "model.safetensors"]
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f} is missing (weights are read from safetensors files only)")
    return files


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def load_state(model: SDAR, folder: Path, device, dtype):
    from safetensors import safe_open
    expected = {_hf_name(n): p for n, p in model.named_parameters()}  # tied lm_head appears once, as embed
    seen = set()
    for f in _weight_files(folder):
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None
        with handle:
            for name in handle.keys():
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.config.tie_word_embeddings):
                    continue
                if name not in expected:
                    raise CheckpointError(f"{f.name}: unexpected tensor {name!r} (not part of an SDAR model with this config.json)")
                tensor = handle.get_tensor(name)
                param = expected[name]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise CheckpointError(f"{f.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                          f"config.json implies {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(tensor.to(dtype))
                seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{folder}: missing tensors {', '.join(missing[:3])}{more}")


def _resolve_dtype(dtype, cfg: ModelConfig, device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 matrix products are slow on most CPUs: compute in fp32 there.
        return torch.float32 if torch.device(device).type == "cpu" else getattr(torch, cfg.torch_dtype, torch.bfloat16)
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return names[dtype]


def resolve_device(name: str) -> str:
    """--device as given (auto, cpu, cuda, cuda:N) -> the device to use. The one device check every entry
    point shares; raises ValueError with a one-line message."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available; use --device cpu")
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return name
    raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")


def load(path, device="cpu", dtype=None):
    """Load an SDAR checkpoint folder (Hugging Face layout) -> (model, tokenizer). Raises CheckpointError."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; pass --model DIR with a folder holding "
                              "config.json, *.safetensors and tokenizer.json")
    raw = _read_json(folder / "config.json")
    cfg = ModelConfig.from_dict(raw)
    gen_cfg = _read_json(folder / "generation_config.json", required=False)
    if "block_size" not in raw and "block_size" in gen_cfg:
        cfg.block_size = gen_cfg["block_size"]
        cfg.check_values()
    if not (folder / "tokenizer.json").exists():
        raise CheckpointError(f"{folder / 'tokenizer.json'} is missing")
    dtype = _resolve_dtype(dtype, cfg, device)
    with torch.device("meta"):
        model = SDAR(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_state(model, folder, device, dtype)
    model.eval()
    return model, Tokenizer(folder, cfg)


def save(model: SDAR, folder, max_shard_bytes: int | None = None, dtype=torch.bfloat16):
    """Write config.json and model.safetensors (or shards plus model.safetensors.index.json). Weight files
    of an earlier save that this one does not write are removed, so the folder holds one consistent set."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tensors = {_hf_name(n): p.detach().to("cpu", dtype).contiguous() for n, p in model.named_parameters()}
    shards = _shards(tensors, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 and max_shard_bytes is None else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if max_shard_bytes is None:
        index.unlink(missing_ok=True)  # the loader reads the index first: it must not outlive its shards
    else:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    for stale in folder.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()


def _shards(tensors: dict, max_shard_bytes: int | None) -> list[dict]:
    """Tensors in order, cut into groups of at most max_shard_bytes (one group when None)."""
    if max_shard_bytes is None:
        return [tensors]
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """The paper's per-layer cost for one query token, 8h^2 + 4 d_ff h + 4 h L, summed over layers,
    with the projections counted at their real (GQA) sizes: 2 * (params of q,k,v,o) + 6 h d_ff + 4 H d L."""
    h, d = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    proj = 2 * (h * d * 2 + h * kv * 2)
    return cfg.num_hidden_layers * (proj + 6 * h * cfg.intermediate_size + 4 * d * context)
