"""Problem sets: local JSON / JSONL / Parquet files go through ``datasets.load_dataset`` like Hub data, with errors
that name the file, the line or the columns."""

import json

import datasets
import pytest

from zerosiam_llm.data import load_problems
from zerosiam_llm.errors import UserInputError

ROWS = [{"problem": "1 + 1?", "answer": 2, "id": "a"}, {"problem": "2 + 3?", "answer": "5", "id": "b"}]


@pytest.fixture
def loads(monkeypatch):
    """Record every datasets.load_dataset call (the real function still runs)."""
    calls = []
    real = datasets.load_dataset

    def spy(path, *args, **kwargs):
        calls.append((path, kwargs.get("data_files")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    return calls


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "json-field", "parquet"])
def test_local_files_go_through_datasets(kind, tmp_path, loads):
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json-list":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "json-field":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"version": "1", "data": [{**r, "answer": str(r["answer"])} for r in ROWS]}))
    else:
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list([{**r, "answer": str(r["answer"])} for r in ROWS]).to_parquet(str(path))
    problems = load_problems(str(path), answer_field="answer", id_field="id")
    assert problems == [{"id": "a", "question": "1 + 1?", "answer": "2"}, {"id": "b", "question": "2 + 3?",
                                                                           "answer": "5"}]  # fmt: skip
    assert loads == [("parquet" if kind == "parquet" else "json", str(path))]


def test_local_file_errors_name_the_file_line_or_columns(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "ok"}\n{"problem": oops}\n')
    with pytest.raises(UserInputError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_problems(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserInputError, match="is empty"):
        load_problems(str(empty))
    with pytest.raises(UserInputError, match="does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
    with pytest.raises(UserInputError, match="question_field 'problem' is not a column of .*; its columns: question, "
                                             "solution"):  # fmt: skip
        load_problems(str(good))
    mixed = tmp_path / "mixed.json"  # a column of numbers and text under one key: arrow cannot type it
    mixed.write_text(json.dumps({"data": ROWS}))
    with pytest.raises(UserInputError, match="mixed.json could not be read as JSON: .+"):
        load_problems(str(mixed))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(UserInputError, match="is not a readable Parquet file"):
        load_problems(str(broken))
