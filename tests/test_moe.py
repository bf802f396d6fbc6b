"""Mixture-of-experts checkpoints. sdar_moe (SDAR-30B-A3B's layout: Qwen3-MoE layers) against transformers'
Qwen3MoeForCausalLM loading the same files (skipped without transformers); llada2_moe (LLaDA2.0-mini's layout)
against a slow literal reference written here from its modeling code's description, reading the checkpoint's
own tensor names. Both through the decode path, generation and FOCUS; and their config errors."""
import json
import math
import shutil

import pytest
import torch

import generate
import model
from checkpoint import LLADA2_MASK_ID, CheckpointError, Tokenizer, load
from conftest import MASK_ID, random_model, tiny_config, write_checkpoint
from test_generate import spec_generate
from test_model import decode_blockwise, random_ids

BS = 4


def sdar_moe_config(**overrides):
    """3 layers: 0 and 2 MoE, 1 dense (mlp_only_layers); 8 experts, 2 per token, renormalised."""
    cfg = dict(model_type="sdar_moe", num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=24, norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False,
               mask_token_id=MASK_ID)
    return tiny_config(**{**cfg, **overrides})


def llada2_config(**overrides):
    """3 layers: 0 dense (first_k_dense_replace), 1-2 MoE with a shared expert; 8 experts in 4 groups, 2 groups
    and 2 experts per token; sigmoid scores with an expert bias; half the head dimensions rotated."""
    cfg = dict(model_type="llada2_moe", num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=24, num_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
               routed_scaling_factor=2.5, score_function="sigmoid", moe_router_enable_expert_bias=True,
               norm_topk_prob=True, partial_rotary_factor=0.5, tie_word_embeddings=False, mask_token_id=MASK_ID)
    return tiny_config(**{**cfg, **overrides})


@pytest.fixture(scope="module", params=["sdar_moe", "llada2_moe"])
def moe_net(request):
    cfg = sdar_moe_config() if request.param == "sdar_moe" else llada2_config()
    return random_model(cfg, seed=11)


def test_the_layers_are_the_ones_the_config_names():
    kinds = [type(layer.mlp).__name__ for layer in random_model(sdar_moe_config()).layers]
    assert kinds == ["MoE", "MLP", "MoE"]
    kinds = [type(layer.mlp).__name__ for layer in random_model(llada2_config()).layers]
    assert kinds == ["MLP", "MoE", "MoE"]
    net = random_model(llada2_config())
    assert net.layers[1].mlp.shared_experts.gate_proj.weight.shape == (24, 32)  # moe_intermediate x shared
    assert net.rope(torch.arange(3))[0].shape == (3, 8)                         # 16 x 0.5 dims rotated


# ---------------------------------------------------------------------------------------------------
# sdar_moe against transformers' Qwen3-MoE, loading the checkpoint our save wrote.

def test_sdar_moe_matches_transformers_qwen3_moe(tmp_path, hf_tokenizer):
    transformers = pytest.importorskip("transformers")
    net = random_model(sdar_moe_config(), seed=5)
    ours = write_checkpoint(tmp_path / "ours", net, hf_tokenizer).path
    theirs = tmp_path / "qwen3_moe"
    shutil.copytree(ours, theirs)
    cfg = json.loads((ours / "config.json").read_text())
    (theirs / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_moe",
                                                     "architectures": ["Qwen3MoeForCausalLM"]}))
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(str(theirs), attn_implementation="eager").float().eval()
    loaded, _ = load(ours)
    ids = random_ids(2, 11, seed=4)
    allowed = model.block_causal_mask(torch.arange(11), BS)
    additive = torch.zeros(11, 11).masked_fill(~allowed, float("-inf")).expand(2, 1, 11, 11)  # 4D block-causal
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=additive).logits
        got = loaded(ids, block_size=BS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - net(ids, block_size=BS)).abs().max() < 1e-5  # and the save/load round trip is exact


# ---------------------------------------------------------------------------------------------------
# llada2_moe against a literal reference that reads the checkpoint's tensors by their LLaDA2.0 names.

