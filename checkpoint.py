"""Reading and writing checkpoints in the Hugging Face layout: config.json, safetensors weights (one file or
shards with an index), tokenizer.json with tokenizer_config.json, generation_config.json and
chat_template.jinja. The network itself is in model.py; this file turns a folder into one and back.

A checkpoint folder is untrusted input: only files inside it are read, every size is checked against the
weight files' headers and the memory there is before anything is allocated, weights must be finite floats,
and the chat template renders in a sandbox with bounds on time and size. Every problem with a folder is a
CheckpointError whose one-line message names the file or field and the fix.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch

from decoder import MAX_BLOCK_SIZE
from model import SDAR, ModelConfig


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read; the message names the problem and the fix."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not token id 1


# ---------------------------------------------------------------------------------------------------
# Files: only what lies inside the folder is read.

MAX_JSON_BYTES = 256 << 20  # tokenizer.json of a 150k vocabulary is about 11 MB


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a file of the folder may really live: the folder, and for a snapshot in the Hugging Face cache
    (.../models--X/snapshots/REV, whose files are links to ../../blobs) that repository's blobs."""
    roots = [folder]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append(folder.parent.parent / "blobs")
    return roots


def _file(folder: Path, name, what: str | None = None, required: bool = True) -> Path | None:
    """The real path of the file `name` of the (resolved) folder, or None when it is absent and not required.
    Refuses a name that leaves the folder (absolute, ..), a link that leads outside it, and anything but a
    regular file (a folder, a fifo, a device: reading one could hang or never end)."""
    what = what or str(name)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{what}: {name!r} is not a file name inside the checkpoint folder {folder}")
    path = folder / name
    if not os.path.lexists(path):
        if required:
            raise CheckpointError(f"{path} is missing; a checkpoint folder needs config.json, model.safetensors "
                                  "(or shards with model.safetensors.index.json) and tokenizer.json")
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # a dangling link, a link loop
        raise CheckpointError(f"{path} cannot be read ({_first_line(e)})") from None
    if not any(real == root or root in real.parents for root in _allowed_roots(folder)):
        raise CheckpointError(f"{path} leads outside the checkpoint folder (to {real}); only files inside it are "
                              "read: copy the file into the folder")
    mode = real.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise CheckpointError(f"{path} is {kind}; it must be a file")
    return real


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        if path.stat().st_size > limit:
            raise CheckpointError(f"{path} is larger than {limit >> 20} MB; that is not a file of a checkpoint")
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or _first_line(e)})") from None


def _read_json(folder: Path, name: str, required: bool = True) -> dict:
    """A JSON file of the folder as a dict ({} when absent and not required)."""
    path = _file(folder, name, required=required)
    if path is None:
        return {}
    try:
        d = json.loads(_read_bytes(path, MAX_JSON_BYTES).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / name} is not valid JSON ({_first_line(e)})") from None
    except RecursionError:
        raise CheckpointError(f"{folder / name} is nested too deeply to be a checkpoint file") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{name} must hold a JSON object, not a {type(d).__name__}")
    return d


