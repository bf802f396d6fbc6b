"""Reading and writing checkpoints in the Hugging Face layout: config.json, safetensors weights (one file or
shards with an index), tokenizer.json with tokenizer_config.json, generation_config.json and
chat_template.jinja. The network itself is in model.py; this package turns a folder into one and back.

    model, tokenizer = checkpoint.load("checkpoints/sdar-tiny")

A checkpoint folder is untrusted input: only files inside it are read (folder.py), every size is checked
against the weight files' headers and the memory there is before anything is allocated (config.py, here),
weights must be finite floats, and the chat template renders in a sandbox with bounds on time and size
(sandbox.py, used by tokenizer.py). Every problem with a folder is a CheckpointError whose one-line message
names the file or field and the fix.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path

import torch

from checkpoint.config import (LLADA2_MASK_ID, MODEL_TYPES, check_config, check_size, config_from_dict,
                               memory_bytes, parameter_count)
from checkpoint.folder import CheckpointError, inside_file, first_line, read_json
from checkpoint.tokenizer import CHATML, Tokenizer
from model import SDAR, ModelConfig

__all__ = ["CHATML", "LLADA2_MASK_ID", "MODEL_TYPES", "CheckpointError", "Tokenizer", "check_config", "check_headers",
           "check_size", "config_from_dict", "first_line", "hf_layout", "inside_file", "load", "load_state",
           "memory_bytes", "parameter_count", "read_config", "read_headers", "read_json", "resolve_device", "save"]


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names; an integer "weight" would load as numbers


def _weight_files(folder: Path) -> list[Path]:
    index = "model.safetensors.index.json"
    if inside_file(folder, index, required=False) is None:
        return [inside_file(folder, "model.safetensors")]
    weight_map = read_json(folder, index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{folder / index} has no weight_map")
    bad = [v for v in weight_map.values() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"{index}: weight_map values must be file names (strings), got {bad[0]!r}; fix the file")
    if "model.safetensors" not in weight_map.values() and inside_file(folder, "model.safetensors", required=False):
        raise CheckpointError(f"{folder} holds two sets of weights, model.safetensors and the shards {index} names; "
                              "keep one")
    what = f"{index}'s weight_map names a shard"
    return [inside_file(folder, name, what) for name in sorted(set(weight_map.values()))]


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
                    shape = tuple(handle.get_slice(name).get_shape())
                    if not _ignored(name, cfg):
                        found[name] = (f, shape, handle.get_slice(name).get_dtype())
                    elif name == "lm_head.weight" and shape != (cfg.vocab_size, cfg.hidden_size):  # a tied copy
                        raise CheckpointError(f"{f.name}: tensor 'lm_head.weight' has shape {shape}, config.json "
                                              f"implies {(cfg.vocab_size, cfg.hidden_size)} (tied to the embeddings)")
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({first_line(e)})") from None
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
        index = folder / "model.safetensors.index.json"
        fix = (f"{index.name}'s weight_map leaves them out: add the shard that holds them" if index.exists() else
               "model.safetensors does not hold them, or config.json describes another model")
        raise CheckpointError(f"{folder}: missing tensors {', '.join(missing[:3])}{more} ({len(missing)} in all); "
                              f"{fix}")


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
            raise CheckpointError(f"{f} is not a readable safetensors file ({first_line(e)})") from None
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
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):  # int8, float8: no model
            raise ValueError(f"dtype must be a float type (torch.float32, bfloat16, float16 or float64), got {dtype}")
        return dtype
    if dtype in (None, "auto"):
        # bf16 matrix products are slow on most CPUs: compute in fp32 there.
        return (torch.float32 if torch.device(device).type == "cpu" else
                {"float32": torch.float32, "float16": torch.float16}.get(cfg.torch_dtype, torch.bfloat16))
    return _named_dtype(dtype)


# the names torch_dtype and save take (float64 too), and short ones
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def _named_dtype(name) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPE_NAMES:  # a list would be unhashable: a TypeError
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16, float64")
    return DTYPE_NAMES[name]


def resolve_device(name: str, flag: str = "--device ") -> str:
    """--device as given (auto, cpu, cuda, cuda:N) -> the device to use. The one device check every entry
    point shares; raises ValueError with a one-line message (flag: how the caller spells the option)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or re.fullmatch(r"cuda:(0|[1-9][0-9]*)", name):  # as torch reads them: not cuda:01 or cuda:٣
        if not torch.cuda.is_available():
            raise ValueError(f"{flag}{name}: no CUDA device is available; use {flag}cpu")
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise ValueError(f"{flag}{name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return name
    raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")


def read_config(folder: Path) -> tuple[ModelConfig, dict]:
    """The folder's config as a ModelConfig, and config.json as read. The block size is config.json's, else
    generation_config.json's; where neither names one, LLaDA2.0's is 32 (its generate's), and an SDAR model's is not
    known (they are trained at 4 to 64): 32 is used, with block_size_named False so that the commands say so."""
    raw = read_json(folder, "config.json")
    cfg = config_from_dict(raw)
    gen_cfg = read_json(folder, "generation_config.json", required=False)
    if "block_size" not in raw and "block_size" in gen_cfg:
        cfg.block_size = gen_cfg["block_size"]
        check_config(cfg, "generation_config.json")
    elif gen_cfg.get("block_size") not in (None, cfg.block_size):  # one would be ignored without a word
        raise CheckpointError(f"config.json: block_size {cfg.block_size} and generation_config.json: block_size "
                              f"{gen_cfg['block_size']!r} disagree; keep one")
    cfg.block_size_named = "block_size" in raw or "block_size" in gen_cfg or cfg.model_type == "llada2_moe"
    return cfg, raw


def load(path, device="cpu", dtype=None):
    """Load an SDAR checkpoint folder (Hugging Face layout) -> (model, tokenizer). Raises CheckpointError for
    the folder, ValueError for the arguments."""
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a string such as \"cpu\" or \"cuda\", got {device!r}")
    device = resolve_device(str(device), "device=")  # cuda without a GPU: a ValueError here, not deep in torch
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a checkpoint folder (a str or Path), got a {type(path).__name__}")
    if not os.fspath(path):  # Path("") is the current folder
        raise CheckpointError("the checkpoint folder's name is empty; pass --model DIR")
    if "\0" in os.fsdecode(path):
        raise ValueError(f"path {os.fsdecode(path)!r} holds a NUL character, which no folder's name can")
    folder = Path(path)
    if not os.path.isdir(folder):  # Path.is_dir raises for a name too long
        problem = "is not a folder" if os.path.lexists(folder) else "does not exist"
        raise CheckpointError(f"checkpoint folder {folder} {problem}; pass --model DIR with a folder holding "
                              "config.json, *.safetensors and tokenizer.json")
    folder = folder.resolve()
    name = os.fsencode(folder).decode("utf-8", "backslashreplace")
    if name != str(folder):  # safetensors opens UTF-8 paths only
        raise CheckpointError(f"checkpoint folder {name} has a name that is not UTF-8, which safetensors cannot "
                              "open; rename it")
    cfg, raw = read_config(folder)
    inside_file(folder, "tokenizer.json")
    dtype = _resolve_dtype(dtype, cfg, device)
    unsaid = "tie_word_embeddings" not in raw  # then the files say: tied unless an lm_head.weight is stored
    if unsaid:
        cfg.tie_word_embeddings = False
    headers = read_headers(_weight_files(folder), cfg)
    if unsaid:
        cfg.tie_word_embeddings = "lm_head.weight" not in headers
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
    of an earlier save that this one does not write are removed, so the folder holds one consistent set. dtype: a
    torch dtype or a name load takes ("float32", "bf16", ...).
    Bad arguments raise ValueError (CheckpointError for a path that is not a folder) before anything is written."""
    from safetensors.torch import save_file
    if not isinstance(model, SDAR):
        raise ValueError(f"model must be an SDAR model, got a {type(model).__name__}")
    # Path("") is the current folder; no name holds a NUL
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder) or "\0" in os.fsdecode(folder):
        raise ValueError(f"folder must be a folder's name (a non-empty str or Path), got {folder!r}")
    if not isinstance(dtype, torch.dtype):
        dtype = _named_dtype(dtype)  # "float32", "bf16": the names load takes
    if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):  # what load reads back
        raise ValueError(f"dtype must be torch.bfloat16, float16, float32 or float64, got {dtype!r}")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, numbers.Integral)  # numpy.int64 too
                                        or isinstance(max_shard_bytes, bool) or max_shard_bytes < 0):
        raise ValueError(f"max_shard_bytes must be an integer >= 0 or None, got {max_shard_bytes!r}")
    max_shard_bytes = None if max_shard_bytes is None else int(max_shard_bytes)
    folder = Path(folder)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"{folder} exists and is not a folder; name a folder to save the checkpoint in")
    tensors = {name: torch.cat([p.detach().to("cpu", dtype) for p in params]).contiguous()
               for name, params in hf_layout(model).items()}  # before any write: a model that fails leaves the folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
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
