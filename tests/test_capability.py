"""The capability regression check: questions from a JSONL file, multiple-choice accuracy by log-likelihood."""

from __future__ import annotations

import json

import pytest

from kubetune.capability import BUILTIN, Question, accuracy, choice_scores, load_questions
from kubetune.errors import KubetuneError


def _write(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return str(path)


def test_the_shipped_set_loads_with_answers_in_range():
    questions = load_questions(BUILTIN)
    assert len(questions) == 24
    assert all(2 <= len(q.choices) <= 10 and 0 <= q.answer < len(q.choices) for q in questions)
    assert any("北京" in q.choices for q in questions) and any("Mars" in q.choices for q in questions)


def test_an_answer_may_be_a_letter_an_index_or_the_choice_text(tmp_path):
    path = _write(tmp_path / "mc.jsonl", [
        {"question": "2+2?", "choices": ["3", "4"], "answer": "b"},
        {"question": "Sky?", "choices": ["blue", "green", "red"], "answer": 0},
        "",
        {"question": "地球是?", "choices": ["平的", "圆的"], "answer": "圆的"},
    ])
    assert [q.answer for q in load_questions(path)] == [1, 0, 1]


def test_bad_lines_are_named_in_one_error_with_the_format(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [
        {"question": "ok?", "choices": ["a", "b"], "answer": "A"},
        "{not json",
        {"question": "", "choices": ["a", "b"], "answer": "A"},
        {"question": "one choice", "choices": ["a"], "answer": "A"},
        {"question": "answer E of two", "choices": ["a", "b"], "answer": "E"},
    ])
    with pytest.raises(KubetuneError) as caught:
        load_questions(path)
    text = str(caught.value)
    for problem in ("line 2: not JSON", "line 3: no question", "line 4: choices", "line 5: answer 'E'"):
        assert problem in text
    assert '"choices"' in caught.value.fix
    with pytest.raises(KubetuneError, match="does not exist"):
        load_questions(str(tmp_path / "missing.jsonl"))


def test_accuracy_follows_the_letter_the_model_prefers(tiny_model_dir):
    """Questions whose right answer is, by construction, the letter the model scores highest (and then lowest)
    give accuracy 1 (and 0): the accuracy is the model's choice, not a fixed number."""
    from kubetune.modeling import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    asked = [Question(f"Question {i}: which option?", ("alpha", "beta", "gamma", "delta"), 0) for i in range(5)]
    scores = choice_scores(model, tokenizer, asked, batch_size=2)  # batches of two: left padding is exercised
    best = [max(range(4), key=s.__getitem__) for s in scores]
    worst = [min(range(4), key=s.__getitem__) for s in scores]
    assert accuracy(model, tokenizer, [Question(q.question, q.choices, b) for q, b in zip(asked, best, strict=True)]) == 1.0
    assert accuracy(model, tokenizer, [Question(q.question, q.choices, w) for q, w in zip(asked, worst, strict=True)]) == 0.0
    alone = choice_scores(model, tokenizer, asked[3:4])[0]
    assert alone == pytest.approx(scores[3], abs=0.05)  # padding does not change a question's scores
