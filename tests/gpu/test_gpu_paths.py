"""The CUDA paths on one GPU: the embedded engine (bf16 there), and a DPO job with bf16 on it.

Skipped, with the reason, where torch sees no CUDA device (CI and these CPU machines run none).
On a GPU machine: `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from job_datasets import write_datasets

from tuneloop.core.artifacts import read_manifest
from tuneloop.core.job_spec import JobSpec
from tuneloop.core.records import Message, SamplingParams
from tuneloop.core.settings import JobSettings
from tuneloop.serve.engine import EmbeddedEngine
from tuneloop.train.run import train_version

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none"),
]


def test_embedded_engine_decodes_concurrent_answers_in_bf16_on_the_gpu(
    tiny_model_dir: Path,
) -> None:
    before = torch.cuda.memory_allocated()
    engine = EmbeddedEngine(tiny_model_dir, "v1", device="cuda", max_concurrency=4)
    assert torch.cuda.memory_allocated() > before  # the weights are on the GPU
    answers: dict[int, tuple[str, int]] = {}

    def answer(i: int) -> None:
        generation = engine.stream([Message("user", f"Question {i}?")], SamplingParams(16, 0.0))
        text = "".join(generation)
        answers[i] = (text, generation.completion_tokens)

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(answers) == [0, 1, 2, 3]
    assert all(0 < tokens <= 16 for _, tokens in answers.values())


def test_dpo_job_trains_in_bf16_on_the_gpu_and_writes_a_version(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data = write_datasets(tmp_path / "data", train_pairs=32, heldout_pairs=8)
    settings = JobSettings(overrides={"max_steps": 4, "logging_steps": 1})
    spec = JobSpec("dpo", data, tiny_model_dir, tmp_path / "v", "v", settings=settings)
    manifest = read_manifest(train_version(spec))
    assert manifest["config"]["bf16"] is True and manifest["config"]["use_cpu"] is False
    assert manifest["metrics"]["steps"] == 4 and manifest["metrics"]["train_tokens"] > 0
