"""walkthrough.md cannot rot.

1. Every `file.py::name` it cites exists (tests and tools included), and so does every name the core modules'
   docstrings cite.
2. Every number it quotes carries, right after it, an HTML comment naming where it comes from, and equals that
   source rounded as written (a number written with % is compared as 100 x the value):
       0.674<!-- cpu predictors.delta.auc_per_step -->        a key of a results file; `cpu` is an alias from
                                                               the page's `<!-- sources: ... -->` comment
       1.72x<!-- gpu A / B -->                                 keys joined by + - * / and numbers
       28.3<!-- code flops_per_token(tiny, 256) / 1e6 -->     a Python expression over the real code
       2.24<!-- paper -->                                     the paper's own numbers, listed in PAPER below
   A key walks the JSON: `a.b` for a field, `[2]` for a list item, `[mode=focus-1.5,batch=256]` for the one
   list item whose fields have these values (`[kept_per_seq]`: the one that has that field). Put spaces
   around a minus sign (names may hold hyphens).
   A number with a decimal point or a % in the prose without such a comment fails the test; settings written
   after "alpha" or "threshold", and text in code spans or fenced blocks, are not quoted numbers.
3. Every exercise has an answer in the Answers section, with at least one checked value, and answers that
   follow from the code are computed by it: a code span followed by a `code` comment must equal the
   expression, evaluated with the exercise's own `name = value` spans as variables:
       `[[1, 3], [1]]`<!-- code unmask_rule(conf, candidate, "threshold", threshold, k) -->
"""
import ast
import json
import math
import re
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from unittest import mock

import torch

import decoder
import focus
import kernels
from model import SDAR, ModelConfig, Rows, flops_per_token

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "walkthrough.md"
REFERENCE = re.compile(r"`((?:tests/|tools/)?\w+\.py)::([\w.]+)`")
CORE = ("model.py", "decoder.py", "focus.py", "kernels.py", "generate.py", "files.py", "checkpoint/__init__.py",
        "checkpoint/config.py", "checkpoint/folder.py", "checkpoint/tokenizer.py", "checkpoint/sandbox.py")


def module_of(path: str) -> str:
    """The name a docstring calls a core file by: checkpoint for every file of the checkpoint package."""
    return path.split("/")[0].removesuffix(".py")

# The paper's own numbers (arXiv 2601.23278; ../shared/reference/paper.md): tokens decoded per step on
# SDAR-8B (mean 2.24, sd 3.34, median 1), about 90% of block compute on tokens not decoded, 65-80% fewer
# tokens processed, up to 3.52x throughput over LMDeploy, 2.32x serving ShareGPT at concurrency 256.
PAPER = {"2.24", "3.34", "1", "90%", "65", "80%", "3.52x", "2.32x"}
# Hardware facts from the vendor's datasheet: H100 and H200 SXM, dense bf16 tensor-core peak, TFLOP/s
# (1979 with 2:4 sparsity).
SPEC = {"989"}

NUMBER = r"(?<![\w.])(\d+(?:,\d{3})*(?:\.\d+)?)(%|x)?(?!\w|\.\d)"
MARKED_NUMBER = re.compile(NUMBER + r"<!--(.*?)-->", re.S)
MARKED_SPAN = re.compile(r"`([^`\n]+)`<!--\s*code\s(.*?)-->", re.S)
SETTING = re.compile(r"(?:alpha|threshold)\s+$")


def defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assigned names; Class.method and Class.attribute (self.x = ...)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        if isinstance(node, ast.ClassDef):
            for n in ast.walk(node):
                if isinstance(n, ast.FunctionDef):
                    names.add(f"{node.name}.{n.name}")
                elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                    names.add(f"{node.name}.{n.target.id}")
                elif (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
                      and isinstance(n.value, ast.Name) and n.value.id == "self"):
                    names.add(f"{node.name}.{n.attr}")
    return names


