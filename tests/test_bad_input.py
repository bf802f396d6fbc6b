"""Bad input through the real entry points: each is refused with one line, `error: ...`, exit 2, and no file
that existed before is changed; an untrusted checkpoint folder makes the loader read nothing outside it; an
interrupt keeps what finished; the Python API checks at its boundary; user text never becomes special tokens;
a save leaves one set of weight files; bench.py never overwrites results."""
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bench
import checkpoint.sandbox as template_sandbox
import decoder
import eval as evaluate
import files
import generate
from checkpoint import CHATML, CheckpointError, Tokenizer, load, save
import model
import partial
import plots
import train
from conftest import ROOT, assert_one_line_error, random_model, recording_opens, tiny_config, write_checkpoint

MAINS = {"generate": generate.main, "eval": evaluate.main, "bench": bench.main, "train": train.main}
NO_MODEL = "{dir}/no-model"  # checks that must come before the model is loaded name a folder that is not there
RESULTS_FILE = ROOT / "results" / "cpu-2026-11-30.json"  # a published result that --overwrite must not reach
SHIPPED_CARD = ROOT / "checkpoints" / "sdar-tiny" / "README.md"  # nor a file of a shipped checkpoint


SHAPE_2X64 = train.SHAPES["2x64"]
TRAIN_2X64 = ["--shape", "2x64", "--problems", "60", "--seq-len", "64", "--batch-size", "2", "--ar-steps", "1",
              "--steps", "1", "--ar-minutes", "0", "--minutes", "0", "--device", "cpu"]  # short, were it let through


def hi(folder):
    """argv that loads the checkpoint {dir}/folder and renders the chat template for one prompt."""
    return ["--model", "{dir}/" + folder, "--prompt", "Hi"]