# ---------------------------------------------------------------------------------------------------
# config.json

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
        if "rotary_dim" in d and "partial_rotary_factor" not in d and _is_int(d["rotary_dim"]) and \
                _is_int(d.get("head_dim")) and d["head_dim"] > 0:
            d["partial_rotary_factor"] = d["rotary_dim"] / d["head_dim"]
        d.setdefault("mask_token_id", LLADA2_MASK_ID)
        d.setdefault("norm_topk_prob", True)  # its modeling code always renormalises the top-k weights
    elif model_type == "sdar":
        if d.get("partial_rotary_factor", 1.0) != 1.0:  # the dense model drops the expert fields, this one too
            raise CheckpointError(f"config.json: partial_rotary_factor {d['partial_rotary_factor']!r} is not "
                                  "supported for model_type sdar (1.0 only)")
        d = {k: v for k, v in d.items() if k not in ModelConfig.MOE_FIELDS}  # dense: no expert fields
    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in d.items() if k in known})
    if "head_dim" not in d and _is_int(cfg.hidden_size) and _is_int(cfg.num_attention_heads) and \
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

    is_int = _is_int
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "block_size"):
        if not is_int(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            raise bad(name, "a positive integer")
    if cfg.block_size > MAX_BLOCK_SIZE:  # a step computes a whole block: the decoder's own bound
        raise bad("block_size", f"in 1..{MAX_BLOCK_SIZE}")
    for name in ("rms_norm_eps", "rope_theta"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise bad(name, "a positive number")
    if not isinstance(cfg.torch_dtype, str):
        raise bad("torch_dtype", "a string such as \"bfloat16\"")
    for name in ("tie_word_embeddings", "attention_bias"):
        if not isinstance(getattr(cfg, name), bool):
            raise bad(name, "true or false")
    if cfg.mask_token_id is not None and not (is_int(cfg.mask_token_id) and 0 <= cfg.mask_token_id < cfg.vocab_size):
        raise bad("mask_token_id", f"a token id below vocab_size {cfg.vocab_size}")
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    if cfg.eos_token_id is not None and not all(is_int(e) and 0 <= e < cfg.vocab_size for e in eos):
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
    v = cfg.routed_scaling_factor
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise bad("routed_scaling_factor", "a positive number")
    if cfg.mlp_only_layers is not None and not (isinstance(cfg.mlp_only_layers, list) and all(is_int(i) for i in cfg.mlp_only_layers)):
        raise bad("mlp_only_layers", "a list of layer indices")
    f = cfg.partial_rotary_factor
    if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1 or int(cfg.head_dim * f) % 2:
        raise bad("partial_rotary_factor", "in (0, 1], giving an even number of rotary dimensions")


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
    if n > 2 * stored:  # not a missing tensor or two (those are named once the shapes are checked)
        raise CheckpointError(f"config.json describes a model of {n:,} parameters, far more than the {stored:,} "
                              f"the weight files hold; {fields_hint}")


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


def _token_ids(value, where: str, vocab_size: int, mask_id: int | None = None) -> list[int]:
    """An id field (one id or a list of them) checked against the vocabulary and the mask token."""
    ids = value if isinstance(value, list) else [value]
    if not all(_is_int(i) and 0 <= i < vocab_size for i in ids):
        raise CheckpointError(f"{where} must be a token id (or a list of them) below vocab_size {vocab_size}, "
                              f"got {value!r}; fix the file")
    if mask_id is not None and mask_id in ids:
        raise CheckpointError(f"{where} {value!r} includes the mask token {mask_id}; a sequence would end at "
                              "every unmasked slot: fix the file")
    return ids


class Tokenizer:
    def __init__(self, folder: Path, cfg: ModelConfig):
        from tokenizers import Tokenizer as HFTokenizer
        folder = Path(folder).resolve()
        path = _file(folder, "tokenizer.json")
        try:
            self.tok = HFTokenizer.from_str(_read_bytes(path, MAX_JSON_BYTES).decode("utf-8"))
        except CheckpointError:
            raise
        except Exception as e:  # the tokenizers package's own errors, bad UTF-8, a nesting too deep
            raise CheckpointError(f"{path} cannot be read ({_first_line(e)})") from None
        top = max(self.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1], default=None)
        if top is not None and top[1] >= cfg.vocab_size:
            raise CheckpointError(f"tokenizer.json: token {top[0]!r} has id {top[1]}, beyond the model's vocabulary "
                                  f"(vocab_size {cfg.vocab_size} in config.json); the files do not belong together")
        tok_cfg = _read_json(folder, "tokenizer_config.json", required=False)
        gen_cfg = _read_json(folder, "generation_config.json", required=False)
        self.chat_template, self.template_source = self._template(folder, tok_cfg)
        self.enable_thinking = False  # Qwen3-style templates: no thinking block unless asked for
        self.plain = _text_only(self.tok)
        self.mask_id = self._mask_id(cfg, tok_cfg, gen_cfg)
        if not 0 <= self.mask_id < cfg.vocab_size:
            raise CheckpointError(f"mask token id {self.mask_id} is outside the vocabulary (vocab_size "
                                  f"{cfg.vocab_size}); fix mask_token_id in config.json or generation_config.json")
        if gen_cfg.get("eos_token_id") is not None:
            eos = _token_ids(gen_cfg["eos_token_id"], "generation_config.json: eos_token_id", cfg.vocab_size,
                             self.mask_id)
        elif cfg.eos_token_id is not None:
            eos = _token_ids(cfg.eos_token_id, "config.json: eos_token_id", cfg.vocab_size, self.mask_id)
        else:
            name = tok_cfg.get("eos_token")
            name = name.get("content") if isinstance(name, dict) else name
            found = self.tok.token_to_id(name) if isinstance(name, str) else None
            eos = [] if found is None else _token_ids(found, f"tokenizer_config.json: eos_token {name!r}",
                                                      cfg.vocab_size, self.mask_id)
        if cfg.eos_token_id is not None:  # checked even where generation_config.json's ids win
            _token_ids(cfg.eos_token_id, "config.json: eos_token_id", cfg.vocab_size, self.mask_id)
        self.eos_ids = sorted(set(eos))
        bos = tok_cfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        self.bos_token = bos if isinstance(bos, str) else None
        self._pieces = {}  # the chat template rendered once per enable_thinking

    @staticmethod
    def _template(folder: Path, tok_cfg: dict) -> tuple[str | None, str]:
        """The chat template and where it comes from: chat_template.jinja wins, as in transformers."""
        jinja_file = _file(folder, "chat_template.jinja", required=False)
        if jinja_file is not None:
            try:
                return _read_bytes(jinja_file, MAX_TEMPLATE_CHARS).decode("utf-8"), "chat_template.jinja"
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{jinja_file} is not UTF-8 text ({e.reason})") from None
        source = "tokenizer_config.json (chat_template)"
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # some checkpoints keep named templates
            if not all(isinstance(t, dict) for t in template):
                raise CheckpointError(f"{source} must be a string or a list of {{\"name\", \"template\"}} objects")
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise CheckpointError(f"{source} must be a string, not {type(template).__name__}; fix the file")
        if template is not None and len(template) > MAX_TEMPLATE_CHARS:
            raise CheckpointError(f"{source} is longer than {MAX_TEMPLATE_CHARS:,} characters; fix the file")
        return template, source

    def _mask_id(self, cfg, tok_cfg, gen_cfg) -> int:
        if cfg.mask_token_id is not None:
            return cfg.mask_token_id
        v = gen_cfg.get("mask_token_id")
        if v is not None:
            if not (_is_int(v) and 0 <= v < cfg.vocab_size):
                raise CheckpointError(f"generation_config.json: mask_token_id must be a token id below vocab_size "
                                      f"{cfg.vocab_size}, got {v!r}; fix the file")
            return v
        if cfg.model_type == "llada2_moe":  # its own convention, before any guess by name
            return LLADA2_MASK_ID
        name = tok_cfg.get("mask_token")
        name = name.get("content") if isinstance(name, dict) else name
        for candidate in (name, "<|MASK|>"):
            if isinstance(candidate, str) and candidate and self.tok.token_to_id(candidate) is not None:
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
        user's message. Rendered once (per enable_thinking), not once per prompt."""
        if self.enable_thinking not in self._pieces:
            rendered = self.apply_chat_template(PLACEHOLDER)
            if rendered.count(PLACEHOLDER) != 1:
                raise CheckpointError(f"{self.template_source}: the chat template does not show the user's message "
                                      "once, as given; fix it or pass --no-chat")
            self._pieces[self.enable_thinking] = tuple(rendered.split(PLACEHOLDER))
        return self._pieces[self.enable_thinking]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, prompt: str) -> str:
        """One user turn plus the assistant header. Renders the checkpoint's own Jinja template when jinja2
        is installed (in a sandbox with bounds on time and size: the template comes with the checkpoint), with
        the variables such templates read: messages, add_generation_prompt, enable_thinking
        (self.enable_thinking, False unless set), bos_token, eos_token. Without jinja2: the ChatML format that
        Qwen/SDAR chat checkpoints use."""
        if not self.chat_template:
            return CHATML.format(prompt=prompt)
        try:
            import jinja2  # noqa: F401
        except ImportError:
            return CHATML.format(prompt=prompt)
        try:
            return render_template(self.chat_template, messages=[{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, enable_thinking=self.enable_thinking,
                                   bos_token=self.bos_token or "", eos_token="")
        except Exception as e:  # whatever the template does (MemoryError, RecursionError too): one line
            raise CheckpointError(f"{self.template_source}: the chat template cannot be rendered "
                                  f"({type(e).__name__}: {_first_line(e)}); fix it or pass --no-chat") from None


# ---------------------------------------------------------------------------------------------------
# The chat template's sandbox: jinja2's, with bounds on what a template may build and on its time.

MAX_TEMPLATE_CHARS = 1_000_000  # the template itself, its output and any string or list it builds
MAX_TEMPLATE_NUMBER = 100_000   # the largest number a template may pass to a call or a filter
MAX_TEMPLATE_RANGE = 10_000     # the longest range() (jinja2's own sandbox allows 100,000)
MAX_TEMPLATE_BITS = 4096        # the largest integer it may build with * or **
TEMPLATE_SECONDS = 5.0          # a chat template renders in milliseconds


class TemplateLimit(Exception):
    """A chat template went past a bound of the sandbox."""


def _bounded(value):
    """value, if it is not a string or collection past MAX_TEMPLATE_CHARS."""
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > MAX_TEMPLATE_CHARS:
        raise TemplateLimit(f"the template built a value of {len(value):,} items (at most {MAX_TEMPLATE_CHARS:,})")
    return value


def _check_counts(args, kwargs):
    for v in (*args, *kwargs.values()):
        if _is_int(v) and abs(v) > MAX_TEMPLATE_NUMBER:
            raise TemplateLimit(f"the number {v} is too large for a template (at most {MAX_TEMPLATE_NUMBER:,})")


_FORMAT_WIDTH = re.compile(r"%[-+ #0*]*(\d*)(?:\.(\d+))?|\{[^{}]*?:[^{}]*?(\d+)(?:\.(\d+))?[^{}]*\}")


def _check_format(text: str):
    """A %- or {}-format string: no field width or precision past MAX_TEMPLATE_NUMBER."""
    for match in _FORMAT_WIDTH.finditer(text):
        if any(g and int(g) > MAX_TEMPLATE_NUMBER for g in match.groups()):
            raise TemplateLimit(f"the format {match.group(0)[:40]!r} asks for too wide a field")


def _check_replace(text, old=None, new=None, *rest):
    """text.replace(old, new) must not build a string past MAX_TEMPLATE_CHARS (replacing "" inserts everywhere)."""
    if all(isinstance(v, str) for v in (text, old, new)):
        if len(text) + (text.count(old) if old else len(text) + 1) * len(new) > MAX_TEMPLATE_CHARS:
            raise TemplateLimit("the template's replace would build too long a string")


def _check_binop(op: str, left, right):
    """Refuse * and ** whose result would be huge, before computing it."""
    numbers = all(isinstance(v, (int, float)) for v in (left, right))
    if op == "**" and numbers and _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
        if right * math.log2(abs(left)) > MAX_TEMPLATE_BITS:
            raise TemplateLimit(f"{left} ** {right} is too large a number for a template")
    elif op == "*" and numbers and _is_int(left) and _is_int(right):
        if abs(left).bit_length() + abs(right).bit_length() > MAX_TEMPLATE_BITS:
            raise TemplateLimit("the template multiplies too large numbers")
    elif op == "*":
        seq, n = (left, right) if _is_int(right) else (right, left)
        if _is_int(n) and hasattr(seq, "__len__") and len(seq) * max(n, 0) > MAX_TEMPLATE_CHARS:
            raise TemplateLimit(f"the template repeats a value {n:,} times")
    elif op == "%" and isinstance(left, str):
        _check_format(left)


def _sandbox():
    """jinja2's immutable sandbox (no access to Python internals, no changes to lists or dicts) with bounds:
    *, ** and % checked before they run, ranges of at most MAX_TEMPLATE_RANGE, no call or filter given a
    number past MAX_TEMPLATE_NUMBER, and no string or list built past MAX_TEMPLATE_CHARS."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _bounded(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own spelling)
            _check_counts(args, kwargs)
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
                _check_format(owner)
            if isinstance(owner, str) and getattr(__obj, "__name__", "") == "replace":
                _check_replace(owner, *args[:2])
            return _bounded(super().call(__context, __obj, *args, **kwargs))

    def raise_exception(message):  # templates call it to refuse a conversation
        raise TemplateError(message)

    def bounded_range(*args):
        r = range(*args)
        if len(r) > MAX_TEMPLATE_RANGE:
            raise TemplateLimit(f"range of {len(r):,} items (at most {MAX_TEMPLATE_RANGE:,})")
        return r

    def bounded_filter(f, name):
        def run(*args, **kwargs):
            _check_counts(args, kwargs)
            if name == "format" and args and isinstance(args[0], str):
                _check_format(args[0])
            if name == "replace" and len(args) >= 3:
                _check_replace(*args[:3])
            return _bounded(f(*args, **kwargs))
        if hasattr(f, "jinja_pass_arg"):  # jinja2's pass_context / pass_environment mark
            run.jinja_pass_arg = f.jinja_pass_arg
        return run

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, range=bounded_range)
    env.globals.pop("lipsum", None)  # builds text of a size the template chooses
    env.filters = {name: bounded_filter(f, name) for name, f in env.filters.items()}
    return env


@contextmanager
def _time_limit(seconds: float):
    """Raise TemplateLimit in the with-block after `seconds` (a timer signal: main thread only, elsewhere the
    size bounds still hold). An earlier timer of the process is put back afterwards."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise TemplateLimit(f"rendering took more than {seconds:g} s")

    old_handler = signal.signal(signal.SIGALRM, expired)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    t0 = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 1e-3), old_interval)


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    return _sandbox().from_string(source)


