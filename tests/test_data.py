"""The offline data: deterministic, both held-out sets disjoint from training, answers right."""
import hashlib
import random
import re

import pytest

import data
import multistep as word_problems
import longstories


SPLITS = ["train", "heldout", "heldout-phrasing"]


def test_problems_are_deterministic():
    for split in SPLITS:
        assert data.make_problems(split, 300) == data.make_problems(split, 300), split


def test_heldout_is_disjoint_from_train():
    train = data.make_problems("train", 5000)
    heldout = data.make_problems("heldout", 500)
    assert all(data.is_heldout(p.question) for p in heldout)
    assert not any(data.is_heldout(p.question) for p in train)
    assert not {p.question for p in train} & {p.question for p in heldout}


@pytest.mark.slow
def test_heldout_phrasing_is_never_trained_on():
    train = data.make_problems("train", 20000)
    held = data.make_problems("heldout-phrasing", 2000)
    assert {p.phrasing for p in held} == {data.HELDOUT_PHRASING}
    assert data.HELDOUT_PHRASING not in {p.phrasing for p in train + data.make_problems("heldout", 2000)}
    assert not {p.question for p in train} & {p.question for p in held}
    # Sentence by sentence, with the names, objects, places and numbers blanked out: no training template
    # may produce a sentence of the held-out family, so its style is new to the model, not just its numbers.
    train_sentences = {s for p in train for s in _sentences(p.question)}
    held_sentences = {s for p in held for s in _sentences(p.question)}
    assert len(held_sentences) >= 20
    assert not train_sentences & held_sentences, sorted(train_sentences & held_sentences)[:5]


def test_heldout_phrasing_has_enough_distinct_problems():
    held = data.make_problems("heldout-phrasing", 600)
    assert len({p.question for p in held}) == 600


def test_training_questions_use_the_varied_wordings():
    questions = [p.question for p in data.make_problems("train", 5000) if p.family == "arithmetic"]
    for word in ["rows of", "each", "per", "in total", "left"]:
        assert any(re.search(rf"\b{word}\b", q) for q in questions), word


def test_unknown_split():
    with pytest.raises(ValueError):
        data.make_problems("test", 1)


_BLANKS = re.compile("|".join(sorted(map(re.escape, data.NAMES + data.OBJECTS + data.PLACES), key=len, reverse=True)))


def _sentences(question: str) -> list[str]:
    """A question's sentences as templates: names, objects, places and numbers replaced by "_"."""
    return [re.sub(r"\d+", "_", _BLANKS.sub("_", s)) for s in re.split(r"(?<=[.?])\s+", question)]


_EQUATION = re.compile(r"(\d+) ([-+*/]|plus|minus|times|divided by) (\d+) (?:=|equals|is) (\d+)")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a // b if b and a % b == 0 else None}
_SYMBOL = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}


def _check_equations(solution: str) -> list[str]:
    # Every "a op b = c" (also in words, "a plus b is c") in a worked solution is true, and each step starts
    # from the previous step's result. Returns the results in order.
    results = []
    for a, op, b, c in _EQUATION.findall(solution):
        assert _APPLY[_SYMBOL.get(op, op)](int(a), int(b)) == int(c), solution
        assert not results or results[-1] == a, solution
        results.append(c)
    return results


def _independent_list_answer(p):
    nums = [int(x) for x in re.findall(r"-?\d+", p.question.split("[")[1].split("]")[0])] \
        if re.search(r"\[\d", p.question) else None
    q = p.question
    if nums is None:
        return None
    if q.startswith("What is the sum") or q.startswith("Add up"):
        return str(sum(nums))
    if "largest number" in q:
        return str(max(nums))
    if "smallest number" in q:
        return str(min(nums))
    if q.startswith("How many items"):
        return str(len(nums))
    if "reverse" in q.lower():
        return "[" + ", ".join(map(str, nums[::-1])) + "]"
    return None


def test_answers_are_correct():
    problems = [p for split in SPLITS for p in data.make_problems(split, 2000)]
    for p in problems:
        assert data.extract_answer(p.solution) == p.answer
        assert p.solution.splitlines()[-1] == f"The answer is {p.answer}."
        if p.family == "arithmetic":
            steps = _check_equations(p.solution)
            assert steps and steps[-1] == p.answer, p
            results = re.findall(r"(?:=|equals|is) (\d+)", p.solution.split("The answer")[0])
            assert results[-1] == p.answer, p
        else:
            expected = _independent_list_answer(p)
            if expected is not None:
                assert expected == p.answer, p