def test_every_cited_function_exists():
    refs = REFERENCE.findall(PAGE.read_text())
    assert len(refs) >= 30
    missing = [f"{f}::{n}" for f, n in refs if not (ROOT / f).exists() or n not in defined_names(ROOT / f)]
    assert not missing, missing


def test_core_docstrings_cite_what_exists():
    """`file.py::name`, tests/file.py, `module.name` (a core module) and `name()` in the core modules' docstrings."""
    modules = {}
    for f in CORE:
        modules.setdefault(module_of(f), set()).update(defined_names(ROOT / f))
    missing = []
    for f in CORE:
        tree = ast.parse((ROOT / f).read_text())
        text = "\n".join(filter(None, (ast.get_docstring(n) for n in ast.walk(tree)
                                       if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)))))
        for path, name in re.findall(r"((?:tests/|tools/)?\w+\.py)::([\w.]+)", text):
            if not (ROOT / path).exists() or name not in defined_names(ROOT / path):
                missing.append(f"{f}: {path}::{name}")
        missing += [f"{f}: {p}" for p in re.findall(r"(?:tests|tools)/\w+\.py", text) if not (ROOT / p).exists()]
        for mod, name in re.findall(rf"(?<![\w./])({'|'.join(modules)})\.(\w+)", text):
            if name in ("py", "json", "safetensors"):  # a file name, not an attribute
                continue
            known = modules[mod] | {n.split(".")[1] for n in modules[mod] if "." in n}  # instance.method too
            if name not in known:
                missing.append(f"{f}: {mod}.{name}")
        for name in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\(\)", text):
            own = defined_names(ROOT / f)
            if name not in own | {n.split(".")[1] for n in own if "." in n}:
                missing.append(f"{f}: {name}()")
    assert not missing, missing


def test_readme_points_to_the_walkthrough():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert "walkthrough.md" in first_screen


# ---------------------------------------------------------------------------------------------------
# Numbers and their sources.

def sources(text: str) -> dict[str, Path]:
    found = re.search(r"<!--\s*sources:(.*?)-->", text, re.S)
    assert found, "walkthrough.md needs a <!-- sources: alias = path, ... --> comment"
    pairs = [p.split("=") for p in found.group(1).split(",")]
    return {alias.strip(): ROOT / path.strip() for alias, path in pairs}


def lookup(data, key: str):
    """One key of a results file: a.b, [i], [field=value,...] or [field] (see the module docstring)."""
    for name, selector in re.findall(r"\.?([A-Za-z_][\w-]*)|\[([^\]]*)\]", key):
        if name:
            data = data[name]
        elif selector.isdigit():
            data = data[int(selector)]
        else:
            tests = [s.split("=", 1) for s in re.split(r",(?=[\w-]+(?:=|$))", selector)]  # a value may hold ", "
            hits = [d for d in data if all(t[0] in d and (len(t) == 1 or str(d[t[0]]) == t[1]) for t in tests)]
            assert len(hits) == 1, f"[{selector}] matches {len(hits)} items, not one"
            data = hits[0]
    return data


TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?(?:e-?\d+)?)|([-+*/()])|([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*|\[[^\]]*\])*))")


def json_value(data, expression: str) -> float:
    """Keys of one results file joined by + - * / ( ) and numbers."""
    out, pos, expression = [], 0, expression.strip()
    while pos < len(expression):
        m = TOKEN.match(expression, pos)
        assert m and m.end() > pos, f"cannot read {expression[pos:]!r}"
        number, op, key = m.groups()
        out.append(number or op or repr(float(lookup(data, key))))
        pos = m.end()
    return eval(" ".join(out), {"__builtins__": {}})


@lru_cache(maxsize=None)
def load_json(path: Path):
    return json.loads(path.read_text())


def number_source(text: str, marker: str, names: dict) -> float:
    """The value a `code` or results-file marker names."""
    head, _, rest = marker.strip().partition(" ")
    if head == "code":
        return eval(rest, dict(names))
    aliases = sources(text)
    assert head in aliases, f"unknown source {head!r} (known: {', '.join(aliases)})"
    return json_value(load_json(aliases[head]), rest)