def render_template(source: str, **variables) -> str:
    """A chat template rendered in the bounded sandbox; raises TemplateLimit past a bound, or whatever the
    template raises."""
    with _time_limit(TEMPLATE_SECONDS):
        out, size = [], 0
        for chunk in _compiled(source).generate(**variables):
            out.append(chunk)
            size += len(chunk)
            if size > MAX_TEMPLATE_CHARS:
                raise TemplateLimit(f"the output passed {MAX_TEMPLATE_CHARS:,} characters")
        return "".join(out)


# ---------------------------------------------------------------------------------------------------
# Checkpoint: Hugging Face layout, safetensors only.

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names; an integer "weight" would load as numbers


def _weight_files(folder: Path) -> list[Path]:
    index = "model.safetensors.index.json"
    if _file(folder, index, required=False) is None:
        return [_file(folder, "model.safetensors", "weights")]
    weight_map = _read_json(folder, index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{folder / index} has no weight_map")
    bad = [v for v in weight_map.values() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"{index}: weight_map values must be file names (strings), got {bad[0]!r}; fix the file")
    return [_file(folder, name, f"{index}: weight_map") for name in sorted(set(weight_map.values()))]


# LLaDA2.0 names some tensors its own way; q, k and v are one fused query_key_value tensor (rows q, k, v).
LLADA2_NAMES = (("embed_tokens.", "word_embeddings."), (".self_attn.o_proj.", ".attention.dense."),
                (".self_attn.q_norm.", ".attention.query_layernorm."),
                (".self_attn.k_norm.", ".attention.key_layernorm."))


def _hf_name(name: str, model_type: str = "sdar") -> str:
    """Our parameter name -> the checkpoint's tensor name."""
    if model_type == "llada2_moe":
        for ours, theirs in LLADA2_NAMES:
            name = name.replace(ours, theirs)
        name = re.sub(r"\.self_attn\.[qkv]_proj\.weight$", ".attention.query_key_value.weight", name)
    return name if name == "lm_head.weight" else "model." + name


def hf_layout(model: SDAR) -> dict[str, list[torch.Tensor]]:
    """Each checkpoint tensor name -> the parameters (or slices of one) it holds, stacked along dim 0 in this
    order: one, except LLaDA2.0's fused q, k, v. Stacked expert weights (model.Experts) are one tensor per
    expert in the checkpoint: experts.{e}.gate_proj.weight is slice e. A tied lm_head appears once."""
    layout = {}
    for name, p in model.named_parameters():
        stacked = re.fullmatch(r"(.*\.experts)\.(gate_proj|up_proj|down_proj)", name)
        if stacked:
            for e in range(p.shape[0]):
                layout[_hf_name(f"{stacked[1]}.{e}.{stacked[2]}.weight", model.config.model_type)] = [p[e]]
        else:
            layout.setdefault(_hf_name(name, model.config.model_type), []).append(p)
    return layout


def _ignored(name: str, cfg: ModelConfig) -> bool:
    """Tensors some checkpoints carry that the model does not read: RoPE tables, a copy of a tied head."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings)


def read_headers(files: list[Path], cfg: ModelConfig) -> dict[str, tuple[Path, tuple, str]]:
    """Each tensor the model reads -> (its file, shape, safetensors dtype), from the files' headers only."""
    from safetensors import safe_open
    found = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    if name in found:
                        raise CheckpointError(f"tensor {name!r} is in both {found[name][0].name} and {f.name}; "
                                              "keep one")
                    if not _ignored(name, cfg):
                        piece = handle.get_slice(name)
                        found[name] = (f, tuple(piece.get_shape()), piece.get_dtype())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({_first_line(e)})") from None
    return found


def check_headers(model: SDAR, headers: dict, folder: Path):
    """Every tensor's name, shape and dtype against the model (which may live on the meta device: nothing is
    read or allocated), and every tensor the model needs present."""
    expected = hf_layout(model)
    for name, (f, shape, dtype) in headers.items():
        if name not in expected:
            raise CheckpointError(f"{f.name}: unexpected tensor {name!r} (not part of a "
                                  f"{model.config.model_type} model with this config.json)")
        params = expected[name]
        want = (sum(p.shape[0] for p in params), *params[0].shape[1:])
        if shape != want:
            raise CheckpointError(f"{f.name}: tensor {name!r} has shape {shape}, config.json implies {want}")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{f.name}: tensor {name!r} is stored as {dtype}; weights must be floats "
                                  f"({', '.join(FLOAT_DTYPES)})")
    missing = sorted(set(expected) - set(headers))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{folder}: missing tensors {', '.join(missing[:3])}{more}")


