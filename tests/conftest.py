"""Shared fixtures: one tiny random model per session, and the real embedded SmolLM2 loaded once (slow tests)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama + local BPE tokenizer saved as a normal HF folder."""
    from zerosiam_llm.testing import build_tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_causal_lm(path)
    return path


@pytest.fixture(scope="session")
def embedded_policy():
    """``(model, tokenizer)`` of embedded:smollm2-135m, loaded once per session (about 15-20 s)."""
    from zerosiam_llm.modeling import load_policy

    return load_policy("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark files not found at {SHARED_DATA}")
    return SHARED_DATA