def test_extract_answer():
    assert data.extract_answer("x\nThe answer is 42.") == "42"
    assert data.extract_answer("The answer is [1, 2].  \n") == "[1, 2]"
    assert data.extract_answer("no answer here") is None


def test_chat_format():
    assert data.chat_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert data.chat_sample("hi", "yo").endswith("assistant\nyo<|im_end|>")


def test_tokenizer_special_ids_and_round_trip():
    tok = data.train_tokenizer(["hello world, the answer is 42."] * 20 + data.stories(20, 0), vocab_size=400)
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == [0, 1, 2, 3]
    text = data.chat_sample("What is 2 + 2?", "2 + 2 = 4.\nThe answer is 4.")
    ids = tok.encode(text).ids
    assert ids[0] == 1 and 2 in ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_natural_text_is_prose():
    paragraphs = data.natural_text(max_chars=50_000)
    assert len(paragraphs) >= 50
    assert all(len(p.split()) >= 8 and p.isascii() and p[-1] in ".!?" for p in paragraphs)


def test_continuations_split_paragraphs():
    paragraphs = data.stories(10, 1)
    for (q, a), p in zip(data.continuation_samples(paragraphs, 1), paragraphs):
        assert f"{q} {a}" == p and 3 <= len(q.split()) <= 12


# ---------------------------------------------------------------------------------------------------
# The short families must not change: results are compared with runs trained and measured before.

def _digest(problems) -> str:
    return hashlib.sha256(repr([(p.question, p.solution, p.answer, p.family, p.phrasing)
                                for p in problems]).encode()).hexdigest()[:16]


def test_short_families_are_unchanged():
    assert _digest(data.make_problems("train", 1000)) == "98c67ba2418124c8"
    assert _digest(data.make_problems("heldout", 1000)) == "5747dfd3b11ee39d"
    assert _digest(data.make_problems("heldout-phrasing", 1000)) == "1cccbe042bca5452"
    first = data.make_problems("heldout", 2)
    assert first[0].question == "Anna's pencils stand in 6 rows of 7. Anna removes 18 pencils. How many pencils are there altogether?"
    assert first[1].question == "Multiply 9 by 9." and first[1].answer == "81"


def test_unknown_family():
    with pytest.raises(ValueError):
        data.make_problems("train", 1, family="poems")


# ---------------------------------------------------------------------------------------------------
# Multi-step word problems.

_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def multistep():
    return {split: data.make_problems(split, 1500, family="multistep") for split in SPLITS}


def test_multistep_solutions_check_out(multistep):
    for p in (p for problems in multistep.values() for p in problems):
        assert p.family == "multistep"
        known = set(re.findall(r"\d+", p.question))  # every operand is given or computed before
        known |= {str(n) for n, word in word_problems.TIMES.items() if word + " as many" in p.question}
        lines = p.solution.splitlines()
        steps = [s for line in lines for s in _STEP.findall(line)]
        assert 3 <= len(steps) <= 6, p.solution
        assert all(len(_STEP.findall(line)) <= 1 for line in lines), p.solution  # one computation a sentence
        for a, op, b, c in steps:
            assert _APPLY[op](int(a), int(b)) == int(c), (a, op, b, c, p.solution)
            assert a in known and b in known, (a, b, p.question, p.solution)
            assert int(c) < 1000
            known.add(c)
        assert steps[-1][3] == p.answer == data.extract_answer(p.solution)
        assert lines[-1] == f"The answer is {p.answer}."


def test_multistep_splits(multistep):
    train, heldout, phrasing = (multistep[s] for s in SPLITS)
    assert data.make_problems("heldout", 200, family="multistep") == heldout[:200]  # seeded
    assert data.make_problems("train", 200, family="multistep") == train[:200]
    assert all(data.is_heldout(p.question) for p in heldout)
    assert not any(data.is_heldout(p.question) for p in train)
    assert len({p.question for p in heldout}) == len(heldout)
    assert not {p.question for p in train} & {p.question for p in heldout + phrasing}
    assert {p.phrasing for p in phrasing} == {word_problems.HELDOUT_PHRASING}
    assert {p.phrasing for p in train + heldout} == set(word_problems.TRAIN_PHRASINGS)


def test_multistep_heldout_phrasing_is_never_trained_on(multistep):
    # Sentence by sentence, names and numbers blanked: no training sentence may read like a held-out one.
    def sentences(question):
        blanked = re.sub(r"\d+", "_", re.sub(r"\b(" + "|".join(word_problems.NAMES) + r")\b", "_", question))
        return {s.lstrip("- ") for line in blanked.splitlines() for s in re.split(r"(?<=[.?])\s+", line)}
    train = set().union(*map(sentences, (p.question for p in data.make_problems("train", 6000, family="multistep"))))
    held = set().union(*map(sentences, (p.question for p in multistep["heldout-phrasing"])))
    assert len(held) > 100
    assert not train & held, sorted(train & held)[:5]


