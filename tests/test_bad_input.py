"""Bad input through the real entry points: each is refused with one line, `error: ...`, exit 2, and no file
that existed before is changed; an interrupt keeps what finished; the Python API checks at its boundary; user
text never becomes special tokens; a save leaves one set of weight files; bench.py never overwrites results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import eval as evaluate
import generate
from checkpoint import CHATML, Tokenizer, load, save
import model
import train
from conftest import ROOT, assert_one_line_error, random_model, tiny_config, write_checkpoint

MAINS = {"generate": generate.main, "eval": evaluate.main, "bench": bench.main, "train": train.main}
NO_MODEL = "{dir}/no-model"  # checks that must come before the model is loaded name a folder that is not there

# (entry point, argv, words the error line must hold). {ckpt}: a good tiny checkpoint, {dir}: the test's folder,
# which holds prompts.jsonl, good.jsonl (an earlier run's results) and bad-prompts files.
CASES = {
    # Data that would be lost.
    "output is the prompts file": ("generate", ["--prompts-file", "{dir}/prompts.jsonl", "--output",
                                                "{dir}/prompts.jsonl"], ["is the prompts file"]),
    "output is the prompts file, with --overwrite": ("generate", ["--prompts-file", "{dir}/prompts.jsonl", "--output",
                                                                  "{dir}/prompts.jsonl", "--overwrite"],
                                                     ["is the prompts file"]),
    "output exists": ("generate", ["--prompt", "Hi", "--output", "{dir}/good.jsonl"], ["exists", "--overwrite"]),
    "output's partial file exists": ("generate", ["--prompt", "Hi", "--output", "{dir}/left.jsonl"],
                                     ["left.jsonl.partial exists"]),
    "eval output exists": ("eval", ["--study", "--output", "{dir}/good.jsonl"], ["exists"]),
    "eval plot of another file": ("eval", ["--plot", "{dir}/good.jsonl"], ["--plot", "not a results file"]),
    # The output path, checked before the model is loaded.
    "output folder missing": ("generate", ["--prompt", "Hi", "--output", "{dir}/nodir/x.jsonl"], ["nodir", "does not exist"]),
    "output is a folder": ("generate", ["--prompt", "Hi", "--output", "{dir}"], ["is a folder"]),
    "eval output folder missing": ("eval", ["--output", "{dir}/nodir/x.json"], ["nodir", "does not exist"]),
    # Numbers.
    "alpha nan": ("generate", ["--prompt", "Hi", "--focus", "--alpha", "nan"], ["alpha", "finite", "nan"]),
    "temperature nan": ("generate", ["--prompt", "Hi", "--temperature", "nan"], ["temperature", "finite"]),
    "threshold nan": ("generate", ["--prompt", "Hi", "--threshold", "nan"], ["threshold", "finite"]),
    "top-p inf": ("generate", ["--prompt", "Hi", "--top-p", "inf"], ["top-p", "finite"]),
    "block size 1000": ("generate", ["--prompt", "Hi", "--block-size", "1000"], ["block-size", "1..256", "1000"]),
    "max-new-tokens not a number": ("generate", ["--prompt", "Hi", "--max-new-tokens", "ten"], ["--max-new-tokens", "'ten'"]),
    "strategy unknown": ("generate", ["--prompt", "Hi", "--strategy", "best"], ["--strategy", "'best'"]),
    "eval alpha nan": ("eval", ["--focus", "--alpha", "nan"], ["alpha", "finite"]),
    "eval num-problems 0": ("eval", ["-n", "0"], ["num-problems", "0"]),
    # Prompts.
    "lone surrogate in a file": ("generate", ["--prompts-file", "{dir}/surrogate.jsonl"], ["line 2", "not valid Unicode"]),
    "file not UTF-8": ("generate", ["--prompts-file", "{dir}/latin1.jsonl"], ["line 2", "not UTF-8"]),
    "undecodable command-line bytes": ("generate", ["--model", "{ckpt}", "--prompt", "Hi", "--prompt",
                                                    os.fsdecode(b"caf\xe9")], ["prompt 2", "not valid Unicode"]),
    "empty prompt in a file": ("generate", ["--prompts-file", "{dir}/empty.jsonl"], ["line 4", "empty"]),
    # config.json.
    "num_key_value_heads 0": ("generate", ["--model", "{dir}/kv0", "--prompt", "Hi"], ["num_key_value_heads", "0"]),
    "config is a list": ("generate", ["--model", "{dir}/list", "--prompt", "Hi"], ["config.json", "object", "list"]),
    "hidden_size a string": ("generate", ["--model", "{dir}/string", "--prompt", "Hi"], ["hidden_size", "'32'"]),
    "mask_token_id outside the vocabulary": ("generate", ["--model", "{dir}/mask", "--prompt", "Hi"],
                                             ["mask_token_id", "vocab_size 300"]),
    # The device, one check for every entry point.
    "generate device tpu": ("generate", ["--prompt", "Hi", "--device", "tpu"], ["unknown device 'tpu'"]),
    "eval device tpu": ("eval", ["--device", "tpu"], ["unknown device 'tpu'"]),
    "bench device tpu": ("bench", ["--device", "tpu"], ["unknown device 'tpu'"]),
    "train device tpu": ("train", ["--out", "{dir}/t", "--device", "tpu"], ["unknown device 'tpu'"]),
    # bench.py's arguments.
    "bench plot missing": ("bench", ["--plot", "{dir}/missing.json"], ["missing.json", "no such file"]),
    "bench plot of another file": ("bench", ["--plot", "{dir}/good.jsonl"], ["--plot", "not a results file"]),
    "bench batch size 0": ("bench", ["--batch-sizes", "32,0"], ["--batch-sizes", "0"]),
    "bench batch size x": ("bench", ["--batch-sizes", "x"], ["--batch-sizes", "'x'"]),
    "bench mode unknown": ("bench", ["--modes", "full,fast"], ["--modes", "'fast'"]),
    "bench repeats 0": ("bench", ["--repeats", "0"], ["--repeats", "0"]),
}
if torch.cuda.is_available():
    del CASES["generate device tpu"]  # still runs; only the cuda case below needs a machine without a GPU
else:
    CASES["eval cuda without a GPU"] = ("eval", ["--device", "cuda"], ["no CUDA device"])
    CASES["generate cuda without a GPU"] = ("generate", ["--prompt", "Hi", "--device", "cuda"], ["no CUDA device"])


@pytest.fixture
def workspace(tmp_path, checkpoint, hf_tokenizer):
    """The test's folder with the files the cases read, and the checkpoints with a broken config.json."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "What is 17 plus 25?"}\n')
    (tmp_path / "good.jsonl").write_text('{"prompt": "an earlier run", "text": "keep me"}\n')
    (tmp_path / "left.jsonl.partial").write_text('{"prompt": "an interrupted run", "text": "keep me too"}\n')
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800 text"}\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "fine"}\n{"prompt": "café"}\n'.encode("latin-1"))
    (tmp_path / "empty.jsonl").write_text('{"prompt": "fine"}\n\n{"prompt": "also fine"}\n{"prompt": " "}\n')
    for name, change in {"kv0": {"num_key_value_heads": 0}, "string": {"hidden_size": "32"},
                         "mask": {"mask_token_id": 9999}, "list": None}.items():
        folder = write_checkpoint(tmp_path / name, random_model(tiny_config()), hf_tokenizer).path
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps([cfg] if change is None else {**cfg, **change}))
    return tmp_path