def llada2_checkpoint_tensors(cfg, seed=0) -> dict:
    """Random weights under LLaDA2.0's names and layout (fused query_key_value, rows q, k, v)."""
    gen = torch.Generator().manual_seed(seed)
    h, d = cfg.hidden_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d

    def w(*shape, scale=None):
        return torch.randn(shape, generator=gen) / (shape[-1] ** 0.5 if scale is None else 1 / scale)

    t = {"model.word_embeddings.weight": w(cfg.vocab_size, h, scale=1.0), "lm_head.weight": w(cfg.vocab_size, h, scale=1.0),
         "model.norm.weight": 1 + 0.2 * w(h, scale=1.0)}

    def mlp(prefix, inner):
        t.update({prefix + "gate_proj.weight": w(inner, h), prefix + "up_proj.weight": w(inner, h),
                  prefix + "down_proj.weight": w(h, inner)})

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + 0.2 * w(h, scale=1.0),
                  p + "post_attention_layernorm.weight": 1 + 0.2 * w(h, scale=1.0),
                  p + "attention.query_key_value.weight": w(qkv_rows, h),
                  p + "attention.dense.weight": w(h, cfg.num_attention_heads * d),
                  p + "attention.query_layernorm.weight": 1 + 0.2 * w(d, scale=1.0),
                  p + "attention.key_layernorm.weight": 1 + 0.2 * w(d, scale=1.0)})
        if i < cfg.first_k_dense_replace:
            mlp(p + "mlp.", cfg.intermediate_size)
            continue
        t[p + "mlp.gate.weight"] = w(cfg.num_experts, h)
        t[p + "mlp.gate.expert_bias"] = 0.1 * w(cfg.num_experts, scale=1.0)
        for e in range(cfg.num_experts):
            mlp(p + f"mlp.experts.{e}.", cfg.moe_intermediate_size)
        mlp(p + "mlp.shared_experts.", cfg.moe_intermediate_size * cfg.num_shared_experts)
    return t


