"""The registry of methods (``zerosiam_llm/methods.py``): every method declared once, and what reads it agrees."""

import re
from pathlib import Path

import pytest

from zerosiam_llm.configs import LabelFreeConfig, ZeroSiamConfig, config_fields
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.methods import METHOD_FIELDS, METHODS, REGISTRY, get_method

REPO = Path(__file__).resolve().parents[1]


def test_each_family_has_its_config_and_trainer():
    from zerosiam_llm.trainers import LabelFreeTrainer, ZeroSiamTrainer

    for name, method in REGISTRY.items():
        grpo = method.family == "grpo"
        assert method.config_class is (LabelFreeConfig if grpo else ZeroSiamConfig), name
        assert method.trainer_class is (LabelFreeTrainer if grpo else ZeroSiamTrainer), name
        assert name in method.config_class.trainer_methods, name
    assert set(ZeroSiamConfig.trainer_methods) | set(LabelFreeConfig.trainer_methods) == set(METHODS)


def test_every_method_field_is_a_field_of_its_methods_config():
    for method in REGISTRY.values():
        fields = config_fields(method.config_class)
        assert all(f in fields for f in method.fields), (method.name, [f for f in method.fields if f not in fields])
    assert set(METHOD_FIELDS) <= set(config_fields(LabelFreeConfig))


def test_papers_and_references_are_declared():
    for name, method in REGISTRY.items():
        if name == "none":
            assert method.paper is None
            continue
        assert re.fullmatch(r"\d{4}\.\d{5}", method.paper.arxiv), name
        assert method.paper.citation.startswith("@") and method.paper.title in method.paper.citation.replace("\n", " ")
        assert method.paper.as_trl()["id"] == method.paper.arxiv
    for name in ("come", "sar", "majority-vote", "semantic-vote", "entropy-reward", "self-certainty"):
        assert re.match(r"[\w-]+/[\w-]+@[0-9a-f]{8} ", REGISTRY[name].reference), name  # repo@commit path


def test_an_unknown_method_is_refused_in_one_line():
    with pytest.raises(UserInputError, match="method: 'zerosiam2' is not allowed; allowed: zerosiam, tent"):
        get_method("zerosiam2")


def test_a_grid_with_an_unknown_method_is_refused_at_load(tmp_path):
    from zerosiam_llm.experiments.grid import load_grid

    grid = tmp_path / "grid.yaml"
    grid.write_text("recipe: smollm2-135m-online-cpu\nlearning_rates: [1.0e-4]\nseeds: [0]\nstreams: [arithmetic]\n"
                    "configs:\n  t: {method: tnet}\n")  # fmt: skip
    with pytest.raises(UserInputError, match="config t: method 'tnet' is not one of zerosiam, tent"):
        load_grid(grid)


def test_the_readme_method_table_is_the_registry():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    header = "| `method` | what adapts the model | trainer | paper |"
    assert header in text
    rows = text.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]  # after the |---| line
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0].strip("`")] = cells
    assert list(table) == list(METHODS)
    for name, (_, summary, trainer, paper) in table.items():
        method = REGISTRY[name]
        assert trainer == f"`{method.trainer_class.__name__}`", name
        assert paper == (method.paper.short if method.paper else ""), name
        assert summary == method.summary, name
