"""GGUF files to plain Hugging Face checkpoints.

transformers reads GGUF (through the `gguf` package) and dequantizes every tensor to the dtype
asked for, here fp32: the result trains and serves like any checkpoint, on the embedded engine
and on vLLM. transformers then refuses to save such a model ("quantized with gguf and is not
serializable") although its weights are plain tensors by then; clearing the quantizer's marks
lets `save_pretrained` write ordinary safetensors.
"""

from __future__ import annotations

from pathlib import Path


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize `gguf_file` into `out_dir`: config, fp32 safetensors, tokenizer, chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf_file.stem
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
