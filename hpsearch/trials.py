"""Facts about a study's trials, read one way by everything that shows or uses them (the run loop, the live display,
``show``/``export``, ``report``, ``evaluate``, ``export-model``, the checkpoint clean-up): which count toward
``n_trials``, which were refused before training, how a trial ended and why, and the best-first order.

Why a trial stopped early is written by ``hpsearch.stopping`` as user attributes, one per reason: the attribute's
name is the reason (:data:`STOP_REASONS`), its value the sentence shown to the user; a cost cap that refused or
stopped a trial is also named in :data:`COST_CAP_ATTR`. Nothing here parses those sentences. Free of torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# User attributes that say why a PRUNED trial stopped, in the order they are looked for: "rejected" (refused before
# training: the architecture shrinks below 1x1, or a cost cap), "dead" (at chance), "over_cost" (an epoch over
# max_seconds_per_epoch), "diverged" (loss not finite). A trial pruned by the study's pruner carries none.
STOP_REASONS = ("rejected", "dead", "over_cost", "diverged")
# The cap that refused or stopped a trial: "max_flops", "max_seconds_per_epoch", or "timeout" (a promotion the run's
# time left could not pay for).
COST_CAP_ATTR = "cost_cap"
WAITED_ATTR = "waited"  # why a trial was not promoted from a rung for arriving early, not for its value (stopping)
# A trial that goes on from where a pruned one stopped (stopping.SuccessiveHalving.promote_late): {"trial": the
# first trial of the configuration, "rung": the rung it was pruned after, "values": {rung: value} it carries,
# "seconds_per_epoch": its last rung's, "enqueued": whether the configuration was an enqueued row}.
LATE_ATTR = "late_promotion"
# How a trial ended, for the budget line and the benchmarks: "pruned" is the pruner's own decision.
ENDINGS = ("complete", "pruned", "dead", "over_cost", "diverged", "rejected", "failed")


def best_first_key(trial: FrozenTrial) -> tuple[float, int]:
    """Sort key of the ranking every command shows: higher value first, then the earlier trial."""
    return -(trial.value or 0.0), trial.number


def best_first(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The complete trials with a value, best first."""
    return sorted((t for t in trials if t.state == TrialState.COMPLETE and t.value is not None), key=best_first_key)


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """The study's complete trials, best first."""
    return best_first(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def is_enqueued(trial: FrozenTrial) -> bool:
    """An ``[[enqueue]]`` row (or a warm start's), not a configuration the sampler chose: Optuna stores an enqueued
    trial's parameters as its ``fixed_params`` system attribute. A late promotion is enqueued too, and is what its
    configuration was."""
    late = late_promotion(trial)
    return bool(late["enqueued"]) if late is not None else "fixed_params" in trial.system_attrs


def late_promotion(trial: FrozenTrial | optuna.Trial) -> dict | None:
    """What a late promotion goes on from (:data:`LATE_ATTR`); None for any other trial."""
    late = trial.user_attrs.get(LATE_ATTR)
    return late if isinstance(late, dict) else None


def is_rejected(trial: FrozenTrial) -> bool:
    """Refused before training (no epoch run): pruned for the sampler, not counted toward n_trials."""
    return trial.state == TrialState.PRUNED and "rejected" in trial.user_attrs


def counts_toward_n_trials(trial: FrozenTrial) -> bool:
    """Complete or pruned after training: what ``n_trials`` counts."""
    return trial.state in FINISHED and not is_rejected(trial)


def count_finished(study: optuna.Study) -> int:
    """Finished trials that count toward n_trials."""
    return sum(counts_toward_n_trials(t) for t in study.get_trials(deepcopy=False, states=FINISHED))


def count_rejected(study: optuna.Study) -> int:
    return sum(is_rejected(t) for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))


def refused_for_cost(trial: FrozenTrial) -> bool:
    """Refused before training by a cost cap (max_flops, or an estimated epoch over max_seconds_per_epoch)."""
    return is_rejected(trial) and COST_CAP_ATTR in trial.user_attrs


def ending(trial: FrozenTrial) -> str:
    """One of :data:`ENDINGS`."""
    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.PRUNED:
        return next((why for why in STOP_REASONS if why in trial.user_attrs), "pruned")
    return "failed"


def stop_note(trial: FrozenTrial) -> str | None:
    """The sentence saying why the trial stopped early or failed (``show``/``export``'s note column), if any."""
    return next((str(trial.user_attrs[k]) for k in (*STOP_REASONS, "error") if k in trial.user_attrs), None)
