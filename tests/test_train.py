"""train.py and objectives.py: the two objectives against literal references, and a run that resumes exactly in
either phase."""
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import objectives
import train
from conftest import random_model, tiny_config


def packed_rows():
    """Two rows: [example 0 (8 tokens), example 1 (4 tokens), row padding (4)] and [one 12-token example, padding]."""
    doc = torch.tensor([[0] * 8 + [1] * 4 + [-1] * 4, [0] * 12 + [-1] * 4])
    pos = torch.tensor([list(range(8)) + list(range(4)) + [0] * 4, list(range(12)) + [0] * 4])
    ids = torch.randint(4, 300, doc.shape, generator=torch.Generator().manual_seed(0))
    return ids, doc, pos


def test_causal_mask_literal():
    _, doc, pos = packed_rows()
    mask = objectives.causal_mask(doc, pos)
    for b in range(doc.shape[0]):
        for i in range(doc.shape[1]):
            for j in range(doc.shape[1]):
                if doc[b, i] < 0:
                    expected = i == j                     # padding sees itself only
                else:
                    expected = bool(doc[b, i] == doc[b, j] and pos[b, j] <= pos[b, i])
                assert bool(mask[b, i, j]) == expected, (b, i, j)


def test_ar_loss_matches_one_example_at_a_time():
    # Packing must not change the loss: every example alone, under a causal mask, predicting its next tokens.
    torch.manual_seed(0)
    net = random_model(tiny_config(), seed=1)
    ids, doc, pos = packed_rows()
    loss, _ = objectives.ar_loss_fn(net, ids, doc, pos)
    total, count = 0.0, 0
    for b in range(doc.shape[0]):
        for d in doc[b].unique():
            if d < 0:
                continue
            x = ids[b][doc[b] == d][None]
            n = x.shape[1]
            logits = net(x, attn_mask=torch.ones(n, n, dtype=torch.bool).tril())[0]
            total += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
            count += n - 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_two_copy_mask_literal():
    _, doc, pos = packed_rows()
    bs, S = 4, doc.shape[1]
    mask = objectives.two_copy_mask(doc, pos, bs)
    for b in range(doc.shape[0]):
        for i in range(2 * S):
            for j in range(2 * S):
                qi, kj = i % S, j % S
                noised_q, noised_k = i < S, j < S
                if doc[b, qi] < 0:
                    expected = qi == kj and noised_q == noised_k
                elif doc[b, qi] != doc[b, kj]:
                    expected = False
                else:
                    qb, kb = pos[b, qi] // bs, pos[b, kj] // bs
                    if noised_q:   # its own noised block, and clean blocks before it
                        expected = bool((noised_k and qb == kb) or (not noised_k and kb < qb))
                    else:          # clean copy: block-causal on the clean copy only
                        expected = bool(not noised_k and kb <= qb)
                assert bool(mask[b, i, j]) == expected, (b, i, j)


# ---------------------------------------------------------------------------------------------------
# A whole run on a tiny shape, interrupted and resumed.

ARGS = ["--shape", "2x64", "--problems", "60", "--seq-len", "64", "--vocab-size", "300", "--batch-size", "2",
        "--ar-steps", "3", "--steps", "3", "--ar-minutes", "0", "--minutes", "0", "--device", "cpu"]


@pytest.fixture
def small_data(monkeypatch):
    """Keep the run to seconds: a few paragraphs of natural text instead of the standard library's."""
    paragraphs = data.stories(40, 0)
    monkeypatch.setattr(data, "natural_text", lambda max_chars=None: paragraphs[:20])
    monkeypatch.setattr(data, "stories", lambda n, seed: paragraphs[20:])


def weights(folder):
    return load_file(str(folder / "model-00001-of-00001.safetensors"))


@pytest.mark.parametrize("interrupt_at", [2, 5])  # call 2 is in the autoregressive phase, call 5 in diffusion
def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch, small_data, interrupt_at):
    assert train.main(["--out", str(tmp_path / "whole")] + ARGS) == 0
    step, calls = train.train_step, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", flaky)
    out = tmp_path / "resumed"
    assert train.main(["--out", str(out)] + ARGS) == 130
    saved = torch.load(out / "train_state.pt", weights_only=True)
    phase = json.loads(saved["history"])["phase"]
    assert phase == ("ar" if interrupt_at <= 3 else "diffusion")
    monkeypatch.setattr(train, "train_step", step)
    assert train.main(["--out", str(out), "--resume"] + ARGS) == 0
    whole, resumed = weights(tmp_path / "whole"), weights(out)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    card = (out / "README.md").read_text()
    assert "--resume" in card and "3 steps" in card


