"""A training job's load on the CPU, for benchmarks that measure serving beside one: AdamW steps
of a random Llama (hidden 256, 4 layers; batch 4 × 128 tokens) until SIGTERM, then the steps per
second on stdout. Started by `hot_swap.py --training-beside`.

    python bench/training_load.py
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from tuneloop.core.config import apply_openmp_defaults


def main() -> int:
    apply_openmp_defaults(os.environ)  # before torch loads, as in a tuneloop job
    import torch
    from transformers import AutoModelForCausalLM

    from tuneloop.train.tiny_model import build_tiny_model

    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with tempfile.TemporaryDirectory(prefix="tuneloop-training-load-") as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            build_tiny_model(Path(tmp) / "model", hidden_size=256, num_layers=4)
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(0))
    print("training", flush=True)
    steps, started = 0, time.perf_counter()
    while not stop:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    print(f"training steps/s: {steps / (time.perf_counter() - started):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
