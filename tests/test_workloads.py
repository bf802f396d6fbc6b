"""workloads.py: fixed, seeded prompt sets and their quality measures, checked against literal definitions."""
import pytest

import data
import workloads


def test_workloads_are_fixed_and_nested():
    for name in workloads.WORKLOADS:
        small, large = workloads.workload(name, 6), workloads.workload(name, 10)
        assert small == workloads.workload(name, 6)                 # seeded: the same prompts every time
        if name != "long":
            assert large.prompts[:6] == small.prompts               # the first n of a larger set
        assert len(small.prompts) == len(small.answers) == 6
        assert len(set(small.prompts)) == 6


def test_long_alternates_problems_and_stories():
    w = workloads.workload("long", 7)
    problems = data.make_problems("heldout", 4, family="multistep")
    stories = data.story_prompts("heldout", 3)
    assert w.prompts == [problems[0].question, stories[0], problems[1].question, stories[1], problems[2].question,
                         stories[2], problems[3].question]
    assert w.answers[::2] == [p.answer for p in problems] and w.answers[1::2] == [None] * 3
    assert w.max_new_tokens >= 400 > workloads.workload("arith", 1).max_new_tokens


def test_a_long_workload_of_one_is_one_problem():
    assert data.story_prompts("heldout", 0) == []
    w = workloads.workload("long", 1)
    assert w.prompts == [data.make_problems("heldout", 1, family="multistep")[0].question]


def test_accuracy_counts_only_prompts_with_an_answer():
    w = workloads.Workload("t", ["a", "b", "c", "d"], ["3", None, "5", "7"], 8)
    texts = ["x\nThe answer is 3.", "a story", "The answer is 6.", "The answer is 7."]
    assert workloads.accuracy(w, texts) == pytest.approx(2 / 3)
    assert workloads.accuracy(workloads.Workload("s", ["a"], [None], 8), ["a story"]) is None


def test_agreement_with_the_full_block():
    w = workloads.Workload("t", ["a", "b", "c"], [None, "1", None], 8)
    reference = [[1, 2, 3, 4], [9], [5, 6]]
    got = workloads.agreement(w, [[1, 2, 7, 4], [8], [5, 6]], reference)   # the problem's output is not compared
    assert got == {"identical": 0.5, "shared_prefix": pytest.approx((2 / 4 + 2 / 2) / 2)}
    assert workloads.agreement(w, [[1, 2, 3, 4, 5], [8], [5]], reference)["shared_prefix"] == pytest.approx((1 + 0.5) / 2)
    assert workloads.agreement(workloads.Workload("p", ["a"], ["1"], 8), [[1]], [[1]]) is None


def test_unknown_workload_and_empty_sets_are_refused():
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.workload("code", 4)
    with pytest.raises(ValueError, match="at least one"):
        workloads.workload("long", 0)


def test_eval_reports_every_mode_on_every_workload(tmp_path, make_checkpoint):
    """tools/eval.py --workloads, two prompts each (a tiny random model: the report, not the answers): one row
    per workload and mode, the delayed cache's steps the unit, the full block the stories' reference."""
    import json

    import eval as evaluate
    out = tmp_path / "w.json"
    ckpt = make_checkpoint(max_position_embeddings=2048)
    assert evaluate.main(["--model", str(ckpt.path), "--workloads", "arith,story", "-n", "2", "--batch-size", "2",
                          "--max-new-tokens", "24", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["workloads"]
    assert [(r["workload"], r["mode"]) for r in rows] == [(w, m) for w in ("arith", "story")
                                                         for m in ("full block", "delayed cache", "FOCUS 1.5")]
    for r in rows:
        assert r["n"] == 2 and r["tokens_mean"] > 0 and r["blocks_per_sequence"] >= 1 and 0 <= r["ended_at_eos"] <= 1
        assert r["steps_over_delayed"] == (1.0 if r["mode"] == "delayed cache" else r["steps_over_delayed"])
        assert (r["accuracy"] is None) == (r["workload"] == "story")
        assert (r["agreement"] is None) == (r["workload"] == "arith")
    assert rows[3]["agreement"] == {"identical": 1.0, "shared_prefix": 1.0}   # the full block against itself


@pytest.mark.parametrize("failure, code, line", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000 bytes"), 2,
     "error: out of memory")])
def test_eval_keeps_finished_rows_when_stopped(tmp_path, make_checkpoint, monkeypatch, capsys, failure, code, line):
    """Ctrl-C, or an allocation that fails, in the middle of a sweep: the exit code, one line naming the partial
    file, which holds every row that finished; the output itself is not made."""
    import json

    import eval as evaluate
    calls = []
    real = evaluate.generate

    def second_mode_stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise failure
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "generate", second_mode_stopped)
    out = tmp_path / "w.json"
    ckpt = make_checkpoint(max_position_embeddings=2048)
    got = evaluate.main(["--model", str(ckpt.path), "--workloads", "arith", "-n", "2", "--max-new-tokens", "8",
                         "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code and err[-1].startswith(line) and "w.json.partial" in err[-1]
    assert not out.exists()
    rows = json.loads((tmp_path / "w.json.partial").read_text())["workloads"]
    assert [r["mode"] for r in rows] == ["full block"]
