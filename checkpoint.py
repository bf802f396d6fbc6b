"""Reading and writing checkpoints in the Hugging Face layout: config.json, safetensors weights (one file or
shards with an index), tokenizer.json with tokenizer_config.json, generation_config.json and
chat_template.jinja. The network itself is in model.py; this file turns a folder into one and back.

Every problem with a folder is a CheckpointError whose message names the file or field and the fix.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path

import torch

from model import SDAR, ModelConfig


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read; the message names the problem and the fix."""


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
    if d.get("rope_scaling") not in (None, {}) and d["rope_scaling"].get("rope_type", "default") != "default":
        raise CheckpointError(f"config.json: rope_scaling {d['rope_scaling']} is not supported (plain RoPE only)")
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (silu only)")
    for name in REQUIRED_MOE.get(model_type, ()):
        if name not in d:
            raise CheckpointError(f"config.json: {name} is missing; a {model_type} checkpoint must name it")
    d = dict(d)
    if model_type == "llada2_moe":
        for name in ("use_qkv_bias", "use_bias"):
            if d.get(name, False) is not False:
                raise CheckpointError(f"config.json: {name} {d[name]!r} is not supported (false only)")
        if d.get("use_qk_norm", True) is not True:
            raise CheckpointError(f"config.json: use_qk_norm {d['use_qk_norm']!r} is not supported (true only)")
        if "rotary_dim" in d and "partial_rotary_factor" not in d and isinstance(d["rotary_dim"], int):
            d["partial_rotary_factor"] = d["rotary_dim"] / d["head_dim"]
        d.setdefault("mask_token_id", LLADA2_MASK_ID)
        d.setdefault("norm_topk_prob", True)  # its modeling code always renormalises the top-k weights
    elif model_type == "sdar":
        d = {k: v for k, v in d.items() if k not in ModelConfig.MOE_FIELDS}  # dense: no expert fields
    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in d.items() if k in known})
    check_config(cfg)
    if "head_dim" not in d:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise CheckpointError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def check_config(cfg: ModelConfig):
    """A CheckpointError naming the field for a value of the wrong type or out of range, so that a bad
    config.json fails here and not as a ZeroDivisionError or IndexError deep in the model."""
    def bad(name, want):
        return CheckpointError(f"config.json: {name} must be {want}, got {getattr(cfg, name)!r}; fix the file")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "block_size"):
        if not is_int(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            raise bad(name, "a positive integer")
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
        if cfg.model_type == "llada2_moe":  # its own convention, before any guess by name
            return LLADA2_MASK_ID
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


def load_state(model: SDAR, folder: Path, device, dtype):
    from safetensors import safe_open
    expected = hf_layout(model)
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
                    raise CheckpointError(f"{f.name}: unexpected tensor {name!r} (not part of a "
                                          f"{model.config.model_type} model with this config.json)")
                tensor = handle.get_tensor(name)
                params = expected[name]
                want = (sum(p.shape[0] for p in params), *params[0].shape[1:])
                if tuple(tensor.shape) != want:
                    raise CheckpointError(f"{f.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                          f"config.json implies {want}")
                with torch.no_grad():
                    for p, piece in zip(params, tensor.split([p.shape[0] for p in params])):
                        p.copy_(piece.to(dtype))
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
    cfg = config_from_dict(raw)
    gen_cfg = _read_json(folder / "generation_config.json", required=False)
    if "block_size" not in raw and "block_size" in gen_cfg:
        cfg.block_size = gen_cfg["block_size"]
        check_config(cfg)
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
