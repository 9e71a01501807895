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


# ---------------------------------------------------------------------------------------------------------------------
# README.md, docs/*.md and results/*/README.md: links, commands, flags and field tables stay true to the repository
# ---------------------------------------------------------------------------------------------------------------------

README = REPO / "README.md"
RECIPES = REPO / "zerosiam_llm" / "recipes"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "results").glob("*/README.md"))]
COMMAND_STARTS = ("python", "python3", "zerosiam-train", "zerosiam-eval", "accelerate", "/usr/bin/time", "pip")
SHELL_BLOCKS = ("bash", "sh", "shell", "console")  # `console`: `$ ` commands and their output
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?")  # NAME, FILE.yaml, RUN_DIR: stand for the reader's own
CLI_OPTIONS = {"recipe", "config", "help"}  # the training command's own options, beside the config fields


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def split_page(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The prose (fenced code blocks blanked out) and the code blocks as (info string, lines)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = re.match(r"^\s*(```|~~~)\s*([\w+-]*)", line)
        if block is None and fence:
            block = (fence.group(2).lower(), [])
            prose.append("")
        elif block is not None and re.match(r"^\s*(```|~~~)\s*$", line):
            blocks.append(block)
            block = None
            prose.append("")
        elif block is not None:
            block[1].append(line)
            prose.append("")
        else:
            prose.append(line)
    assert block is None, "a code block is not closed"
    return "\n".join(prose), blocks


def slug(title: str) -> str:
    """GitHub's heading anchor: link markup dropped, lower case, punctuation but - and _ removed, spaces -> -."""
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a page; a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen = set(), {}
    for line in split_page(path.read_text())[0].splitlines():
        heading = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    prose = re.sub(r"`[^`]*`", "``", split_page(path.read_text())[0])  # no links inside code spans
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)


def inline_commands(path: Path) -> list[str]:
    """Code spans in the prose that are a command line (``python train.py ...``, ``zerosiam-eval ...``)."""
    spans = re.findall(r"`([^`]+)`", split_page(path.read_text())[0])
    return [" ".join(s.split()) for s in spans if s.split()[0] in COMMAND_STARTS and len(s.split()) > 1]


def block_commands(lines: list[str], console: bool) -> list[tuple[str, bool]]:
    """(command line, shown failing) for each command of a shell block; ``\\`` continuations joined. In a console
    block only ``$ `` lines are commands, and one whose next line starts with ``error:`` shows a refused input."""
    joined, current = [], ""
    for line in lines:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current)
        current = ""
    commands = []
    for i, line in enumerate(joined):
        if console:
            if line.startswith("$ "):
                failing = i + 1 < len(joined) and joined[i + 1].startswith("error:")
                commands.append((line[2:], failing))
        else:
            commands.append((line, False))
    return commands


def page_commands(path: Path) -> list[tuple[str, bool]]:
    commands = [(c, False) for c in inline_commands(path)]
    for info, lines in split_page(path.read_text())[1]:
        if info in SHELL_BLOCKS:
            commands += block_commands(lines, console=info == "console")
    return commands


