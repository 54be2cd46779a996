"""TRL's fused LM head scoring only labelled positions on a CPU: the same log-probabilities and
gradients as scoring every position, and the switch is TRL's own."""

from __future__ import annotations

from pathlib import Path

import pytest


def per_token_logps_and_grad(model_dir: Path, compact: bool, monkeypatch: pytest.MonkeyPatch):
    import torch
    import trl.kernels.chunked_logprob as trl_kernels
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from tuneloop.train.trl_cpu_head import score_labelled_positions_on_cpu

    with monkeypatch.context() as patch:
        # TRL's own switch (a job run earlier in this process may have replaced it), restored after.
        patch.setattr(trl_utils, "_use_triton", trl_kernels._use_triton)
        if compact:
            score_labelled_positions_on_cpu()
            score_labelled_positions_on_cpu()  # a second call changes nothing
        assert trl_utils._use_triton(torch.device("cpu")) is compact
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        trl_utils.add_fused_lm_head(model)
        ids = torch.tensor([[5, 17, 42, 99, 7, 8, 0, 0], [3, 9, 27, 81, 243, 4, 11, 12]])
        mask = (ids != 0).long()
        labels = ids.clone()
        labels[:, :4] = -100  # the prompt
        labels[mask == 0] = -100  # the padding
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    return out.log_probs.detach(), grad


def test_labelled_positions_only_give_the_same_logps_and_gradients(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    every, every_grad = per_token_logps_and_grad(tiny_model_dir, False, monkeypatch)
    labelled, labelled_grad = per_token_logps_and_grad(tiny_model_dir, True, monkeypatch)
    assert every.shape == labelled.shape == (2, 7)
    assert (every[:, :3] == 0).all() and (every[:, 3:5] != 0).all()
    torch.testing.assert_close(labelled, every, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(labelled_grad, every_grad, rtol=1e-4, atol=1e-6)
