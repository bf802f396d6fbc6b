"""The shipped model's data, built offline by seeded generators (nothing is downloaded).

- Verifiable tasks in a chat format: multi-step arithmetic word problems with worked solutions (in the
  spirit of GSM8K, small numbers), direct arithmetic questions and list manipulation. Every solution ends
  with "The answer is X." Word problems are asked in several phrasing families (PHRASINGS), one family per
  problem. Two held-out sets are never trained on:
  - "heldout": the questions for which is_heldout(question) holds (a CRC of the text), in the training
    phrasings: new questions from known templates.
  - "heldout-phrasing": word problems in HELDOUT_PHRASING, a family told in the past tense ("Yesterday Tom
    had 12 apples. Then Tom lost 3 of them...") that no training question uses. It asks the same operations
    with the same solutions, so it measures whether the model generalises beyond its training templates.
- Long answers (multistep.py, longstories.py): make_problems(split, n, family="multistep") gives word problems of several
  quantities with worked solutions of 3 to 6 steps (80-250 tokens), split the same two ways (their held-out
  phrasing family is multistep.HELDOUT_PHRASING). story_samples gives chat prompts with stories and
  descriptions of several paragraphs (150-400 tokens); story_prompts("heldout", n) gives prompts never
  trained on (is_heldout of the prompt); long_texts gives the same texts without a prompt.
- Natural text: docstrings of the Python standard library, read with `ast` from the running Python's own
  source files (PSF License), and short generated stories, so an English prompt gets a readable answer.
  documents() joins docstring paragraphs into documents of several paragraphs for plain-text training.
- The tokenizer: byte-level BPE trained with the `tokenizers` package, with SDAR's special tokens.
"""
from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import multistep
import longstories

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]  # ids 0..3
END_OF_TEXT, EOS_TOKEN, MASK_TOKEN = "<|endoftext|>", "<|im_end|>", "<|MASK|>"
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def chat_sample(question: str, answer: str) -> str:
    return chat_prompt(question) + answer + EOS_TOKEN


@dataclass
class Problem:
    question: str
    solution: str
    answer: str
    family: str
    phrasing: str  # the question's phrasing family: a key of PHRASINGS, "direct" or "lists"


def is_heldout(question: str) -> bool:
    """One question in ten, fixed by its text: the held-out space."""
    return zlib.crc32(question.encode()) % 10 == 0


def extract_answer(text: str) -> str | None:
    found = re.findall(r"The answer is (.+?)\.?\s*$", text.strip(), flags=re.M)
    return found[-1].strip() if found else None


# ---------------------------------------------------------------------------------------------------
# Arithmetic word problems.

NAMES = ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Nora", "Omar", "Ivy", "Jack", "Zoe",
         "Paul", "Rosa", "Ali", "Kate", "Hugo", "Lena", "Ravi", "Sara", "Theo", "Yuki"]
OBJECTS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "shells", "cards", "stamps",
           "flowers", "eggs", "balloons", "candies", "toy cars", "buttons", "cupcakes", "oranges", "beads", "rocks"]
PLACES = ["the market", "the shop", "school", "the fair", "the park", "a friend's house"]


