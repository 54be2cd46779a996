"""Trust weights in the loss: the reward model's and DPO's trainers, weighing each preference pair
by its `weight` column (the trust weight of the rater who gave it, `feedback.raters`).

Per-example loss weights, not a per-example label-smoothed loss. With a rater's weight read as
w = 2p - 1 (p the chance their verdict is right), label smoothing eps = (1 - w) / 2 is the exact
likelihood of a noisy label, but what it teaches on the pairs of a rater near w = 0 is wrong for
us: -(1/2) log sigmoid(m) - (1/2) log sigmoid(-m) is least at margin 0, so a random rater's votes
would pull every margin they touch toward "equally good", against the honest votes on the same
answers, a claim nobody made. A weight w * loss says "this vote counts w times": at 0 it is
ignored, which is what a coin flip is worth. It also caps nothing: smoothing keeps a mediocre
rater's pairs from ever exceeding a margin of log(p / (1 - p)). And weights apply to any
per-pair loss, while TRL 1.16's DPO sigmoid loss no longer takes label smoothing at all (only its
robust, EXO and AOT losses do). The weighted mean is over the batch, sum(w * loss) / n, not
divided by sum(w): a batch of low-trust votes moves the model less than a trusted one, as it should.

Trust weights are made relative before training (`relative_trust`): divided by their mean over
the people's pairs, they share out among the raters the push those pairs would have unweighted,
and do not shrink it. Taken as they are, pairs whose raters weigh 0.7 on average train as if the
learning rate were 0.7 times the one configured, and a loop that catches its bad raters learned
less from its honest ones than a loop that catches nobody (`bench/RESULTS.md`). Weights that are
not a rater's keep their scale: a reward model's pair beside the people's (`train.scored_pairs`),
a pair of thumbs across prompts (`train.reward_data`).

The trainers keep the `weight` column past TRL's column pruning and hand it to the loss through
the collator. Without the column, or with every weight 1 in a batch, they are TRL's own trainers
(its code computes the loss); a pair of weight 0 never reaches them (`feedback.datasets` drops it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from trl import DPOTrainer, RewardTrainer

from tuneloop.train.job_config import JobError

if TYPE_CHECKING:
    import datasets

WEIGHT = "weight"


def weighted_bradley_terry(margin: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The Bradley-Terry loss of each pair, -log sigmoid(margin), weighted, averaged over the
    batch (see the module's docstring)."""
    return -(weight.to(margin.dtype) * F.logsigmoid(margin)).mean()


def relative_trust(pairs: datasets.Dataset) -> datasets.Dataset:
    """The people's pairs with their trust weights divided by the weights' mean (see the
    module's docstring); pairs without weights as they are."""
    if WEIGHT not in pairs.column_names or len(pairs) == 0:
        return pairs
    weights = pairs[WEIGHT]
    mean = sum(weights) / len(weights)
    if mean <= 0 or mean == 1:
        return pairs
    return pairs.map(lambda row: {WEIGHT: row[WEIGHT] / mean})


class _WithWeights:
    """A collator that passes the examples' `weight` on, as a float tensor, beside the batch
    TRL's own collator makes."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        if examples and WEIGHT in examples[0]:
            batch[WEIGHT] = torch.tensor([e[WEIGHT] for e in examples], dtype=torch.float)
        return batch


class _KeepsWeights:
    """Keeps `weight` among the columns the trainer's dataloaders pass to the collator."""

    data_collator: Any
    _signature_columns: list[str] | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_collator = _WithWeights(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        if self._signature_columns is not None and WEIGHT not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHT]


def _trusted_fully(weight: torch.Tensor | None) -> bool:
    return weight is None or bool((weight == 1).all())


class WeightedRewardTrainer(_KeepsWeights, RewardTrainer):
    """TRL's RewardTrainer; a batch with weights other than 1 gets the weighted loss, computed from
    the rewards of TRL's own forward pass (its metrics unchanged)."""

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        weight = inputs.pop(WEIGHT, None)
        if _trusted_fully(weight):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        _, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        margin = chosen - rejected - inputs.get("margin", 0)
        loss = weighted_bradley_terry(margin, weight)
        if self.args.center_rewards_coefficient is not None:
            loss += self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        return (loss, outputs) if return_outputs else loss


class WeightedDPOTrainer(_KeepsWeights, DPOTrainer):
    """TRL's DPOTrainer; a batch with weights other than 1 gets DPO's sigmoid loss weighted per
    pair.

    TRL computes all its loss types in one long method with no per-pair hook, so the weighted
    batch is computed here, for the default objective (the sigmoid loss over the reverse KL, the
    reference as TRL gets it) and for it with TRL's `sft` term beside (RPO: the chosen answer's
    mean token NLL, weighted per pair like the sigmoid loss); other objectives with weights are
    refused when the trainer is made. Its metrics are the rewards' and the tokens' (what the
    job reports)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        columns = getattr(self.train_dataset, "column_names", None) or []
        weights = self.train_dataset[WEIGHT] if WEIGHT in columns else []
        if any(w != 1 for w in weights) and not self._weighable():
            raise JobError(
                "trust weights need DPO's sigmoid loss, alone or with 'sft' (loss_type, "
                "f_divergence_type, ld_alpha, "
                "use_weighting at their defaults); keep those, or snapshot with --no-rater-weights"
            )

    def _weighable(self) -> bool:
        return (
            list(self.loss_types) in (["sigmoid"], ["sigmoid", "sft"])
            and self.f_divergence_type == "reverse_kl"
            and self.ld_alpha is None
            and not self.use_weighting
            and not self.aux_loss_enabled
            and not self._is_vision_dataset
        )

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        weight = inputs.pop(WEIGHT, None)
        # `return_outputs` (TRL's deprecated logits for `compute_metrics`, unused here) stays TRL's.
        if _trusted_fully(weight) or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        return self._weighted_loss(model, inputs, weight)

    def _weighted_loss(
        self, model: Any, inputs: dict[str, Any], weight: torch.Tensor
    ) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        not_model = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in not_model}
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head=True)
        per_token = outputs.log_probs[:, -(completion_mask.size(1) - 1) :]
        chosen, rejected = per_token.sum(1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = model if self.ref_model is None else self.ref_model  # PEFT: adapter off
            ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
        chosen_rewards = self.beta * (chosen - ref_chosen)
        rejected_rewards = self.beta * (rejected - ref_rejected)
        margins = chosen_rewards - rejected_rewards
        loss = weighted_bradley_terry(margins, weight) * self.loss_weights[0]
        if "sft" in self.loss_types:  # TRL's mean NLL over the chosen answers' tokens,
            # each token weighing its pair's weight (the same value as TRL's where all are 1)
            mask = completion_mask[:, 1:].chunk(2)[0].to(per_token.dtype)
            nll = -(per_token.chunk(2)[0] * mask).sum(1)
            sft = (weight.to(nll.dtype) * nll).sum() / mask.sum().clamp(min=1)
            loss = loss + sft * self.loss_weights[1]

        gather = self.accelerator.gather_for_metrics
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self._total_train_tokens]
        margins = margins.detach()
        metrics["rewards/chosen"].append(gather(chosen_rewards.detach()).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards.detach()).mean().item())
        metrics["rewards/accuracies"].append(gather((margins > 0).float()).mean().item())
        metrics["rewards/margins"].append(gather(margins).mean().item())
        metrics["trust_weight"].append(gather(weight).mean().item())
        return loss