def write_llada2_checkpoint(folder, cfg, tensors, hf_tokenizer):
    """config.json in LLaDA2.0's own words (rotary_dim, use_qk_norm, use_qkv_bias, router_dtype, ...)."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    config = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
              "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
              "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": False,
              "use_qkv_bias": False, "use_bias": False, "use_qk_norm": True, "use_rmsnorm": True,
              "partial_rotary_factor": 0.5, "rotary_dim": cfg.head_dim // 2, "hidden_act": "silu",
              "num_experts": cfg.num_experts, "num_shared_experts": cfg.num_shared_experts,
              "num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size": cfg.moe_intermediate_size,
              "first_k_dense_replace": cfg.first_k_dense_replace, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
              "routed_scaling_factor": cfg.routed_scaling_factor, "score_function": "sigmoid",
              "norm_topk_prob": True, "moe_router_enable_expert_bias": True, "router_dtype": "fp32",
              "torch_dtype": "float32", "mask_token_id": cfg.mask_token_id, "block_size": cfg.block_size}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    hf_tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def llada2_reference(t: dict, cfg, ids: list[int], block_size: int) -> torch.Tensor:
    """LLaDA2.0's forward, one token, head and expert at a time, in float64 from the named tensors."""
    t = {k: v.double() for k, v in t.items()}
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rot, n = d // 2, len(ids)

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean() + cfg.rms_norm_eps)

    def rope(v, pos):  # rotate pairs (i, i + rot/2) of the first rot dimensions; the rest pass through
        out = v.clone()
        for i in range(rot // 2):
            angle = pos * cfg.rope_theta ** (-2 * i / rot)
            a, b = v[i], v[i + rot // 2]
            out[i], out[i + rot // 2] = a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)
        return out

    def swiglu(x, prefix):
        gate, up = t[prefix + "gate_proj.weight"] @ x, t[prefix + "up_proj.weight"] @ x
        return t[prefix + "down_proj.weight"] @ (gate * torch.sigmoid(gate) * up)

    def route(x, prefix):  # -> [(expert, weight)]
        scores = [1 / (1 + math.exp(-float(s))) for s in t[prefix + "gate.weight"] @ x]
        biased = [s + float(b) for s, b in zip(scores, t[prefix + "gate.expert_bias"])]
        size = cfg.num_experts // cfg.n_group
        group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(cfg.n_group)]
        groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
        candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda e: -biased[e])[:cfg.num_experts_per_tok]
        total = sum(scores[e] for e in chosen)
        return [(e, scores[e] / total * cfg.routed_scaling_factor) for e in chosen]

    x = [t["model.word_embeddings.weight"][i] for i in ids]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        q, k, v = [], [], []
        for pos in range(n):
            fused = t[p + "attention.query_key_value.weight"] @ rms(x[pos], t[p + "input_layernorm.weight"])
            q.append([rope(rms(fused[j * d:(j + 1) * d], t[p + "attention.query_layernorm.weight"]), pos) for j in range(nh)])
            k.append([rope(rms(fused[(nh + j) * d:(nh + j + 1) * d], t[p + "attention.key_layernorm.weight"]), pos)
                      for j in range(nkv)])
            v.append([fused[(nh + nkv + j) * d:(nh + nkv + j + 1) * d] for j in range(nkv)])
        new_x = []
        for i in range(n):
            keys = [j for j in range(n) if j // block_size <= i // block_size]   # block-causal
            heads = []
            for head in range(nh):
                g = head // (nh // nkv)
                weights = torch.softmax(torch.stack([q[i][head] @ k[j][g] / math.sqrt(d) for j in keys]), 0)
                heads.append(sum(wt * v[j][g] for wt, j in zip(weights, keys)))
            h = x[i] + t[p + "attention.dense.weight"] @ torch.cat(heads)
            y = rms(h, t[p + "post_attention_layernorm.weight"])
            if layer < cfg.first_k_dense_replace:
                out = swiglu(y, p + "mlp.")
            else:
                out = sum(wt * swiglu(y, p + f"mlp.experts.{e}.") for e, wt in route(y, p + "mlp."))
                out = out + swiglu(y, p + "mlp.shared_experts.")
            new_x.append(h + out)
        x = new_x
    return torch.stack([t["lm_head.weight"] @ rms(xi, t["model.norm.weight"]) for xi in x])


def test_llada2_moe_matches_the_literal_reference(tmp_path, hf_tokenizer):
    cfg = llada2_config()
    tensors = llada2_checkpoint_tensors(cfg, seed=2)
    net, tok = load(write_llada2_checkpoint(tmp_path / "llada2", cfg, tensors, hf_tokenizer))
    assert net.config.model_type == "llada2_moe" and net.config.rotary_dim == 8 and tok.mask_id == MASK_ID
    ids = random_ids(1, 10, seed=6)[0].tolist()
    want = llada2_reference(tensors, cfg, ids, BS)
    with torch.no_grad():
        got = net(torch.tensor([ids]), block_size=BS)[0].double()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_llada2_moe_save_writes_its_own_layout(tmp_path, hf_tokenizer):
    """A save of a loaded LLaDA2.0 model writes the same tensor names (fused query_key_value) and loads back."""
    from safetensors.torch import load_file
    cfg = llada2_config()
    tensors = llada2_checkpoint_tensors(cfg, seed=3)
    net, _ = load(write_llada2_checkpoint(tmp_path / "a", cfg, tensors, hf_tokenizer))
    write_checkpoint(tmp_path / "b", net, hf_tokenizer)
    again = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_llada2_mask_token_defaults_to_its_generate_default(checkpoint):
    """No mask id in config.json or generation_config.json: LLaDA2.0's own (156895), not a name guess."""
    cfg = llada2_config(vocab_size=157184, mask_token_id=None)
    assert Tokenizer(checkpoint.path, cfg).mask_id == LLADA2_MASK_ID == 156895


# ---------------------------------------------------------------------------------------------------
# The decode path, generation and FOCUS on both.

def test_decode_path_matches_spec_form(moe_net):
    sequences = [random_ids(1, 14, seed=20)[0], random_ids(1, 11, seed=21)[0]]
    got = decode_blockwise(moe_net, sequences, [0, 1], 2, [5, 3], BS)
    for slot, (ids, n) in enumerate(zip(sequences, [5, 3])):
        with torch.no_grad():
            want = moe_net(ids[None], block_size=BS)[0]
        for p in range(n // BS * BS, len(ids) // BS * BS):
            torch.testing.assert_close(got[slot][p], want[p], atol=1e-4, rtol=0)  # fp32, logits of size ~50


def run(net, prompts, **opts):
    with torch.no_grad():
        return generate.generate_ids(net, prompts, MASK_ID, [], generate.Options(block_size=BS, **opts))


PROMPTS = [[17, 42, 99, 150, 201], [8, 9, 10, 11, 12, 13, 14, 15], [250, 251, 252]]


def test_generation_matches_the_spec_form_loop(moe_net):
    results = run(moe_net, PROMPTS, max_new_tokens=10, threshold=0.6, delayed_cache=False, batch_size=3)
    for prompt, (ids, stats) in zip(PROMPTS, results):
        want_ids, want_decoded, _ = spec_generate(moe_net, prompt, (), "threshold", 0.6, 1, max_new_tokens=10)
        assert ids == want_ids and stats["decoded"] == want_decoded


def test_focus_without_eviction_is_the_delayed_cache(moe_net):
    base = run(moe_net, PROMPTS, max_new_tokens=12, batch_size=3)
    wide = run(moe_net, PROMPTS, max_new_tokens=12, batch_size=3, focus=True, alpha=1000.0)
    assert [ids for ids, _ in wide] == [ids for ids, _ in base]


def test_evicted_tokens_skip_the_experts_of_later_layers(moe_net, monkeypatch):
    """FOCUS unchanged on MoE: the experts of layer 0 see every computed row; from layer 1 on (its attention and
    MLP run after the selection, on the kept rows) exactly the rows kept, stats' computed_deep."""
    seen = {i: 0 for i in range(len(moe_net.layers))}
    for i, layer in enumerate(moe_net.layers):
        if isinstance(layer.mlp, model.MoE):
            original = layer.mlp.forward
            monkeypatch.setattr(layer.mlp, "forward",
                                lambda x, i=i, f=original: (seen.__setitem__(i, seen[i] + x.shape[0]), f(x))[1])
    (ids, stats), = run(moe_net, [PROMPTS[0]], max_new_tokens=12, focus=True, alpha=1.0)
    prefill = len(PROMPTS[0]) // BS * BS
    assert sum(stats["computed_deep"]) < sum(stats["computed"])                    # it did evict
    moe_layers = [i for i, layer in enumerate(moe_net.layers) if isinstance(layer.mlp, model.MoE)]
    for i in moe_layers:
        want = sum(stats["computed"]) if i == 0 else sum(stats["computed_deep"])
        assert seen[i] == want + prefill, f"layer {i}"
    assert any(i >= 1 for i in moe_layers) and (0 in moe_layers) == (moe_net.config.model_type == "sdar_moe")


@pytest.mark.slow
def test_batched_experts_match_the_loop(moe_net):
    """kernels.batched_experts (--compile) against MoE's loop over experts: same logits, same greedy tokens;
    the fast path ends with its block."""
    import kernels
    ids = random_ids(3, 12, seed=13)
    with torch.no_grad():
        want = moe_net(ids, block_size=BS)
        with kernels.fast_paths(moe_net):
            assert all(m.run_experts is kernels.batched_experts for m in moe_net.modules() if isinstance(m, model.MoE))
            got = moe_net(ids, block_size=BS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    plain = run(moe_net, PROMPTS, max_new_tokens=10, batch_size=3)
    assert run(moe_net, PROMPTS, max_new_tokens=10, batch_size=3, compile=True) == plain
    assert all(m.run_experts is model.experts_loop for m in moe_net.modules() if isinstance(m, model.MoE))


# ---------------------------------------------------------------------------------------------------
# Config errors: a missing or unusable expert field is a CheckpointError naming it.

def test_a_llada2_config_without_a_block_size_decodes_in_blocks_of_32(tmp_path, hf_tokenizer):
    """LLaDA2.0's config.json names no block size; its generate decodes in blocks of 32, so no note is due."""
    folder = write_checkpoint(tmp_path / "llada2", random_model(llada2_config(block_size=32)), hf_tokenizer).path
    raw = json.loads((folder / "config.json").read_text())
    del raw["block_size"]
    (folder / "config.json").write_text(json.dumps(raw))
    cfg = load(folder)[0].config
    assert cfg.block_size == 32 and cfg.block_size_named


@pytest.mark.parametrize("kind,change,words", [
    ("sdar_moe", {"num_experts": None}, ["num_experts is missing", "sdar_moe"]),
    ("sdar_moe", {"norm_topk_prob": None}, ["norm_topk_prob is missing"]),
    ("sdar_moe", {"num_experts_per_tok": 9}, ["num_experts_per_tok", "at most num_experts"]),
    ("sdar_moe", {"moe_intermediate_size": 0}, ["moe_intermediate_size", "positive integer"]),
    ("sdar_moe", {"mlp_only_layers": "1"}, ["mlp_only_layers"]),
    ("llada2_moe", {"n_group": 3}, ["n_group", "divisor"]),
    ("llada2_moe", {"topk_group": None}, ["topk_group is missing", "llada2_moe"]),
    ("llada2_moe", {"score_function": "relu"}, ["score_function", "sigmoid"]),
    ("llada2_moe", {"use_qkv_bias": True}, ["use_qkv_bias"]),
    ("llada2_moe", {"routed_scaling_factor": "2.5"}, ["routed_scaling_factor", "positive number"]),
    ("llada2_moe", {"num_experts_per_tok": 6}, ["num_experts_per_tok", "topk_group x experts per group (4)"]),
    ("llada2_moe", {"rotary_dim": 16}, ["rotary_dim 16 and partial_rotary_factor 0.5 disagree"]),
    ("llada2_moe", {"rotary_dim": "8", "partial_rotary_factor": None}, ["rotary_dim", "'8'"]),
    # LLaDA2.0's routing fields were honoured in an sdar_moe config (Qwen3-MoE has none of them)
    ("sdar_moe", {"n_group": 4, "topk_group": 2}, ["n_group 4", "field of LLaDA2.0", "sdar_moe", "remove it"]),
    ("sdar_moe", {"score_function": "sigmoid"}, ["score_function 'sigmoid'", "field of LLaDA2.0"]),
    ("sdar_moe", {"routed_scaling_factor": 2.5}, ["routed_scaling_factor 2.5", "field of LLaDA2.0"]),
    ("sdar_moe", {"partial_rotary_factor": 0.5}, ["partial_rotary_factor 0.5", "field of LLaDA2.0"]),
    # refused only once generating, as logits that are not finite
    ("llada2_moe", {"routed_scaling_factor": 1e308}, ["config.json", "routed_scaling_factor", "at most 1,000"]),
    ("llada2_moe", {"routed_scaling_factor": 1e30}, ["routed_scaling_factor", "at most 1,000"]),  # empty answers
    ("llada2_moe", {"partial_rotary_factor": 0.01}, ["partial_rotary_factor", "at least 2"]),  # no RoPE at all
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_moe_config_is_a_checkpoint_error(tmp_path, hf_tokenizer, kind, change, words):
    cfg = sdar_moe_config() if kind == "sdar_moe" else llada2_config()
    folder = write_checkpoint(tmp_path / kind, random_model(cfg), hf_tokenizer).path
    raw = json.loads((folder / "config.json").read_text())
    raw.update(change)
    raw = {k: v for k, v in raw.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value), f"{w!r} not in {err.value}"
