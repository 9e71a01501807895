"""The stability sweep: run classification, the healthy range, grid files, resume of a killed sweep."""

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from zerosiam_llm.cli import train_main
from zerosiam_llm.errors import UserInputError
from zerosiam_llm.experiments.classify import classify_run, run_metrics
from zerosiam_llm.experiments.grid import Cell, load_grid
from zerosiam_llm.experiments.report import (
    _predictions,
    figure_of_merit,
    healthy_range,
    report_markdown,
    summarise_cells,
)
from zerosiam_llm.experiments.stability import CELL_FILE, main, run_grid
from zerosiam_llm.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"

HEALTHY = {
    "loss": 1.0,
    "zerosiam/entropy_target": 1.0,
    "zerosiam/top1_above_099": 0.15,
    "zerosiam/logit_norm_mean": 1400.0,
    "monitor/repetition": 0.15,
    "completions/answer_rate": 1.0,
    "coherence/base_nll": 0.4,
    "train/nonfinite_skipped": 0.0,
}


def history(n=16, **changes):
    """``n`` step lines of a healthy run; ``changes`` maps a metric to ``(from_step, value)``."""
    rows = []
    for step in range(1, n + 1):
        row = {"step": step, **HEALTHY}
        for metric, (start, value) in changes.items():
            if step >= start:
                row[metric.replace("__", "/")] = value
        rows.append(row)
    return rows


def test_healthy_run():
    verdict = classify_run(history())
    assert verdict == {"verdict": "healthy", "rule": None, "update": None, "events": []}


# each default guard rule on its own: (metric, bad value from update 5, update at which the rule fires)
RULES = [
    ("zerosiam/entropy_target", 0.05, 7, "below 0.1"),  # for 3 steps
    ("monitor/repetition", 0.6, 6, "above 0.5"),  # for 2 steps
    ("completions/answer_rate", 0.1, 7, "below 0.25"),  # for 3 steps
    ("coherence/base_nll", 1.3, 5, "above 3x its first value"),
    ("zerosiam/logit_norm_mean", 2200.0, 5, "above 1.5x its first value"),
    ("zerosiam/top1_above_099", 0.6, 5, "above 0.5"),
    ("train/nonfinite_skipped", 1.0, 7, "above 0.5"),  # for 3 steps
]


@pytest.mark.parametrize("metric,value,update,condition", RULES)
def test_each_rule_degrades(metric, value, update, condition):
    verdict = classify_run(history(**{metric.replace("/", "__"): (5, value)}))
    assert verdict["verdict"] == "degraded"
    assert verdict["rule"] == f"{metric} {condition}"
    assert verdict["update"] == update
    assert verdict["events"]


def test_first_rule_that_fired_is_named():
    rows = history(zerosiam__top1_above_099=(9, 0.7), monitor__repetition=(4, 0.6))
    verdict = classify_run(rows)
    assert (verdict["rule"], verdict["update"]) == ("monitor/repetition above 0.5", 5)


def test_collapse_with_loops():
    # Tent at lr 1e-3 on this model: entropy ~0, one token, looping completions that still end in a number
    rows = history(
        zerosiam__entropy_target=(6, 0.003), zerosiam__top1_above_099=(6, 0.99), monitor__repetition=(6, 0.67)
    )
    assert classify_run(rows)["verdict"] == "collapsed"


def test_collapse_without_answers():
    rows = history(
        zerosiam__entropy_target=(6, 0.01), zerosiam__top1_above_099=(6, 0.95), completions__answer_rate=(6, 0.0)
    )
    assert classify_run(rows)["verdict"] == "collapsed"


def test_low_entropy_alone_is_not_collapse():
    # confident but still answering without loops: degraded (the entropy rule fired), not collapsed
    rows = history(zerosiam__entropy_target=(6, 0.01), zerosiam__top1_above_099=(6, 0.95))
    assert classify_run(rows)["verdict"] == "degraded"


def test_collapse_is_judged_on_the_final_updates():
    rows = history(
        zerosiam__entropy_target=(6, 0.01), zerosiam__top1_above_099=(6, 0.95), monitor__repetition=(6, 0.7)
    )
    for row in rows[-3:]:  # recovered at the end
        row.update(HEALTHY)
    assert classify_run(rows)["verdict"] == "degraded"


