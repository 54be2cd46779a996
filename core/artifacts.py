"""The on-disk form of a model version, shared by the jobs that write one and the engines that
serve one.

A version directory holds `manifest.json` (what it is and where it came from), the tokenizer,
and either a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`, relative to the
base model named in the manifest) or full weights (`config.json` + `model.safetensors`). A plain
Hugging Face checkpoint directory (the demo model, a user's `--model`) loads the same way.

Every policy adapter applies to the root base model, not to its parent: a job that starts from an
adapter version keeps training that adapter. So any policy version is one adapter over the one
served base, which is what vLLM's runtime LoRA loading wants.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.core.files import write_json_atomic

MANIFEST_FILE = "manifest.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def read_manifest(version_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a version directory, or None for a plain checkpoint."""
    path = Path(version_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_manifest(version_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write atomically: a reader sees the old manifest or the new one, never half of one."""
    return write_json_atomic(
        Path(version_dir) / MANIFEST_FILE, manifest, sort_keys=True, default=str
    )


def add_manifest_metrics(version_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge `metrics` into the manifest's (facts learned after the job: its gate result, the
    feedback it was trained on); the manifest is the version's record, the database indexes it.
    Returns the manifest as written."""
    manifest = read_manifest(version_dir) or {}
    manifest["metrics"] = dict(manifest.get("metrics") or {}) | metrics
    write_manifest(version_dir, manifest)
    return manifest


def is_adapter(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG_FILE).exists()


def base_model_path(model_dir: str | Path) -> str:
    """The full-weights directory (or hub id) that `model_dir`'s weights apply to.

    For full weights that is `model_dir` itself; for an adapter, the manifest's `base`, else the
    adapter config's `base_model_name_or_path`."""
    if not is_adapter(model_dir):
        return str(model_dir)
    manifest = read_manifest(model_dir) or {}
    if manifest.get("base"):
        return str(manifest["base"])
    config = json.loads((Path(model_dir) / ADAPTER_CONFIG_FILE).read_text())
    return str(config["base_model_name_or_path"])


def load_causal_lm(model_dir: str | Path, *, device: str = "cpu", dtype: Any = None) -> Any:
    """A ready-to-generate causal LM from a version directory or a plain checkpoint.

    Adapters are merged into their base on load: generation then costs what the base costs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_path(model_dir), dtype=dtype)
    if is_adapter(model_dir):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    return model.to(device).eval()


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer saved with a version (jobs save it beside every adapter), padded left for
    batched generation."""
    from transformers import AutoTokenizer

    path = model_dir if (Path(model_dir) / "tokenizer_config.json").exists() else None
    tokenizer = AutoTokenizer.from_pretrained(str(path or base_model_path(model_dir)))
    tokenizer.padding_side = "left"  # not saved by transformers 5
    return tokenizer
