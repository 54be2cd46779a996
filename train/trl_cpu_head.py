"""TRL's fused LM head, scoring only the tokens that have a label on a CPU too.

DPO and KTO in TRL 1.16 compute per-token log-probabilities with a fused, tiled LM head (no
`(batch, seq, vocab)` logits). On Triton devices it projects only the positions whose label is
not -100 (the completion); elsewhere it projects every position, prompt and padding included,
"so that tile shapes stay fixed" (a concern of compiled backends, not of eager CPU torch). With
SmolLM2's 49,152-token vocabulary that head, run over every position, was half of a DPO step on
2 cores: 17.5 s per step against 8.4 s when only the labelled positions are scored, with the same
loss (bench/train_speed.py, bench/RESULTS.md). The kernel's tiles themselves stay TRL's torch
code; only the choice of positions changes, through TRL's own switch (`_use_triton` as read by
`trl.trainer.utils`).
"""

from __future__ import annotations

from typing import Any

_MARK = "_tuneloop_scores_labelled_positions_on_cpu"


def score_labelled_positions_on_cpu() -> None:
    """Make TRL's fused LM head project only labelled positions on CPU tensors (idempotent)."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    if getattr(original, _MARK, False):
        return

    def compact(device: Any) -> bool:
        return device.type == "cpu" or original(device)

    setattr(compact, _MARK, True)
    trl_utils._use_triton = compact
