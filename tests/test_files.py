"""Atomic writes, append-only JSONL and the one JSONL / YAML reader."""

import pytest

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.files import append_jsonl, atomic_path, atomic_write_json, load_yaml, parse_jsonl, read_jsonl


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"a": 2, "torn')
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind


def test_append_and_read_back_ignoring_a_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, [{"step": 1}, {"step": 2, "text": "é"}])
    append_jsonl(path, {"step": 3})
    with open(path, "ab") as f:
        f.write('{"step": 4, "text": "é'.encode()[:-1])  # killed mid-write, inside a multi-byte character
    assert read_jsonl(path) == [{"step": 1}, {"step": 2, "text": "é"}, {"step": 3}]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"a": 1}\n{"a": \n', r"line 2: not valid JSON"),
        (b'{"a": 1}\n\n[1, 2]\n', r"line 3: expected a JSON object, got list"),
        (b'{"a": 1}\n{"a": "\xff"}\n', r"line 2: not UTF-8 text"),
    ],
)
def test_bad_lines_are_named(tmp_path, raw, message):
    path = tmp_path / "results.jsonl"
    path.write_bytes(raw)
    with pytest.raises(UserInputError, match=rf"results file .*results.jsonl, {message}"):
        read_jsonl(path, "results file")


def test_data_files_may_end_without_a_newline():
    assert parse_jsonl(b'{"q": 1}\n{"q": 2}', "data.jsonl", "data file") == [{"q": 1}, {"q": 2}]
    assert parse_jsonl(b'{"q": 1}\n{"q": 2}', "run.jsonl", "run file", torn_tail=True) == [{"q": 1}]


def test_load_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(UserInputError, match=r"recipe .*missing.yaml does not exist"):
        load_yaml(tmp_path / "missing.yaml", "recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(UserInputError, match=r"recipe .*bad.yaml is not valid YAML at line \d+, column \d+"):
        load_yaml(bad, "recipe")
    bad.write_bytes(b"a: \xff\n")
    with pytest.raises(UserInputError, match="is not UTF-8 text"):
        load_yaml(bad, "recipe")
    bad.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserInputError, match="not valid YAML"):  # safe_load: no Python tags
        load_yaml(bad, "recipe")
    bad.write_text("a: 1\n")
    assert load_yaml(bad, "recipe") == {"a": 1}