def test_no_updates_is_an_error():
    with pytest.raises(UserInputError, match="no logged updates"):
        classify_run([{"step": 1}])


def test_run_metrics_final_window_and_ratios():
    rows = history(zerosiam__logit_norm_mean=(14, 2800.0), coherence__base_nll=(15, 0.8))
    out = run_metrics(rows, {"problems": 128, "graded": 128, "correct": 12})
    assert out["updates"] == 16
    assert out["logit_norm_ratio"] == pytest.approx(2.0)  # last 3 all 2800 / first 1400
    assert out["base_nll_ratio"] == pytest.approx((0.4 + 0.8 + 0.8) / 3 / 0.4)
    assert out["entropy_final"] == pytest.approx(1.0)
    assert out["correct"] == 12
    assert out["grad_norm_max"] is None  # no update logged a gradient norm: unknown, not zero
    rows = [dict(r, grad_norm=0.5 if r["step"] == 3 else 0.0) for r in rows]
    assert run_metrics(rows, None)["grad_norm_max"] == 0.5
    rows[4]["grad_norm"] = float("nan")
    assert run_metrics(rows, None)["grad_norm_max"] is None


def _row(config, lr, healthy, seeds=3, correct=10, graded=100):
    return {"stream": "arithmetic", "config": config, "learning_rate": lr, "seeds": seeds, "finished": seeds,
            "healthy": healthy, "correct": correct, "graded": graded}  # fmt: skip


LRS = [1e-4, 3e-4, 1e-3, 3e-3]


def test_healthy_range_is_the_widest_run_of_all_seed_healthy_points():
    rows = [_row("z", 1e-4, 3), _row("z", 3e-4, 2), _row("z", 1e-3, 3), _row("z", 3e-3, 3)]
    rng = healthy_range(rows, LRS)
    assert (rng["low"], rng["high"], rng["points"]) == (1e-3, 3e-3, 2)
    assert rng["width"] == pytest.approx(9.0)  # grid step 3 x 3e-3 / 1e-3
    assert healthy_range([_row("z", lr, 2) for lr in LRS], LRS)["width"] == 0.0
    unfinished = dict(_row("z", 1e-4, 1, seeds=3), finished=1)  # 1 of 3 seeds run: not (yet) healthy
    assert healthy_range([unfinished], LRS)["points"] == 0


def test_figure_of_merit_against_the_baseline(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "recipe": "smollm2-135m-online-cpu", "learning_rates": LRS, "seeds": [0, 1, 2], "streams": ["arithmetic"],
        "baseline": "tent", "configs": {"tent": {"method": "tent"}, "zs": {"method": "zerosiam"}},
    }))  # fmt: skip
    grid = load_grid(grid_file)
    summary = [_row("tent", 1e-4, 3, correct=5), _row("tent", 3e-4, 1), _row("tent", 1e-3, 0), _row("tent", 3e-3, 0)]
    summary += [
        _row("zs", 1e-4, 3, correct=6),
        _row("zs", 3e-4, 3, correct=8),
        _row("zs", 1e-3, 3),
        _row("zs", 3e-3, 0),
    ]
    merit = {m["config"]: m for m in figure_of_merit(grid, summary)}
    assert merit["tent"]["width"] == pytest.approx(3.0)
    assert merit["zs"]["width"] == pytest.approx(30.0)
    assert merit["zs"]["width_vs_baseline"] == pytest.approx(10.0)
    assert merit["zs"]["correct"] == 6 + 8 + 10 and merit["zs"]["graded"] == 300
    never = [dict(r, healthy=0) if r["config"] == "tent" else r for r in summary]
    assert {m["config"]: m for m in figure_of_merit(grid, never)}["zs"]["width_vs_baseline"] == math.inf