# Several wordings for each step, drawn independently of the question: as in real solutions, the wording
# is not determined by the problem, so a model cannot be sure of a whole sentence before it starts it.
SAY = {
    "add": ["{name} gets {b} more, so {a} + {b} = {c} {obj}", "After that there are {a} + {b} = {c} {obj}",
            "Adding {b} gives {a} + {b} = {c}", "{a} plus {b} is {c}, so now {name} has {c} {obj}",
            "Then {a} + {b} = {c}", "With {b} more {obj}, the total is {a} + {b} = {c}",
            "We add: {a} + {b} = {c} {obj}"],
    "sub": ["{name} has {b} fewer, so {a} - {b} = {c} {obj}", "Taking away {b} leaves {a} - {b} = {c}",
            "Then {a} - {b} = {c}", "{a} minus {b} is {c}, so {c} {obj} are left",
            "Without those {b} {obj}, {name} has {a} - {b} = {c}", "We subtract: {a} - {b} = {c} {obj}"],
    "mul": ["The {obj} grow {b} times, so {a} * {b} = {c} {obj}", "Multiplying gives {a} * {b} = {c}",
            "{a} times {b} is {c}", "Then {a} * {b} = {c} {obj}", "Now there are {b} times as many: {a} * {b} = {c}"],
    "div": ["Shared among {b} friends, each gets {a} / {b} = {c} {obj}", "Dividing gives {a} / {b} = {c}",
            "{a} divided by {b} is {c}", "Each friend gets {a} / {b} = {c} {obj}"],
    # Wordings for question forms that are not a change of one count: a product to start with, a count cut
    # into equal groups, and a count of groups of a given size (its result is not a number of {obj}).
    "setup": ["{a} groups of {b} make {a} * {b} = {c} {obj}", "To start, {a} * {b} = {c} {obj}",
              "At first there are {a} * {b} = {c}", "{a} times {b} is {c} {obj} to begin with"],
    "div_groups": ["In {b} equal groups, each has {a} / {b} = {c} {obj}", "Dividing gives {a} / {b} = {c}",
                   "{a} divided by {b} is {c}"],
    "div_per": ["With {b} in each, there are {a} / {b} = {c}", "Dividing gives {a} / {b} = {c}",
                "{a} divided by {b} is {c}"],
    "direct": ["{a} {op} {b} = {c}", "{a} {word} {b} equals {c}", "We compute {a} {op} {b} = {c}",
               "{a} {word} {b} is {c}", "Working it out, {a} {op} {b} = {c}"],
}
OPENERS = ["", "", "", "Let's solve it step by step.", "We work through it one step at a time.", "Let's think.",
           "Start with what we know."]


def _say(rng: random.Random, kind: str, **values) -> str:
    return rng.choice(SAY[kind]).format(**values)


# Phrasing families: each asks the same operations in its own style, and a word problem takes every question
# sentence from one family. Fields: {name}, {friend}, {obj}, {place}, {a} (the count so far), {b} (the step's
# number), {times} ("twice", "three times"...). "setup" opens with a product (a groups of b); each "div" entry
# ends the problem with its own question and names its solution wording; "left" asks after a subtraction.
PHRASINGS = {
    "plain": {
        "start": ["{name} has {a} {obj}.", "{name} starts with {a} {obj}.", "There are {a} {obj} in {name}'s bag."],
        "add": ["Then {name} gets {b} more at {place}.", "{friend} gives {name} {b} more {obj}.",
                "{name} buys {b} more {obj}."],
        "sub": ["{name} gives {b} {obj} to {friend}.", "{name} loses {b} of them.", "{name} uses {b} {obj}."],
        "mul": ["Then {name} multiplies the number of {obj} by {b}.", "Then the number of {obj} grows {b} times."],
        "div": [("{name} shares the {obj} equally among {b} friends. How many {obj} does each friend get?", "div")],
        "ask": ["How many {obj} does {name} have now?", "How many {obj} are there now?",
                "How many {obj} does {name} have in the end?"],
    },
    "groups": {  # rows, boxes and packs
        "start": ["{name} counts {a} {obj} on the table."],
        "setup": ["{name}'s {obj} stand in {a} rows of {b}.", "{name} has {a} boxes with {b} {obj} in each box.",
                  "{name} lines up the {obj} in {a} rows of {b}.", "{name} buys {a} packs of {obj} with {b} per pack."],
        "add": ["{friend} brings {b} more {obj}.", "{name} puts {b} more {obj} with the others."],
        "sub": ["{friend} takes {b} of the {obj} away.", "{name} removes {b} {obj}."],
        "mul": ["Next, {name} ends up with {times} as many {obj}.", "Next, the number of {obj} becomes {b} times as big."],
        "div": [("{name} puts the {obj} into {b} equal rows. How many {obj} are in each row?", "div_groups"),
                ("{name} packs the {obj} with {b} per box. How many boxes does {name} fill?", "div_per"),
                ("Each of {b} friends gets the same share of the {obj}. How many {obj} does each friend get?", "div")],
        "ask": ["How many {obj} does {name} have altogether?", "How many {obj} are there altogether?"],
    },
    "totals": {  # everyday counting that asks "in total" or "left"
        "start": ["{name} keeps {a} {obj} in a jar.", "{name} owns {a} {obj}."],
        "setup": ["{name} gets {b} {obj} per day for {a} days.", "Each of {a} friends gives {name} {b} {obj}."],
        "add": ["{name} also gets {b} {obj} from {friend}.", "{name} finds {b} more {obj} at {place}."],
        "sub": ["{name} sells {b} of the {obj}.", "{name} gives away {b} {obj}."],
        "mul": ["The number of {obj} is then multiplied by {b}.", "{name} then has {times} as many {obj}."],
        "div": [("{name} splits the {obj} into {b} equal groups. How many {obj} are in each group?", "div_groups"),
                ("{name} hands out the {obj}, {b} per child. How many children get {obj}?", "div_per")],
        "ask": ["How many {obj} does {name} have in total?", "How many {obj} are there in total?"],
        "left": ["How many {obj} are left?", "How many {obj} does {name} have left?"],
    },
    "past-tense": {  # a story told afterwards: every sentence in the past tense, which no training family uses
        "start": ["Yesterday {name} had {a} {obj}.", "At first {name} had {a} {obj}.", "Last week {name} owned {a} {obj}."],
        "setup": ["Last week {name} bought {a} bags of {b} {obj}.", "{name} had {a} boxes, and every box held {b} {obj}."],
        "add": ["Later {name} got {b} more {obj}.", "Then {friend} gave {name} {b} more {obj}.",
                "After that {name} found {b} more at {place}."],
        "sub": ["Then {name} lost {b} of them.", "{name} gave {b} {obj} to {friend}.", "Later {name} used up {b} {obj}."],
        "mul": ["Then the number of {obj} became {b} times as large.",
                "After a while {name} had {times} as many {obj} as before."],
        "div": [("In the end {name} split the {obj} evenly among {b} friends. How many {obj} did each friend get?", "div"),
                ("Then {name} put the {obj} into {b} equal piles. How many {obj} were in each pile?", "div_groups"),
                ("{name} packed the {obj} with {b} in every box. How many boxes did {name} fill?", "div_per")],
        "ask": ["How many {obj} did {name} have at the end?", "How many {obj} were there after that?",
                "How many {obj} did {name} end up with?"],
        "left": ["How many {obj} were left?", "How many {obj} did {name} have left?"],
    },
}
# Never trained on: "heldout-phrasing" problems measure whether the model learnt the operations or only the
# training templates.
HELDOUT_PHRASING = "past-tense"
TRAIN_PHRASINGS = [p for p in PHRASINGS if p != HELDOUT_PHRASING]
TIMES = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}


