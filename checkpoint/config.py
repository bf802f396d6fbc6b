"""config.json -> ModelConfig: the three model types, the names transformers 4 and 5 write, every field checked
(type and range) so that a bad file fails here and not deep in the model, and the model's size from the config
alone, checked against the memory there is before anything is allocated."""
from __future__ import annotations

import math
import os
from dataclasses import fields

import torch

from checkpoint.folder import CheckpointError, is_int
from decoder import MAX_BLOCK_SIZE
from model import ModelConfig


MODEL_TYPES = ("sdar", "sdar_moe", "llada2_moe")
# llada2_moe: field names, tensor names and the mask id follow LLaDA2.0-mini's public modeling code and
# inclusionAI's copy of its config.json; no released LLaDA2.0 checkpoint file was read here to confirm them.
LLADA2_MASK_ID = 156895  # LLaDA2.0's mask token: its generate()'s default; its config.json names none

# The fields each mixture-of-experts type must name (a missing one is an error, not a silent default).
REQUIRED_MOE = {
    "sdar_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"),
    "llada2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_shared_experts",
                   "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "score_function",
                   "moe_router_enable_expert_bias", "head_dim"),
}
# LLaDA2.0's own routing and RoPE fields, at the values that leave a Qwen3-MoE layer as it is (checkpoint.save writes
# them so): an sdar_moe config that sets another value describes a model Qwen3-MoE's code would not run.
LLADA2_ONLY = {"first_k_dense_replace": 0, "num_shared_experts": 0, "score_function": "softmax",
               "moe_router_enable_expert_bias": False, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
               "partial_rotary_factor": 1.0}
MAX_ROUTED_SCALING = 1000  # LLaDA2.0 uses 2.5; far past it, the routed weights overflow (NaN logits)
TORCH_DTYPES = ("float32", "bfloat16", "float16", "float64")  # the weights' dtype, as transformers writes it
# transformers 5 writes some fields under new names: field -> ours.
RENAMED = {"num_local_experts": "num_experts", "dtype": "torch_dtype"}