@pytest.fixture(scope="module")
def tokenizer():
    """A BPE like the one train.py builds, on a sample of its texts."""
    texts = [data.chat_sample(p.question, p.solution) for p in data.make_problems("train", 3000)]
    texts += [data.chat_sample(p.question, p.solution) for p in data.make_problems("train", 2000, family="multistep")]
    texts += [data.chat_sample(q, a) for q, a in data.story_samples(1500, 0)] + data.natural_text(max_chars=300_000)
    return data.train_tokenizer(texts, 4096)


@pytest.mark.slow
def test_long_answers_have_their_lengths(tokenizer, multistep):
    solutions = [len(e.ids) for e in tokenizer.encode_batch([p.solution for p in multistep["heldout"]])]
    assert 80 <= min(solutions) and max(solutions) <= 250 and sum(solutions) / len(solutions) > 100
    texts = [len(e.ids) for e in tokenizer.encode_batch([t for _, t in data.story_samples(1500, 1)])]
    assert 150 <= min(texts) and max(texts) <= 400


# ---------------------------------------------------------------------------------------------------
# Stories and descriptions.

def test_stories_are_coherent():
    rng = random.Random(0)
    for _ in range(500):
        cast = longstories.new_cast(rng)
        text = longstories.story(rng, cast)
        paragraphs = text.split("\n\n")
        assert 4 <= len(paragraphs) <= 5 and all(p.strip() == p and p for p in paragraphs)
        assert text.count('"') >= 6 and text.count('"') % 2 == 0  # three lines of dialogue at least, all closed
        named = set(re.findall(r"\b(" + "|".join(word_problems.NAMES) + r")\b", text))
        assert named == set(cast.names), (named, cast.names)  # the cast, all of it and nobody else
        fill = lambda t: t.format(h=cast.names[0], f=cast.names[1], landmark=longstories.PLACES[cast.place][2])
        setup = min(i for i in (text.lower().find(fill(s).lower()) for s in cast.event["setup"]) if i >= 0)
        # the event set up is resolved after it, by what the idea said
        idea, fix = next((i, f) for i, f in cast.event["turns"] if fill(i)[:-1] in text)
        assert setup < text.find(fill(idea)[:-1]) < text.find(fill(fix[1])), text


def test_story_samples_name_what_they_ask_for():
    for prompt, text in data.story_samples(600, 0):
        assert len(text.split("\n\n")) >= 4, text
        for name in re.findall(r"\b(" + "|".join(word_problems.NAMES) + r")\b", prompt):
            assert name in text, (prompt, text[:200])
        if prompt.startswith(("Continue", "Here is", "Finish")):
            assert not text.startswith(prompt.split(": ", 1)[1])  # the answer goes on, not starts over
            continue
        for word in ("fox", "baker", "winter", "market", "gardener", "key", "festival"):
            if re.search(rf"\b{word}\b", prompt):
                assert word in text.lower(), (prompt, text[:200])


@pytest.mark.slow
def test_story_prompts_are_held_out():
    heldout = data.story_prompts("heldout", 300)
    assert heldout == data.story_prompts("heldout", 300) and len(set(heldout)) == 300
    assert all(data.is_heldout(p) for p in heldout)
    assert not any(data.is_heldout(p) for p in data.story_prompts("train", 300))
    trained = {p for p, _ in data.story_samples(20000, 0)}
    assert not trained & set(heldout)
    assert len(trained) > 5000  # prompts vary: many forms, casts, places and events
    with pytest.raises(ValueError):
        data.story_prompts("test", 1)


def test_long_texts_are_whole():
    texts = data.long_texts(50, 0)
    assert texts == data.long_texts(50, 0)
    assert all(t[0].isupper() and len(t.split("\n\n")) >= 4 for t in texts)


# ---------------------------------------------------------------------------------------------------
# Plain text: docstrings as documents of several paragraphs.

def test_documents_join_paragraphs_losslessly():
    paragraphs = data.natural_text(max_chars=100_000)
    for seed in (0, 1):
        docs = data.documents(paragraphs, seed)
        assert "\n\n".join(docs) == "\n\n".join(paragraphs)
        assert all(len(d.split()) >= 80 for d in docs[:-1])  # none ends in its first blocks
    starts = lambda seed: {d.split("\n\n")[0] for d in data.documents(paragraphs, seed)}
    assert len(starts(0) - starts(1)) > len(starts(0)) // 2  # two seeds start documents in different places
