"""docs/troubleshooting.md is a checked list: each row names a test that exists, and the stated count is the count."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TROUBLESHOOTING = REPO / "docs" / "troubleshooting.md"


def table_rows(text: str) -> dict[str, list[str]]:
    """The data rows of each ``## section``'s Markdown table."""
    rows: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif section and line.startswith("| ") and not line.startswith(("| input ", "| event ", "| situation ")):
            rows.setdefault(section, []).append(line)
    return rows


def test_every_troubleshooting_row_names_an_existing_test():
    rows = [row for section in table_rows(TROUBLESHOOTING.read_text()).values() for row in section]
    assert rows
    for row in rows:
        refs = re.findall(r"`(test_\w+\.py)(?:::(test_\w+)(\*?))?`", row.rsplit("|", 2)[-2])
        assert refs, f"row names no test: {row[:80]}"
        for file, name, prefix in refs:  # test_guard_* names every test starting so
            source = (REPO / "tests" / file).read_text()
            pattern = rf"^def {name}" + ("" if prefix else r"\(")
            assert not name or re.search(pattern, source, re.M), f"{file}::{name}{prefix} does not exist"


def test_the_stated_count_of_handled_cases_is_the_count_of_rows():
    text = TROUBLESHOOTING.read_text()
    rows = table_rows(text)
    stated = re.search(r"\*\*(\d+) cases\*\*: (\d+) bad inputs, (\d+) kills and faults, (\d+) numerics", text)
    assert stated, "the count line is missing"
    counts = [len(rows["Bad input"]), len(rows["Kills and faults"]), len(rows["Numerics"])]
    assert [int(g) for g in stated.groups()] == [sum(counts), *counts]
