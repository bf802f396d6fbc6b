"""The checkpoint: checkpoint.save -> checkpoint.load round trips, the tokenizer's special ids and chat template, and one
clear CheckpointError per kind of broken checkpoint folder."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import checkpoint.config
import checkpoint.tokenizer
from checkpoint import CHATML, CheckpointError, load
import model
from conftest import ENDOFTEXT_ID, IM_END_ID, MASK_ID

SHARD_BYTES = 12_000  # the bf16 embedding alone is 19,200 bytes: several shards


def rounded(net, dtype):
    """A copy of net's parameters as they come back from a checkpoint saved in `dtype`."""
    return {name: p.detach().to(dtype).float() for name, p in net.named_parameters()}


@pytest.mark.parametrize("shards", [None, SHARD_BYTES], ids=["single-file", "sharded"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_bf16(make_checkpoint, tied, shards):
    ckpt = make_checkpoint(tie_word_embeddings=tied, max_shard_bytes=shards, dtype=torch.bfloat16)
    files = sorted(p.name for p in ckpt.path.glob("*.safetensors"))
    if shards:
        assert len(files) > 2 and "model.safetensors" not in files
        index = json.loads((ckpt.path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
        assert all(n.startswith("model.") or n == "lm_head.weight" for n in index["weight_map"])
    else:
        assert files == ["model.safetensors"] and not (ckpt.path / "model.safetensors.index.json").exists()

    net, tok = load(ckpt.path)
    assert (net.lm_head.weight is net.embed_tokens.weight) == tied
    assert net.embed_tokens.weight.dtype == torch.float32  # bf16 on disk, fp32 compute on the CPU
    want = rounded(ckpt.net, torch.bfloat16)
    got = dict(net.named_parameters())
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if not tied:  # the bf16 rounding really happened: the checkpoint is not the fp32 original
        assert not torch.equal(got["lm_head.weight"], ckpt.net.lm_head.weight)

    reference = model.SDAR(ckpt.net.config)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(want[name])
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(ids, block_size=4), reference(ids, block_size=4), atol=1e-6, rtol=0)
    assert tok.mask_id == MASK_ID and tok.eos_ids == sorted([ENDOFTEXT_ID, IM_END_ID])


def test_round_trip_fp32_is_exact_and_keeps_the_config(make_checkpoint):
    ckpt = make_checkpoint(tie_word_embeddings=False, dtype=torch.float32, rope_theta=123.0, block_size=8,
                           num_hidden_layers=3, max_position_embeddings=96)
    net, _ = load(ckpt.path)
    for (name, a), (_, b) in zip(net.named_parameters(), ckpt.net.named_parameters()):
        assert torch.equal(a, b), name
    cfg = net.config
    assert (cfg.rope_theta, cfg.block_size, cfg.num_hidden_layers, cfg.max_position_embeddings, cfg.head_dim) == \
        (123.0, 8, 3, 96, 16)
    assert not net.training


def test_load_dtype_option(make_checkpoint):
    ckpt = make_checkpoint()
    net, _ = load(ckpt.path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    with pytest.raises(ValueError, match="unknown dtype"):
        load(ckpt.path, dtype="int8")


def test_tied_checkpoint_may_also_store_lm_head(make_checkpoint):
    """Some checkpoints keep a copy of the tied head; it is ignored, as is rotary_emb.inv_freq."""
    ckpt = make_checkpoint()
    path = ckpt.path / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, path)
    net, _ = load(ckpt.path)
    assert net.lm_head.weight is net.embed_tokens.weight
    assert torch.equal(net.embed_tokens.weight, ckpt.net.embed_tokens.weight)


# ---------------------------------------------------------------------------------------------------
# Tokenizer: ids from config.json, generation_config.json and tokenizer_config.json; the chat template.

def edit_json(path, **changes):
    d = json.loads(path.read_text()) if path.exists() else {}
    d.update(changes)
    path.write_text(json.dumps(d))


def test_tokenizer_encode_decode(make_checkpoint):
    _, tok = load(make_checkpoint().path)
    text = "<|im_start|>user\nWhat is 17 plus 25?<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == 1 and IM_END_ID in ids and MASK_ID not in ids
    assert tok.decode(ids) == text


def test_mask_id_precedence(make_checkpoint):
    path = make_checkpoint().path
    assert load(path)[1].mask_id == MASK_ID  # found by name: <|MASK|>
    edit_json(path / "tokenizer_config.json", mask_token={"content": "<|im_start|>"})
    assert load(path)[1].mask_id == 1
    edit_json(path / "generation_config.json", mask_token_id=7)
    assert load(path)[1].mask_id == 7
    edit_json(path / "config.json", mask_token_id=9)
    assert load(path)[1].mask_id == 9


def test_eos_ids_from_generation_config_then_tokenizer_config(make_checkpoint):
    path = make_checkpoint(generation_config={"eos_token_id": IM_END_ID}).path
    assert load(path)[1].eos_ids == [IM_END_ID]
    os.remove(path / "generation_config.json")
    edit_json(path / "tokenizer_config.json", eos_token="<|endoftext|>")
    assert load(path)[1].eos_ids == [ENDOFTEXT_ID]
    os.remove(path / "tokenizer_config.json")
    assert load(path)[1].eos_ids == []


def test_eos_ids_from_config_json(make_checkpoint):
    path = make_checkpoint(generation_config={"eos_token_id": ENDOFTEXT_ID}).path
    edit_json(path / "config.json", eos_token_id=[IM_END_ID, ENDOFTEXT_ID])
    assert load(path)[1].eos_ids == [ENDOFTEXT_ID]  # generation_config.json first
    os.remove(path / "generation_config.json")
    edit_json(path / "tokenizer_config.json", eos_token="<|im_start|>")
    assert load(path)[1].eos_ids == [ENDOFTEXT_ID, IM_END_ID]  # then config.json, before tokenizer_config


def test_chat_template_is_chatml_without_a_template(make_checkpoint):
    _, tok = load(make_checkpoint().path)
    assert tok.chat_template is None
    assert tok.apply_chat_template("Hi there") == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_chat_template_from_tokenizer_config(make_checkpoint, monkeypatch):
    path = make_checkpoint().path
    edit_json(path / "tokenizer_config.json", chat_template=TEMPLATE, bos_token="<s>")
    _, tok = load(path)
    assert tok.apply_chat_template("Hi") == "<s>[user] Hi\n[assistant] "
    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` now raises ImportError
    assert tok.apply_chat_template("Hi") == CHATML.format(prompt="Hi")


def test_named_chat_templates_use_the_default_one(make_checkpoint):
    path = make_checkpoint().path
    edit_json(path / "tokenizer_config.json", chat_template=[{"name": "tool_use", "template": "TOOLS"},
                                                             {"name": "default", "template": TEMPLATE}])
    _, tok = load(path)
    assert tok.apply_chat_template("Hi") == "[user] Hi\n[assistant] "


# SDAR-8B-Chat-b32's chat_template.jinja (the Qwen3 template), as the public checkpoint folder ships it
# (a copy is in sands-lab/FOCUS, opencompass-0.5.1.post1/opencompass/models/SDAR-8B-Chat-b32/).
SDAR_8B_TEMPLATE = Path(__file__).parent / "data" / "sdar-8b-chat-b32.chat_template.jinja"


def test_chat_template_jinja_file_wins_and_renders_the_sdar_template(make_checkpoint):
    path = make_checkpoint().path
    edit_json(path / "tokenizer_config.json", chat_template=TEMPLATE)
    shutil.copy(SDAR_8B_TEMPLATE, path / "chat_template.jinja")
    _, tok = load(path)
    # Written by hand from the template: one user turn, the assistant header, and with enable_thinking
    # false (the default here) an empty thinking block, so the model answers without one.
    assert tok.apply_chat_template("What is 17 plus 25?") == (
        "<|im_start|>user\nWhat is 17 plus 25?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tok.enable_thinking = True
    assert tok.apply_chat_template("What is 17 plus 25?") == (
        "<|im_start|>user\nWhat is 17 plus 25?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_that_cannot_render_is_a_checkpoint_error(make_checkpoint):
    path = make_checkpoint().path
    (path / "chat_template.jinja").write_text("{{ raise_exception('only system prompts') }}")
    _, tok = load(path)
    with pytest.raises(CheckpointError, match="only system prompts"):
        tok.apply_chat_template("Hi")
    (path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")  # the sandbox refuses internals
    _, tok = load(path)
    with pytest.raises(CheckpointError, match="chat template"):
        tok.apply_chat_template("Hi")


# ---------------------------------------------------------------------------------------------------
# Broken checkpoints: one CheckpointError each, with a one-line message that names the problem.

def rewrite_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def expect_error(path, *words):
    with pytest.raises(CheckpointError) as err:
        load(path)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def test_error_folder_missing(tmp_path):
    expect_error(tmp_path / "nowhere", "nowhere", "does not exist")


def test_error_config_missing(make_checkpoint):
    path = make_checkpoint().path
    os.remove(path / "config.json")
    expect_error(path, "config.json is missing")


def test_error_config_invalid_json(make_checkpoint):
    path = make_checkpoint().path
    (path / "config.json").write_text('{"model_type": "sdar",')
    expect_error(path, "config.json is not valid JSON")


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", None])
def test_error_unknown_model_type(make_checkpoint, model_type):
    path = make_checkpoint().path
    edit_json(path / "config.json", model_type=model_type)
    expect_error(path, f"model_type {model_type!r} is not supported")


@pytest.mark.parametrize("change,words", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
], ids=["rope_scaling", "hidden_act", "heads"])
def test_error_unsupported_config(make_checkpoint, change, words):
    path = make_checkpoint().path
    edit_json(path / "config.json", **change)
    expect_error(path, "config.json", words)


def test_config_defaults_head_dim_and_block_size(make_checkpoint):
    """Without head_dim, it is hidden_size / num_attention_heads; without block_size in config.json,
    generation_config.json may give it."""
    path = make_checkpoint(head_dim=8, block_size=4, generation_config={"eos_token_id": 2, "block_size": 8}).path
    cfg = json.loads((path / "config.json").read_text())
    del cfg["head_dim"], cfg["block_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    net, _ = load(path)
    assert (net.config.head_dim, net.config.block_size) == (8, 8)


def test_error_weights_file_missing(make_checkpoint):
    path = make_checkpoint().path
    os.remove(path / "model.safetensors")
    expect_error(path, "model.safetensors is missing")


def test_error_shard_missing(make_checkpoint):
    path = make_checkpoint(max_shard_bytes=SHARD_BYTES).path
    shard = sorted(path.glob("model-*.safetensors"))[1]
    os.remove(shard)
    expect_error(path, f"{shard.name} is missing")


def test_error_missing_tensor(make_checkpoint):
    path = make_checkpoint().path
    rewrite_tensors(path / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(path, "missing tensors model.layers.1.mlp.up_proj.weight")


def test_error_untied_checkpoint_without_lm_head(make_checkpoint):
    path = make_checkpoint(tie_word_embeddings=False).path
    rewrite_tensors(path / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    expect_error(path, "missing tensors lm_head.weight")


def test_error_unexpected_tensor(make_checkpoint):
    path = make_checkpoint().path
    rewrite_tensors(path / "model.safetensors",
                    lambda t: t.update({"model.layers.0.mlp.experts.0.weight": torch.zeros(2, 2)}))
    expect_error(path, "unexpected tensor 'model.layers.0.mlp.experts.0.weight'")


def test_error_misshapen_tensor(make_checkpoint):
    path = make_checkpoint().path
    rewrite_tensors(path / "model.safetensors",
                    lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 32)}))
    msg = expect_error(path, "'model.layers.0.self_attn.k_proj.weight'", "(64, 32)", "(32, 32)")
    assert "shape" in msg


def test_error_tokenizer_missing(make_checkpoint):
    path = make_checkpoint().path
    os.remove(path / "tokenizer.json")
    expect_error(path, "tokenizer.json is missing")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_error_corrupt_safetensors(make_checkpoint, damage):
    path = make_checkpoint().path
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": b"not a safetensors file" * 4, "truncated": data[:-64], "empty": b""}[damage])
    expect_error(path, "model.safetensors is not a readable safetensors file")


def test_error_index_without_weight_map(make_checkpoint):
    path = make_checkpoint(max_shard_bytes=SHARD_BYTES).path
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    expect_error(path, "has no weight_map")


def test_error_corrupt_tokenizer_json(make_checkpoint):
    path = make_checkpoint().path
    (path / "tokenizer.json").write_text('{"version": ')
    expect_error(path, "tokenizer.json")


# ---------------------------------------------------------------------------------------------------
# Sizes from the config and the headers, before anything is allocated.

@pytest.mark.parametrize("overrides", [
    {}, {"tie_word_embeddings": False, "attention_bias": True},
    {"model_type": "sdar_moe", "num_hidden_layers": 5, "num_experts": 4, "num_experts_per_tok": 2,
     "moe_intermediate_size": 8, "decoder_sparse_step": 2, "mlp_only_layers": [1, 3, 4]},
    {"model_type": "llada2_moe", "num_hidden_layers": 3, "num_experts": 4, "num_experts_per_tok": 2,
     "moe_intermediate_size": 8, "num_shared_experts": 2, "first_k_dense_replace": 1,
     "moe_router_enable_expert_bias": True, "partial_rotary_factor": 0.5},
], ids=["tied", "untied with bias", "sdar_moe", "llada2_moe"])
def test_parameter_count_from_the_config_alone(overrides):
    from conftest import tiny_config
    cfg = tiny_config(**overrides)
    with torch.device("meta"):
        net = model.SDAR(cfg)
    assert checkpoint.parameter_count(cfg) == sum(p.numel() for p in net.parameters())


def test_shapes_and_dtypes_are_checked_before_allocating(make_checkpoint, monkeypatch):
    path = make_checkpoint().path
    rewrite_tensors(path / "model.safetensors",
                    lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 32)}))
    monkeypatch.setattr(model.SDAR, "to_empty", lambda *a, **k: pytest.fail("allocated before the check"))
    expect_error(path, "k_proj", "(64, 32)")


def test_a_model_larger_than_the_memory_is_refused(make_checkpoint, monkeypatch):
    monkeypatch.setattr(checkpoint.config, "memory_bytes", lambda device: 1000)
    msg = expect_error(make_checkpoint().path, "config.json describes a model of 34,400 parameters", "0.0 GiB")
    assert "memory" in msg


# ---------------------------------------------------------------------------------------------------
# Config fields as transformers 5 writes them.

@pytest.mark.parametrize("kind", ["sdar", "sdar_moe"])
def test_a_transformers_5_config_loads_with_its_rope_theta(tmp_path, hf_tokenizer, kind):
    """transformers 5 keeps the RoPE base only in rope_parameters and names the expert count num_local_experts;
    a config written by it loads the model those fields describe (rope_theta 123, not the default 10000)."""
    transformers = pytest.importorskip("transformers")
    from conftest import random_model, tiny_config, write_checkpoint
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
               tie_word_embeddings=False) if kind == "sdar_moe" else {}
    cfg = tiny_config(model_type=kind, rope_theta=123.0, **moe)
    net = random_model(cfg, seed=3)
    folder = write_checkpoint(tmp_path / "ckpt", net, hf_tokenizer).path
    fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    if kind == "sdar_moe":
        hf = transformers.Qwen3MoeConfig(**fields, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        hf = transformers.Qwen3Config(**fields)
    written = hf.to_dict()
    assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == 123.0
    assert kind == "sdar" or ("num_local_experts" in written and "num_experts" not in written)
    (folder / "config.json").write_text(json.dumps({**written, "model_type": kind, "block_size": cfg.block_size}))
    loaded, _ = load(folder)
    assert loaded.config.rope_theta == 123.0 and loaded.config.num_experts == cfg.num_experts
    ids = torch.randint(4, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, block_size=4), net(ids, block_size=4))


@pytest.mark.parametrize("change,words", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, "per attention type"),
    ({"rope_theta": 5.0, "rope_parameters": {"rope_theta": 6.0}}, "disagree"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},  # was ignored: the
     "quantization_config with quant_method 'fp8'"),                                      # weights read as floats
], ids=["rope_type", "per layer type", "theta conflict", "experts conflict", "sliding window", "layer types",
        "partial rotary", "quantized"])
def test_config_fields_that_would_change_the_model_are_refused(make_checkpoint, change, words):
    path = make_checkpoint().path
    if "num_local_experts" in change:
        change = {**change, "model_type": "sdar_moe", "num_experts": 4}
    edit_json(path / "config.json", **change)
    expect_error(path, "config.json", words)


# ---------------------------------------------------------------------------------------------------
# Links: inside the folder, or to the Hugging Face cache's blobs of the same repository.

def test_links_inside_the_folder_and_to_the_hub_cache_blobs_load(make_checkpoint, tmp_path):
    path = make_checkpoint().path
    (path / "real-config.json").write_bytes((path / "config.json").read_bytes())
    (path / "config.json").unlink()
    (path / "config.json").symlink_to("real-config.json")
    repo = tmp_path / "hub" / "models--x--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in path.iterdir():
        if f.is_file() and not f.is_symlink():
            (repo / "blobs" / f.name).write_bytes(f.read_bytes())
            (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    (snapshot / "config.json").symlink_to("../../blobs/real-config.json")
    for folder in (path, snapshot):
        net, _ = load(folder)
        assert net.config.hidden_size == 32


# ---------------------------------------------------------------------------------------------------
# The chat template: rendered once per tokenizer.

def test_the_template_renders_once_per_tokenizer(make_checkpoint, monkeypatch):
    import generate
    path = make_checkpoint().path
    edit_json(path / "tokenizer_config.json", chat_template=TEMPLATE)
    _, tok = load(path)
    calls = []
    original = checkpoint.tokenizer.render_template
    monkeypatch.setattr(checkpoint.tokenizer, "render_template", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    ids = generate.encode_prompts(tok, [f"prompt {i}" for i in range(5)], chat=True)
    assert len(calls) == 1 and tok.decode(ids[3]) == "[user] prompt 3\n[assistant] "
    tok.enable_thinking = True  # another rendering: once more
    generate.encode_prompts(tok, ["a", "b"], chat=True)
    assert len(calls) == 2