def test_never_overwrites_a_checkpoint(tmp_path, small_data, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert train.main(["--out", str(out)] + ARGS) == 2
    assert (out / "config.json").read_text() == "{}"
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert train.main(["--out", str(tmp_path / "file")] + ARGS) == 2
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("flag,value", [("--steps", "-1"), ("--batch-size", "0"), ("--minutes", "nan"),
                                         ("--ar-lr", "inf"), ("--seq-len", "100"), ("--seq-len", "1048576"),
                                         ("--problems", "1000000000")])
def test_bad_values_are_one_line_errors(tmp_path, capsys, flag, value):
    assert train.main(["--out", str(tmp_path / "m"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and flag in err
    assert not (tmp_path / "m").exists()


def test_resume_with_another_shape_is_a_one_line_error(tmp_path, small_data, capsys):
    out = tmp_path / "m"
    assert train.main(["--out", str(out)] + ARGS) == 0
    state = (out / "train_state.pt").read_bytes()
    args = [a if a != "2x64" else "8x384" for a in ARGS]
    assert train.main(["--out", str(out), "--resume"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "--shape 2x64" in err
    assert (out / "train_state.pt").read_bytes() == state


def test_resume_with_another_mix_is_a_one_line_error(tmp_path, small_data, capsys):
    out = tmp_path / "m"
    assert train.main(["--out", str(out), "--mix", "long-heavy"] + ARGS) == 0
    assert "--mix long-heavy" in (out / "README.md").read_text()
    assert train.main(["--out", str(out), "--resume"] + ARGS) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "--mix long-heavy" in err


def test_init_from_keeps_the_checkpoints_block_size_and_context(tmp_path, small_data, hf_tokenizer, capsys):
    """--init-from a checkpoint of blocks of 4 and a context of 512: trained and saved with them, resumed too (the
    run reset them to train.py's 32 and 2048 without a word); a --seq-len they do not fit is one line."""
    from conftest import write_checkpoint
    init = write_checkpoint(tmp_path / "init", random_model(tiny_config(**train.SHAPES["2x64"])), hf_tokenizer).path
    out = tmp_path / "m"
    assert train.main(["--out", str(out), "--init-from", str(init)] + ARGS) == 0
    saved = lambda name: json.loads((out / name).read_text())
    assert (saved("config.json")["block_size"], saved("config.json")["max_position_embeddings"]) == (4, 512)
    assert saved("generation_config.json")["block_size"] == 4 and "block size 4" in (out / "README.md").read_text()
    assert train.main(["--out", str(out), "--resume"] + ARGS) == 0
    assert (saved("config.json")["block_size"], saved("config.json")["max_position_embeddings"]) == (4, 512)
    capsys.readouterr()
    small = write_checkpoint(tmp_path / "small", random_model(tiny_config(**train.SHAPES["2x64"],
                                                                           max_position_embeddings=32)), hf_tokenizer)
    assert train.main(["--out", str(tmp_path / "m2"), "--init-from", str(small.path)] + ARGS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --init-from") and "context (max_position_embeddings) 32" in err[-1] and \
        "--seq-len 64" in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.slow
def test_mixes_hold_their_families_and_plain_text_past_its_first_block(monkeypatch):
    # Docstring paragraphs trained one by one mostly end inside their first block, and a plain prompt was
    # then answered with end-of-text at once (data.documents); the long mixes train them as documents.
    paragraphs = data.natural_text(max_chars=150_000)
    monkeypatch.setattr(data, "natural_text", lambda max_chars=None: paragraphs)
    tok = data.train_tokenizer(paragraphs + data.long_texts(100, 0), vocab_size=1000)
    for mix, share in train.MIXES.items():
        examples = train.build_examples(tok, 400, 0, mix)
        answers = {tok.decode(ids[n_prompt:-2]) for ids, n_prompt in examples if n_prompt}
        plain = [tok.decode(ids[:-1]) for ids, n_prompt in examples if not n_prompt]
        docstrings = [text for text in plain if text.split("\n\n")[0] in paragraphs]
        ends_early = sum(len(tok.encode(text).ids) < 32 for text in docstrings) / len(docstrings)
        assert ends_early > 0.3 if mix == "short" else ends_early < 0.02, (mix, ends_early)
        stories = [t for _, t in data.story_samples(max(int(400 * share["long_chats"]), 5), 0)]
        multistep = [p.solution for p in data.make_problems("train", max(int(400 * share["multistep"]), 5), family="multistep")]
        assert all((t in answers) == (mix != "short") for t in stories + multistep), mix
        assert sum(t in plain for t in data.long_texts(int(400 * share["long_plain"]), 0)) == int(400 * share["long_plain"])


class RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickled, it would make the file
        return (Path.touch, (self.path,))


def edit_state(state, **changes):
    """train_state.pt with some entries replaced; history=dict(...) changes entries of its history."""
    saved = torch.load(state, weights_only=True)
    saved["history"] = json.dumps({**json.loads(saved["history"]), **changes.pop("history", {})})
    torch.save({**saved, **changes}, state)


@pytest.mark.parametrize("damage", ["cut", "foreign", "no tokenizer", "pickle that runs code", "weights a list",
                                    "history without its steps", "block size not a number",
                                    "another optimizer mid-phase"])
def test_resume_from_a_damaged_folder_is_a_one_line_error(tmp_path, small_data, capsys, damage):
    """A train_state.pt cut short, another program's file in its place (one that would run code when unpickled,
    or one that holds a state's keys but not its contents), or the tokenizer gone: one line, exit 2, no warning,
    and the folder as it was."""
    out = tmp_path / "m"
    assert train.main(["--out", str(out)] + ARGS) == 0
    state = out / "train_state.pt"
    if damage == "cut":
        state.write_bytes(state.read_bytes()[:1000])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, state)
    elif damage == "no tokenizer":
        (out / "tokenizer.json").unlink()
    elif damage == "pickle that runs code":
        state.write_bytes(pickle.dumps({"model": RunsCode(tmp_path / "ran")}))
    elif damage == "weights a list":  # was a TypeError from load_state_dict
        edit_state(state, model=[1, 2])
    elif damage == "history without its steps":  # was a KeyError
        torch.save({**torch.load(state, weights_only=True),
                    "history": json.dumps({"phase": "ar", "shape": "2x64", "mix": "long"})}, state)
    elif damage == "block size not a number":
        edit_state(state, history={"block_size": "4"})
    else:  # mid-phase, so the optimizer is read: was a KeyError from AdamW.load_state_dict
        edit_state(state, optimizer={}, history={"phase": "diffusion", "step": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        assert train.main(["--out", str(out), "--resume"] + ARGS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume") and "Traceback" not in err[0], err
    assert not [w for w in warned if "pickle" in str(w.message)]  # torch's warning is no second line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "ran").exists()


def test_a_loss_that_is_not_finite_stops_the_run_and_saves_nothing(tmp_path, monkeypatch, small_data, capsys):
    """A learning rate that diverges: the first NaN loss ends the run with one line, before its step reaches
    the weights; the state saved at the end of the first phase stays, and no weights are written."""
    real, calls = train.loss_fn, []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss, ce = real(*args, **kwargs)
        return (loss * float("nan"), ce) if len(calls) == 2 else (loss, ce)

    import tqdm as tqdm_module
    bars = []

    class Recorded(tqdm_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(train, "loss_fn", diverging)
    monkeypatch.setattr(tqdm_module, "tqdm", Recorded)
    out = tmp_path / "m"
    assert train.main(["--out", str(out)] + ARGS) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: diffusion step 2: the loss is nan") and "lower --lr" in err[-1], err
    assert bars[-1].disable and not bars[-1].leave  # the stopped phase's bar is closed and cleared
    saved = torch.load(out / "train_state.pt", weights_only=True)
    assert json.loads(saved["history"])["phase"] == "diffusion"  # as the autoregressive phase left it
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert not list(out.glob("model*"))


def test_never_trains_into_results_or_over_the_shipped_model(capsys):
    for out, extra in (("results", []), ("checkpoints/sdar-tiny", ["--overwrite"])):
        assert train.main(["--out", str(train.ROOT / out)] + extra + ARGS) == 2
        assert "shipped checkpoint" in capsys.readouterr().err