def as_written(value: float, written: str) -> str:
    decimals = len(written.split(".")[1]) if "." in written else 0
    return f"{value:.{decimals}f}"


def regions(text: str):
    """The page cut into (text, names): every Answers item sees its exercise's `name = value` spans."""
    head, _, answers = text.partition("\n## Answers")
    exercises = head.partition("\n## Exercises")[2]
    base = code_names()
    yield head, base
    ex_items = re.split(r"\n(?=\d+\. )", exercises)[1:]
    for item in re.split(r"\n(?=\d+\. )", answers)[1:]:
        n = int(item.split(".")[0])
        names = dict(base)
        for name, value in re.findall(r"`(\w+) = ([^`]+)`", ex_items[n - 1]):
            names[name] = eval(value, {"__builtins__": {}, "range": range, "list": list, **names})
        yield item, names


def test_every_marked_number_equals_its_source():
    text = PAGE.read_text()
    wrong, checked = [], 0
    for part, names in regions(text):
        for number, unit, marker in MARKED_NUMBER.findall(part):
            written = number.replace(",", "") + ("%" if unit == "%" else "")
            head = marker.split()[0] if marker.split() else ""
            if head == "paper":
                ok = number + unit in PAPER
            elif head == "spec":
                ok = number in SPEC
            else:
                value = number_source(text, marker, names) * (100 if unit == "%" else 1)
                ok = as_written(value, number.replace(",", "")) == number.replace(",", "")
            checked += 1
            if not ok:
                shown = "" if head in ("paper", "spec") else f" (source gives {value!r})"
                wrong.append(f"{written}<!--{marker}-->{shown}")
        for span, expression in MARKED_SPAN.findall(part):
            value = eval(expression, dict(names))
            ok = span == value if isinstance(value, str) else ast.literal_eval(span) == value
            checked += 1
            if not ok:
                wrong.append(f"`{span}` but the code gives {value!r}")
    assert checked >= 60, checked
    assert not wrong, "\n".join(wrong)


def test_no_unmarked_number_in_the_prose():
    text = re.sub(r"```.*?```", "", PAGE.read_text(), flags=re.S)         # fenced blocks
    text = MARKED_SPAN.sub("", text)
    text = MARKED_NUMBER.sub("", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)                                  # code spans
    unmarked = []
    for m in re.finditer(NUMBER, text):
        if ("." in m.group(1) or m.group(2) == "%") and not SETTING.search(text[:m.start()]) \
                and not text[:m.start()].endswith("arXiv "):
            line = text.count("\n", 0, m.start()) + 1
            unmarked.append(f"{m.group(0)!r} in: {text.splitlines()[line - 1].strip()[:90]}")
    assert not unmarked, "numbers without a source comment:\n" + "\n".join(unmarked)


def test_paper_constants_are_the_papers():
    paper = ROOT.parent / "shared" / "reference" / "paper.md"
    if not paper.exists():
        return  # the reference notes live beside the checkout, not in it
    facts = paper.read_text()
    assert all(n.rstrip("x%") in facts for n in PAPER), [n for n in PAPER if n.rstrip("x%") not in facts]


def test_every_exercise_has_a_checked_answer():
    text = PAGE.read_text()
    head, _, answers = text.partition("\n## Answers")
    exercises = re.split(r"\n(?=\d+\. )", head.partition("\n## Exercises")[2])[1:]
    items = re.split(r"\n(?=\d+\. )", answers)[1:]
    assert len(exercises) >= 5 and len(items) == len(exercises)
    for n, item in enumerate(items, 1):
        assert item.startswith(f"{n}. ")
        assert MARKED_NUMBER.search(item) or MARKED_SPAN.search(item), f"answer {n} has no checked value"


# ---------------------------------------------------------------------------------------------------
# What `code` comments may call: the real functions, on the exercises' inputs.