# (entry point, argv, words the error line must hold). {ckpt}: a good tiny checkpoint, {dir}: the test's folder,
# which holds prompts.jsonl, good.jsonl (an earlier run's results), bad-prompts files, outside/ (files a
# checkpoint folder must not reach) and, built when a case names them, the broken checkpoints of BROKEN below.
CASES = {
    # Data that would be lost.
    "output is the prompts file": ("generate", ["--prompts-file", "{dir}/prompts.jsonl", "--output",
                                                "{dir}/prompts.jsonl"], ["is the prompts file"]),
    "output is the prompts file, with --overwrite": ("generate", ["--prompts-file", "{dir}/prompts.jsonl", "--output",
                                                                  "{dir}/prompts.jsonl", "--overwrite"],
                                                     ["is the prompts file"]),
    "output is a hard link to the prompts file": ("generate", ["--prompts-file", "{dir}/prompts.jsonl", "--output",
                                                               "{dir}/hard-link.jsonl", "--overwrite"],
                                                  ["is the prompts file"]),
    "output is a symlink to the prompts file": ("generate", ["--prompts-file", "{dir}/prompts.jsonl", "--output",
                                                             "{dir}/soft-link.jsonl", "--overwrite"],
                                                ["is the prompts file"]),
    "output's partial file is the prompts file": ("generate", ["--prompts-file", "{dir}/res.jsonl.partial", "--output",
                                                               "{dir}/res.jsonl", "--overwrite"],
                                                  ["partial file", "is the prompts file"]),
    "output is a file of the model": ("generate", ["--model", "{ckpt}", "--prompt", "Hi", "--output",
                                                   "{ckpt}/config.json", "--overwrite"], ["file of the checkpoint"]),
    "output is a published result": ("generate", ["--prompt", "Hi", "--output", str(RESULTS_FILE), "--overwrite"],
                                     ["results/"]),
    "output is a fifo": ("generate", ["--prompt", "Hi", "--output", "{dir}/fifo", "--overwrite"],
                         ["not a regular file"]),
    "output is being written by another run": ("generate", ["--prompt", "Hi", "--output", "{dir}/busy.jsonl",
                                                            "--overwrite"], ["another run is writing", "busy.jsonl"]),
    "output of a shipped checkpoint": ("generate", ["--prompt", "Hi", "--output", str(SHIPPED_CARD), "--overwrite"],
                                       ["checkpoints/"]),
    "output empty": ("generate", ["--prompt", "Hi", "--output", ""], ["--output is empty"]),
    "output name too long": ("generate", ["--prompt", "Hi", "--output", "{dir}/" + "a" * 300], ["File name too long"]),
    "output exists": ("generate", ["--prompt", "Hi", "--output", "{dir}/good.jsonl"], ["exists", "--overwrite"]),
    "output's partial file exists": ("generate", ["--prompt", "Hi", "--output", "{dir}/left.jsonl"],
                                     ["left.jsonl.partial exists"]),
    "eval output exists": ("eval", ["--study", "--output", "{dir}/good.jsonl"], ["exists"]),
    "eval plot of another file": ("eval", ["--plot", "{dir}/good.jsonl"], ["--plot", "not a results file"]),
    "eval model card a link out of the folder": ("eval", ["--model", "{dir}/card-link", "--update-card", "-n", "1",
                                                          "--max-new-tokens", "4"], ["README.md", "leads outside"]),
    # The output path, checked before the model is loaded.
    "output folder missing": ("generate", ["--prompt", "Hi", "--output", "{dir}/nodir/x.jsonl"], ["nodir", "does not exist"]),
    "output folder a file": ("generate", ["--prompt", "Hi", "--output", "{dir}/good.jsonl/x.jsonl"],
                             ["good.jsonl is a file, not a folder"]),  # it said the folder does not exist
    "output folder under a file": ("generate", ["--prompt", "Hi", "--output", "{dir}/good.jsonl/sub/x.jsonl"],
                                   ["good.jsonl is a file, not a folder"]),
    "eval output folder a file": ("eval", ["--study", "--output", "{dir}/good.jsonl/x.json"],
                                  ["good.jsonl is a file, not a folder"]),
    "output is a folder": ("generate", ["--prompt", "Hi", "--output", "{dir}"], ["is a folder"]),
    "eval output folder missing": ("eval", ["--study", "--output", "{dir}/nodir/x.json"], ["nodir", "does not exist"]),
    "eval output without a sweep": ("eval", ["--output", "{dir}/x.json"], ["--output goes with"]),
    "eval output empty": ("eval", ["--study", "--output", ""], ["--output is empty"]),
    "eval workloads empty": ("eval", ["--workloads", ""], ["--workloads is empty"]),
    "eval plot empty": ("eval", ["--plot", ""], ["--plot is empty"]),
    "eval plot a folder": ("eval", ["--plot", "{dir}"], ["--plot", "a folder"]),
    "eval plot a fifo": ("eval", ["--plot", "{dir}/fifo"], ["--plot", "not a regular file"]),
    "eval workload twice": ("eval", ["--workloads", "arith,long,arith"], ["--workloads", "twice"]),
    "eval update-card with a sweep": ("eval", ["--study", "--update-card"], ["--update-card", "plain evaluation"]),
    "eval output's partial file exists": ("eval", ["--workloads", "long", "--output", "{dir}/left.jsonl"],
                                          ["left.jsonl.partial exists"]),
    "output a file with a trailing slash": ("generate", ["--prompt", "Hi", "--output", "{dir}/good.jsonl/", "--overwrite"],
                                            ["ends with /", "not a folder"]),
    "eval output with a trailing slash": ("eval", ["--study", "--output", "{dir}/new.json/"], ["ends with /"]),
    "eval frontier output named .png": ("eval", ["--frontier", "--output", "{dir}/f.png"], ["plot would replace it"]),
    "eval frontier output named .PNG": ("eval", ["--frontier", "--output", "{dir}/f.PNG"],  # the same file, where
                                        ["plot would replace it"]),                       # case is ignored
    "eval plot with a sweep flag": ("eval", ["--plot", "{dir}/good.jsonl", "--study"], ["--plot only draws",
                                                                                          "drop --study"]),
    "bench plot with a run flag": ("bench", ["--plot", "{dir}/good.jsonl", "--modes", "full", "--repeats", "2"],
                                   ["--plot only draws", "drop --repeats, --modes"]),  # were ignored
    "eval plot with --model": ("eval", ["--plot", "{dir}/good.jsonl", "--model", "{ckpt}"],  # were ignored, as
                               ["--plot only draws", "drop --model"]),                      # other run flags were not
    "bench plot with --device and --dtype": ("bench", ["--plot", "{dir}/good.jsonl", "--device", "cpu", "--dtype",
                                                       "float32"], ["--plot only draws", "drop --device, --dtype"]),
    "eval plot with --focus": ("eval", ["--plot", "{dir}/good.jsonl", "--focus"],  # said "drop --no-focus"
                               ["--plot only draws", "drop --focus, which"]),
    "eval frontier plot's name taken": ("eval", ["--frontier", "--output", "{dir}/plot.json"],
                                        ["plot.png exists and would be replaced"]),
    "output -": ("generate", ["--prompt", "Hi", "--output", "-"], ["--output -", "name a file"]),
    "eval num-problems 10^9": ("eval", ["-n", "1000000000"], ["num-problems", "1..10,000"]),
    "eval probe-problems -2": ("eval", ["--study", "--probe-problems", "-2"], ["--probe-problems", "-2"]),
    "eval show-failures -1": ("eval", ["--show-failures", "-1"], ["--show-failures", "-1"]),
    "eval probe-problems 0": ("eval", ["--study", "--probe-problems", "0"], ["--probe-problems", "positive"]),
    "eval probe-problems past -n": ("eval", ["--study", "-n", "5", "--probe-problems", "50"],  # used 5, silently
                                    ["--probe-problems 50", "5 problems of the study", "--num-problems"]),
    "eval probe-problems without --study": ("eval", ["--probe-problems", "5"], ["--probe-problems goes with --study"]),
    "eval split with --study": ("eval", ["--study", "--split", "heldout-phrasing"], ["--split goes with"]),
    "eval max-new-tokens 0": ("eval", ["--max-new-tokens", "0"], ["max-new-tokens must be positive"]),
    "eval max-new-tokens 0 with workloads": ("eval", ["--workloads", "arith", "--max-new-tokens", "0"],
                                             ["max-new-tokens must be positive"]),
    "eval fit-probe with nothing to fit": ("eval", ["--model", "{ckpt}", "--fit-probe", "-n", "1", "--max-new-tokens",
                                                    "1", "--device", "cpu"], ["probe fit found no step",
                                                                              "--max-new-tokens"]),
    # Numbers.
    "alpha nan": ("generate", ["--prompt", "Hi", "--focus", "--alpha", "nan"], ["alpha", "finite", "nan"]),
    "alpha 1e19": ("generate", ["--prompt", "Hi", "--focus", "--alpha", "1e19"], ["alpha must be in [1, 1e+06]"]),
    "alpha -1 without focus": ("generate", ["--prompt", "Hi", "--alpha", "-1"], ["alpha must be in [1, 1e+06]"]),
    "focus-rank without --focus": ("generate", ["--prompt", "Hi", "--focus-rank", "random"], ["focus-rank", "--focus"]),
    "alpha without --focus": ("generate", ["--prompt", "Hi", "--alpha", "2"], ["alpha 2.0 needs --focus"]),
    "top-p without a temperature": ("generate", ["--prompt", "Hi", "--top-p", "0.5"],
                                    ["--top-p", "--temperature above 0"]),
    "tokens-per-step with the threshold rule": ("generate", ["--prompt", "Hi", "--tokens-per-step", "4"],
                                                ["tokens-per-step 4", "--strategy static or sequential"]),
    "temperature nan": ("generate", ["--prompt", "Hi", "--temperature", "nan"], ["temperature", "finite"]),
    "threshold nan": ("generate", ["--prompt", "Hi", "--threshold", "nan"], ["threshold", "finite"]),
    "top-p inf": ("generate", ["--prompt", "Hi", "--top-p", "inf"], ["top-p", "finite"]),
    "block size 1000": ("generate", ["--prompt", "Hi", "--block-size", "1000"], ["block-size", "1..256", "1000"]),
    "stop-repeats 10^20": ("generate", ["--prompt", "Hi", "--stop-repeats", str(10**20)], ["stop-repeats", "2^63"]),
    "stop-repeats 10^12": ("generate", ["--prompt", "Hi", "--stop-repeats", str(10**12)],
                           ["stop-repeats", "can never stop"]),
    "seed 10^23": ("generate", ["--prompt", "Hi", "--seed", str(10**23)], ["seed", "2^63"]),
    "seed negative": ("generate", ["--prompt", "Hi", "--seed", "-1"], ["seed", "0..2^63-1"]),
    "max-new-tokens not a number": ("generate", ["--prompt", "Hi", "--max-new-tokens", "ten"], ["--max-new-tokens", "'ten'"]),
    "strategy unknown": ("generate", ["--prompt", "Hi", "--strategy", "best"], ["--strategy", "'best'"]),
    "eval alpha nan": ("eval", ["--focus", "--alpha", "nan"], ["alpha", "finite"]),
    "eval num-problems 0": ("eval", ["-n", "0"], ["num-problems", "0"]),
    "eval sweep with mode flags": ("eval", ["--ablation", "--focus", "--focus-rank", "random"],
                                   ["--focus, --focus-rank would change some of the sweep's modes"]),
    "eval sweep without the delayed cache": ("eval", ["--frontier", "--no-delayed-cache"], ["--no-delayed-cache would"]),
    "eval frontier at another threshold": ("eval", ["--frontier", "--threshold", "0.5"], ["--threshold would"]),
    # Prompts.
    "lone surrogate in a file": ("generate", ["--prompts-file", "{dir}/surrogate.jsonl"], ["line 2", "not valid Unicode"]),
    "file not UTF-8": ("generate", ["--prompts-file", "{dir}/latin1.jsonl"], ["line 2", "not UTF-8"]),
    "file UTF-16 with its mark": ("generate", ["--prompts-file", "{dir}/utf16.jsonl"],  # "invalid start byte"
                                  ["UTF-16", "byte-order mark", "save the file as UTF-8"]),
    "file UTF-16 without a mark": ("generate", ["--prompts-file", "{dir}/utf16le.jsonl"],  # "not valid JSON"
                                   ["line 1", "NUL byte", "UTF-16", "save the file as UTF-8"]),
    "undecodable command-line bytes": ("generate", ["--model", "{ckpt}", "--prompt", "Hi", "--prompt",
                                                    os.fsdecode(b"caf\xe9")], ["prompt 2", "not valid Unicode"]),
    "empty prompt in a file": ("generate", ["--prompts-file", "{dir}/empty.jsonl"], ["line 4", "empty"]),
    "prompts file /dev/zero": ("generate", ["--prompts-file", "/dev/zero"], ["/dev/zero", "larger than"]),
    "prompts file a folder": ("generate", ["--prompts-file", "{dir}"], ["cannot read prompts file"]),
    "prompts line nested too deeply": ("generate", ["--prompts-file", "{dir}/nested.jsonl"], ["line 2", "nested"]),
    "prompts line with a 5001-digit number": ("generate", ["--prompts-file", "{dir}/long-number.jsonl"],
                                              ["line 2", "not valid JSON"]),
    "prompts file with CR line ends": ("generate", ["--prompts-file", "{dir}/cr.jsonl"],  # "not valid JSON"
                                       ["line 1", "CR only", "convert the line ends to LF"]),
    "prompts file of pretty-printed JSON": ("generate", ["--prompts-file", "{dir}/pretty.jsonl"],  # "not valid
                                            ["one JSON document", "on a line of its own"]),         # JSON" only
    "prompts line an array of objects": ("generate", ["--prompts-file", "{dir}/array.jsonl"],
                                         ["line 1", "array of objects", "on a line of its own"]),
    "prompts file of plain text": ("generate", ["--prompts-file", "{dir}/plain.txt"],
                                   ["line 1", "not valid JSON", '{"prompt": "..."}']),
    "prompts file named by an empty string": ("generate", ["--prompt", "Hi", "--prompts-file", ""],
                                              ["--prompts-file is empty"]),
    "prompts file -": ("generate", ["--prompts-file", "-"], ["--prompts-file -", "/dev/stdin"]),
    "prompts file given twice": ("generate", ["--prompts-file", "{dir}/prompts.jsonl", "--prompts-file",
                                              "{dir}/empty.jsonl"], ["--prompts-file is given twice"]),
    "focus and no-focus": ("generate", ["--prompt", "Hi", "--focus", "--no-focus"], ["--focus/--no-focus is given twice"]),
    "prompt line with a setting": ("generate", ["--prompts-file", "{dir}/setting.jsonl"],
                                   ["line 2", '"max_new_tokens" is a setting', "--max-new-tokens"]),
    "prompt key given twice": ("generate", ["--prompts-file", "{dir}/two-keys.jsonl"], ["line 2", '"prompt" is given twice']),
    "prompt key given twice in other letters": ("generate", ["--prompts-file", "{dir}/two-keys-case.jsonl"],
                                                ["line 2", '"prompt" is given twice']),
    "prompt line with a setting spelled as its flag": ("generate", ["--prompts-file", "{dir}/setting-flag.jsonl"],
                                                       ["line 2", '"Max-New-Tokens" is a setting', "--max-new-tokens"]),
    # config.json.
    "num_key_value_heads 0": ("generate", hi("kv0"), ["num_key_value_heads", "0"]),
    "config is a list": ("generate", hi("list"), ["config.json", "object", "list"]),
    "hidden_size a string": ("generate", hi("string"), ["hidden_size", "'32'"]),
    "mask_token_id outside the vocabulary": ("generate", hi("mask"), ["mask_token_id", "vocab_size 300"]),
    "mask_token_id true": ("generate", hi("mask-true"), ["config.json", "mask_token_id", "True"]),
    "config nested too deeply": ("generate", hi("nested-config"), ["config.json", "nested too deeply"]),
    "config is a folder": ("generate", hi("config-folder"), ["config.json", "is a folder"]),
    "config with a 5001-digit number": ("generate", hi("long-number"), ["config.json", "not valid JSON"]),
    "model name too long": ("generate", ["--model", "{dir}/" + "a" * 300, "--prompt", "Hi"], ["does not exist"]),
    "model empty": ("generate", ["--model", "", "--prompt", "Hi"], ["checkpoint folder's name is empty"]),
    "model a file": ("generate", ["--model", "{ckpt}/config.json", "--prompt", "Hi"], ["config.json is not a folder"]),
    "model name not UTF-8": ("generate", hi(os.fsdecode(b"caf\xe9")), ["not UTF-8", "rename it"]),
    # A NUL in a file's name (main(argv) only: a real command line cannot hold one): "embedded null byte", no flag
    "model name with a NUL": ("generate", ["--model", "{dir}/a\0b", "--prompt", "Hi"], ["--model", "NUL character"]),
    "output with a NUL": ("generate", ["--prompt", "Hi", "--output", "{dir}/x\0y"], ["--output", "NUL character"]),
    "prompts file with a NUL": ("generate", ["--prompts-file", "{dir}/p\0q"], ["--prompts-file", "NUL character"]),
    "eval output with a NUL": ("eval", ["--study", "--output", "{dir}/x\0y"], ["--output", "NUL character"]),
    "eval plot with a NUL": ("eval", ["--plot", "{dir}/x\0y"], ["--plot", "NUL character"]),
    "bench out with a NUL": ("bench", ["--out", "{dir}/x\0y"], ["--out", "NUL character"]),
    "bench plot with a NUL": ("bench", ["--plot", "{dir}/x\0y"], ["--plot", "NUL character"]),
    "train out with a NUL": ("train", ["--out", "{dir}/x\0y"], ["--out", "NUL character"]),
    "train init-from with a NUL": ("train", ["--out", "{dir}/t", "--init-from", "{dir}/a\0b"],
                                   ["--init-from", "NUL character"]),
    "rope_scaling a string": ("generate", hi("rope-string"), ["config.json", "rope_scaling", "'yarn'"]),
    "rope_theta and rope_parameters disagree": ("generate", hi("rope-conflict"), ["rope_theta", "rope_parameters",
                                                                                   "disagree"]),
    "hidden_size 10^9": ("generate", hi("hidden-1e9"), ["config.json", "parameters", "memory", "hidden_size"]),
    "num_hidden_layers 10^5": ("generate", hi("layers-1e5"), ["config.json", "parameters", "num_hidden_layers"]),
    "block_size 10^6": ("generate", hi("block-1e6"), ["config.json", "block_size", "1..256", "1000000"]),
    "head_dim odd": ("generate", hi("head-dim-15"), ["config.json", "head_dim must be even", "15"]),  # a RuntimeError
    "rope_theta 1e-300": ("generate", hi("rope-tiny"), ["config.json", "rope_theta", "above 1"]),
    "rms_norm_eps 1e308": ("generate", hi("eps-huge"), ["config.json", "rms_norm_eps", "below 1"]),
    "layer_types a string": ("generate", hi("layer-types"), ["config.json", "layer_types", "list"]),
    "config key given twice": ("generate", hi("block-twice"), ["config.json", '"block_size" is given twice']),
    "torch_dtype not a float type's name": ("generate", hi("dtype-float8"), ["config.json", "torch_dtype", "'float8'"]),
    "rope_scaling with a factor and no type": ("generate", hi("rope-factor"), ["config.json", "rope_scaling",
                                                                               "factor 4.0", "no rope_type"]),
    "block_size of generation_config disagrees": ("generate", hi("gen-block"), ["config.json: block_size 4",
                                                                                "generation_config.json: block_size 8",
                                                                                "disagree"]),
    # generation_config.json, tokenizer_config.json, tokenizer.json.
    "generation_config a list": ("generate", hi("gen-list"), ["generation_config.json", "object", "list"]),
    "tokenizer_config a list": ("generate", hi("tok-list"), ["tokenizer_config.json", "object", "list"]),
    "eos_token_id outside the vocabulary": ("generate", hi("eos-9999"), ["generation_config.json", "eos_token_id",
                                                                          "9999"]),
    "eos_token_id the mask token": ("generate", hi("eos-mask"), ["generation_config.json", "eos_token_id",
                                                                  "mask token"]),
    "eos_token_id a float": ("generate", hi("eos-float"), ["generation_config.json", "eos_token_id", "1.5"]),
    "eos_token_id a string": ("generate", hi("eos-string"), ["generation_config.json", "eos_token_id", "'2'"]),
    "eos_token_id an empty list": ("generate", hi("eos-empty"), ["generation_config.json", "eos_token_id", "[]"]),
    "config eos_token_id the mask token": ("generate", hi("config-eos-mask"), ["config.json", "eos_token_id",
                                                                                "mask token"]),
    "generation mask_token_id true": ("generate", hi("gen-mask-true"), ["generation_config.json", "mask_token_id",
                                                                         "True"]),
    "tokenizer ids beyond the vocabulary": ("generate", hi("vocab-256"), ["tokenizer.json", "beyond",
                                                                          "vocab_size 256"]),
    "mask_token not a token": ("generate", hi("mask-unknown"), ["tokenizer_config.json", "'<|mask|>'",
                                                                "not a token of tokenizer.json"]),
    # The weights.
    "index points outside the folder": ("generate", hi("index-up"), ["weight_map", "../outside/model.safetensors",
                                                                     "inside the checkpoint folder"]),
    "index gives an absolute path": ("generate", hi("index-absolute"), ["weight_map", "inside the checkpoint folder"]),
    "index leaves out shards": ("generate", hi("index-short"), ["missing tensors", "in all",
                                                               "model.safetensors.index.json's weight_map leaves"]),
    "index names the folder as a shard": ("generate", hi("index-dot"), ["weight_map names a shard",
                                                                         "'.' is not a file name"]),
    "index value not a string": ("generate", hi("index-int"), ["weight_map", "strings", "5"]),
    "weights a link out of the folder": ("generate", hi("weights-link"), ["model.safetensors",
                                                                          "leads outside the checkpoint folder"]),
    "config a link out of the folder": ("generate", hi("config-link"), ["config.json", "leads outside"]),
    "tokenizer a link out of the folder": ("generate", hi("tokenizer-link"), ["tokenizer.json", "leads outside"]),
    "template a link out of the folder": ("generate", hi("template-link"), ["chat_template.jinja", "leads outside"]),
    "integer weights": ("generate", hi("int-weights"), ["model.norm.weight", "I32", "floats"]),
    "NaN weight": ("generate", hi("nan-weight"), ["model.layers.0.mlp.up_proj.weight", "NaN"]),
    "weights that overflow": ("generate", hi("huge-weight"), ["logits are not finite", "check the checkpoint"]),
    "tied head of another shape": ("generate", hi("tied-head"), ["lm_head.weight", "(7, 3)", "tied"]),
    "one weights file beside an index of shards": ("generate", hi("two-weight-sets"), ["two sets of weights",
                                                                                        "keep one"]),
    # The chat template: every failure is one line naming its file.
    "template include": ("generate", hi("t-include"), ["chat_template.jinja", "cannot be rendered"]),
    "template division by zero": ("generate", hi("t-zero"), ["chat_template.jinja", "ZeroDivisionError"]),
    "template recursion": ("generate", hi("t-recursion"), ["chat_template.jinja", "RecursionError"]),
    "template string bomb": ("generate", hi("t-bomb"), ["chat_template.jinja", "repeats"]),
    "template power bomb": ("generate", hi("t-power"), ["chat_template.jinja", "too large"]),
    "template filter bomb": ("generate", hi("t-center"), ["chat_template.jinja", "too large"]),
    "template format bomb": ("generate", hi("t-format"), ["chat_template.jinja", "too wide"]),
    "template doubling": ("generate", hi("t-doubling"), ["chat_template.jinja", "built a value"]),
    "template huge range": ("generate", hi("t-range"), ["chat_template.jinja", "range of 50,000 items"]),
    "template output bomb": ("generate", hi("t-output"), ["chat_template.jinja", "output passed"]),
    "template join bomb": ("generate", hi("t-join"), ["chat_template.jinja", "memory"]),
    "template that never ends": ("generate", hi("t-loops"), ["chat_template.jinja", "took more than"]),
    "template not a string": ("generate", hi("t-number"), ["tokenizer_config.json", "chat_template", "string"]),
    "template empty": ("generate", hi("t-empty"), ["tokenizer_config.json", "does not show the user's message"]),
    "named default template without its text": ("generate", hi("t-named-none"),  # was ChatML without a word
                                                ["tokenizer_config.json", '"default" template', "string", "None"]),
    "named default template twice": ("generate", hi("t-named-twice"), ["tokenizer_config.json",
                                                                       '"default" template twice']),
    "named templates without a default": ("generate", hi("t-named"), ["tokenizer_config.json", "no \"default\"",
                                                                        "['tool_use']"]),
    # The device, one check for every entry point.
    "generate device tpu": ("generate", ["--prompt", "Hi", "--device", "tpu"], ["unknown device 'tpu'"]),
    "eval device tpu": ("eval", ["--device", "tpu"], ["unknown device 'tpu'"]),
    "bench device tpu": ("bench", ["--device", "tpu"], ["unknown device 'tpu'"]),
    "generate device cuda:01": ("generate", ["--prompt", "Hi", "--device", "cuda:01"], ["unknown device 'cuda:01'"]),
    "eval device with a digit torch does not read": ("eval", ["--device", "cuda:\u0663"], ["unknown device"]),
    "train device tpu": ("train", ["--out", "{dir}/t", "--device", "tpu"], ["unknown device 'tpu'"]),
    "train out not makeable": ("train", ["--out", "/proc/no-such-folder/t"], ["--out", "cannot make the folder"]),
    "train out name too long": ("train", ["--out", "{dir}/" + "a" * 300], ["File name too long"]),
    "train usage error": ("train", ["--out", "{dir}/t", "--steps", "ten"], ["--steps", "'ten'"]),
    "train seed 10^23": ("train", ["--out", "{dir}/t", "--seed", str(10**23)], ["--seed", "2^63"]),
    "train lr 1e308": ("train", ["--out", "{dir}/t", "--lr", "1e308", "--device", "tpu"], ["--lr", "at most 1"]),
    "train vocab-size below the bytes": ("train", ["--out", "{dir}/t", "--vocab-size", "5", "--device", "tpu"],
                                         ["--vocab-size", "at least 260"]),  # it trained with 260 without a word
    "train shard-mb 1e308": ("train", ["--out", "{dir}/t", "--shard-mb", "1e308", "--device", "tpu"],
                             ["--shard-mb", "at most"]),  # it failed at the save, after the training
    "train out empty": ("train", ["--out", ""], ["--out is empty"]),
    "train out the checkpoints folder": ("train", ["--out", str(ROOT / "checkpoints"), "--overwrite", "--device", "tpu"],
                                         ["shipped checkpoint"]),  # tpu: were it let through, no training starts
    "train out the project's folder": ("train", ["--out", str(ROOT), "--overwrite", "--device", "tpu"],
                                       ["holds the project's results"]),
    "train out in results": ("train", ["--out", str(ROOT / "results" / "study"), "--overwrite", "--device", "tpu"],
                             ["is in or holds the project's results"]),
    "train init-from empty": ("train", ["--out", "{dir}/t", "--init-from", ""], ["--init-from is empty"]),
    "train init-from missing": ("train", ["--out", "{dir}/t", "--init-from", "{dir}/nothere"],
                                ["--init-from", "nothere does not exist"]),  # said "no tokenizer.json there"
    "train init-from a file": ("train", ["--out", "{dir}/t", "--init-from", "{dir}/good.jsonl"],
                               ["--init-from", "good.jsonl is not a folder"]),
    "train init-from the out folder": ("train", ["--out", "{dir}/init-copy", "--init-from", "{dir}/init-copy/",
                                                 "--overwrite"], ["--init-from", "is the --out folder"]),
    "train init-from a tokenizer without a mask": ("train", ["--out", "{dir}/t", "--init-from", "{dir}/no-mask-token"],
                                                    ["--init-from", "has no token <|MASK|>"]),
    "train init-from of another shape": ("train", ["--out", "{dir}/t", "--init-from", "{ckpt}"],
                                         ["--init-from", "hidden_size 32, --shape 8x384 has 384"]),
    "train init-from with byte-order marks": ("train", ["--out", "{dir}/t", "--init-from", "{dir}/bom"],
                                              ["--init-from", "hidden_size 32, --shape 8x384 has 384"]),  # read past
    "train init-from with an untied head": ("train", ["--out", "{dir}/t", "--init-from", "{dir}/untied-2x64",
                                                      *TRAIN_2X64], ["--init-from", "tie_word_embeddings False"]),
    "train init-from of another rope_theta": ("train", ["--out", "{dir}/t", "--init-from", "{dir}/theta-2x64",
                                                        *TRAIN_2X64], ["--init-from", "rope_theta 1000000.0"]),
    "train init-from with resume": ("train", ["--out", "{dir}/t", "--resume", "--init-from", "{ckpt}"],
                                    ["--init-from goes without --resume"]),
    "train resume with a broken tokenizer": ("train", ["--out", "{dir}/resume-tok", "--resume"],
                                             ["--resume", "tokenizer.json", "cannot be read"]),
    "train resume with a fifo for its state": ("train", ["--out", "{dir}/resume-fifo", "--resume"],
                                               ["--resume", "train_state.pt is not a regular file"]),
    "train resume with a fifo for its tokenizer": ("train", ["--out", "{dir}/resume-tok-fifo", "--resume"],
                                                   ["--resume", "tokenizer.json is not a regular file"]),
    # bench.py's arguments.
    "bench plot missing": ("bench", ["--plot", "{dir}/missing.json"], ["missing.json", "no such file"]),
    "bench plot of another file": ("bench", ["--plot", "{dir}/good.jsonl"], ["--plot", "not a results file"]),
    "bench batch size 0": ("bench", ["--batch-sizes", "32,0"], ["--batch-sizes", "0"]),
    "bench batch size 10^20": ("bench", ["--batch-sizes", f"32,{10**20}"], ["--batch-sizes", "2^63", str(10**20)]),
    "bench batch size x": ("bench", ["--batch-sizes", "x"], ["--batch-sizes", "'x'"]),
    "bench mode unknown": ("bench", ["--modes", "full,fast"], ["--modes", "'fast'"]),
    "bench repeats 0": ("bench", ["--repeats", "0"], ["--repeats", "0"]),
    "bench mode twice": ("bench", ["--modes", "full,full"], ["--modes", "twice"]),
    "bench real size on a CPU": ("bench", ["--real-size", "--device", "cpu"], ["needs a GPU"]),
    "bench plot empty": ("bench", ["--plot", ""], ["--plot is empty"]),
    "bench out empty": ("bench", ["--out", ""], ["--out is empty"]),
    "bench out name too long": ("bench", ["--out", "{dir}/" + "o" * 300], ["--out", "File name too long"]),
    "bench prompts past the bound": ("bench", ["--num-prompts", "1000000000"], ["--num-prompts", "at most"]),
    "bench replay problems past the bound": ("bench", ["--real-size", "--replay-problems", "1000000000"],
                                             ["--replay-problems", "at most 10,000"]),
    "bench queue past the bound": ("bench", ["--real-size", "--queue-factor", str(10**12)],
                                   ["--queue-factor", "at most 1,000"]),
    "bench repeats past the bound": ("bench", ["--repeats", str(10**12)], ["--repeats", "at most 1,000"]),
    "bench real batch past the bound": ("bench", ["--real-size", "--real-batches", "64," + str(10**9)],
                                        ["--real-batches", "at most 65,536"]),
    "bench real-size flag without it": ("bench", ["--contexts", "64"], ["--contexts goes with --real-size"]),
    "bench context past the shape's": ("bench", ["--real-size", "--real-size-config", "tiny", "--contexts", "256,4000",
                                                 "--out", "{dir}/bench"], ["--contexts 4000", "context of 4,096"]),
    "bench attention kernel without compile": ("bench", ["--attention", "flex"], ["--attention goes with --compile"]),
    "bench attention kernel on the CPU": ("bench", ["--attention", "flex", "--compile", "--device", "cpu"],  # its
                                          ["--attention flex", "CUDA kernel", "--device cuda"]),  # results said flex
    "bench dtype with --real-size": ("bench", ["--real-size", "--real-size-config", "tiny", "--dtype", "float64"],
                                     ["--dtype goes without --real-size"]),  # was ignored
    "bench modes with --real-size": ("bench", ["--real-size", "--real-size-config", "tiny", "--modes", "full"],
                                     ["--modes goes without --real-size"]),
    # eval.py's --only.
    "eval only without oracle": ("eval", ["--only", "saturation"], ["--only goes with --oracle"]),
    "eval only matching nothing": ("eval", ["--oracle", "arith", "--only", "zzz"], ["--only 'zzz'", "no entry"]),
    "eval only empty": ("eval", ["--oracle", "arith", "--only", ""], ["--only is empty"]),  # ran every entry
    # Results files read back by --plot.
    "bench plot nested too deeply": ("bench", ["--plot", "{dir}/deep.json"], ["--plot", "not a results file"]),
    "eval plot nested too deeply": ("eval", ["--plot", "{dir}/deep.json"], ["--plot", "not a results file"]),
    "bench plot with a 5001-digit number": ("bench", ["--plot", "{dir}/long-number.json"], ["long-number.json",
                                                                                           "not a results file"]),
    "eval plot with a 5001-digit number": ("eval", ["--plot", "{dir}/long-number.json"], ["long-number.json",
                                                                                         "not a results file"]),
}
if torch.cuda.is_available():
    del CASES["generate device tpu"]  # still runs; only the cuda case below needs a machine without a GPU
