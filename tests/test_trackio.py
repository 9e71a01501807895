"""``report_to: trackio`` offline: a run of the trainer logs the collapse metrics to trackio's local SQLite store.

trackio is in the ``dev`` extra (``pip install -e ".[dev]"``), so a missing install fails here instead of skipping.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import trackio  # noqa: F401  (dev extra: an ImportError here means `pip install -e ".[dev]"` was not run)
from trackio.sqlite_storage import SQLiteStorage

from zerosiam_llm.cli import train_main

PROJECT = "zerosiam-test"
RUN = "tiny-trackio"
# HF's TrackioCallback logs every key under "train/" (transformers.integrations.rewrite_logs)
COLLAPSE_METRICS = (
    "entropy", "zerosiam/entropy_online", "zerosiam/entropy_target", "zerosiam/kl_target_online",
    "zerosiam/logit_norm_mean", "zerosiam/top1_above_099", "zerosiam/predictor_deviation", "monitor/repetition",
    "coherence/base_nll", "grad_norm/predictor", "grad_norm/lora",
)  # fmt: skip
# environment variables that would send trackio's data to a Space, a bucket or a server instead of the local store
REMOTE_ENV = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID", "SYSTEM")


@pytest.fixture
def trackio_dir(tmp_path, monkeypatch) -> Path:
    """trackio's store in ``tmp_path``, never ``~/.cache/huggingface/trackio``.

    trackio reads ``TRACKIO_DIR`` once, when it is imported, into module constants; TRL imports it with its trainers,
    so in a test session it is already imported: the constants are repointed too (restored after the test)."""
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    for name in REMOTE_ENV:
        monkeypatch.delenv(name, raising=False)
    import trackio.utils

    old = Path(trackio.utils.TRACKIO_DIR)
    for mod_name, module in list(sys.modules.items()):
        if mod_name != "trackio" and not mod_name.startswith("trackio."):
            continue
        for attr in ("TRACKIO_DIR", "MEDIA_DIR", "ARTIFACTS_DIR"):
            value = getattr(module, attr, None)
            if isinstance(value, Path) and (value == old or old in value.parents):
                monkeypatch.setattr(module, attr, store / value.relative_to(old))
    return store


def test_report_to_trackio_logs_collapse_metrics_offline(tmp_path, tiny_model_dir, trackio_dir):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--output_dir", str(out), "--num_problems", "16",
            "--max_completion_length", "8", "--answer_field", "null", "--max_steps", "2", "--report_to", "trackio",
            "--project", PROJECT, "--run_name", RUN]  # fmt: skip
    assert train_main(argv) == 0

    assert (trackio_dir / f"{PROJECT}.db").is_file(), sorted(p.name for p in trackio_dir.iterdir())
    assert SQLiteStorage.get_runs(PROJECT) == [RUN]
    rows = SQLiteStorage.get_logs(PROJECT, RUN)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "entropy" in r]  # the last line is the end-of-training summary
    assert [s["step"] for s in steps] == [1, 2]

    for key in COLLAPSE_METRICS:
        logged = [(r["step"], r["train/global_step"], r[f"train/{key}"]) for r in rows if f"train/{key}" in r]
        # one value per optimizer step; trackio's step (the dashboard's x-axis) is the trainer's global step
        assert [(step, global_step) for step, global_step, _ in logged] == [(1, 1), (2, 2)], (key, logged)
        # the same numbers as the run's own metrics.jsonl
        for (_, _, value), record in zip(logged, steps, strict=True):
            assert math.isclose(value, record[key], rel_tol=1e-6, abs_tol=1e-9), (key, value, record[key])
    # P starts at I: ||P - I||_F is 0 at the first step and moves after the first update
    deviation = [r["train/zerosiam/predictor_deviation"] for r in rows if "train/zerosiam/predictor_deviation" in r]
    assert deviation[0] == 0.0 and deviation[1] > 0.0