def load_state(model: SDAR, folder: Path, device, dtype):
    """Read the folder's weights into the model's parameters: headers checked first, then each tensor copied
    and checked finite (a NaN weight gives an empty answer, not an error, further on)."""
    from safetensors import safe_open
    folder = Path(folder).resolve()
    headers = read_headers(_weight_files(folder), model.config)
    check_headers(model, headers, folder)
    expected = hf_layout(model)
    by_file = {}
    for name, (f, _, _) in headers.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({_first_line(e)})") from None
        with handle:
            for name in names:
                tensor = handle.get_tensor(name)
                params = expected[name]
                with torch.no_grad():
                    for p, piece in zip(params, tensor.split([p.shape[0] for p in params])):
                        p.copy_(piece.to(dtype))
                        if not torch.isfinite(p).all():
                            why = ("holds NaN or infinite values" if not torch.isfinite(piece).all() else
                                   f"has values beyond the range of {str(dtype).removeprefix('torch.')}; load it "
                                   "in float32 or bfloat16")
                            raise CheckpointError(f"{f.name}: tensor {name!r} {why}; the checkpoint is damaged")


def _resolve_dtype(dtype, cfg: ModelConfig, device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 matrix products are slow on most CPUs: compute in fp32 there.
        return (torch.float32 if torch.device(device).type == "cpu" else
                {"float32": torch.float32, "float16": torch.float16}.get(cfg.torch_dtype, torch.bfloat16))
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return names[dtype]


def resolve_device(name: str, flag: str = "--device ") -> str:
    """--device as given (auto, cpu, cuda, cuda:N) -> the device to use. The one device check every entry
    point shares; raises ValueError with a one-line message (flag: how the caller spells the option)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"{flag}{name}: no CUDA device is available; use {flag}cpu")
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise ValueError(f"{flag}{name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return name
    raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")


def load(path, device="cpu", dtype=None):
    """Load an SDAR checkpoint folder (Hugging Face layout) -> (model, tokenizer). Raises CheckpointError for
    the folder, ValueError for the arguments."""
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a string such as \"cpu\" or \"cuda\", got {device!r}")
    device = resolve_device(str(device), "device=")  # cuda without a GPU: a ValueError here, not deep in torch
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; pass --model DIR with a folder holding "
                              "config.json, *.safetensors and tokenizer.json")
    folder = folder.resolve()
    raw = _read_json(folder, "config.json")
    cfg = config_from_dict(raw)
    gen_cfg = _read_json(folder, "generation_config.json", required=False)
    if "block_size" not in raw and "block_size" in gen_cfg:
        cfg.block_size = gen_cfg["block_size"]
        check_config(cfg, "generation_config.json")
    _file(folder, "tokenizer.json")
    dtype = _resolve_dtype(dtype, cfg, device)
    headers = read_headers(_weight_files(folder), cfg)
    check_size(cfg, sum(math.prod(shape) for _, shape, _ in headers.values()), device, dtype)
    with torch.device("meta"):
        model = SDAR(cfg)
    check_headers(model, headers, folder)
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
    tensors = {name: torch.cat([p.detach().to("cpu", dtype) for p in params]).contiguous()
               for name, params in hf_layout(model).items()}
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