def test_an_unfinished_row_says_how_wide_its_range_could_still_get(tmp_path):
    # tent: 1e-4 healthy on 1 of 3 seeds run, 3e-4 collapsed, 1e-3 not run; zs: 1e-4 healthy, 3e-4 half run
    tent = [dict(_row("tent", 1e-4, 1), finished=1), _row("tent", 3e-4, 0), dict(_row("tent", 1e-3, 0), finished=0)]
    tent.append(_row("tent", 3e-3, 0))
    rng = healthy_range(tent, LRS)
    assert rng["width"] == 0.0 and rng["width_if_rest_healthy"] == pytest.approx(3.0) and rng["open"]  # 1e-4 or 1e-3
    assert (rng["cells_finished"], rng["cells_to_run"]) == (7, 5)
    zs = [_row("zs", 1e-4, 3), dict(_row("zs", 3e-4, 1), finished=1), _row("zs", 1e-3, 3), _row("zs", 3e-3, 2)]
    rng = healthy_range(zs, LRS)
    assert (rng["low"], rng["high"]) == (1e-4, 1e-4) and rng["width_if_rest_healthy"] == pytest.approx(3 * 10)
    failed = [_row("zs", 1e-4, 3), dict(_row("zs", 3e-4, 0), finished=1), _row("zs", 1e-3, 2), _row("zs", 3e-3, 3)]
    rng = healthy_range(failed, LRS)  # a finished unhealthy seed closes 3e-4 whatever the other seeds do
    assert rng["width"] == rng["width_if_rest_healthy"] == pytest.approx(3.0) and not rng["open"]

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "recipe": "smollm2-135m-online-cpu", "learning_rates": LRS, "seeds": [0, 1, 2], "streams": ["arithmetic"],
        "baseline": "tent", "configs": {"tent": {"method": "tent"}, "zs": {"method": "zerosiam"},
                                        "sar": {"method": "sar"}},
    }))  # fmt: skip
    grid = load_grid(grid_file)
    never = [dict(_row("sar", lr, 0), finished=0, verdicts=[]) for lr in LRS]
    summary = [dict(r, verdicts=[]) for r in tent + zs + never]
    for r in summary:
        r.update({k: None for k in ("entropy_final", "logit_norm_ratio", "repetition_final", "base_nll_ratio",
                                    "answer_rate_final", "first_rule_update", "accuracy")})  # fmt: skip
    md = report_markdown(grid, summary, figure_of_merit(grid, summary))
    assert "| arithmetic | tent | none | 0.0 (up to 3.0: 5 cells to run) | - | - |" in md
    assert "| arithmetic | zs | 0.0001 .. 0.0001 | 3.0 (up to 30.0: 2 cells to run) | inf (open) |" in md
    assert "| arithmetic | sar | not run | - | - | - |" in md
    assert "Some cells have not run" in md
    grid.baseline = "zs"  # a baseline with a width: a row with no cell still has no ratio
    md = report_markdown(grid, summary, figure_of_merit(grid, summary))
    assert "| arithmetic | sar | not run | - | - | - |" in md and "| arithmetic | zs | 0.0001 .. 0.0001 |" in md
    grid.baseline = "tent"
    closed = [dict(r, finished=3) for r in summary if r["config"] != "sar"]
    closed_grid = load_grid(grid_file)
    closed_grid.configs.pop("sar")
    assert "Some cells have not run" not in report_markdown(closed_grid, closed, figure_of_merit(closed_grid, closed))


def _write_grid(path: Path, model_dir: Path, configs: dict, **extra) -> Path:
    grid = {
        "recipe": str(REPO / "recipes" / "smollm2-135m-online-cpu.yaml"),
        "batches": 2, "stream_batch_size": 2, "learning_rates": [1e-3], "seeds": [0], "streams": ["arithmetic"],
        "baseline": "tent", "configs": configs,
        "overrides": {"model": str(model_dir), "max_completion_length": 6, "base_nll_every": 1},
        **extra,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        ({"learning_rates": [1e-3, -1]}, "learning_rates must be a list of numbers > 0"),
        ({"learning_rates": [1e-3, 1e-3]}, "learning_rates has a repeated value"),
        ({"streams": ["math"]}, "streams must be a list from arithmetic, gsm8k"),
        ({"seeds": ["a"]}, "seeds must be a list of integers"),
        ({"baseline": "sar"}, "baseline 'sar' is not one of the configs"),
        ({"batches": 0}, "batches must be an integer >= 1"),
        ({"colour": 1}, "'colour' is not a grid field"),
        ({"configs": {"a/b": {}}}, "config name 'a/b' must be a plain folder name"),
    ],
)
def test_bad_grid_files(tmp_path, change, message):
    change = dict(change)
    configs = change.pop("configs", {"tent": {"method": "tent"}})
    path = _write_grid(tmp_path / "g.yaml", tmp_path, configs, **change)
    with pytest.raises(UserInputError, match=message):
        load_grid(path)


