"""The offline data: deterministic, held-out split disjoint from training, answers right."""
import re

import pytest

import data


def test_problems_are_deterministic():
    assert data.make_problems("train", 300) == data.make_problems("train", 300)
    assert data.make_problems("heldout", 100) == data.make_problems("heldout", 100)


def test_heldout_is_disjoint_from_train():
    train = data.make_problems("train", 5000)
    heldout = data.make_problems("heldout", 500)
    assert all(data.is_heldout(p.question) for p in heldout)
    assert not any(data.is_heldout(p.question) for p in train)
    assert not {p.question for p in train} & {p.question for p in heldout}


def test_unknown_split():
    with pytest.raises(ValueError):
        data.make_problems("test", 1)


def _check_equations(solution: str):
    # Every "a op b = c" in a worked solution is true.
    for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", solution):
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else None}[op] == c, solution


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
    for p in data.make_problems("train", 2000) + data.make_problems("heldout", 500):
        assert data.extract_answer(p.solution) == p.answer
        if p.family == "arithmetic":
            _check_equations(p.solution)
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
