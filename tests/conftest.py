"""Shared fixtures: tiny random SDAR checkpoints in the Hugging Face layout, written through checkpoint.save, with a
byte-level BPE tokenizer trained on a few sentences.

The random weights are scaled up so that logits are peaky: greedy decoding then has no near-ties, and a batched
run must reproduce a single-sequence run token for token.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from checkpoint import load, save  # noqa: E402
import model  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole run (a subprocess, the shipped model's long answers, torch.compile "
                            "on CPU, a real-size bench); `pytest -m 'not slow'` leaves these out for a quick check")


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]  # ids 0..3
ENDOFTEXT_ID, IM_START_ID, IM_END_ID, MASK_ID = range(4)
EOS_IDS = [IM_END_ID, ENDOFTEXT_ID]  # generation_config.json order; the loader sorts them
VOCAB_SIZE = 300

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 17 plus 25? It is 42.",
    "Block diffusion decodes several tokens per step, one block at a time.",
    "A small model for tests, with a tiny vocabulary and random weights.",
    "Masked tokens are predicted at their own position; there is no shift.",
]


def tiny_config(**overrides) -> model.ModelConfig:
    """GQA (4 query heads, 2 kv heads), head_dim not equal to hidden / heads, blocks of 4."""
    cfg = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=512, tie_word_embeddings=True, block_size=4, torch_dtype="float32")
    cfg.update(overrides)
    return model.ModelConfig(**cfg)


def random_model(cfg: model.ModelConfig, seed: int = 0) -> model.SDAR:
    """An fp32 SDAR with random weights, every one of them non-trivial (norm weights too), scaled so that the
    layers move the residual stream and the head gives peaky distributions."""
    gen = torch.Generator().manual_seed(seed)
    net = model.SDAR(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("expert_bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name == "embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":  # untied only
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # projections: std 1/sqrt(fan_in), so every layer changes the residual stream by about its size
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return net.eval()


def takes_a_number_from_the_host(tensor, index, value) -> bool:
    """Does `tensor[index] = value` copy a number from the host, waiting for the device on CUDA? A Python
    number written through a tensor (or list) index, or into a single element, is made on the host and copied
    over by a copy that waits for everything queued (PyTorch's indexed assignment); through slices alone, a
    kernel fills it."""
    parts = index if isinstance(index, tuple) else (index,)
    advanced = any(isinstance(p, (torch.Tensor, list)) for p in parts)   # index_put_
    element = sum(isinstance(p, int) for p in parts) == tensor.dim()    # one element: a copy of one number
    return isinstance(value, (bool, int, float)) and (advanced or element)


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return tok


@dataclass
class Checkpoint:
    path: Path
    net: model.SDAR  # the model that was saved (fp32, before any rounding by the save dtype)


def write_checkpoint(folder: Path, net: model.SDAR, hf_tokenizer, max_shard_bytes=None, dtype=torch.float32,
                     generation_config: dict | None = None) -> Checkpoint:
    folder = Path(folder)
    save(net, folder, max_shard_bytes=max_shard_bytes, dtype=dtype)
    hf_tokenizer.save(str(folder / "tokenizer.json"))
    gen = {"eos_token_id": EOS_IDS} if generation_config is None else generation_config
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return Checkpoint(folder, net)


@pytest.fixture(scope="session")
def hf_tokenizer():
    return train_tokenizer()


@pytest.fixture
def make_checkpoint(tmp_path, hf_tokenizer):
    """make_checkpoint(name, seed=0, max_shard_bytes=None, dtype=torch.float32, generation_config=None,
    **config overrides) -> Checkpoint written under tmp_path/name."""
    def make(name="ckpt", seed=0, max_shard_bytes=None, dtype=torch.float32, generation_config=None, **overrides):
        net = random_model(tiny_config(**overrides), seed)
        return write_checkpoint(tmp_path / name, net, hf_tokenizer, max_shard_bytes, dtype, generation_config)
    return make


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, hf_tokenizer) -> Checkpoint:
    """The shared read-only checkpoint for generation tests: tied, single file, fp32, blocks of 4."""
    return write_checkpoint(tmp_path_factory.mktemp("sdar-tiny"), random_model(tiny_config(), seed=0), hf_tokenizer)


@pytest.fixture(scope="session")
def loaded(checkpoint):
    """(model, tokenizer) loaded from the shared checkpoint. Tests must not modify them."""
    return load(checkpoint.path)


def assert_one_line_error(code: int, err: str, words=()):
    """A refused command: exit 2, and stderr one line `error: ...` holding each of `words`, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"


_opened: list[str] | None = None  # the paths recording_opens collects, while it runs


def _audit(event, args):
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.abspath(os.fsdecode(args[0])))


@contextmanager
def recording_opens(monkeypatch):
    """Every path opened in the with-block: Python's opens (an audit hook: open, os.open, Path.read_*) and the
    files safetensors opens. Yields the list, filled as they happen."""
    global _opened
    import safetensors
    if not getattr(_audit, "added", False):
        sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only inside the block
        _audit.added = True
    original = safetensors.safe_open

    def safe_open(path, *args, **kwargs):
        _opened.append(os.path.abspath(os.fsdecode(path)))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", safe_open)
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None
        monkeypatch.setattr(safetensors, "safe_open", original)