def snapshot(*folders) -> dict:
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_no_file(name, workspace, checkpoint, capsys):
    entry, argv, words = CASES[name]
    fill = {"dir": str(workspace), "ckpt": str(checkpoint.path)}
    argv = [a.format(**fill) for a in argv]
    if "--model" not in argv and entry != "train":
        argv += ["--model", NO_MODEL.format(**fill)]  # so a check that waits for the model fails the test
    before = snapshot(workspace, checkpoint.path)
    code = MAINS[entry](argv)
    assert_one_line_error(code, capsys.readouterr().err, words)
    assert snapshot(workspace, checkpoint.path) == before


def test_plot_without_matplotlib_says_so_and_fails(workspace, monkeypatch, capsys):
    """A good results file but no matplotlib: one line with the fix, exit 1, no file written."""
    frontier = workspace / "frontier.json"
    frontier.write_text(json.dumps({"modes": [{"mode": "delayed cache 0.9", "accuracy": 0.9,
                                               "row_layers_per_token": 50.0}]}))
    bench_result = workspace / "bench.json"
    bench_result.write_text(json.dumps({"device": "cpu", "modes": [{"mode": "full", "batch_size": 1}]}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    for entry, path in (("eval", frontier), ("bench", bench_result)):
        before = snapshot(workspace)
        assert MAINS[entry](["--plot", str(path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install matplotlib" in err[0], err
        assert snapshot(workspace) == before


# ---------------------------------------------------------------------------------------------------
# Results are kept: an interrupt, a failed run, a good run with --overwrite.

def test_interrupt_keeps_the_finished_results(checkpoint, tmp_path):
    n = 400
    prompts = [f"Prompt number {i}: the quick brown fox" for i in range(n)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--model", str(checkpoint.path),
                             "--prompts-file", str(tmp_path / "p.jsonl"), "--output", str(out), "--batch-size", "2",
                             "--max-new-tokens", "64", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # tiny ops: threads only contend
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert 2 <= len(kept) < n
    assert all(r["prompt"] == prompts[r["index"]] and isinstance(r["text"], str) for r in kept)
    assert stderr.strip().splitlines()[-1] == (f"interrupted: {len(kept)} of {n} prompts finished; "
                                               f"their results are in {partial}")
    assert not out.exists()  # the output's name is given only to a complete set of results
    assert stdout.count("### ") == len(kept)


def test_a_failed_run_leaves_the_output_as_it_was(checkpoint, tmp_path, capsys):
    """--overwrite replaces the output only once every prompt has finished: a run that fails keeps it."""
    good = tmp_path / "out.jsonl"
    good.write_text("an earlier run's results\n")
    code = generate.main(["--model", str(checkpoint.path), "--prompt", "Hi", "--prompt", "the quick brown fox " * 40,
                          "--output", str(good), "--overwrite", "--max-new-tokens", "400"])
    assert code == 2 and "exceeds the model's context" in capsys.readouterr().err
    assert good.read_text() == "an earlier run's results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no partial file left without results


def test_overwrite_replaces_the_output_with_every_result(checkpoint, tmp_path, capsys):
    good = tmp_path / "out.jsonl"
    good.write_text("an earlier run's results\n")
    code = generate.main(["--model", str(checkpoint.path), "--prompt", "Hi", "--prompt", "The lazy dog",
                          "--output", str(good), "--overwrite", "--max-new-tokens", "6"])
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line)["index"] for line in good.read_text().splitlines()] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# ---------------------------------------------------------------------------------------------------
# The Python API checks at its boundary.

@pytest.mark.parametrize("prompts,options,words", [
    ([], {}, "prompts is empty"),
    ("hello", {}, "wrap a single prompt in a list"),
    (None, {}, "prompts must be a list"),
    ([None], {}, "prompt 1 is a NoneType, not text"),
    (["Hi", 5], {}, "prompt 2 is a int, not text"),
    (["Hi", " "], {}, "prompt 2 is empty"),
    (["bad \ud800"], {}, "prompt 1 is not valid Unicode"),
    (["Hi"], {"max_new_tokens": "10"}, "max-new-tokens must be an integer, got '10'"),
    (["Hi"], {"max_new_tokens": 2.5}, "max-new-tokens must be an integer, got 2.5"),
    (["Hi"], {"threshold": None}, "threshold must be a finite number, got None"),
    (["Hi"], {"focus": True, "alpha": float("nan")}, "alpha must be a finite number"),
    (["Hi"], {"focus": "yes"}, "focus must be True or False"),
    (["Hi"], {"block_size": 257}, "block-size must be in 1..256"),
    (["Hi"], {"focus_rank": "best"}, "unknown focus-rank 'best'"),
    (["Hi"], {"max_tokens": 5}, "unknown option"),
], ids=lambda v: repr(v)[:40])
def test_generate_api_checks_its_arguments(loaded, prompts, options, words):
    net, tok = loaded
    with pytest.raises(ValueError) as e:
        generate.generate(net, tok, prompts, **options)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_options_are_checked_when_made_and_are_the_cli_defaults():
    with pytest.raises(ValueError, match="temperature"):
        generate.Options(temperature=float("nan"))
    args = generate.parse_args(["--prompt", "Hi"])
    assert generate.options_from(args) == generate.Options()


def test_generate_ids_refuses_no_prompts(loaded):
    net, tok = loaded
    with pytest.raises(ValueError, match="no prompts"):
        generate.generate_ids(net, [], tok.mask_id, tok.eos_ids, generate.Options())


# ---------------------------------------------------------------------------------------------------
# Prompt text stays text.

def added_tokens(tok) -> dict[int, str]:
    return {i: t.content for i, t in tok.tok.get_added_tokens_decoder().items()}


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "no-chat"])
@pytest.mark.parametrize("which", ["tiny", "shipped"])
def test_prompt_spelling_special_tokens_gets_no_special_ids(loaded, chat, which):
    tok = loaded[1] if which == "tiny" else Tokenizer(generate.DEFAULT_MODEL, model.ModelConfig(vocab_size=4096))
    specials = added_tokens(tok)
    prompt = "Hi " + " ".join(specials.values()) + "".join(specials.values()) + "\nassistant"
    ids = generate.encode_prompts(tok, [prompt], chat)[0]
    template_only = generate.encode_prompts(tok, ["Hi"], chat)[0]
    assert [i for i in ids if i in specials] == [i for i in template_only if i in specials]
    assert [i for i in template_only if i in specials] == ([] if not chat else [i for i in tok.encode(
        CHATML.format(prompt="Hi")) if i in specials])
    assert tok.decode(tok.encode_text(prompt)) == prompt


# ---------------------------------------------------------------------------------------------------
# Files that are rewritten: checkpoint.save, bench.py's results.

@pytest.mark.parametrize("first,second", [(12_000, None), (None, 12_000), (8_000, 30_000)],
                         ids=["shards then one file", "one file then shards", "more shards then fewer"])
def test_a_save_leaves_one_set_of_weight_files(tmp_path, hf_tokenizer, first, second):
    old, new = random_model(tiny_config(), seed=1), random_model(tiny_config(), seed=2)
    write_checkpoint(tmp_path, old, hf_tokenizer, max_shard_bytes=first)
    save(new, tmp_path, max_shard_bytes=second, dtype=torch.float32)
    files = sorted(p.name for p in tmp_path.glob("model*"))
    if second is None:
        assert files == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert files == sorted(set(index["weight_map"].values())) + ["model.safetensors.index.json"]
    loaded, _ = load(tmp_path)
    for (name, a), (_, b) in zip(loaded.named_parameters(), new.named_parameters()):
        assert torch.equal(a, b), name


def test_bench_never_overwrites_a_results_file(tmp_path):
    first = bench.new_results_path(tmp_path, "cpu-2026-11-24")
    assert first == tmp_path / "cpu-2026-11-24.json"
    first.write_text("{}")
    second = bench.new_results_path(tmp_path, "cpu-2026-11-24")
    assert second == tmp_path / "cpu-2026-11-24-2.json"
    second.write_text("{}")
    assert bench.new_results_path(tmp_path, "cpu-2026-11-24") == tmp_path / "cpu-2026-11-24-3.json"


def test_generate_takes_one_checked_options(loaded):
    net, tok = loaded
    opts = generate.Options(max_new_tokens=4)
    assert generate.generate(net, tok, ["Hi"], opts)[0].token_ids == generate.generate(net, tok, ["Hi"], max_new_tokens=4)[0].token_ids
    for bad in ({"max_new_tokens": 4}, "fast"):
        with pytest.raises(ValueError, match="decoder.Options"):
            generate.generate(net, tok, ["Hi"], bad)
    with pytest.raises(ValueError, match="not both"):
        generate.generate(net, tok, ["Hi"], opts, max_new_tokens=8)