else:
    CASES["eval cuda without a GPU"] = ("eval", ["--device", "cuda"], ["no CUDA device"])
    CASES["generate cuda without a GPU"] = ("generate", ["--prompt", "Hi", "--device", "cuda"], ["no CUDA device"])


def edit_json(name, **changes):
    def edit(folder, root):
        path = folder / name
        d = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**d, **changes}))
    return edit


def write_file(name, text):
    def write(folder, root):
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_text(text)
    return write


def link_out(name):
    """name becomes a link to root/outside/name, a good file that the loader must not open."""
    def link(folder, root):
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(root / "outside" / name)
    return link


def index_to(target):
    """The weights as one 'shard' named `target` in model.safetensors.index.json; the folder's own file goes."""
    def index(folder, root):
        names = load_file(folder / "model.safetensors").keys()
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: target(root) for n in names}}))
    return index


def byte_order_marks(folder, root):
    """A UTF-8 byte-order mark at the start of every JSON file (some Windows editors write one)."""
    for path in folder.glob("*.json"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def index_short(folder, root):
    """The weights in shards; the index names only the first, with the embeddings (the rest: most of the model)."""
    save(random_model(tiny_config()), folder, max_shard_bytes=12_000, dtype=torch.float32)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = index["weight_map"]["model.embed_tokens.weight"]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v == first}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def tensors(change):
    def rewrite(folder, root):
        t = load_file(folder / "model.safetensors")
        change(t)
        save_file(t, folder / "model.safetensors")
    return rewrite