def segments(command: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``;``, ``|``; ``for``/``do`` and env
    assignments dropped, ``/usr/bin/time -v`` unwrapped), comments removed."""
    import shlex

    tokens = shlex.split(command, comments=True)
    parts, part = [], []
    for token in tokens:
        if token in ("&&", "||", "|", ";"):
            parts.append(part)
            part = []
        elif token.endswith(";"):
            part.append(token[:-1])
            parts.append(part)
            part = []
        else:
            part.append(token)
    parts.append(part)
    out = []
    for part in parts:
        while part and (part[0] in ("do", "then", "/usr/bin/time", "-v") or re.match(r"^\w+=", part[0])):
            part = part[1:]
        if part and part[0] not in ("for", "done", "fi"):
            out.append(part)
    return out


def flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """(name, value) of each ``--name value`` / ``--name=value`` (value None when the next token is a flag)."""
    found = []
    for i, token in enumerate(argv):
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
            found.append((name, value))
    return found


def parse_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """What a simple command runs: ("train", args), ("eval", args), ("script:PATH", args), ("module:NAME", args),
    ("pip", args); None for anything else (trackio, ruff, ...)."""
    if not argv:
        return None
    head, rest = argv[0], argv[1:]
    if head == "zerosiam-train":
        return "train", rest
    if head == "zerosiam-eval":
        return "eval", rest
    if head == "pip":
        return "pip", rest
    if head == "accelerate" and rest[:1] == ["launch"]:
        script = next((i for i, t in enumerate(rest) if t.endswith(".py")), None)
        if script is None:  # `accelerate launch` named in prose
            return None
        return parse_command(["python", *rest[script:]])
    if head in ("python", "python3") and rest:
        if rest[0] == "-m":
            module = rest[1]
            return ("train", rest[2:]) if module == "zerosiam_llm" else ("module:" + module, rest[2:])
        if rest[0] == "train.py":
            return "train", rest[1:]
        if rest[0] == "evals/evaluate.py":
            return "eval", rest[1:]
        if rest[0].endswith(".py"):
            return "script:" + rest[0], rest[1:]
    return None


def all_commands() -> list[tuple[Path, str, bool, str, list[str]]]:
    found = []
    for page in PAGES:
        for command, failing in page_commands(page):
            for argv in segments(command):
                parsed = parse_command(argv)
                if parsed:
                    found.append((page, command, failing, *parsed))
                if parsed and argv[0] == "accelerate":  # the launcher's own flags (--config_file)
                    script = next(i for i, token in enumerate(argv) if token.endswith(".py"))
                    found.append((page, command, failing, "accelerate", argv[2:script]))
    return found


def recipe_exists(name: str) -> bool:
    return any(p.is_file() for p in (RECIPES / name, RECIPES / f"{name}.yaml", REPO / name))


def config_fields() -> set[str]:
    import dataclasses

    from zerosiam_llm.configs import LabelFreeConfig, ZeroSiamConfig

    return {f.name for cls in (ZeroSiamConfig, LabelFreeConfig) for f in dataclasses.fields(cls)}


def eval_fields() -> set[str]:
    import dataclasses

    from zerosiam_llm.evaluation.cli import EvalArguments

    return {f.name for f in dataclasses.fields(EvalArguments)}


def test_the_pages_exist_and_the_readme_is_short():
    assert {rel(p) for p in PAGES} >= {"README.md", "docs/troubleshooting.md", "results/stability/README.md"}
    lines = len(README.read_text().splitlines())
    assert lines <= 300, f"README.md has {lines} lines; move detail to docs/ (at most 300)"


def test_every_code_block_says_what_it_holds():
    """A command in an untagged block would escape the checks below: every block is bash, console, yaml, python,
    text, ..."""
    untagged = [rel(p) for p in PAGES for info, _ in split_page(p.read_text())[1] if not info]
    assert not untagged, f"code blocks without an info string in {untagged}"


def test_every_relative_link_reaches_a_file_and_its_heading():
    from urllib.parse import unquote

    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = unquote(target).partition("#")
            path = (page.parent / path_part).resolve() if path_part else page
            if not path.exists() or REPO not in (path, *path.parents):
                broken.append(f"{rel(page)}: {target} (no such file)")
            elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
                broken.append(f"{rel(page)}: {target} (no heading #{anchor} in {rel(path)})")
    assert not broken, "\n".join(broken)


def test_the_slug_rules():
    assert slug("Training: `train.py`") == "training-trainpy"
    assert slug("What a run writes (`output_dir`)") == "what-a-run-writes-output_dir"
    assert slug("Reproducing the paper's LLM table") == "reproducing-the-papers-llm-table"
    assert slug("GRPO-reward methods: `LabelFreeTrainer`") == "grpo-reward-methods-labelfreetrainer"


def test_commands_are_found_in_every_kind_of_block():
    commands = all_commands()
    kinds = {kind.split(":")[0] for *_, kind, _ in commands}
    assert kinds >= {"train", "eval", "script", "module", "pip", "accelerate"}
    assert any(failing for _, _, failing, _, _ in commands)  # the bad-input examples are seen as such
    assert segments('for S in 0 1; do') == []
    assert segments('/usr/bin/time -v python train.py --x 1 && ruff check . # c') == [
        ["python", "train.py", "--x", "1"], ["ruff", "check", "."]]


def test_every_recipe_named_in_a_command_exists():
    missing = []
    for page, command, failing, kind, args in all_commands():
        for name, value in flags(args):
            if kind == "train" and name == "recipe" and not failing and value and not PLACEHOLDER.fullmatch(value):
                if not recipe_exists(value):
                    missing.append(f"{rel(page)}: --recipe {value} in `{command}`")
            if kind == "script:scripts/stability_map.py" and name == "grid" and value:
                if not (REPO / value).is_file():
                    missing.append(f"{rel(page)}: --grid {value} in `{command}`")
            if kind == "accelerate" and name == "config_file" and value:
                if not (REPO / value).is_file():
                    missing.append(f"{rel(page)}: --config_file {value} in `{command}`")
    assert not missing, "\n".join(missing)


def test_every_script_and_module_named_in_a_command_exists():
    import importlib.util

    missing = []
    for page, command, _, kind, _ in all_commands():
        if kind.startswith("script:"):
            if not (REPO / kind[7:]).is_file():
                missing.append(f"{rel(page)}: {kind[7:]} in `{command}`")
        elif kind.startswith("module:"):
            module = kind[7:]
            parts = module.split(".")
            if (REPO / parts[0]).is_dir():  # the project's own: a file or a package with __main__, not imported
                base = REPO.joinpath(*parts)
                if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
                    missing.append(f"{rel(page)}: python -m {module} in `{command}`")
            elif importlib.util.find_spec(parts[0]) is None:
                missing.append(f"{rel(page)}: python -m {module} (not installed) in `{command}`")
    assert not missing, "\n".join(missing)


def test_every_pip_extra_named_exists():
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+)\s*=", section, re.M))
    named = set()
    for *_, kind, args in all_commands():
        if kind == "pip":
            for token in args:
                named |= {e.strip() for m in re.findall(r"\[([\w,\s-]+)\]", token) for e in m.split(",")}
    assert named and named <= extras, f"unknown extras {named - extras}; pyproject has {sorted(extras)}"


def test_every_train_flag_is_a_config_field_or_an_option():
    allowed = config_fields() | CLI_OPTIONS
    unknown = []
    for page, command, failing, kind, args in all_commands():
        if kind != "train":
            continue
        for name, _ in flags(args):
            if failing:  # a shown refusal: what it refuses must really be refused
                error = re.search(r"unknown field '(\w+)'", command)
                assert not error or error.group(1) not in allowed
            elif name not in allowed:
                unknown.append(f"{rel(page)}: --{name} in `{command}`")
    assert not unknown, "\n".join(unknown)


def test_every_eval_flag_is_a_field_of_the_evaluation_command():
    allowed = eval_fields() | CLI_OPTIONS | {"debug"}
    unknown = [f"{rel(page)}: --{name} in `{command}`" for page, command, _, kind, args in all_commands()
               if kind == "eval" for name, _ in flags(args) if name not in allowed]  # fmt: skip
    assert not unknown, "\n".join(unknown)


def test_shown_refusals_are_what_the_code_says():
    from zerosiam_llm.parser import available_recipes

    names = ", ".join(available_recipes())
    for page in PAGES:
        for _, lines in split_page(page.read_text())[1]:
            for i, line in enumerate(lines):
                refused = re.match(r"^\$ .*--recipe (\S+)", line)
                listed = re.search(r"available recipes: (.*)$", line)
                if refused and i + 1 < len(lines) and lines[i + 1].startswith("error:"):
                    assert not recipe_exists(refused.group(1)), f"{rel(page)}: {refused.group(1)} exists"
                if listed:
                    assert listed.group(1) == names, f"{rel(page)}: the recipe list is now {names}"


TOKEN = r'`[^`]*`|"[^"]*"|[^,/`"\s][^,/`"]*'


def parse_default(cell: str) -> list | None:
    """The values of a default cell (``0.8, `quantile` ``, ``None / 30``, ``false``); None if any is prose."""
    cell = cell.strip()
    if not re.fullmatch(rf"(?:{TOKEN})(?:\s*[,/]\s*(?:{TOKEN}))*", cell):
        return None
    values = []
    for token in (t.strip() for t in re.findall(TOKEN, cell)):
        if token[0] in "`\"":
            values.append(token[1:-1])
        elif token in ("None", "null"):
            values.append(None)
        elif token in ("true", "false"):
            values.append(token == "true")
        elif re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", token):
            values.append(float(token))
        else:
            return None
    return values


def same_default(documented, default) -> bool:
    if documented is None or isinstance(documented, bool) or default is None or isinstance(default, bool):
        return documented is default or documented == default and type(documented) is type(default)
    if isinstance(documented, float):
        return isinstance(default, (int, float)) and abs(documented - default) < 1e-12
    return str(getattr(default, "value", default)) == documented


def field_tables(text: str, header: str) -> list[list[str]]:
    """The rows (cells) of every table under ``header``."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.strip() == header:
            inside = True
        elif inside and line.startswith("|") and not re.match(r"^\|[-:| ]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif not line.startswith("|"):
            inside = False
    return rows


def defaults_of(classes) -> dict[str, list]:
    import dataclasses

    found: dict[str, list] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                found.setdefault(f.name, []).append(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                found.setdefault(f.name, []).append(f.default_factory())
    return found


def check_field_tables(header: str, classes) -> list[str]:
    defaults = defaults_of(classes)
    wrong, checked = [], 0
    for page in PAGES:
        for row in field_tables(page.read_text(), header):
            names = re.findall(r"`([^`]+)`", row[0])
            wrong += [f"{rel(page)}: `{n}` is not a field" for n in names if n not in defaults]
            values = parse_default(row[1])
            if names and values is not None and len(values) == len(names):
                checked += 1
                for name, value in zip(names, values, strict=True):
                    if name in defaults and not any(same_default(value, d) for d in defaults[name]):
                        wrong.append(f"{rel(page)}: `{name}` default documented {value!r}, is {defaults[name]}")
    assert checked, f"no {header} table found"
    return wrong


def test_field_tables_name_real_fields_with_their_defaults():
    from zerosiam_llm.configs import LabelFreeConfig, ZeroSiamConfig

    wrong = check_field_tables("| field | default | meaning |", (ZeroSiamConfig, LabelFreeConfig))
    assert not wrong, "\n".join(wrong)


def test_the_evaluation_flag_table_names_real_flags_with_their_defaults():
    from zerosiam_llm.evaluation.cli import EvalArguments

    wrong = check_field_tables("| flag | default | meaning |", (EvalArguments,))
    assert not wrong, "\n".join(wrong)
