"""The offline data: deterministic, both held-out sets disjoint from training, answers right."""
import re

import pytest

import data


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
