"""Collapse curves and the first -> last table from fake runs' metrics.jsonl."""

import pytest

from zerosiam_llm.errors import UserInputError
from zerosiam_llm.experiments.plots import (
    _map_cell_text,
    _range_columns,
    collapse_table,
    main,
    plot_runs,
    plot_stability_map,
)
from zerosiam_llm.files import append_jsonl


def _fake_run(path, entropy, repetition, base_nll=None):
    rows = []
    for step, (h, r) in enumerate(zip(entropy, repetition, strict=True), start=1):
        row = {
            "step": step,
            "loss": h,
            "zerosiam/entropy_target": h,
            "zerosiam/entropy_online": h * 0.9,
            "zerosiam/logit_norm_mean": 1400.0 + 100 * step,
            "monitor/repetition": r,
            "completions/answer_rate": 1.0 - r,
            "monitor/accuracy": None,  # TRL logs an all-NaN metric as None
        }
        if base_nll is not None:
            row["coherence/base_nll"] = base_nll[step - 1]
        rows.append(row)
    rows.append({"step": len(entropy), "train_runtime": 12.0, "train_loss": 0.4})  # the final summary line
    append_jsonl(path / "metrics.jsonl", rows)
    return path


@pytest.fixture
def two_runs(tmp_path):
    tent = _fake_run(tmp_path / "tent", [1.11, 0.48, 0.03], [0.15, 0.31, 0.58])
    zs = _fake_run(tmp_path / "zerosiam", [1.11, 0.96, 0.89], [0.15, 0.12, 0.13], base_nll=[0.43, 0.45, 0.48])
    return tent, zs


def test_plot_two_runs_writes_a_png(two_runs, tmp_path):
    out = plot_runs(list(two_runs), tmp_path / "figs" / "curves.png", labels=["tent lr 3e-4", "zerosiam"])
    assert out == tmp_path / "figs" / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left behind


def test_collapse_table_rows(two_runs):
    table = collapse_table(list(two_runs), ["tent lr 3e-4", "zerosiam"]).splitlines()
    assert table[0].startswith("| run | steps | H(p_r) | logit norm | repetition |")
    assert len(table) == 4
    tent, zs = table[2], table[3]
    assert tent.startswith("| tent lr 3e-4 | 3 | 1.11 -> 0.03 | 1500 -> 1700 | 0.15 -> 0.58 |")
    assert zs.startswith("| zerosiam | 3 | 1.11 -> 0.89 |")
    assert "0.43 -> 0.48" in zs
    cells = [c.strip() for c in tent.strip("|").split("|")]
    assert cells[7] == "-"  # no base NLL logged by this run
    assert cells[8] == "-"  # accuracy only None


def test_default_labels_are_the_folder_names(two_runs):
    table = collapse_table(list(two_runs))
    assert "| tent | 3 |" in table and "| zerosiam | 3 |" in table


def test_cli(two_runs, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main([str(two_runs[0]), str(two_runs[1]), "--output", str(out), "--labels", "a,b"]) == 0
    printed = capsys.readouterr().out
    assert "| a | 3 |" in printed and f"curves: {out}" in printed
    assert out.is_file()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nowhere", "run directory .*nowhere does not exist"),
        (lambda p: p, "has no metrics.jsonl"),
    ],
)
def test_cli_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    import re

    assert main([str(make(tmp_path)), "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err)


def test_bad_inputs(two_runs, tmp_path):
    with pytest.raises(UserInputError, match="2 runs; give one label per run"):
        plot_runs(list(two_runs), tmp_path / "c.png", labels=["only one"])
    with pytest.raises(UserInputError, match="must end in .png, .pdf, .svg"):
        plot_runs(list(two_runs), tmp_path / "c.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"step": 1, "train_runtime": 1.0}\n')
    with pytest.raises(UserInputError, match="no step lines yet"):
        collapse_table([empty])
    (empty / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(UserInputError, match=r"metrics.jsonl, line 1: not valid JSON"):
        collapse_table([empty])


def _map_row(config, lr, verdicts, first=None, seeds=3):
    healthy = sum(v == "healthy" for v in verdicts)
    return {"stream": "gsm8k", "config": config, "learning_rate": lr, "seeds": seeds, "finished": len(verdicts),
            "healthy": healthy, "verdicts": verdicts, "first_rule_update": first}  # fmt: skip


def test_stability_map_cells_say_healthy_collapsed_degraded_and_the_first_rule(tmp_path):
    collapsed = "collapsed (first rule at update 8)"
    degraded = "degraded (monitor/repetition above 0.5, update 14)"
    assert _map_cell_text(_map_row("tent", 3e-4, [collapsed] * 3, first=8), 16) == "0/3\n3C @8"
    assert _map_cell_text(_map_row("zs", 3e-4, ["healthy", "healthy", degraded], first=17), 16) == "2/3\n1D >16"
    assert _map_cell_text(_map_row("zs", 1e-3, [degraded, collapsed], first=4), 16) == "0/2 +1\n1C 1D @4"
    assert _map_cell_text(_map_row("zs", 1e-4, ["healthy"] * 3, first=17), 16) == "3/3\nclean"
    merit = [
        {"stream": "gsm8k", "config": "tent", "low": None, "high": None, "width": 0.0, "width_vs_baseline": None,
         "accuracy": None},
        {"stream": "gsm8k", "config": "zs", "low": 1e-4, "high": 3e-4, "width": 9.0, "width_vs_baseline": 3.0,
         "accuracy": 0.02, "ci95": [0.01, 0.04]},
    ]  # fmt: skip
    assert _range_columns(merit[0], "tent") == ["none", "0", "(baseline)", "-"]
    assert _range_columns(merit[1], "tent") == ["0.0001-0.0003", "9.0", "3.0x", "2.0 [1.0, 4.0]"]
    still_open = dict(merit[1], width_if_rest_healthy=27.0, open=True, cells_finished=6, cells_to_run=3)
    assert _range_columns(still_open, "tent")[:3] == ["0.0001-0.0003", "9.0 (<=27)", "3.0x?"]
    assert _range_columns(merit[1], "tent", baseline_open=True)[2] == "3.0x?"
    assert _range_columns(dict(merit[0], cells_finished=0, cells_to_run=12), "tent") == ["not run", "-", "-", "-"]
    assert _range_columns(dict(merit[1], config="none", no_op=True), "tent")[2] == "no-op"  # never moved the model
    summary = [_map_row("tent", 3e-4, [collapsed] * 3, first=8), _map_row("zs", 3e-4, ["healthy"] * 3, first=17)]
    summary += [_map_row("tent", 1e-4, []), _map_row("zs", 1e-4, [])]  # not run
    out = plot_stability_map(summary, ["gsm8k"], ["tent", "zs"], [1e-4, 3e-4], tmp_path / "map.png", 16, merit, "tent")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