def two_weight_sets(folder, root):
    """Shards with their index beside the single model.safetensors of other weights."""
    single = (folder / "model.safetensors").read_bytes()
    save(random_model(tiny_config(), seed=1), folder, max_shard_bytes=12_000, dtype=torch.float32)
    (folder / "model.safetensors").write_bytes(single)


def config_folder(folder, root):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def vocab_256(folder, root):
    """Weights for 256 tokens beside the 300-token tokenizer."""
    save(random_model(tiny_config(vocab_size=256)), folder, dtype=torch.float32)


NESTED = "[" * 100_000 + "]" * 100_000
# Broken checkpoints, each a copy of the good tiny one with one change(folder, the test's folder).
BROKEN = {
    "kv0": edit_json("config.json", num_key_value_heads=0),
    "string": edit_json("config.json", hidden_size="32"),
    "mask": edit_json("config.json", mask_token_id=9999),
    "list": lambda f, r: (f / "config.json").write_text(json.dumps([json.loads((f / "config.json").read_text())])),
    "mask-true": edit_json("config.json", mask_token_id=True),
    "nested-config": write_file("config.json", NESTED),
    "config-folder": config_folder,
    "rope-string": edit_json("config.json", rope_scaling="yarn"),
    "rope-conflict": edit_json("config.json", rope_theta=10000.0, rope_parameters={"rope_theta": 1e6}),
    "hidden-1e9": edit_json("config.json", hidden_size=10**9),
    "layers-1e5": edit_json("config.json", num_hidden_layers=10**5),
    "block-1e6": edit_json("config.json", block_size=10**6),
    "head-dim-15": lambda f, r: save(random_model(tiny_config(head_dim=15)), f, dtype=torch.float32),
    "long-number": lambda f, r: (f / "config.json").write_text(
        (f / "config.json").read_text().replace('"vocab_size": 300', '"vocab_size": 1' + "0" * 5000)),
    "rope-tiny": edit_json("config.json", rope_theta=1e-300),
    "eps-huge": edit_json("config.json", rms_norm_eps=1e308),
    "layer-types": edit_json("config.json", layer_types="sliding_attention"),
    "block-twice": lambda f, r: (f / "config.json").write_text(  # json would keep the second without a word
        (f / "config.json").read_text().replace('"block_size": 4', '"block_size": 4, "block_size": 8')),
    "dtype-float8": edit_json("config.json", torch_dtype="float8"),  # --dtype auto read it as bfloat16
    "rope-factor": edit_json("config.json", rope_scaling={"factor": 4.0}),
    "gen-block": edit_json("generation_config.json", block_size=8),
    "two-weight-sets": two_weight_sets,
    "gen-list": write_file("generation_config.json", "[2, 0]"),
    "tok-list": write_file("tokenizer_config.json", "[]"),
    "eos-9999": edit_json("generation_config.json", eos_token_id=9999),
    "eos-mask": edit_json("generation_config.json", eos_token_id=[2, 3]),
    "eos-float": edit_json("generation_config.json", eos_token_id=1.5),
    "eos-string": edit_json("generation_config.json", eos_token_id="2"),
    "eos-empty": edit_json("generation_config.json", eos_token_id=[]),
    "config-eos-mask": edit_json("config.json", eos_token_id=3),
    "gen-mask-true": edit_json("generation_config.json", mask_token_id=True),
    "vocab-256": vocab_256,
    "mask-unknown": edit_json("tokenizer_config.json", mask_token="<|mask|>"),  # the token is <|MASK|>
    "index-up": index_to(lambda root: "../outside/model.safetensors"),
    "index-absolute": index_to(lambda root: str(root / "outside" / "model.safetensors")),
    "index-int": index_to(lambda root: 5),
    "index-short": index_short,
    "index-dot": index_to(lambda root: "."),
    "weights-link": link_out("model.safetensors"),
    "config-link": link_out("config.json"),
    "tokenizer-link": link_out("tokenizer.json"),
    "template-link": link_out("chat_template.jinja"),
    "int-weights": tensors(lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)})),
    "nan-weight": tensors(lambda t: t["model.layers.0.mlp.up_proj.weight"].view(-1)[5].fill_(float("nan"))),
    "huge-weight": tensors(lambda t: t["model.layers.0.mlp.up_proj.weight"].mul_(1e38)),  # finite, overflows later
    "tied-head": tensors(lambda t: t.update({"lm_head.weight": torch.zeros(7, 3)})),
    "t-include": write_file("chat_template.jinja", "{% include '/etc/passwd' %}"),
    "t-zero": write_file("chat_template.jinja", "{{ 1 // 0 }}"),
    "t-recursion": write_file("chat_template.jinja", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"),
    "t-bomb": write_file("chat_template.jinja", "{{ 'a' * 10**10 }}"),
    "t-power": write_file("chat_template.jinja", "{{ 9 ** 999999999 }}"),
    "t-center": write_file("chat_template.jinja", "{{ 'a' | center(10**10) }}"),
    "t-format": write_file("chat_template.jinja", "{{ '%1000000000s' % 'a' }}"),
    "t-doubling": write_file("chat_template.jinja", "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
                                                    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"),
    "t-range": write_file("chat_template.jinja", "{% for i in range(50000) %}{% endfor %}"),
    "t-output": write_file("chat_template.jinja", "{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}"),
    "t-join": write_file("chat_template.jinja", "{% set x = 'a' * 99999 %}{{ ([x] * 20000) | join }}"),
    "t-loops": write_file("chat_template.jinja", "{% for i in range(10000) %}{% for j in range(10000) %}"
                                                 "{% endfor %}{% endfor %}"),
    "t-number": edit_json("tokenizer_config.json", chat_template=5),
    "t-empty": edit_json("tokenizer_config.json", chat_template=""),  # not ChatML in its place
    "t-named": edit_json("tokenizer_config.json", chat_template=[{"name": "tool_use", "template": "{{ messages }}"}]),
    "t-named-none": edit_json("tokenizer_config.json", chat_template=[{"name": "default"}]),
    "t-named-twice": edit_json("tokenizer_config.json", chat_template=[{"name": "default", "template": "{{ messages }}"},
                                                                       {"name": "default", "template": "x"}]),
    "card-link": lambda f, r: (f / "README.md").symlink_to(r / "good.jsonl"),
    os.fsdecode(b"caf\xe9"): lambda f, r: None,  # the good checkpoint under a name that is not UTF-8
    "no-mask-token": lambda f, r: (f / "tokenizer.json").write_text(
        (f / "tokenizer.json").read_text().replace('"<|MASK|>"', '"<|NOMASK|>"')),
    "untied-2x64": lambda f, r: save(random_model(tiny_config(**SHAPE_2X64, tie_word_embeddings=False)), f,
                                     dtype=torch.float32),
    "theta-2x64": lambda f, r: save(random_model(tiny_config(**SHAPE_2X64, rope_theta=1e6)), f, dtype=torch.float32),
    "init-copy": lambda f, r: None,  # the good checkpoint, which train.py must not write over
    "bom": byte_order_marks,
    "resume-fifo": lambda f, r: os.mkfifo(f / "train_state.pt"),
    "resume-tok-fifo": lambda f, r: ((f / "train_state.pt").write_bytes(b"state"), (f / "tokenizer.json").unlink(),
                                     os.mkfifo(f / "tokenizer.json")),
    "resume-tok": lambda f, r: ((f / "train_state.pt").write_bytes(b"state"), (f / "tokenizer.json").write_text("{")),
}


@pytest.fixture
def workspace(tmp_path, checkpoint):
    """The test's folder with the files the cases read (broken checkpoints: build_broken)."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "What is 17 plus 25?"}\n')
    (tmp_path / "res.jsonl.partial").write_text('{"prompt": "a prompts file with an unlucky name"}\n')
    os.link(tmp_path / "prompts.jsonl", tmp_path / "hard-link.jsonl")
    (tmp_path / "soft-link.jsonl").symlink_to(tmp_path / "prompts.jsonl")
    (tmp_path / "good.jsonl").write_text('{"prompt": "an earlier run", "text": "keep me"}\n')
    (tmp_path / "left.jsonl.partial").write_text('{"prompt": "an interrupted run", "text": "keep me too"}\n')
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800 text"}\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "fine"}\n{"prompt": "café"}\n'.encode("latin-1"))
    (tmp_path / "utf16.jsonl").write_bytes('{"prompt": "fine"}\r\n'.encode("utf-16"))  # Windows PowerShell's >
    (tmp_path / "utf16le.jsonl").write_bytes('{"prompt": "fine"}\n'.encode("utf-16-le"))
    (tmp_path / "empty.jsonl").write_text('{"prompt": "fine"}\n\n{"prompt": "also fine"}\n{"prompt": " "}\n')
    (tmp_path / "cr.jsonl").write_bytes(b'{"prompt": "fine"}\r{"prompt": "old Mac"}\r')
    (tmp_path / "pretty.jsonl").write_text(json.dumps([{"prompt": "one"}, {"prompt": "two"}], indent=2))
    (tmp_path / "array.jsonl").write_text(json.dumps([{"prompt": "one"}, {"prompt": "two"}]) + "\n")
    (tmp_path / "plain.txt").write_text("What is 17 plus 25?\n")
    (tmp_path / "nested.jsonl").write_text('{"prompt": "fine"}\n{"prompt": ' + NESTED + '}\n')
    (tmp_path / "long-number.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "a", "n": 1' + "0" * 5000 + '}\n')
    (tmp_path / "two-keys.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "first", "prompt": "second"}\n')
    (tmp_path / "setting.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "short", "max_new_tokens": 3}\n')
    (tmp_path / "setting-flag.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "short", "Max-New-Tokens": 3}\n')
    (tmp_path / "two-keys-case.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "first", "Prompt": "second"}\n')
    (tmp_path / "plot.png").write_bytes(b"an earlier plot")
    (tmp_path / "deep.json").write_text('{"modes": ' + NESTED + '}')
    (tmp_path / "long-number.json").write_text('{"modes": [{"mode": "full", "batch_size": 1' + "0" * 5000 +
                                               ', "tokens_per_s": 1}]}')
    os.mkfifo(tmp_path / "fifo")
    shutil.copytree(checkpoint.path, tmp_path / "outside")  # good files that no checkpoint folder may reach
    (tmp_path / "outside" / "chat_template.jinja").write_text("{{ messages[0].content }}")
    return tmp_path


def build_broken(root: Path, argv: list[str], source: Path):
    for a in argv:
        name = a.removeprefix(str(root) + "/")
        if name in BROKEN:
            shutil.copytree(source, root / name)
            BROKEN[name](root / name, root)


def snapshot(*folders) -> dict:
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_no_file(name, workspace, checkpoint, capsys, monkeypatch):
    entry, argv, words = CASES[name]
    fill = {"dir": str(workspace), "ckpt": str(checkpoint.path)}
    argv = [a.format(**fill) for a in argv]
    if "--model" not in argv and "--plot" not in argv and entry != "train":  # --plot loads no model
        argv += ["--model", NO_MODEL.format(**fill)]  # so a check that waits for the model fails the test
    build_broken(workspace, argv, checkpoint.path)
    monkeypatch.setattr(template_sandbox, "TEMPLATE_SECONDS", 0.5)  # the template that never ends
    monkeypatch.setattr(files, "MAX_PROMPTS_BYTES", 1 << 20)      # /dev/zero: read 1 MB, not 256
    busy = os.open(workspace / "busy.jsonl.partial", os.O_WRONLY | os.O_CREAT)  # a run that is still going
    files.fcntl.flock(busy, files.fcntl.LOCK_EX)
    before = snapshot(workspace, checkpoint.path)
    published, card = RESULTS_FILE.read_bytes(), SHIPPED_CARD.read_bytes()
    try:
        with recording_opens(monkeypatch) as opened:
            code = MAINS[entry](argv)
    finally:
        os.close(busy)
    assert_one_line_error(code, capsys.readouterr().err, words)
    assert snapshot(workspace, checkpoint.path) == before
    assert RESULTS_FILE.read_bytes() == published and SHIPPED_CARD.read_bytes() == card
    assert stat.S_ISFIFO((workspace / "fifo").stat().st_mode)
    assert not [p for p in opened if p.startswith(str(workspace / "outside"))]  # the checkpoint stayed inside


# Quirks of checkpoint files found in the wild, which load as if they were not there.
QUIRKS = {
    "tokenizer.json truncates and pads": edit_json("tokenizer.json", truncation={
        "direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}, padding={
        "strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0,
        "pad_token": "<|endoftext|>"}),  # transformers applies them only when a call asks for them
    "a byte-order mark on every JSON file": byte_order_marks,
}


@pytest.mark.parametrize("name", list(QUIRKS))
def test_checkpoint_quirks_change_nothing(name, tmp_path, checkpoint, loaded):
    shutil.copytree(checkpoint.path, tmp_path / name)
    QUIRKS[name](tmp_path / name, tmp_path)
    tok, prompt = load(tmp_path / name)[1], "the quick brown fox " * 5
    for chat in (True, False):
        assert tok.encode_prompt(prompt, chat) == loaded[1].encode_prompt(prompt, chat)


def test_a_config_without_tie_word_embeddings_loads_the_head_the_files_hold(tmp_path, hf_tokenizer):
    """Without the field the weight files decide: a stored lm_head.weight is the head, none means the embeddings.
    (The head was tied to the embeddings, and a stored lm_head.weight dropped without a word.)"""
    ids = torch.randint(4, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    for tied in (False, True):
        net = random_model(tiny_config(tie_word_embeddings=tied), seed=0)
        folder = write_checkpoint(tmp_path / f"tied-{tied}", net, hf_tokenizer).path
        cfg = json.loads((folder / "config.json").read_text())
        del cfg["tie_word_embeddings"]
        (folder / "config.json").write_text(json.dumps(cfg))
        loaded, _ = load(folder)
        assert loaded.config.tie_word_embeddings == tied
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, block_size=4), net(ids, block_size=4))


def test_a_checkpoint_without_an_end_of_text_token_says_so(tmp_path, checkpoint, capsys):
    """No EOS id anywhere: every answer runs to --max-new-tokens, and generate.py says why (a note, exit 0)."""
    folder = tmp_path / "no-eos"
    shutil.copytree(checkpoint.path, folder)
    for name, key in (("config.json", "eos_token_id"), ("generation_config.json", "eos_token_id"),
                      ("tokenizer_config.json", "eos_token")):
        if (folder / name).exists():
            edit_json(name, **{key: None})(folder, tmp_path)
    assert load(folder)[1].eos_ids == []
    for ckpt, noted in ((checkpoint.path, False), (folder, True)):
        assert MAINS["generate"](["--model", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "8"]) == 0
        assert ("names no end-of-text token" in capsys.readouterr().err) == noted


def test_a_checkpoint_without_a_block_size_says_so(tmp_path, checkpoint, capsys):
    """Neither config.json nor generation_config.json names block_size: 32 is used and generate.py and eval.py say
    so, once, unless --block-size is given (it decoded in blocks of 32 without a word, whatever the model's)."""
    folder = tmp_path / "no-block-size"
    shutil.copytree(checkpoint.path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["block_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load(folder)[0].config.block_size == 32
    note = "note: {} names no block_size (config.json, generation_config.json): decoding uses blocks of 32; pass " \
        "--block-size with the block size the model was trained with, or add it to config.json\n"
    for args, noted in (([], True), (["--block-size", "4"], False)):
        assert MAINS["generate"](["--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "4", *args]) == 0
        err = capsys.readouterr().err
        assert (note.format(folder) in err) == noted and err.count("note:") == noted, err
    assert MAINS["eval"](["--model", str(folder), "-n", "1", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().err.count(note.format(folder)) == 1
    edit_json("generation_config.json", block_size=4)(folder, tmp_path)  # named there: no note
    assert MAINS["generate"](["--model", str(folder), "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_plot_without_matplotlib_says_so_and_fails(workspace, monkeypatch, capsys):
    """A good results file but no matplotlib: one line with the fix, exit 1, no file written."""
    frontier = workspace / "frontier.json"
    frontier.write_text(json.dumps({"modes": [{"mode": "delayed cache 0.9", "accuracy": 0.9,
                                               "row_layers_per_token": 50.0}]}))
    bench_result = workspace / "bench.json"
    bench_result.write_text(json.dumps({"device": "cpu", "modes": [{"mode": "full", "batch_size": 1,
                                                                   "tokens_per_s": 9.0}]}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    for entry, path in (("eval", frontier), ("bench", bench_result)):
        before = snapshot(workspace)
        assert MAINS[entry](["--plot", str(path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install matplotlib" in err[0], err
        assert snapshot(workspace) == before


@pytest.mark.parametrize("entry,res,code", [
    ("bench", {"device": "cpu", "modes": [{"mode": "full", "batch_size": 1, "tokens_per_s": 9.0}]}, 0),  # --modes full
    ("bench", {"predictors": {"I0": {"roc": [[0, 0], [1, 1]], "auc_pooled": 0.5}}}, 0),  # an older file's predictors
    ("bench", {"modes": [{"mode": "full"}]}, 2),
    ("eval", {"modes": [{"mode": "delayed cache 0.9", "row_layers_per_token": 50.0}]}, 2),  # no accuracy
    ("bench", {"predictors": {"I0": {"roc": 5, "auc_pooled": 0.5}}}, 2),
    ("bench", {"modes": [{"mode": ["full"], "batch_size": 1, "tokens_per_s": 9.0}]}, 2),
    ("eval", {"modes": [{"mode": "delayed cache 0.9", "accuracy": None, "row_layers_per_token": 50.0}]}, 2),
    ("bench", {"modes": [{"mode": "full", "batch_size": 1, "tokens_per_s": float("nan")}]}, 2),  # drawn as nothing
    ("eval", {"modes": [{"mode": "delayed cache 0.9", "accuracy": float("inf"), "row_layers_per_token": 50.0}]}, 2),
], ids=["no delayed mode", "fewer predictors", "a mode without figures", "a frontier row without accuracy",
        "an ROC curve of a number", "a mode named by a list", "a frontier row's accuracy null", "a NaN speed",
        "an infinite accuracy"])
def test_plot_draws_what_the_file_has_or_refuses_it(workspace, monkeypatch, capsys, entry, res, code):
    """With matplotlib (a stand-in here): a results file of a partial run is drawn, a malformed one is one line."""
    from unittest.mock import MagicMock
    plt = MagicMock()
    plt.subplots.side_effect = lambda *a, **k: (MagicMock(), MagicMock())
    monkeypatch.setattr(plots, "pyplot", lambda: plt)
    path = workspace / "res.json"
    path.write_text(json.dumps(res))
    assert MAINS[entry](["--plot", str(path)]) == code
    if code:
        assert_one_line_error(code, capsys.readouterr().err, ["not a results file"])


def test_plot_of_a_file_that_cannot_be_read_is_one_line(workspace, monkeypatch, capsys):
    path = workspace / "res.json"
    path.write_text("{}")

    def denied(*args, **kwargs):  # a file without read permission (root reads it anyway)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(Path, "read_text", denied)
    for entry in ("bench", "eval"):
        assert_one_line_error(MAINS[entry](["--plot", str(path)]), capsys.readouterr().err,
                              ["--plot", "res.json", "cannot read it", "Permission denied"])


def test_frontier_plot_never_replaces_its_results(workspace, monkeypatch, capsys):
    monkeypatch.setattr(plots, "pyplot", lambda: pytest.fail("drew"))
    path = workspace / "frontier.png"
    path.write_text(json.dumps({"modes": [{"mode": "delayed cache 0.9", "accuracy": 0.9, "row_layers_per_token": 5}]}))
    before = path.read_bytes()
    assert_one_line_error(evaluate.main(["--plot", str(path)]), capsys.readouterr().err, ["would replace this file"])
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------------
# Results are kept: an interrupt, a failed run, a good run with --overwrite.

@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "kill", "hang-up"])
def test_interrupt_keeps_the_finished_results(checkpoint, tmp_path, signum):
    """Ctrl-C, kill -TERM and a closed terminal (SIGHUP) alike: the finished results kept, one line, exit 128 + the
    signal's number (kill and hang-up ended the process at once, and the partial file's lines went unnamed)."""
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
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert 2 <= len(kept) < n
    assert all(r["prompt"] == prompts[r["index"]] and isinstance(r["text"], str) for r in kept)
    assert stderr.strip().splitlines()[-1] == (f"interrupted: {len(kept)} of {n} prompts finished; "
                                               f"their results are in {partial}")
    assert not out.exists()  # the output's name is given only to a complete set of results
    assert stdout.count("### ") == len(kept)


@pytest.mark.slow
def test_eval_killed_keeps_what_finished(checkpoint, tmp_path):
    """kill -TERM once eval.py has saved its first piece: one line naming the partial file, exit 143."""
    out, partial = tmp_path / "w.json", tmp_path / "w.json.partial"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "eval.py"), "--model", str(checkpoint.path),
                             "--workloads", "arith,multistep,story,long", "-n", "64", "--output", str(out),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted; what finished is in {partial}"
    assert json.loads(partial.read_text())["workloads"] and not out.exists()


def test_a_signal_ignored_when_started_stays_ignored():
    """Under nohup SIGHUP is ignored: a closed terminal must not stop the run. SIGTERM, not ignored, stops it."""
    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        generate.start_command()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)  # else the kill ends pytest
        with pytest.raises(KeyboardInterrupt) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert generate.interrupted_status(e.value) == 143
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second kill ends the process at once
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_failed_run_leaves_the_output_as_it_was(checkpoint, tmp_path, capsys):
    """--overwrite replaces the output only once every prompt has finished: a run that fails keeps it."""
    good = tmp_path / "out.jsonl"
    good.write_text("an earlier run's results\n")
    code = generate.main(["--model", str(checkpoint.path), "--prompt", "Hi", "--prompt", "the quick brown fox " * 40,
                          "--output", str(good), "--overwrite", "--max-new-tokens", "400"])
    assert code == 2 and "exceeds the model's context" in capsys.readouterr().err
    assert good.read_text() == "an earlier run's results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no partial file left without results


@pytest.mark.parametrize("entry,args", [
    ("eval", ["--study", "-n", "1", "--probe-problems", "1", "--output", "{dir}/study.json"]),
    ("bench", ["--modes", "full", "--batch-sizes", "1", "--num-prompts", "1", "--repeats", "1", "--out", "{dir}"])])
def test_a_predictor_analysis_with_nothing_to_score_ends_with_one_line(checkpoint, tmp_path, capsys, entry, args):
    """One-token answers: every step decodes all its masked tokens or none, so the analysis has nothing to rank;
    after the sweep's progress lines, one error line (it was an IndexError from the empty ROC curve), which
    says where the modes that finished are kept (it did not)."""
    code = MAINS[entry](["--model", str(checkpoint.path), "--max-new-tokens", "1", "--device", "cpu"] +
                        [a.format(dir=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    [kept] = tmp_path.glob("*.partial")
    assert json.loads(kept.read_text())["modes"]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the predictor analysis found no step") and \
        last.endswith(f"; what finished is in {kept}"), err


def test_overwrite_replaces_the_output_with_every_result(checkpoint, tmp_path, capsys):
    good = tmp_path / "out.jsonl"
    good.write_text("an earlier run's results\n")
    code = generate.main(["--model", str(checkpoint.path), "--prompt", "Hi", "--prompt", "The lazy dog",
                          "--output", str(good), "--overwrite", "--max-new-tokens", "6"])
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line)["index"] for line in good.read_text().splitlines()] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_overwrite_replaces_a_stale_partial_file_and_a_link_target(checkpoint, tmp_path, capsys):
    """--overwrite removes an interrupted run's partial file (never writes into it) and replaces the file a
    link names, not the link; the new files get the usual permissions, not a temporary file's 0600."""
    target = tmp_path / "real.jsonl"
    target.write_text("an earlier run's results\n")
    (tmp_path / "link.jsonl").symlink_to(target)
    stale = tmp_path / "real.jsonl.partial"
    stale.write_text("an interrupted run\n")
    os.link(stale, tmp_path / "kept-elsewhere")  # another name of the stale file keeps its bytes
    code = generate.main(["--model", str(checkpoint.path), "--prompt", "Hi", "--output", str(tmp_path / "link.jsonl"),
                          "--overwrite", "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "link.jsonl").is_symlink() and json.loads(target.read_text())["index"] == 0
    assert (tmp_path / "kept-elsewhere").read_text() == "an interrupted run\n" and not stale.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_an_output_that_appears_during_the_run_is_kept(checkpoint, tmp_path, capsys, monkeypatch):
    """Without --overwrite, a file another run wrote meanwhile under the same name is not replaced: one line
    at the end, and this run's results stay in the partial file."""
    out = tmp_path / "out.jsonl"
    original = generate.generate

    def generate_then_the_other_run_finishes(*args, **kwargs):
        results = original(*args, **kwargs)
        out.write_text("the other run's results\n")
        return results

    monkeypatch.setattr(generate, "generate", generate_then_the_other_run_finishes)
    code = generate.main(["--model", str(checkpoint.path), "--prompt", "Hi", "--output", str(out),
                          "--max-new-tokens", "4"])
    assert_one_line_error(code, capsys.readouterr().err, ["appeared while this run was going", "out.jsonl.partial"])
    assert out.read_text() == "the other run's results\n"
    assert json.loads((tmp_path / "out.jsonl.partial").read_text())["index"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.partial"]


def test_an_output_folder_removed_during_the_run_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    """The folder of --output is removed while the run goes: one error line that says the partial file went
    with it, and the texts that finished on stdout."""
    folder = tmp_path / "out"
    folder.mkdir()
    original = generate.generate

    def generate_then_the_folder_goes(*args, **kwargs):
        results = original(*args, **kwargs)
        shutil.rmtree(folder)
        return results

    monkeypatch.setattr(generate, "generate", generate_then_the_folder_goes)
    code = generate.main(["--model", str(checkpoint.path), "--prompt", "Hi", "--output", str(folder / "o.jsonl"),
                          "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert_one_line_error(code, err, ["cannot write", "No such file or directory", "o.jsonl.partial is gone too"])
    assert out.startswith("### Hi\n")


def test_a_results_file_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
    """eval.py and bench.py's results where os.link fails (exFAT, some network shares): a checked rename."""
    out = partial.PartialJSON(tmp_path / "r.json")

    def no_links(*args, **kwargs):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    out.commit({"modes": []})
    assert json.loads((tmp_path / "r.json").read_text()) == {"modes": []}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_full_disk_keeps_whole_lines_and_says_so(checkpoint, tmp_path, capsys, monkeypatch):
    """The disk fills up in the middle of the second result's line: one error line, exit 2, and the partial
    file holds the first result whole and nothing of the second."""
    out = tmp_path / "out.jsonl"
    real = files._write_all
    calls = []

    def fill_up(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            os.write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(files, "_write_all", fill_up)
    code = generate.main(["--model", str(checkpoint.path), "--prompt", "Hi", "--prompt", "The lazy dog", "--prompt",
                          "A fox", "--output", str(out), "--max-new-tokens", "4", "--batch-size", "1"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, ["cannot write", "out.jsonl.partial", "No space left on device",
                                      "1 results that finished before are kept whole"])
    lines = (tmp_path / "out.jsonl.partial").read_text().split("\n")
    assert lines[1:] == [""] and json.loads(lines[0])["index"] == 0
    assert not out.exists()


def run_script(args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


@pytest.mark.slow
def test_a_file_size_limit_keeps_whole_lines(checkpoint, tmp_path):
    """A real limit (RLIMIT_FSIZE: the kernel cuts the write, then sends SIGXFSZ): one line, what finished kept
    whole, no output file."""
    import resource
    out = tmp_path / "out.jsonl"
    prompts = [arg for i in range(6) for arg in ("--prompt", f"Prompt {i}")]
    proc = run_script([str(ROOT / "generate.py"), "--model", str(checkpoint.path), *prompts, "--output", str(out),
                       "--max-new-tokens", "8", "--batch-size", "1", "--device", "cpu"],
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)))
    assert_one_line_error(proc.returncode, proc.stderr, ["cannot write", "out.jsonl.partial", "File too large",
                                                         "kept whole"])
    kept = (tmp_path / "out.jsonl.partial").read_text()
    assert kept.endswith("\n") and [json.loads(line)["index"] for line in kept.splitlines()] == \
        list(range(kept.count("\n")))
    assert not out.exists()


@pytest.mark.slow
def test_eval_output_past_a_file_size_limit_keeps_what_finished(checkpoint, tmp_path):
    """eval.py --output past RLIMIT_FSIZE: one error line after the progress lines, and the partial file holds the
    pieces that finished, whole."""
    import resource
    out = tmp_path / "w.json"
    proc = run_script([str(ROOT / "tools" / "eval.py"), "--model", str(checkpoint.path), "--workloads", "arith,long",
                       "-n", "1", "--max-new-tokens", "4", "--output", str(out), "--device", "cpu"],
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: cannot write {out}.partial: File too large; what "
                                                    "finished before is kept in it")
    assert 1 <= len(json.loads((tmp_path / "w.json.partial").read_text())["workloads"]) < 6
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [("generate.py", ["--prompt", "Hi", "--prompt", "The lazy dog"]),
                                         ("tools/eval.py", ["-n", "2"])])
def test_a_closed_pipe_ends_quietly(checkpoint, script, args):
    """`generate.py ... | head -n 0`: the reader is gone before anything is printed; no traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), "--model", str(checkpoint.path), *args,
                             "--max-new-tokens", "4", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    if script == "generate.py":
        assert stderr.strip().splitlines()[-1].startswith("2 sequences")


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [("generate.py", ["--prompt", "Hi", "--prompt", "The lazy dog"]),
                                         ("tools/eval.py", ["-n", "1"])])
def test_a_closed_stderr_is_no_crash(checkpoint, script, args):
    """Started with stderr closed (2>&-), sys.stderr is None: the run crashed at its first use (exit 1)."""
    proc = run_script([str(ROOT / script), "--model", str(checkpoint.path), *args, "--max-new-tokens", "4",
                       "--device", "cpu"], preexec_fn=lambda: os.close(2))
    assert proc.returncode == 0 and proc.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["tools/train.py", "tools/bench.py", "generate.py", "tools/eval.py"])
def test_a_closed_stderr_keeps_errors_off_stdout(tmp_path, script):
    """print(file=None) writes to stdout: with stderr closed an error line went into the command's output (and
    bench.py's and train.py's progress bars crashed, as generate.py's did)."""
    args = ["--out", str(tmp_path / "t")] if script == "tools/train.py" else ["--prompt", "Hi"] if script == \
        "generate.py" else []
    proc = run_script([str(ROOT / script), *args, "--device", "tpu"], preexec_fn=lambda: os.close(2))
    assert proc.returncode == 2 and proc.stdout == ""


@pytest.mark.slow
def test_output_dev_stdout_on_a_pipe_is_refused_before_any_work(tmp_path):
    """/dev/stdout on a pipe resolves to "pipe:[...]", a name that is not there: it was let through, and the
    run failed with "cannot write /proc/.../pipe:[...].partial"."""
    proc = run_script([str(ROOT / "generate.py"), "--prompt", "Hi", "--output", "/dev/stdout", "--overwrite",
                       "--model", str(tmp_path / "no-model")])
    assert_one_line_error(proc.returncode, proc.stderr, ["--output /dev/stdout is not a regular file"])


@pytest.mark.parametrize("script,args,line", [("generate.py", ["--prompt", "Hi"], "interrupted before generation began"),
                                              ("tools/eval.py", ["--study"], "interrupted before any work began")])
def test_interrupt_during_imports_is_one_line(script, args, line):
    """Ctrl-C while `import torch` runs (a finder sends SIGINT the moment torch is looked up)."""
    code = textwrap.dedent(f"""
        import os, runpy, signal, sys
        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    os.kill(os.getpid(), signal.SIGINT)
        sys.meta_path.insert(0, Interrupt())
        sys.path[:0] = [{str(ROOT)!r}, {str((ROOT / script).parent)!r}]   # as `python {script}` would
        sys.argv = [{script!r}] + {args!r}
        runpy.run_path({str(ROOT / script)!r}, run_name="__main__")
    """)
    proc = run_script(["-c", code])
    assert proc.returncode == 130 and proc.stderr == line + "\n", proc.stderr


@pytest.mark.parametrize("failure,code,words", [
    (KeyboardInterrupt(), 130, ["interrupted: 0 of 1 prompts finished"]),
    (MemoryError(), 2, ["error: out of memory"]),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:119] data. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"), 2,
     ["error: out of memory", "DefaultCPUAllocator", "--batch-size"]),
], ids=["ctrl-c", "MemoryError", "CPU allocator"])
def test_model_load_interrupted_or_out_of_memory_is_one_line(checkpoint, tmp_path, capsys, monkeypatch, failure,
                                                            code, words):
    def load(*args, **kwargs):
        raise failure
    monkeypatch.setattr(generate, "load", load)
    assert generate.main(["--model", str(checkpoint.path), "--prompt", "Hi", "--output", str(tmp_path / "o")]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err
    assert list(tmp_path.iterdir()) == []  # the empty partial file is gone


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "kill", "hang-up"])
@pytest.mark.parametrize("entry,stage", [("generate", generate), ("eval", evaluate), ("bench", bench), ("train", train),
                                         ("bench", "resolve_device"), ("train", "check_args")],
                         ids=["generate", "eval", "bench", "train", "bench device", "train checks"])
def test_interrupt_during_the_argument_checks_is_one_line(tmp_path, monkeypatch, capsys, entry, stage, signum):
    """An interrupt before a command's main try-block (its argument checks) printed a traceback."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt(signum) if signum != signal.SIGINT else KeyboardInterrupt()
    module = {"generate": generate, "eval": evaluate, "bench": bench, "train": train}[entry]
    monkeypatch.setattr(module, "parse_args" if not isinstance(stage, str) else stage, interrupt)
    assert MAINS[entry](["--out", str(tmp_path / "t")] if entry == "train" else []) == 128 + signum
    assert capsys.readouterr().err == "interrupted\n"


class GoneTerminal(io.TextIOBase):
    """A stream whose terminal went away (SIGHUP): every write fails with EIO."""
    def write(self, text):
        raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("entry,work,argv", [
    ("generate", "load", ["--prompt", "Hi"]), ("eval", "load", ["-n", "1"]), ("bench", "run", []),
    ("train", "train", ["--out", "{dir}/t", "--device", "cpu"]), ("generate", "parse_args", [])])
def test_an_interrupt_with_the_terminal_gone_keeps_its_status(tmp_path, monkeypatch, entry, work, argv):
    """After SIGHUP the last line's write can fail (EIO): that was exit 1 and a traceback, not 129."""
    def hang_up(*args, **kwargs):
        raise KeyboardInterrupt(signal.SIGHUP)
    module = {"generate": generate, "eval": evaluate, "bench": bench, "train": train}[entry]
    monkeypatch.setattr(module, work, hang_up)
    monkeypatch.setattr(sys, "stderr", GoneTerminal())
    monkeypatch.setattr(sys, "stdout", GoneTerminal())
    monkeypatch.chdir(tmp_path)  # bench's results folder
    assert MAINS[entry]([a.format(dir=tmp_path) for a in argv]) == 128 + signal.SIGHUP


def test_prompts_files_joined_with_their_marks_and_line_ends_read(tmp_path):
    """UTF-8 files with byte-order marks and CRLF joined by cat (a mark at a later line's start was "not valid
    JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))"); blank lines and a last line without a newline."""
    path = tmp_path / "p.jsonl"
    path.write_bytes('{"prompt": "one"}\r\n\r\n'.encode("utf-8-sig") + '{"prompt": "two"}\r\n'.encode("utf-8-sig") +
                     b'\n  \n{"prompt": "three"}')
    assert files.read_prompts(str(path)) == ["one", "two", "three"]


def test_prompt_lines_end_at_newline_only(tmp_path):
    """JSON Lines splits at \\n: a raw U+2028, U+0085 or form feed inside a string is the prompt's text."""
    path = tmp_path / "p.jsonl"
    prompts = ["one\u2028two", "three\u0085four", "five\x0csix"]
    path.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    assert files.read_prompts(str(path)) == prompts


# ---------------------------------------------------------------------------------------------------
# Numbers in range that used to break the maths.

@pytest.mark.parametrize("temperature,top_p", [(1e-40, 1.0), (1e308, 1.0), (0.7, 1e-300), (5e-324, 1e-300)])
def test_sampling_stays_finite_at_extreme_settings(temperature, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 10
    logits[:, 3] = float("-inf")  # the mask token
    token, conf = decoder.sample(logits, temperature, 0, top_p, torch.Generator().manual_seed(1))
    assert torch.isfinite(conf).all() and (token != 3).all()
    if temperature < 1e-30 or top_p < 1e-30:  # the limit is greedy
        assert torch.equal(token, logits.argmax(-1)) and torch.allclose(conf, torch.ones(6))
    if temperature > 1e30:  # the limit is uniform over the allowed tokens
        assert torch.allclose(conf, torch.full((6,), 1 / 49))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("focus", [False, True])
def test_weights_that_overflow_end_the_run_with_one_clear_error(temperature, focus):
    """Finite weights too large for the dtype overflow in the forward (inf, then NaN logits): greedy or sampled,
    the step's NaN confidences end the run with a ValueError, read with the step's statistics (no extra sync)."""
    net = random_model(tiny_config(), seed=0)
    with torch.no_grad():
        net.layers[0].mlp.up_proj.weight.mul_(1e38)
    opts = generate.Options(max_new_tokens=8, batch_size=2, temperature=temperature, focus=focus)
    with pytest.raises(ValueError, match="logits are not finite"):
        generate.generate_ids(net, [[5, 6, 7], [8, 9]], 3, [2], opts)


def test_extreme_sampling_generates(loaded):
    net, tok = loaded
    for options in ({"temperature": 1e-40}, {"temperature": 1e308}, {"temperature": 0.7, "top_p": 1e-300}):
        ids = generate.generate(net, tok, ["Hi"], max_new_tokens=8, **options)[0].token_ids
        assert len(ids) == 8 and tok.mask_id not in ids


def test_stop_repeats_past_the_blocks_there_can_be_is_off(loaded):
    net, tok = loaded
    want = generate.generate(net, tok, ["Hi"], max_new_tokens=12)[0]
    got = generate.generate(net, tok, ["Hi"], max_new_tokens=12, stop_repeats=12)[0]
    assert got.token_ids == want.token_ids and got.stats["finish_reason"] == want.stats["finish_reason"]


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
    (["Hi"], {"chat": "no"}, "chat must be True or False, got 'no'"),
    (["Hi"], {"on_result": "print"}, "on_result must be a function"),
], ids=lambda v: repr(v)[:40])
def test_generate_api_checks_its_arguments(loaded, prompts, options, words):
    net, tok = loaded
    with pytest.raises(ValueError) as e:
        generate.generate(net, tok, prompts, **options)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_numpy_and_other_number_types_are_plain_numbers(loaded):
    """numpy.float64 was taken and kept, numpy.float32 and numpy.int64 refused as not numbers: every integral and
    real type is taken now and stored as a plain int or float; bools and non-finite values are still refused."""
    import fractions
    import numpy as np
    net, tok = loaded
    opts = generate.Options(alpha=np.float32(2.0), focus=True, max_new_tokens=np.int64(8), block_size=np.int32(4),
                            threshold=fractions.Fraction(1, 2), temperature=np.float64(0.0), seed=np.uint8(3))
    assert opts == generate.Options(alpha=2.0, focus=True, max_new_tokens=8, block_size=4, threshold=0.5, seed=3)
    assert [type(getattr(opts, k)) for k in ("alpha", "max_new_tokens", "block_size", "threshold", "temperature",
                                             "seed")] == [float, int, int, float, float, int]
    json.dumps(dataclasses.asdict(opts))  # a numpy.float32 would not serialise
    ids = generate.generate_ids(net, [np.array([5, 6, 7]).tolist(), [np.int64(8), np.int32(9)]], np.int64(tok.mask_id),
                                [np.int64(i) for i in tok.eos_ids], generate.Options(max_new_tokens=8))
    assert ids[1][0] == generate.generate_ids(net, [[8, 9]], tok.mask_id, tok.eos_ids,
                                              generate.Options(max_new_tokens=8))[0][0]
    for bad, words in [({"max_new_tokens": np.bool_(True)}, "max-new-tokens must be an integer"),
                       ({"max_new_tokens": True}, "max-new-tokens must be an integer"),
                       ({"threshold": np.float32("nan")}, "threshold must be a finite number"),
                       ({"threshold": True}, "threshold must be a finite number"),
                       ({"threshold": 10**400}, "threshold must be a finite number"),  # was an OverflowError
                       ({"seed": np.uint64(2**64 - 1)}, "seed must be below 2^63"),
                       ({"max_new_tokens": 8.0}, "max-new-tokens must be an integer")]:
        api_error(lambda: generate.Options(**bad), words)


def test_options_are_checked_when_made_and_are_the_cli_defaults():
    with pytest.raises(ValueError, match="temperature"):
        generate.Options(temperature=float("nan"))
    args = generate.parse_args(["--prompt", "Hi"])
    assert generate.options_from(args) == generate.Options()


def test_generate_ids_refuses_no_prompts(loaded):
    net, tok = loaded
    with pytest.raises(ValueError, match="no prompts"):
        generate.generate_ids(net, [], tok.mask_id, tok.eos_ids, generate.Options())


def api_error(call, *words):
    with pytest.raises(ValueError) as e:
        call()
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_the_api_refuses_swapped_or_changed_arguments(loaded, checkpoint):
    net, tok = loaded
    api_error(lambda: generate.generate(tok, net, ["Hi"]), "swapped", "generate(model, tokenizer, prompts)")
    api_error(lambda: generate.generate("model", tok, ["Hi"]), "model must be an SDAR model")
    api_error(lambda: generate.generate(net, tok, ["Hi"], 5), "opts must be a decoder.Options", "got a int")
    api_error(lambda: generate.generate(net, None, ["Hi"]), "tokenizer must be a checkpoint.Tokenizer")
    opts = generate.Options(max_new_tokens=4)
    opts.temperature = float("nan")  # a field changed after the checks of __init__
    api_error(lambda: generate.generate(net, tok, ["Hi"], opts), "temperature must be a finite number, got nan")
    api_error(lambda: generate.generate_ids(net, [[5, 6]], tok.mask_id, tok.eos_ids, opts), "temperature")
    api_error(lambda: generate.generate_ids(net, [[5, 6]], tok.mask_id, tok.eos_ids, {"max_new_tokens": 4}),
              "decoder.Options")
    api_error(lambda: generate.generate_ids(net, [[5, 300]], tok.mask_id, tok.eos_ids, generate.Options()),
              "prompt 1", "token ids below the vocabulary size 300")
    api_error(lambda: generate.generate_ids(net, [[5]], True, tok.eos_ids, generate.Options()), "mask_id")
    api_error(lambda: generate.generate_ids(net, torch.tensor([[5, 6]]), tok.mask_id, tok.eos_ids, generate.Options()),
              "prompt_ids must be a list of lists of token ids, got a Tensor")
    api_error(lambda: generate.generate_ids(net, [[5, 6]], tok.mask_id, [2, 10**30], generate.Options()), "eos_ids")
    api_error(lambda: generate.generate_ids(net, [[5, 6]], 3, [2, 3], generate.Options()), "eos_ids", "mask_id 3")
    api_error(lambda: load(None), "path must be a checkpoint folder", "NoneType")
    api_error(lambda: load(str(checkpoint.path) + "\0"), "NUL character")  # was "does not exist", the NUL printed
    api_error(lambda: load(checkpoint.path, dtype=torch.int8), "dtype must be", "torch.int8")
    api_error(lambda: load(checkpoint.path, dtype=["bfloat16"]), "unknown dtype ['bfloat16']")


def test_dtype_float64_loads_as_torch_dtype_float64_does(tmp_path, hf_tokenizer, capsys):
    """save and config.json's torch_dtype take float64, and load(dtype=torch.float64): --dtype float64 was
    refused as an unknown dtype."""
    write_checkpoint(tmp_path, random_model(tiny_config()), hf_tokenizer, dtype=torch.float64)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float64"
    assert load(tmp_path, dtype="float64")[0].embed_tokens.weight.dtype == torch.float64
    argv = ["--model", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "8", "--device", "cpu", "--dtype"]
    assert generate.main(argv + ["float64"]) == 0
    assert capsys.readouterr().out == (generate.main(argv + ["float32"]), capsys.readouterr().out)[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_load_on_cuda_without_a_gpu_is_a_value_error(checkpoint):
    api_error(lambda: load(checkpoint.path, device="cuda"), "device=cuda", "no CUDA device")
    api_error(lambda: load(checkpoint.path, device=torch.device("cuda:1")), "no CUDA device")
    api_error(lambda: load(checkpoint.path, device=0), "device must be a string")


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

@pytest.mark.parametrize("first,second", [(12_000, None), (None, 12_000), (8_000, 30_000), (None, "numpy")],
                         ids=["shards then one file", "one file then shards", "more shards then fewer",
                              "a numpy integer"])  # numpy.int64 was refused as not an integer
def test_a_save_leaves_one_set_of_weight_files(tmp_path, hf_tokenizer, first, second):
    old, new = random_model(tiny_config(), seed=1), random_model(tiny_config(), seed=2)
    write_checkpoint(tmp_path, old, hf_tokenizer, max_shard_bytes=first)
    if second == "numpy":
        import numpy as np
        second = np.int64(12_000)
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


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("bf16", torch.bfloat16), ("float64", torch.float64)])
def test_save_takes_the_dtype_names_load_takes(tmp_path, name, dtype):
    """save(dtype="float32") was refused ("dtype must be torch.bfloat16, ..."), though load takes the name."""
    save(random_model(tiny_config()), tmp_path, dtype=name)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {dtype}


@pytest.mark.parametrize("change,error,words", [
    (dict(dtype=torch.int8), ValueError, "dtype must be"),          # wrote integer weights load refuses
    (dict(dtype="bfloat8"), ValueError, "unknown dtype 'bfloat8'"),  # a TypeError once config.json was rewritten
    (dict(dtype=None), ValueError, "unknown dtype None"),           # config.json said torch_dtype "None"
    (dict(max_shard_bytes="10"), ValueError, "max_shard_bytes"),
    (dict(model="model"), ValueError, "model must be an SDAR model"),
    (dict(folder=""), ValueError, "non-empty"),                     # wrote into the current folder
    (dict(folder=b"ckpt"), ValueError, "folder must be"),
    (dict(folder="a\0b"), ValueError, "folder must be"),           # "embedded null byte"
    (dict(folder="a-file"), CheckpointError, "is not a folder"),
], ids=lambda v: repr(v)[:40])
def test_save_checks_its_arguments_before_writing(tmp_path, hf_tokenizer, monkeypatch, change, error, words):
    folder = write_checkpoint(tmp_path / "ckpt", random_model(tiny_config()), hf_tokenizer).path
    (tmp_path / "a-file").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    args = {"model": random_model(tiny_config(), seed=1), "folder": folder, "dtype": torch.float32} | change
    with pytest.raises(error) as e:
        save(args.pop("model"), args.pop("folder"), **args)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "ckpt"]


@pytest.mark.parametrize("name", [None, "", 5], ids=repr)
def test_a_results_file_needs_a_name(name, tmp_path, monkeypatch):
    """partial.PartialJSON: a TypeError from os for None or 5, "PosixPath('.') has an empty name" for ""."""
    monkeypatch.chdir(tmp_path)
    api_error(lambda: partial.PartialJSON(name), "results file's name must be a non-empty str or Path")
    assert list(tmp_path.iterdir()) == []


def test_bench_records_the_attention_kernel_that_runs(tmp_path, monkeypatch):
    """Off CUDA every kernel is SDPA with a mask: a --compile run on the CPU recorded "varlen"."""
    ran = {}
    monkeypatch.setattr(bench, "run", lambda args, device, res, out: ran.update(res) or 0)
    assert bench.main(["--compile", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert ran["attention"] == "mask"


def test_bench_never_overwrites_a_results_file(tmp_path):
    first = partial.new_results_path(tmp_path, "cpu-2026-11-24")
    assert first == tmp_path / "cpu-2026-11-24.json"
    first.write_text("{}")
    second = partial.new_results_path(tmp_path, "cpu-2026-11-24")
    assert second == tmp_path / "cpu-2026-11-24-2.json"
    second.write_text("{}")
    assert partial.new_results_path(tmp_path, "cpu-2026-11-24") == tmp_path / "cpu-2026-11-24-3.json"


def test_generate_takes_one_checked_options(loaded):
    net, tok = loaded
    opts = generate.Options(max_new_tokens=4)
    assert generate.generate(net, tok, ["Hi"], opts)[0].token_ids == generate.generate(net, tok, ["Hi"], max_new_tokens=4)[0].token_ids
    for bad in ({"max_new_tokens": 4}, "fast"):
        with pytest.raises(ValueError, match="decoder.Options"):
            generate.generate(net, tok, ["Hi"], bad)
    with pytest.raises(ValueError, match="not both"):
        generate.generate(net, tok, ["Hi"], opts, max_new_tokens=8)
