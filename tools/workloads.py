"""Named workloads: fixed sets of held-out prompts, each with its quality measure. tools/eval.py reports them
(`--workloads`), tools/bench.py replays their decoding schedules at real size (`--replay-workload`).

    from workloads import workload
    w = workload("long", 64)        # w.prompts, w.answers, w.max_new_tokens

- arith: held-out arithmetic and list problems (short answers), checked by their exact answer;
- multistep: held-out multi-step word problems (worked solutions of 3 to 6 steps), checked likewise;
- story: held-out prompts for long stories and descriptions; no single right answer, so a mode's quality is
  its agreement with the full block's output on the same prompts;
- long: multistep and story prompts in turn: the long-generation workload, like the paper's serving runs.
Every set is seeded: the same name and n give the same prompts, and the first n of a larger set.
"""
from __future__ import annotations

from dataclasses import dataclass

import data

WORKLOADS = ("arith", "multistep", "story", "long")
PAPER_DECODED_PER_STEP = (2.24, 3.34, 1)  # the paper's tokens decoded per step for SDAR-8B: mean / sd / median


@dataclass
class Workload:
    name: str
    prompts: list[str]
    answers: list[str | None]  # a problem's exact answer; None for a story (quality: agreement with the full block)
    max_new_tokens: int


def workload(name: str, n: int) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; use one of {', '.join(WORKLOADS)}")
    if n <= 0:
        raise ValueError(f"a workload needs at least one prompt, got {n}")
    if name == "arith":
        problems = data.make_problems("heldout", n)
        return Workload(name, [p.question for p in problems], [p.answer for p in problems], 256)
    multistep = data.make_problems("heldout", n if name == "multistep" else (n + 1) // 2, family="multistep")
    stories = data.story_prompts("heldout", n if name == "story" else n // 2)
    if name == "multistep":
        return Workload(name, [p.question for p in multistep], [p.answer for p in multistep], 512)
    if name == "story":
        return Workload(name, stories, [None] * n, 512)
    prompts, answers = [], []
    for i in range(n):  # long: a problem, a story, a problem, ...
        if i % 2 == 0:
            prompts.append(multistep[i // 2].question)
            answers.append(multistep[i // 2].answer)
        else:
            prompts.append(stories[i // 2])
            answers.append(None)
    return Workload(name, prompts, answers, 512)


def accuracy(w: Workload, texts: list[str]) -> float | None:
    """Exact answers among the prompts that have one (None when none has)."""
    scored = [data.extract_answer(t) == a for t, a in zip(texts, w.answers) if a is not None]
    return sum(scored) / len(scored) if scored else None


def agreement(w: Workload, ids: list[list[int]], reference: list[list[int]]) -> dict | None:
    """How far a mode's outputs agree with the full block's on the prompts without an exact answer: the share of
    identical outputs, and the mean share of the full block's tokens that the output repeats before it first
    differs (its shared prefix)."""
    pairs = [(a, b) for a, b, answer in zip(ids, reference, w.answers) if answer is None]
    if not pairs:
        return None

    def shared(a, b):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return n / max(len(b), 1)
    return {"identical": sum(a == b for a, b in pairs) / len(pairs),
            "shared_prefix": sum(shared(a, b) for a, b in pairs) / len(pairs)}