def _rope_fields(d: dict) -> dict:
    """RoPE as config.json gives it: rope_theta (and partial_rotary_factor) at the top level (transformers 4)
    or inside rope_parameters (transformers 5); rope_scaling and rope_parameters must ask for plain RoPE."""
    for name in ("rope_scaling", "rope_parameters"):
        v = d.get(name)
        if v is None:
            continue
        if not isinstance(v, dict):
            raise CheckpointError(f"config.json: {name} must be an object or null, got {v!r}")
        if any(isinstance(x, dict) for x in v.values()):
            raise CheckpointError(f"config.json: {name} per attention type is not supported (one plain RoPE only)")
        if "rope_type" not in v and "type" not in v and v.get("factor") not in (None, 1):  # a scaling, unnamed
            raise CheckpointError(f"config.json: {name} has factor {v['factor']!r} but no rope_type, so its scaling "
                                  "is unknown; only plain RoPE is supported (no factor)")
        kind = v.get("rope_type", v.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"config.json: {name} has rope_type {kind!r}, which is not supported "
                                  "(plain RoPE only)")
    params = d.get("rope_parameters") or {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in params:
            if key in d and d[key] != params[key]:
                raise CheckpointError(f"config.json: {key} {d[key]!r} and rope_parameters.{key} {params[key]!r} "
                                      "disagree; keep one")
            d[key] = params[key]
    return d


def config_from_dict(d) -> ModelConfig:
    """config.json's object -> ModelConfig, or a CheckpointError naming the field and the fix.

    model_type sdar: the dense Qwen3 layer. sdar_moe: the same with Qwen3-MoE layers. llada2_moe
    (LLaDA2.0): its own field names are read as well (use_qkv_bias, use_qk_norm, rotary_dim)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"config.json must hold a JSON object, not a {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not supported; this loader reads "
                              f"{', '.join(MODEL_TYPES)}")
    for name in ("quantization_config", "compression_config"):  # the weights would be read as plain floats
        q = d.get(name)
        if q is not None:
            method = f" with quant_method {q.get('quant_method')!r}" if isinstance(q, dict) else ""
            raise CheckpointError(f"config.json: {name}{method} says the weights are quantized, and quantized "
                                  "checkpoints are not read; use the model's unquantized (bf16) release")
    d = dict(d)
    for theirs, ours in RENAMED.items():
        if d.get(theirs) is not None:
            if ours in d and d[ours] != d[theirs]:
                raise CheckpointError(f"config.json: {theirs} {d[theirs]!r} and {ours} {d[ours]!r} disagree; keep one")
            d[ours] = d[theirs]
    if d.get("torch_dtype", "") is None:  # transformers writes null when it was never set
        del d["torch_dtype"]
    d = _rope_fields(d)
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (silu only)")
    # Sliding-window attention would change what each token sees: refused rather than ignored.
    layer_types = d.get("layer_types")
    if layer_types is not None and not isinstance(layer_types, list):  # a string would be read as no types
        raise CheckpointError(f"config.json: layer_types must be a list, got {layer_types!r}; fix the file")
    if d.get("use_sliding_window") not in (None, False) or (
            isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types)):
        raise CheckpointError("config.json: sliding-window attention (use_sliding_window, layer_types) is not "
                              "supported (full attention only)")
    for name in REQUIRED_MOE.get(model_type, ()):
        if name not in d:
            raise CheckpointError(f"config.json: {name} is missing; a {model_type} checkpoint must name it")
    if model_type == "llada2_moe":
        for name in ("use_qkv_bias", "use_bias"):
            if d.get(name, False) is not False:
                raise CheckpointError(f"config.json: {name} {d[name]!r} is not supported (false only)")
        if d.get("use_qk_norm", True) is not True:
            raise CheckpointError(f"config.json: use_qk_norm {d['use_qk_norm']!r} is not supported (true only)")
        if "rotary_dim" in d and is_int(d.get("head_dim")) and d["head_dim"] > 0:
            if not is_int(d["rotary_dim"]) or d["rotary_dim"] <= 0:  # read as no rotary_dim: RoPE on every dimension
                raise CheckpointError(f"config.json: rotary_dim must be a positive integer, got {d['rotary_dim']!r}; "
                                      "fix the file")
            f = d.setdefault("partial_rotary_factor", d["rotary_dim"] / d["head_dim"])
            if isinstance(f, (int, float)) and math.isfinite(f) and int(d["head_dim"] * f) != d["rotary_dim"]:
                raise CheckpointError(f"config.json: rotary_dim {d['rotary_dim']} and partial_rotary_factor "
                                      f"{d['partial_rotary_factor']!r} disagree (head_dim {d['head_dim']}); keep one")
        d.setdefault("mask_token_id", LLADA2_MASK_ID)
        d.setdefault("norm_topk_prob", True)  # its modeling code always renormalises the top-k weights
    elif model_type == "sdar_moe":
        changed = next((k for k, v in LLADA2_ONLY.items() if d.get(k, v) != v), None)
        if changed:  # honoured, it would route (or rotate) as no SDAR-MoE model does
            raise CheckpointError(f"config.json: {changed} {d[changed]!r} is a field of LLaDA2.0 (model_type "
                                  "llada2_moe), which model_type sdar_moe (Qwen3-MoE) does not have; remove it, or "
                                  "set model_type llada2_moe if the model is LLaDA2.0")
    elif model_type == "sdar":
        if d.get("partial_rotary_factor", 1.0) != 1.0:  # the dense model drops the expert fields, this one too
            raise CheckpointError(f"config.json: partial_rotary_factor {d['partial_rotary_factor']!r} is not "
                                  "supported for model_type sdar (1.0 only)")
        d = {k: v for k, v in d.items() if k not in ModelConfig.MOE_FIELDS}  # dense: no expert fields
    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in d.items() if k in known})
    if "head_dim" not in d and is_int(cfg.hidden_size) and is_int(cfg.num_attention_heads) and \
            cfg.num_attention_heads > 0:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    check_config(cfg)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise CheckpointError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def check_config(cfg: ModelConfig, source: str = "config.json"):
    """A CheckpointError naming the field for a value of the wrong type or out of range, so that a bad
    config.json fails here and not as a ZeroDivisionError or IndexError deep in the model."""
    def bad(name, want):
        return CheckpointError(f"{source}: {name} must be {want}, got {getattr(cfg, name)!r}; fix the file")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "block_size"):
        if not is_int(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            raise bad(name, "a positive integer")
    if cfg.block_size > MAX_BLOCK_SIZE:  # a step computes a whole block: the decoder's own bound
        raise bad("block_size", f"in 1..{MAX_BLOCK_SIZE}")
    if cfg.head_dim % 2 and cfg.partial_rotary_factor == 1:  # was a RuntimeError in RoPE, once generating
        raise bad("head_dim", "even (RoPE turns pairs of dimensions)")
    for name in ("rms_norm_eps", "rope_theta"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise bad(name, "a positive number")
    if cfg.rms_norm_eps >= 1:  # as large as the activations it flattens every norm (past float32's range to 0)
        raise bad("rms_norm_eps", "a small positive number (below 1)")
    if cfg.rope_theta <= 1:  # a base below 1 makes the rotary frequencies huge (past float32's range, NaN logits)
        raise bad("rope_theta", "a RoPE base above 1")
    if cfg.torch_dtype not in TORCH_DTYPES:  # --dtype auto reads it: another name would load as bfloat16
        raise bad("torch_dtype", f"one of {', '.join(TORCH_DTYPES)}")
    for name in ("tie_word_embeddings", "attention_bias"):
        if not isinstance(getattr(cfg, name), bool):
            raise bad(name, "true or false")
    if cfg.mask_token_id is not None and not (is_int(cfg.mask_token_id) and 0 <= cfg.mask_token_id < cfg.vocab_size):
        raise bad("mask_token_id", f"a token id below vocab_size {cfg.vocab_size}")
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    if cfg.eos_token_id is not None and not (eos and all(is_int(e) and 0 <= e < cfg.vocab_size for e in eos)):
        raise bad("eos_token_id", f"a token id (or a list of them) below vocab_size {cfg.vocab_size}")
    if cfg.eos_token_id is not None and cfg.mask_token_id in eos:
        raise bad("eos_token_id", f"other than the mask token {cfg.mask_token_id}")
    if cfg.model_type != "sdar":
        check_moe_config(cfg, bad, is_int)


def check_moe_config(cfg: ModelConfig, bad, is_int):
    """The expert fields of sdar_moe and llada2_moe, each named when wrong."""
    for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "n_group",
                 "topk_group"):
        if not is_int(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            raise bad(name, "a positive integer")
    for name in ("first_k_dense_replace", "num_shared_experts"):
        if not is_int(getattr(cfg, name)) or getattr(cfg, name) < 0:
            raise bad(name, "a non-negative integer")
    for name in ("norm_topk_prob", "moe_router_enable_expert_bias"):
        if not isinstance(getattr(cfg, name), bool):
            raise bad(name, "true or false")
    if cfg.num_experts_per_tok > cfg.num_experts:
        raise bad("num_experts_per_tok", f"at most num_experts ({cfg.num_experts})")
    if cfg.score_function not in ("softmax", "sigmoid"):
        raise bad("score_function", "\"softmax\" or \"sigmoid\"")
    if cfg.num_experts % cfg.n_group or cfg.topk_group > cfg.n_group or (
            cfg.n_group > 1 and cfg.num_experts // cfg.n_group < 2):
        raise bad("n_group", f"a divisor of num_experts ({cfg.num_experts}) with topk_group <= n_group and at "
                             "least 2 experts per group")
    allowed = cfg.topk_group * (cfg.num_experts // cfg.n_group)  # the experts of the groups a token may use
    if cfg.num_experts_per_tok > allowed:  # the rest would be picked among -inf scores, at random
        raise bad("num_experts_per_tok", f"at most topk_group x experts per group ({allowed})")
    v = cfg.routed_scaling_factor
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise bad("routed_scaling_factor", "a positive number")
    if v > MAX_ROUTED_SCALING:  # refused here, not as NaN logits once the model runs
        raise bad("routed_scaling_factor", f"at most {MAX_ROUTED_SCALING:,} (LLaDA2.0 uses 2.5)")
    if cfg.mlp_only_layers is not None and not (isinstance(cfg.mlp_only_layers, list) and all(is_int(i) for i in cfg.mlp_only_layers)):
        raise bad("mlp_only_layers", "a list of layer indices")
    f = cfg.partial_rotary_factor
    if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1 or int(cfg.head_dim * f) % 2 or \
            int(cfg.head_dim * f) == 0:  # none: a model without positions
        raise bad("partial_rotary_factor", "in (0, 1], giving an even number of rotary dimensions (at least 2)")


def parameter_count(cfg: ModelConfig) -> int:
    """The number of parameters SDAR(cfg) has, from the config alone (nothing is built), so that a config
    describing an impossible model is refused before it is allocated."""
    H, L, hd = cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    attention = 2 * H * q + 2 * H * kv + 2 * hd + 2 * H       # q, o, k, v; q/k norms; the layer's two norms
    if cfg.attention_bias:
        attention += q + 2 * kv + H
    dense = 3 * H * cfg.intermediate_size
    inner = cfg.moe_intermediate_size
    moe = (cfg.num_experts * H * (1 + 3 * inner) + 3 * H * inner * cfg.num_shared_experts
           + (cfg.num_experts if cfg.moe_router_enable_expert_bias else 0))
    if cfg.num_experts == 0:
        n_moe = 0
    elif cfg.model_type == "llada2_moe":
        n_moe = max(0, L - cfg.first_k_dense_replace)
    else:  # as ModelConfig.is_moe_layer, without a loop over the layers
        skipped = {i for i in cfg.mlp_only_layers or [] if 0 <= i < L and (i + 1) % cfg.decoder_sparse_step == 0}
        n_moe = L // cfg.decoder_sparse_step - len(skipped)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * H
    return cfg.vocab_size * H + head + H + L * attention + n_moe * moe + (L - n_moe) * dense


def memory_bytes(device) -> int | None:
    """The memory a model can use on the device: the machine's physical memory, or the GPU's free memory."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        pass
    return None


MAX_NAMED_LAYERS = 1024


def check_size(cfg: ModelConfig, stored: int, device, dtype: torch.dtype):
    """Refuse, before allocating, a config whose model cannot fit the device or is not what the weight files
    hold (stored: the elements of the tensors the model reads, from the files' headers)."""
    n = parameter_count(cfg)
    fields_hint = "check hidden_size, intermediate_size, num_hidden_layers and vocab_size in config.json"
    need = n * torch.empty(0, dtype=dtype).element_size()
    have = memory_bytes(device)
    if have is not None and need > have:
        raise CheckpointError(f"config.json describes a model of {n:,} parameters ({need / 2**30:,.1f} GiB in "
                              f"{str(dtype).removeprefix('torch.')}), more than the {have / 2**30:,.1f} GiB of "
                              f"memory there is ({device}); {fields_hint}")
    # A model of up to MAX_NAMED_LAYERS layers is built (on the meta device: seconds) and the tensors it misses
    # named: a shard left out of the index; past that, building it would take minutes.
    if n > 2 * stored and cfg.num_hidden_layers > MAX_NAMED_LAYERS:
        raise CheckpointError(f"config.json describes a model of {n:,} parameters, far more than the {stored:,} "
                              f"the weight files hold; {fields_hint}")