def positions(flags) -> str:
    """Block positions as the page writes them: 0..7 for a run of three or more, 19, 20 otherwise."""
    cols = [i for i, f in enumerate(flags) if f]
    runs, out = [], []
    for c in cols:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    for r in runs:
        out += [f"{r[0]}..{r[-1]}"] if len(r) >= 3 else [str(c) for c in r]
    return ", ".join(out)


def unmask_rule(conf, candidate, strategy, threshold, k):
    """decoder.unmask on one (S, block) grid -> the decoded positions of each sequence."""
    chosen = decoder.unmask(torch.tensor(conf), torch.tensor(candidate, dtype=torch.bool), strategy, threshold, k)
    return [row.nonzero().squeeze(1).tolist() for row in chosen]


class Scheduled(decoder.Decoder):
    """A Decoder that decodes the positions it is told (`decode_next`) instead of choosing by confidence."""
    decode_next: list = []

    def choose(self, logits, seq, col):
        _, tokens = super().choose(logits, seq, col)
        chosen = torch.zeros_like(self.masked)
        chosen[0, self.decode_next] = True
        return chosen & self.masked, tokens


@lru_cache(maxsize=None)
def _delayed_cache_run(decoded: tuple, block_size: int):
    """A fresh block decoded by the given schedule on a tiny random model, through the real Decoder's steps:
    per step, the positions computed and the last block position attention reaches."""
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, block_size=block_size,
                      mask_token_id=3, torch_dtype="float32")
    torch.manual_seed(0)
    opts = decoder.Options(max_new_tokens=2 * block_size, block_size=block_size)
    dec = Scheduled(SDAR(cfg).eval(), 3, [-1], opts, num_slots=1, max_len=4 * block_size)
    dec.admit([0], [list(range(10, 10 + block_size))])           # one whole prompt block, then a fresh one
    computed, reach = [], []
    with torch.inference_mode():
        for positions_now in decoded:
            dec.decode_next = list(positions_now)
            stats = dec.step()
            computed.append(dec.last_step.computed[0].tolist())
            reach.append(int(stats["context"][0]) - block_size - 1)
            dec.finish_blocks(stats["committing"])
    return computed, reach


def delayed_cache_rows(decoded, block_size) -> str:
    computed, _ = _delayed_cache_run(tuple(map(tuple, decoded)), block_size)
    return " | ".join(positions(c) for c in computed)


def delayed_cache_total(decoded, block_size) -> int:
    computed, _ = _delayed_cache_run(tuple(map(tuple, decoded)), block_size)
    return sum(map(sum, computed))


def attention_reach(decoded, block_size) -> list:
    return _delayed_cache_run(tuple(map(tuple, decoded)), block_size)[1]


def importance(q, k, scale, masked=None, pool=True):
    """focus.token_importance of one sequence, one head of dimension 1 (masked: the mask set, default all),
    rounded to 3 decimals; pool=False: as if max_pool3 returned its input."""
    masked = list(range(len(q))) if masked is None else masked
    qt = torch.tensor([q[i] for i in masked], dtype=torch.float32).view(1, -1, 1, 1)
    kt = torch.tensor([k[i] for i in masked], dtype=torch.float32).view(1, -1, 1, 1)
    valid = torch.ones(1, len(masked), dtype=torch.bool)
    with mock.patch.object(focus, "max_pool3", focus.max_pool3 if pool else (lambda s: s)):
        out = focus.token_importance(qt, kt, valid, scale)
    return [round(v, 3) for v in out[0].tolist()]


def delta(i1, i0, dtype) -> list:
    out = focus.importance_delta(torch.tensor(i1), torch.tensor(i0), dtype)
    return [round(v, 4) for v in out.tolist()]


def target(avg, mask_count, alpha) -> list:
    return focus.retain_target(torch.tensor(avg), torch.tensor(mask_count), alpha).tolist()


def evicts(avg, mask_count, alpha) -> list:
    return [m > t for m, t in zip(mask_count, target(avg, mask_count, alpha))]