def test_bad_grid_through_the_command_line(tmp_path, capsys):
    path = _write_grid(tmp_path / "g.yaml", tmp_path, {"tent": {"method": "tent"}}, seeds=[])
    assert main(["--grid", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: grid file {path}: seeds is missing or empty"]
    assert not (tmp_path / "out").exists()


def test_gsm8k_stream_needs_data_dir(tmp_path):
    grid = load_grid(_write_grid(tmp_path / "g.yaml", tmp_path, {"tent": {"method": "tent"}}, streams=["gsm8k"]))
    with pytest.raises(UserInputError, match="gsm8k stream needs --data_dir"):
        run_grid(grid, tmp_path / "out", [sys.executable, str(TRAIN)])


def test_sweep_runs_classifies_and_resumes(tiny_model_dir, tmp_path):
    configs = {"tent": {"method": "tent"}, "zerosiam-sgd": {"method": "zerosiam", "predictor_optimizer": "sgd"}}
    grid = load_grid(_write_grid(tmp_path / "grid.yaml", tiny_model_dir, configs))
    out = tmp_path / "out"
    command = [sys.executable, str(TRAIN)]
    records, failed = run_grid(grid, out, command, poll_seconds=0.2)
    assert failed == []
    tent, zs = Cell("arithmetic", "tent", 1e-3, 0), Cell("arithmetic", "zerosiam-sgd", 1e-3, 0)
    assert set(records) == {tent, zs}
    for cell in (tent, zs):
        record = json.loads((cell.folder(out) / CELL_FILE).read_text())
        assert record["verdict"] in ("healthy", "degraded", "collapsed")
        assert record["updates"] == 2 and record["problems"] == 4
        assert record["machine"]["torch"] and record["machine"]["cpu"]  # where it ran: pooled maps say so
    report = (out / "stability.md").read_text()
    assert "\nCells ran on: " in report and "(2 cells)." in report
    assert "| arithmetic | zerosiam-sgd | 0.001 | " in report
    data = json.loads((out / "stability.json").read_text())
    assert len(data["cells"]) == 2 and {m["config"] for m in data["healthy_range"]} == {"tent", "zerosiam-sgd"}
    assert (out / "stability.png").stat().st_size > 0

    # a killed sweep: tent finished, zerosiam-sgd did not (no cell.json, its run half there)
    tent_log = (tent.folder(out) / "train.log").stat().st_size
    (zs.folder(out) / CELL_FILE).unlink()
    for path in (zs.folder(out) / "run" / "arithmetic").glob("stream_summary.json"):
        path.unlink()
    predictions = (zs.folder(out) / "run" / "arithmetic" / "predictions.jsonl").read_text().splitlines()
    records, _ = run_grid(grid, out, command, poll_seconds=0.2)
    assert (tent.folder(out) / "train.log").stat().st_size == tent_log  # finished cell: not run again
    assert (zs.folder(out) / CELL_FILE).is_file() and set(records) == {tent, zs}
    again = (zs.folder(out) / "run" / "arithmetic" / "predictions.jsonl").read_text().splitlines()
    assert again == predictions  # resumed: nothing predicted twice

    # the same config name with other settings is refused before any work
    configs["zerosiam-sgd"]["alpha"] = 2.0
    changed = load_grid(_write_grid(tmp_path / "grid.yaml", tiny_model_dir, configs))
    with pytest.raises(UserInputError, match="was run with other settings"):
        run_grid(changed, out, command)


def test_summary_pools_accuracy_and_takes_medians_over_seeds(tmp_path):
    configs = {"tent": {"method": "tent"}}
    grid = load_grid(_write_grid(tmp_path / "g.yaml", tmp_path, configs, seeds=[0, 1, 2], batches=16))
    verdicts = [("healthy", None), ("degraded", 5), ("collapsed", 3)]
    records = {
        Cell("arithmetic", "tent", 1e-3, seed): {
            "verdict": verdict, "rule": None if update is None else "monitor/repetition above 0.5", "update": update,
            "correct": seed, "graded": 4, "entropy_final": 0.1 * (seed + 1), "logit_norm_ratio": 1.0,
            "repetition_final": 0.2, "base_nll_ratio": 1.0, "answer_rate_final": 1.0,
        }
        for seed, (verdict, update) in enumerate(verdicts)
    }  # fmt: skip
    (row,) = summarise_cells(grid, records)
    assert (row["healthy"], row["finished"], row["seeds"]) == (1, 3, 3)
    assert (row["correct"], row["graded"]) == (3, 12) and row["accuracy"] == 0.25
    assert row["entropy_final"] == pytest.approx(0.2)
    assert row["first_rule_update"] == 5  # median of 17 (healthy: outlasted 16 updates), 5 and 3
    assert row["verdicts"][1] == "degraded (monitor/repetition above 0.5, update 5)"


def test_a_failed_cell_does_not_stop_the_others(tmp_path):
    grid = load_grid(_write_grid(tmp_path / "g.yaml", tmp_path, {"tent": {"method": "tent"}, "zs": {}}))
    crash = [sys.executable, "-c", "import sys; print('boom'); sys.exit(1)"]
    records, failed = run_grid(grid, tmp_path / "out", crash, poll_seconds=0.05)
    assert records == {} and [c.config for c in failed] == ["tent", "zs"]
    assert (failed[0].folder(tmp_path / "out") / "train.log").read_text().strip() == "boom"
    assert not (failed[0].folder(tmp_path / "out") / CELL_FILE).exists()  # retried on the next run


def test_configs_runs_only_those_rows_and_the_report_covers_the_grid(tmp_path, capsys):
    grid = load_grid(_write_grid(tmp_path / "g.yaml", tmp_path, {"tent": {"method": "tent"}, "zs": {}}))
    crash = [sys.executable, "-c", "import sys; sys.exit(1)"]
    out = tmp_path / "out"
    _, failed = run_grid(grid, out, crash, poll_seconds=0.05, configs=["zs"])
    assert [c.config for c in failed] == ["zs"]
    assert not (Cell("arithmetic", "tent", 1e-3, 0).folder(out) / "train.log").exists()  # not started
    assert "1 left for later (not in --configs)" in capsys.readouterr().out
    assert "| arithmetic | tent | 0.001 | 0/1 (0 run) | not run |" in (out / "stability.md").read_text()
    with pytest.raises(UserInputError, match="--configs: 'sar' is not a config of the grid; configs: tent, zs"):
        run_grid(grid, out, crash, configs=["sar"])


def test_seeds_and_learning_rates_run_only_those_cells(tmp_path, capsys):
    grid = load_grid(_write_grid(tmp_path / "g.yaml", tmp_path, {"tent": {"method": "tent"}, "zs": {}},
                                 learning_rates=[3e-4, 1e-3], seeds=[0, 1]))  # fmt: skip
    crash = [sys.executable, "-c", "import sys; sys.exit(1)"]
    out = tmp_path / "out"
    _, failed = run_grid(grid, out, crash, poll_seconds=0.05, seeds=[1], learning_rates=[3e-4])
    assert [(c.config, c.learning_rate, c.seed) for c in failed] == [("tent", 3e-4, 1), ("zs", 3e-4, 1)]
    assert not (Cell("arithmetic", "tent", 1e-3, 1).folder(out) / "train.log").exists()
    assert not (Cell("arithmetic", "tent", 3e-4, 0).folder(out) / "train.log").exists()
    assert "6 left for later (not in --seeds, --learning_rates)" in capsys.readouterr().out
    _, failed = run_grid(grid, out, crash, poll_seconds=0.05, configs=["zs"], seeds=[0], learning_rates=[0.001])
    assert [(c.config, c.learning_rate, c.seed) for c in failed] == [("zs", 1e-3, 0)]  # every selector at once
    with pytest.raises(UserInputError, match="--seeds: 2 is not a seed of the grid; seeds: 0, 1"):
        run_grid(grid, out, crash, seeds=[2])
    with pytest.raises(UserInputError, match="--learning_rates: 0.003 is not a learning rate of the grid; "
                       "learning rates: 0.0003, 0.001"):  # fmt: skip
        run_grid(grid, out, crash, learning_rates=[3e-3])


@pytest.mark.parametrize(
    "option,message",
    [
        (["--seeds", "0,x"], "error: argument --seeds: '0,x' is not a comma-separated list of integers"),
        (["--learning_rates", "3e-4;1e-3"],
         "error: argument --learning_rates: '3e-4;1e-3' is not a comma-separated list of numbers"),
        (["--seeds", "7"], "error: --seeds: 7 is not a seed of the grid; seeds: 0"),
    ],
)  # fmt: skip
def test_bad_selection_through_the_command_line(tmp_path, capsys, option, message):
    path = _write_grid(tmp_path / "g.yaml", tmp_path, {"tent": {"method": "tent"}})
    assert main(["--grid", str(path), "--output_dir", str(tmp_path / "out"), *option]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_reuse_copies_a_finished_cell_with_the_same_arguments(tmp_path):
    fields = {"method": "zerosiam", "predictor_lr_ratio": 30}
    first = load_grid(_write_grid(tmp_path / "a.yaml", tmp_path, {"zs-x30": fields}, baseline=None))
    (cell,) = first.cells()
    folder = cell.folder(tmp_path / "first")
    folder.mkdir(parents=True)
    (folder / "cell_args.json").write_text(json.dumps(first.cell_args(cell, None)))
    record = {"config": "zs-x30", "verdict": "degraded", "rule": "monitor/repetition above 0.5", "update": 2,
              "correct": 1, "graded": 4}  # fmt: skip
    (folder / CELL_FILE).write_text(json.dumps(record))
    # the second grid: the same fields under another name (copied), and one with other fields (run)
    second = load_grid(
        _write_grid(
            tmp_path / "b.yaml", tmp_path, {"zerosiam": fields, "zs-x1": {"predictor_lr_ratio": 1}}, baseline=None
        )
    )
    crash = [sys.executable, "-c", "import sys; sys.exit(1)"]
    records, failed = run_grid(second, tmp_path / "second", crash, poll_seconds=0.05, reuse=[tmp_path / "first"])
    copied = Cell("arithmetic", "zerosiam", 1e-3, 0)
    assert [c.config for c in failed] == ["zs-x1"] and set(records) == {copied}
    on_disk = json.loads((copied.folder(tmp_path / "second") / CELL_FILE).read_text())
    assert on_disk == {**record, "config": "zerosiam", "reused_from": str(folder)} == records[copied]
    with pytest.raises(UserInputError, match="--reuse .*nowhere: no such folder"):
        run_grid(second, tmp_path / "second", crash, reuse=[tmp_path / "nowhere"])


def test_a_config_that_never_updates_runs_once_per_seed_and_stands_for_every_lr(tmp_path):
    configs = {"none": {"method": "none"}, "tent": {"method": "tent"}}
    grid = load_grid(_write_grid(tmp_path / "g.yaml", tmp_path, configs, learning_rates=[1e-4, 1e-3], seeds=[0, 1]))
    assert not grid.updates("none") and grid.updates("tent")
    crash = [sys.executable, "-c", "import sys; sys.exit(1)"]
    out = tmp_path / "out"
    _, failed = run_grid(grid, out, crash, poll_seconds=0.05)
    # the grid file lists lr 1e-4 first: none runs there once per seed, tent at every lr
    assert sorted((c.config, c.learning_rate, c.seed) for c in failed) == [
        ("none", 1e-4, 0), ("none", 1e-4, 1), ("tent", 1e-4, 0), ("tent", 1e-4, 1), ("tent", 1e-3, 0),
        ("tent", 1e-3, 1),
    ]  # fmt: skip
    run = Cell("arithmetic", "none", 1e-4, 1)
    record = {"stream": "arithmetic", "config": "none", "learning_rate": 1e-4, "seed": 1, "verdict": "healthy",
              "rule": None, "update": None, "correct": 1, "graded": 4}  # fmt: skip
    (run.folder(out) / CELL_FILE).write_text(json.dumps(record))
    records, failed = run_grid(grid, out, crash, poll_seconds=0.05, configs=["none"])
    copy = Cell("arithmetic", "none", 1e-3, 1)
    assert [(c.learning_rate, c.seed) for c in failed] == [(1e-4, 0)]  # seed 0 still runs once; seed 1 is copied
    on_disk = json.loads((copy.folder(out) / CELL_FILE).read_text())
    assert on_disk == records[copy] == {**record, "learning_rate": 1e-3, "same_run_as": str(run.folder(out)),
                                        "lr_unused": "method none"}  # fmt: skip
    assert Cell("arithmetic", "none", 1e-3, 0) not in records
    # tent updates: only a run whose every update had no gradient (and no predictor moved) stands for another lr
    assert grid.lr_unused("tent", {"grad_norm_max": 0.0}) == "no update had a gradient"
    for record in ({"grad_norm_max": 1e-9}, {"grad_norm_max": None}, {}):
        assert grid.lr_unused("tent", record) is None
    assert grid.lr_unused("tent", {"grad_norm_max": 0.0, "predictor_deviation_final": 0.3}) is None  # decay moved P


def test_a_run_whose_updates_had_no_gradient_stands_for_every_lr(tiny_model_dir, tmp_path):
    # RENT's reward on the tiny model: no rollout ends in \boxed{}, so every reward is equal and every advantage 0
    configs = {"rent": {"method": "entropy-reward", "num_rollouts": 2, "temperature": 1.0}}
    grid_file = _write_grid(tmp_path / "g.yaml", tiny_model_dir, configs, learning_rates=[1e-3, 1e-1], baseline=None)
    grid = load_grid(grid_file)
    out = tmp_path / "out"
    records, failed = run_grid(grid, out, [sys.executable, str(TRAIN)], poll_seconds=0.2)
    ran, copy = Cell("arithmetic", "rent", 1e-3, 0), Cell("arithmetic", "rent", 1e-1, 0)
    assert failed == [] and records[ran]["grad_norm_max"] == 0.0 and records[ran]["updates"] == 2
    assert records[copy]["same_run_as"] == str(ran.folder(out)) and not (copy.folder(out) / "run").exists()
    assert records[copy]["lr_unused"] == "no update had a gradient"
    assert "| arithmetic | rent | 0.001 .. 0.1 | 10000.0 | no-op |" in (out / "stability.md").read_text()
    assert "No run of `rent` moved the model" in (out / "stability.md").read_text()
    # the copy is right: run at the copied lr, train.py predicts exactly what the first run did
    check = tmp_path / "check"
    assert train_main([*grid.cell_args(copy, None), "--output_dir", str(check)]) == 0
    (first,) = (ran.folder(out) / "run").glob("*/predictions.jsonl")
    assert read_jsonl(check / first.parent.name / "predictions.jsonl") == read_jsonl(first)


def test_the_report_says_which_configs_answer_by_sampled_majority(tmp_path):
    configs = {"tent": {"method": "tent"}, "ttrl": {"method": "majority-vote", "num_rollouts": 4, "temperature": 1.0}}
    grid = load_grid(_write_grid(tmp_path / "g.yaml", tmp_path, configs))
    assert (
        _predictions(grid) == "greedy predictions, except the majority answer of k sampled rollouts for ttrl k=4 T=1.0"
    )
    greedy = load_grid(_write_grid(tmp_path / "h.yaml", tmp_path, {"tent": {"method": "tent"}}))
    assert _predictions(greedy) == "greedy predictions"


def test_pooled_accuracy_over_a_range_counts_a_copied_run_once(tmp_path):
    configs = {"tent": {"method": "tent"}, "none": {"method": "none"}}
    grid = load_grid(_write_grid(tmp_path / "g.yaml", tmp_path, configs, learning_rates=[1e-4, 3e-4, 1e-3]))
    run = {"verdict": "healthy", "rule": None, "update": None, "correct": 3, "graded": 40}
    source = Cell("arithmetic", "none", 3e-4, 0).folder(tmp_path / "out")
    records = {Cell("arithmetic", "none", lr, 0): dict(run, **({} if lr == 3e-4 else {"same_run_as": str(source)}))
               for lr in grid.learning_rates}  # fmt: skip
    records.update({Cell("arithmetic", "tent", lr, 0): dict(run, correct=1) for lr in grid.learning_rates})
    summary = summarise_cells(grid, records)
    assert [r["correct"] for r in summary if r["config"] == "none"] == [3, 3, 3]  # each lr's row: its own cell
    merit = {m["config"]: m for m in figure_of_merit(grid, summary)}
    assert (merit["none"]["correct"], merit["none"]["graded"]) == (3, 40)  # one run, not three
    assert (merit["tent"]["correct"], merit["tent"]["graded"]) == (3, 120)  # three runs
