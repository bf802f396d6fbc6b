"""Real models' shapes (config.json fields), for timing at real size with random weights (tools/bench.py
--real-size): SDAR-1.7B, SDAR-8B (the paper's model), LLaDA2.0-mini (the paper's mixture-of-experts model),
and tiny versions for quick checks."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the core modules, one folder up
from model import SDAR, ModelConfig

SDAR_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                 block_size=32, mask_token_id=151669, max_position_embeddings=32768)
# The paper's model: SDAR-8B-Chat (Qwen3-8B's shape).
SDAR_8B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
               block_size=32, mask_token_id=151669, max_position_embeddings=32768)
# The paper's second model (mixture of experts, 16B parameters, 1.4B active): LLaDA2.0-mini's config.json.
LLADA2_MINI = dict(model_type="llada2_moe", vocab_size=157184, hidden_size=2048, intermediate_size=5120,
                   num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                   rope_theta=600000.0, partial_rotary_factor=0.5, tie_word_embeddings=False, block_size=32,
                   mask_token_id=156895, max_position_embeddings=16384, num_experts=256, num_experts_per_tok=8,
                   moe_intermediate_size=512, num_shared_experts=1, first_k_dense_replace=1, n_group=8,
                   topk_group=4, routed_scaling_factor=2.5, score_function="sigmoid",
                   moe_router_enable_expert_bias=True, norm_topk_prob=True)
TINY_REAL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, block_size=32, mask_token_id=3,
                 max_position_embeddings=4096)
TINY_MOE = {**LLADA2_MINI, **TINY_REAL, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "n_group": 4, "topk_group": 2}
REAL_SIZE = {"sdar-1.7b": SDAR_1_7B, "sdar-8b": SDAR_8B, "llada2-mini": LLADA2_MINI, "tiny": TINY_REAL,
             "tiny-moe": TINY_MOE}


def random_model(shape: dict, device, dtype):
    """Random weights of a real model's shape, made directly in `dtype` on `device` (no fp32 copy first)."""
    cfg = ModelConfig(**shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = SDAR(cfg)
    finally:
        torch.set_default_dtype(default)
    for p in model.parameters():
        if p.dim() >= 2:  # projections and stacked experts
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()