def _word_problem(rng: random.Random, phrasing: str) -> tuple[str, list[str], int]:
    style = PHRASINGS[phrasing]
    name, friend = rng.sample(NAMES, 2)
    words = {"name": name, "friend": friend, "obj": rng.choice(OBJECTS)}
    question, steps = [], []

    def ask(template: str, kind: str, a: int, b: int, c: int) -> int:
        """One question sentence and its solution step, a op b = c; returns c, the new count."""
        question.append(template.format(a=a, b=b, times=TIMES.get(b), place=rng.choice(PLACES), **words))
        steps.append(_say(rng, kind, a=a, b=b, c=c, **words))
        return c

    if "setup" in style and rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        value = ask(rng.choice(style["setup"]), "setup", a, b, a * b)
    else:
        value = rng.randint(2, 40)
        question.append(rng.choice(style["start"]).format(a=value, **words))
    op = None
    for i in range(rng.randint(1, 3)):
        op = rng.choice(["add", "add", "sub", "sub", "mul"] + (["div"] if i > 0 else []))
        if op == "mul" and value * 5 > 400:
            op = "add"
        if op == "div":
            divisors = [k for k in range(2, 7) if value % k == 0]
            if not divisors:
                op = "sub"
        if op == "sub" and value < 3:
            op = "add"
        if op == "add":
            value = ask(rng.choice(style["add"]), "add", value, b := rng.randint(2, 30), value + b)
        elif op == "sub":
            value = ask(rng.choice(style["sub"]), "sub", value, b := rng.randint(2, value - 1), value - b)
        elif op == "mul":
            value = ask(rng.choice(style["mul"]), "mul", value, b := rng.randint(2, 5), value * b)
        else:  # a division ends the problem: its template carries the final question
            template, kind = rng.choice(style["div"])
            value = ask(template, kind, value, b := rng.choice(divisors), value // b)
            return " ".join(question), steps, value
    asks = style["ask"] + (style.get("left", []) if op == "sub" else [])  # "left" only makes sense after a loss
    question.append(rng.choice(asks).format(**words))
    return " ".join(question), steps, value


# Direct questions, several phrasings per operator; a is never smaller than b for "-", and b divides a for "/".
DIRECT = {
    "+": ["What is {a} plus {b}?", "Compute {a} + {b}.", "What is {a} + {b}?", "Calculate {a} plus {b}.",
          "How much is {a} plus {b}?", "What do you get when you add {a} and {b}?", "Find the sum of {a} and {b}.",
          "What is {b} more than {a}?"],
    "-": ["What is {a} minus {b}?", "Compute {a} - {b}.", "What is {a} - {b}?", "Calculate {a} minus {b}.",
          "How much is {a} minus {b}?", "What is {b} less than {a}?", "Subtract {b} from {a}.",
          "What is the difference between {a} and {b}?", "Take {b} away from {a}. How much is left?"],
    "*": ["What is {a} times {b}?", "Compute {a} * {b}.", "What is {a} * {b}?", "Calculate {a} times {b}.",
          "How much is {a} times {b}?", "Find the product of {a} and {b}.", "Multiply {a} by {b}.",
          "What do you get when you multiply {a} by {b}?"],
    "/": ["What is {a} divided by {b}?", "Compute {a} / {b}.", "Divide {a} by {b}.",
          "How many times does {b} go into {a}?", "What do you get when you divide {a} by {b}?"],
}
OPERATOR = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b),
            "*": ("times", lambda a, b: a * b), "/": ("divided by", lambda a, b: a // b)}


def _direct_question(rng: random.Random) -> tuple[str, list[str], int]:
    op = rng.choice("+-*/")
    if op == "*":
        a, b = rng.randint(2, 30), rng.randint(2, 12)
    elif op == "/":
        b = rng.randint(2, 12)
        a = b * rng.randint(2, 20)
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if op == "-" and b > a:
            a, b = b, a
    word, apply = OPERATOR[op]
    value = apply(a, b)
    question = rng.choice(DIRECT[op]).format(a=a, b=b)
    return question, [_say(rng, "direct", a=a, b=b, op=op, word=word, c=value)], value


def arithmetic_problem(rng: random.Random, phrasing: str | None = None) -> Problem:
    """A word problem in the given phrasing family; without one, a training family's word problem (70%) or a
    direct question (phrasing "direct")."""
    if phrasing is None:
        phrasing = rng.choice(TRAIN_PHRASINGS) if rng.random() < 0.7 else "direct"
    word = phrasing != "direct"
    question, steps, value = _word_problem(rng, phrasing) if word else _direct_question(rng)
    opener = rng.choice(OPENERS)
    start = ([opener] if opener else []) + ([re.match(r"(.+?\.)", question).group(1)] if word and rng.random() < 0.6 else [])
    solution = "\n".join(start + [s + "." for s in steps]) + f"\nThe answer is {value}."
    return Problem(question, solution, str(value), "arithmetic", phrasing)


# ---------------------------------------------------------------------------------------------------
# List manipulation.

WORDS = ["cat", "dog", "sun", "tree", "fish", "bird", "star", "moon", "rain", "leaf", "cup", "box", "key", "hat"]


def _fmt(items) -> str:
    return "[" + ", ".join(str(x) for x in items) + "]"


def list_problem(rng: random.Random) -> Problem:
    words = rng.random() < 0.25
    n = rng.randint(3, 7)
    items = [rng.choice(WORDS) for _ in range(n)] if words else [rng.randint(0, 30) for _ in range(n)]
    ops = ["reverse", "first", "last", "remove", "count", "length"] + ([] if words else ["sort", "sum", "max", "min"])
    op = rng.choice(ops)
    L = _fmt(items)
    if op == "reverse":
        back = ', '.join(map(str, items[::-1]))
        q, work, ans = rng.choice([f"Reverse the list {L}.", f"What is {L} in reverse order?"]), \
            rng.choice([f"Reading {L} from the end: {back}.", f"From last to first the items are {back}.",
                        f"Backwards, {L} becomes {back}."]), _fmt(items[::-1])
    elif op == "sort":
        desc = rng.random() < 0.3
        out = sorted(items, reverse=desc)
        order = "largest to smallest" if desc else "smallest to largest"
        q, work, ans = f"Sort {L} from {order}.", f"Ordered from {order}: {', '.join(map(str, out))}.", _fmt(out)
    elif op == "sum":
        total = sum(items)
        q, work, ans = rng.choice([f"What is the sum of {L}?", f"Add up the numbers in {L}."]), \
            rng.choice([f"{' + '.join(map(str, items))} = {total}.", f"Adding them up: {' + '.join(map(str, items))} = {total}.",
                        f"The total is {' + '.join(map(str, items))} = {total}."]), str(total)
    elif op in ("max", "min"):
        best = max(items) if op == "max" else min(items)
        word = "largest" if op == "max" else "smallest"
        q, work, ans = f"What is the {word} number in {L}?", f"Comparing {', '.join(map(str, items))}, the {word} is {best}.", str(best)
    elif op == "count":
        x = rng.choice(items) if rng.random() < 0.8 else (rng.choice(WORDS) if words else rng.randint(0, 30))
        c = items.count(x)
        q, work, ans = f"How many times does {x} appear in {L}?", f"Checking each item of {L}, {x} appears {c} times.", str(c)
    elif op == "length":
        q, work, ans = f"How many items are in {L}?", f"Counting the items: {', '.join(str(i + 1) for i in range(n))}.", str(n)
    elif op in ("first", "last"):
        k = rng.randint(1, n - 1)
        out = items[:k] if op == "first" else items[-k:]
        q, work, ans = f"Give the {op} {k} items of {L}.", f"The {op} {k} items are {', '.join(map(str, out))}.", _fmt(out)
    else:
        x = rng.choice(items)
        out = [i for i in items if i != x]
        q, work, ans = f"Remove every {x} from {L}.", f"Dropping each {x} leaves {', '.join(map(str, out)) or 'nothing'}.", _fmt(out)
    opener = rng.choice(LIST_OPENERS)
    return Problem(q, (opener + "\n" if opener else "") + f"{work}\nThe answer is {ans}.", ans, "lists", "lists")


LIST_OPENERS = ["", "", "Let's look at the list.", "We go through the items one by one.", "Let's check each item.",
                "Here is the list again: we work on it carefully."]


FAMILIES = {"arithmetic": (arithmetic_problem, 0.65), "lists": (list_problem, 0.35)}


def multistep_problem(rng: random.Random, phrasing: str | None = None) -> Problem:
    """A word problem of several quantities with a worked solution of 3 to 6 steps (multistep.multistep), in the
    given phrasing family or a training one."""
    phrasing = phrasing or rng.choice(multistep.TRAIN_PHRASINGS)
    question, solution, value = multistep.multistep(rng, phrasing)
    return Problem(question, solution, str(value), "multistep", phrasing)


MAX_PROBLEMS = 10_000  # the held-out sets are a tenth of the question space: more would take minutes to build


def make_problems(split: str, n: int, family: str | None = None) -> list[Problem]:
    """n problems of the split, seeded. "train" and "heldout" mix the families by their weights, in the training
    phrasings, and split them by is_heldout; "heldout-phrasing" is word problems in HELDOUT_PHRASING only.
    family="multistep": the long word problems alone, split the same way (their held-out phrasing family is
    multistep.HELDOUT_PHRASING), from their own seed, so the default sets stay as they were."""
    if split not in ("train", "heldout", "heldout-phrasing"):
        raise ValueError(f"unknown split {split!r}")
    if family not in (None, "multistep"):
        raise ValueError(f"unknown family {family!r}; use multistep or none (the short families)")
    rng = random.Random(f"problems-{split}" + (f"-{family}" if family else ""))
    names, weights = list(FAMILIES), [w for _, w in FAMILIES.values()]
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:  # a question space too small for n distinct problems fails, not loops forever
            raise RuntimeError(f"only {len(out)} distinct {split} problems, {n} asked")
        if family == "multistep":
            p = multistep_problem(rng, multistep.HELDOUT_PHRASING if split == "heldout-phrasing" else None)
            if split != "heldout-phrasing" and is_heldout(p.question) != (split == "heldout"):
                continue
        elif split == "heldout-phrasing":
            p = arithmetic_problem(rng, HELDOUT_PHRASING)
        else:
            p = FAMILIES[rng.choices(names, weights)[0]][0](rng)
            if is_heldout(p.question) != (split == "heldout"):
                continue
        if split != "train":  # evaluation sets have no repeats
            if p.question in seen:
                continue
            seen.add(p.question)
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------
# Natural text.

def _prose(text: str) -> bool:
    words = text.split()
    if len(words) < 8 or any(s in text for s in (">>>", "::", "{", "}", "==", "->", "http", "\\")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.9 and text[0].isupper() and text.rstrip()[-1] in ".!?"


def natural_text(max_chars: int | None = None) -> list[str]:
    """Prose paragraphs of the standard library's docstrings, in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip", "__phello__")
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for para in (doc or "").split("\n\n"):
                    para = " ".join(para.split())
                    if _prose(para) and para.isascii():
                        out.append(para)
                        total += len(para)
                        if max_chars and total >= max_chars:
                            return out
    return out


def stories(n: int, seed: int) -> list[str]:
    """Short simple stories and everyday descriptions from a seeded grammar."""
    rng = random.Random(f"stories-{seed}")
    animals = ["fox", "rabbit", "bear", "cat", "dog", "owl", "mouse", "duck", "frog", "horse", "lion", "turtle"]
    adjs = ["little", "brave", "happy", "small", "kind", "curious", "sleepy", "clever", "shy", "old", "young"]
    places = ["a quiet forest", "a small village", "a big city", "a green valley", "a sunny farm", "the seaside",
              "a snowy mountain", "a busy market", "an old garden", "a wide river"]
    weather = ["sunny and warm", "cold and windy", "rainy and grey", "bright and clear", "cloudy and cool",
               "hot and dry", "snowy and quiet", "foggy in the morning"]
    feelings = ["happy", "sad", "tired", "excited", "worried", "proud", "surprised", "calm", "hungry"]
    things = ["a red ball", "a shiny stone", "a lost key", "a small box", "an old map", "a warm hat", "a blue kite",
              "a basket of berries", "a wooden boat", "a bright lantern"]
    out = []
    for _ in range(n):
        name, animal, adj = rng.choice(NAMES), rng.choice(animals), rng.choice(adjs)
        friend = rng.choice(NAMES)
        thing, place, feel = rng.choice(things), rng.choice(places), rng.choice(feelings)
        kind = rng.random()
        if kind < 0.45:
            s = [rng.choice(["Once upon a time", "One day", "Long ago", "A long time ago"]) +
                 f", there was a {adj} {animal} named {name} who lived in {place}.",
                 rng.choice([f"Every morning, {name} went for a walk.", f"{name} liked to play with {friend}.",
                             f"{name} loved to look at the sky."]),
                 f"One day, {name} found {thing} near the path.",
                 rng.choice([f"{name} felt {feel} and ran to show {friend}.", f"{name} did not know what to do.",
                             f"{name} picked it up and smiled."]),
                 rng.choice([f"{friend} said, \"Let us keep it safe together.\"", "They played until the sun went down.",
                             "Together they took it back to its owner."]),
                 rng.choice([f"From that day on, {name} and {friend} were best friends.", "It was a good day.",
                             f"{name} went home {rng.choice(feelings)} and slept well."])]
        elif kind < 0.75:
            s = [rng.choice(["The weather today is", "Today the weather is", "This morning it was"]) +
                 f" {rng.choice(weather)}.",
                 rng.choice(["Many people walked in the park.", "The streets were quiet.", "Children played outside.",
                             "Birds sang in the trees."]),
                 f"{name} took {rng.choice(['an umbrella', 'a coat', 'a hat', 'a bottle of water'])} and went to "
                 f"{rng.choice(PLACES)}.",
                 rng.choice([f"Later it became {rng.choice(weather)}.", "In the evening the wind stopped.",
                             "By noon the sky had changed."]),
                 f"{name} felt {feel} when {rng.choice(['the day ended', 'the rain started', 'the sun came out'])}."]
        else:
            s = [f"{name} wanted to {rng.choice(['bake a cake', 'build a kite', 'plant a garden', 'paint a picture', 'write a letter'])}.",
                 f"First, {name} {rng.choice(['found', 'bought', 'borrowed'])} {thing}.",
                 rng.choice([f"Then {friend} came to help.", "It took a long time.", "The work was hard but fun."]),
                 rng.choice([f"At last it was done, and {name} was {feel}.", "In the end, everyone said it was beautiful."])]
        for _ in range(rng.randint(0, 2)):  # a few free sentences anywhere in the middle
            s.insert(rng.randint(1, len(s) - 1), rng.choice(EXTRA_SENTENCES).format(name=name, friend=friend))
        out.append(" ".join(s))
    return out


EXTRA_SENTENCES = ["The air smelled of fresh grass.", "{name} laughed out loud.", "A small bird watched from a branch.",
                   "{friend} was busy with something else.", "It was almost time for lunch.", "Nobody else was around.",
                   "{name} stopped to think for a moment.", "The wind moved the leaves gently.",
                   "{friend} asked many questions.", "Somewhere a dog was barking.", "{name} felt a little nervous.",
                   "The sky turned orange and pink.", "They walked slowly and talked about the day.",
                   "{name} remembered an old song.", "Far away, a bell was ringing."]


def continuation_samples(paragraphs: list[str], seed: int) -> list[tuple[str, str]]:
    """(first 3..12 words, the rest of the paragraph) chat pairs that teach continuing a text."""
    rng = random.Random(f"continue-{seed}")
    pairs = []
    for p in paragraphs:
        words = p.split()
        k = rng.randint(3, min(12, len(words) - 3))
        pairs.append((" ".join(words[:k]), " ".join(words[k:])))
    return pairs


def documents(paragraphs: list[str], seed: int) -> list[str]:
    """Consecutive paragraphs joined by blank lines into plain-text documents of at least 80 words, each cut
    at a seeded length up to 200 words (about 300 tokens of docstrings); other seeds cut elsewhere, so a
    paragraph that starts one document sits inside another.

    Why: a docstring paragraph alone is short (median 23 tokens; two in three end inside the first block of
    32). Trained one by one, each from a block boundary and padded with end-of-text to the block's end, they
    taught that a few words of plain text are followed by end-of-text in the same block: the decoder, which
    unmasks its surest token first, then wrote end-of-text at the block's end first and closed the sentence
    in the slots left (a plain docstring opening got 2 or 3 tokens)."""
    rng = random.Random(f"documents-{seed}")
    out, current, words, target = [], [], 0, rng.randint(80, 200)
    for p in paragraphs:
        current.append(p)
        words += len(p.split())
        if words >= target:
            out.append("\n\n".join(current))
            current, words, target = [], 0, rng.randint(80, 200)
    return out + (["\n\n".join(current)] if current else [])


# ---------------------------------------------------------------------------------------------------
# Long texts: stories and descriptions of several paragraphs (longstories.py), in chat or as plain text.

def story_samples(n: int, seed: int) -> list[tuple[str, str]]:
    """n training (prompt, text) chat pairs: stories and descriptions of 150 to 400 tokens, each prompt asking
    for its text in one of several ways. Prompts for which is_heldout holds are never trained on."""
    rng = random.Random(f"long-{seed}")
    out = []
    while len(out) < n:
        prompt, text = longstories.long_sample(rng)
        if not is_heldout(prompt):
            out.append((prompt, text))
    return out


def story_prompts(split: str, n: int) -> list[str]:
    """n distinct prompts asking for a story or a description, seeded: "heldout" prompts are never trained on,
    "train" prompts may be."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    if n <= 0:
        return []
    rng = random.Random(f"long-prompts-{split}")
    out, seen = [], set()
    for _ in range(100 * n + 1000):
        prompt, _ = longstories.long_sample(rng)
        if is_heldout(prompt) == (split == "heldout") and prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} distinct {split} story prompts, {n} asked")


def long_texts(n: int, seed: int) -> list[str]:
    """n whole stories and descriptions without a prompt, for plain-text training."""
    rng = random.Random(f"long-texts-{seed}")
    return [longstories.long_sample(rng, continuation=False)[1] for _ in range(n)]


# ---------------------------------------------------------------------------------------------------
# Tokenizer.

def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def write_tokenizer_files(tok, folder, block_size: int) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": EOS_TOKEN, "pad_token": END_OF_TEXT,
              "mask_token": MASK_TOKEN, "bos_token": None, "model_max_length": 2048,
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False} for t, i in ids.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"eos_token_id": [ids[EOS_TOKEN], ids[END_OF_TEXT]], "pad_token_id": ids[END_OF_TEXT],
           "mask_token_id": ids[MASK_TOKEN], "block_size": block_size}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