def near_target(target, confidence, masked, threshold) -> list:
    return focus.near_threshold_target(torch.tensor(target), torch.tensor(confidence), torch.tensor(masked),
                                       threshold).tolist()


def kept(score, position, target, progress) -> str:
    """focus.select_retained on one sequence's mask set."""
    out = focus.select_retained(torch.tensor([score], dtype=torch.float32), torch.ones(1, len(score), dtype=torch.bool),
                                torch.tensor([position]), torch.tensor([target]), torch.tensor([progress]))
    flags = [False] * (max(position) + 1)
    for p, k in zip(position, out[0].tolist()):
        flags[p] = k
    return positions(flags)


def kept_without_rule5(score, position, target) -> str:
    """select_retained with rule 5 idle: with progress at the last position nothing lies between it and the
    rightmost kept token, so the result is rules 1-4 alone."""
    return kept(score, position, target, max(position))


def compute_ratio(cfg: ModelConfig, context: int, k: int, block: int = 32) -> float:
    """A step's FLOPs with the whole block in every layer over FOCUS's (whole block in layers 0-1, k rows
    after), by model.flops_per_token (every layer costs the same per token)."""
    per_layer = flops_per_token(cfg, context) / cfg.num_hidden_layers
    n = cfg.num_hidden_layers
    return n * block * per_layer / ((2 * block + (n - 2) * k) * per_layer)


def varlen(seq, key_end, heads, kv_heads, cache_len) -> tuple:
    """kernels.varlen_layout for one decode step's rows (slots seq of 4, each slot's rows at its block positions
    0, 1, ...): the packed sequences' first queries (then the total), their first key rows in the cache, their
    key counts, and where each (row, head) is packed (rows x heads)."""
    place = [seq[:i].count(s) for i, s in enumerate(seq)]
    rows = Rows.build(torch.tensor(seq), torch.tensor(place), torch.tensor(key_end), num_slots=4)
    order, cu_q, cu_k, key_len, _ = kernels.varlen_layout(rows, heads, kv_heads, cache_len)
    return cu_q.tolist(), cu_k[:-1].tolist(), key_len.tolist(), order.view(len(seq), heads).tolist()


def host_waits(statements) -> list:
    """Exercise 12: for each `t[...] = ...` statement (t (4, 8); idx, col, ones tensors of two entries), does it
    copy a number from the host (conftest.takes_a_number_from_the_host), found by running it watched."""
    from conftest import takes_a_number_from_the_host
    seen, real = [], torch.Tensor.__setitem__

    def setitem(self, index, value):
        seen.append(takes_a_number_from_the_host(self, index, value))
        return real(self, index, value)
    with mock.patch.object(torch.Tensor, "__setitem__", setitem):
        for statement in statements:
            exec(statement, {}, {"t": torch.zeros(4, 8), "idx": torch.tensor([0, 1]), "col": torch.tensor([2, 3]),
                                 "ones": torch.ones(2)})
    return seen


def config_from(data: dict) -> ModelConfig:
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in names})


@lru_cache(maxsize=None)
def _code_names():
    text = PAGE.read_text()
    gpu = load_json(sources(text)["gpu"])
    return {"torch": torch, "math": math, "flops_per_token": flops_per_token, "compute_ratio": compute_ratio,
            "tiny": config_from(json.loads((ROOT / "checkpoints/sdar-tiny/config.json").read_text())),
            "sdar_1_7b": config_from(gpu["real_size"]["config"]),
            "unmask_rule": unmask_rule, "delayed_cache_rows": delayed_cache_rows,
            "delayed_cache_total": delayed_cache_total, "attention_reach": attention_reach,
            "importance": importance, "delta": delta, "target": target, "evicts": evicts, "kept": kept,
            "kept_without_rule5": kept_without_rule5, "near_target": near_target, "varlen": varlen,
            "host_waits": host_waits}


def code_names() -> dict:
    return dict(_code_names())
