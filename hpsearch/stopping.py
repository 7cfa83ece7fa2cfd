"""Why a trial stops early, in one place: the study's pruner, the dead-trial rule, the cost caps (``max_flops`` and
``max_seconds_per_epoch``, before training and after each epoch; the run's timeout, before a promoted trial's next
stage), the last-epoch exemption, divergence and rejection.

Each reason is stored as one user attribute whose name is the reason (``trials.STOP_REASONS``) and whose value is
the sentence shown to the user; a cost cap also names itself in ``trials.COST_CAP_ATTR``. Whoever reads them
(``hpsearch.trials``) never parses the sentence. Every stop raises ``optuna.TrialPruned``: pruned, not failed, so
the sampler learns to avoid the region. Measuring (MACs, timed steps, an epoch's seconds) is the objective's work;
judging what was measured is this module's. Free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import optuna

from hpsearch._knobs import DEAD_KNOBS
from hpsearch.trials import COST_CAP_ATTR, STOP_REASONS, WAITED_ATTR, is_enqueued

if TYPE_CHECKING:  # the spec pulls in the strategies and torch
    from hpsearch.spec import StudySpec

REJECTED, DEAD, OVER_COST, DIVERGED = STOP_REASONS  # the attribute names, one per reason


# ---- rejection: refused before training (pruned for the sampler, not counted toward n_trials)

def reject(trial: optuna.Trial, why: str, *, cost_cap: str | None = None) -> NoReturn:
    """Refuses the configuration before training: stored as ``rejected`` (and the cap that refused it, if any)."""
    trial.set_user_attr(REJECTED, why)
    if cost_cap is not None:
        trial.set_user_attr(COST_CAP_ATTR, cost_cap)
    raise optuna.TrialPruned(f"rejected before training: {why}")


# ---- the cost caps

def refuse_over_max_flops(trial: optuna.Trial, macs: int, max_flops: int) -> None:
    """``max_flops``, before any training: multiply-accumulates of one image through the model (stored)."""
    trial.set_user_attr("macs", macs)
    if macs > max_flops:
        reject(trial, f"{macs:,} MACs per image, over max_flops = {max_flops:,}", cost_cap="max_flops")


def refuse_slow_epoch(trial: optuna.Trial, estimate: float, cap: float) -> None:
    """``max_seconds_per_epoch``, before any training: an epoch of the study's own training estimated from a few
    timed steps (an estimate that errs low, on the cost clock: devices.cost_clock)."""
    trial.set_user_attr("estimated_seconds_per_epoch", round(estimate, 3))
    if estimate > cap:
        reject(trial, f"estimated {estimate:.1f} s per epoch from timed steps, over max_seconds_per_epoch = {cap:g}",
               cost_cap="max_seconds_per_epoch")


def refuse_past_deadline(trial: optuna.Trial, stage: str, *, need: float, left: float) -> None:
    """The run's timeout, before a promoted trial's next stage: refused when the stage would end after it (``need``
    seconds, ``left`` of the timeout), once the study has a complete trial to return (the first is never refused)."""
    if need <= left or not trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return
    why = (f"{stage} would take about {need:.0f} s, " + (f"{left:.0f} s of the run's timeout left" if left > 0
                                                         else "the run's timeout has passed"))
    stop_over_cost(trial, why, cost_cap="timeout")


def stop_over_cost(trial: optuna.Trial, why: str, *, cost_cap: str) -> NoReturn:
    """Stops a trial that trained some of its way for a cost cap: stored as ``over_cost`` and the cap's name."""
    trial.set_user_attr(OVER_COST, why)
    trial.set_user_attr(COST_CAP_ATTR, cost_cap)
    raise optuna.TrialPruned(why)


# ---- the dead-trial rule

@dataclass(frozen=True)
class DeadTrialRule:
    """A trial whose validation accuracy is below ``threshold`` (chance plus a margin) after ``after`` epochs
    learns nothing: it is pruned at once instead of spending its whole budget at chance."""

    threshold: float
    after: int  # epochs

    def reason(self, epoch: int, value: float) -> str | None:
        """Why the trial is dead after 0-based ``epoch`` with validation accuracy ``value``; None when it is not."""
        if epoch + 1 < self.after or value >= self.threshold:
            return None
        return f"val accuracy {value:.4f} after {epoch + 1} epochs is at chance (below {self.threshold:.4f})"


DEAD_MARGIN = 0.02  # accuracy points above chance a trial must reach ...
DEAD_AFTER = 1  # ... after this many epochs


def dead_trial_rule(spec: StudySpec, chance: float) -> DeadTrialRule | None:
    """The study's dead-trial rule for a validation split where always guessing one class scores ``chance``;
    None when the study turns it off (``pruner = "none"`` or ``dead_trial = false``)."""
    threshold = chance + spec.pruner.get("dead_margin", DEAD_MARGIN)
    # A validation split (nearly) all of one class gives chance no meaning: nothing could beat the threshold.
    if spec.pruner["type"] == "none" or not spec.pruner.get("dead_trial", True) or threshold >= 1:
        return None
    return DeadTrialRule(threshold=threshold, after=spec.pruner.get("dead_after", DEAD_AFTER))


# ---- the study's pruner

class SuccessiveHalving(optuna.pruners.SuccessiveHalvingPruner):
    """Optuna's successive halving, whose ``bootstrap_count`` waits for the sampled trials only. Optuna cannot pause
    a trial, so a trial reaching a rung before anything else is there has nothing to be compared with: by default it
    is promoted (the first trials of a study train to the end whatever they are worth), with ``bootstrap_count = n``
    it is pruned until more than n trials have reached the rung. An enqueued row is the user's own starting point,
    the reference every sampled trial is measured against: it is never pruned for arriving first."""

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        self._no_bootstrap = optuna.pruners.SuccessiveHalvingPruner(**{**knobs, "bootstrap_count": 0})

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if is_enqueued(trial):
            return self._no_bootstrap.prune(study, trial)
        return super().prune(study, trial)

    def waited(self, study: optuna.Study, number: int, rung: int) -> str | None:
        """Why trial ``number``, pruned at ``rung``, was when it was not for its value: too few trials had reached
        the rung to compare it with. None when it was compared and not in the top 1/reduction_factor."""
        if not self._bootstrap_count:
            return None
        key = f"completed_rung_{rung}"  # where Optuna's successive halving records each trial's value at a rung
        trials = study.get_trials(deepcopy=False)
        there = sum(key in t.system_attrs for t in trials)
        if there > self._bootstrap_count or any(t.number == number and is_enqueued(t) for t in trials):
            return None
        return (f"{there} trial{'s' * (there != 1)} had reached it, too few to compare with "
                f"(bootstrap_count = {self._bootstrap_count})")


PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive-halving": SuccessiveHalving,
    "hyperband": optuna.pruners.HyperbandPruner,
}


def rung_step(spec: StudySpec, k: int) -> int:
    """The step rung ``k``'s value is reported at: ``reduction_factor ** k``, where Optuna's successive-halving
    pruner (min_resource 1) holds its k-th promotion."""
    return int(spec.pruner.get("reduction_factor", 3)) ** k


def make_pruner(spec: StudySpec, dead: DeadTrialRule | None = None) -> optuna.pruners.BasePruner:
    knobs = {k: v for k, v in spec.pruner.items() if k != "type" and k not in DEAD_KNOBS}
    kind = spec.pruner["type"]
    if spec.rungs:
        # Each rung is one step (rung_step). No dead-trial rule: a rung is short by design (objective.stages).
        if kind == "none":
            return optuna.pruners.NopPruner()
        return SuccessiveHalving(min_resource=1, min_early_stopping_rate=0, **knobs)
    if kind == "percentile":
        knobs = {"percentile": 25.0, **knobs}
    if kind == "hyperband":
        # Steps are epochs, so a trial's full budget is known: hyperband needs no "auto" guess.
        knobs = {"max_resource": spec.epochs, **knobs}
    if dead is None:
        return PRUNERS[kind](**knobs)
    return _with_dead_trials(PRUNERS[kind])(dead=dead, **knobs)


def _with_dead_trials(base: type[optuna.pruners.BasePruner]) -> Any:
    """``base`` that also prunes dead trials with Optuna's ThresholdPruner. A subclass rather than a wrapper:
    Optuna shows samplers Hyperband's per-bracket trials only when ``isinstance(pruner, HyperbandPruner)``."""

    class WithDeadTrials(base):  # type: ignore[valid-type,misc]
        def __init__(self, *, dead: DeadTrialRule, **knobs: Any) -> None:
            super().__init__(**knobs)
            self._dead = optuna.pruners.ThresholdPruner(lower=dead.threshold, n_warmup_steps=dead.after - 1)

        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            return self._dead.prune(study, trial) or super().prune(study, trial)

    return WithDeadTrials


# ---- during training

@dataclass(frozen=True)
class EpochRules:
    """What may stop a trial after one of its epochs (its value already reported): the last-epoch exemption, then
    ``max_seconds_per_epoch``, then the study's pruner (which applies the dead-trial rule too)."""

    max_seconds_per_epoch: float | None
    dead: DeadTrialRule | None

    def after_epoch(self, trial: optuna.Trial, *, epoch: int, epochs: int, value: float, seconds: float,
                    rung: int | None, pruner_judges: bool) -> None:
        """Raises TrialPruned to stop the trial after 0-based ``epoch`` of ``epochs``. ``seconds``: what the epoch
        stands for in the study's own training; ``rung``: the rung it belongs to when it trained on fewer images.
        ``pruner_judges``: whether the epoch was reported to the pruner (with rungs, successive halving judges each
        rung's end instead: a rung is short by design, and a trial still at chance in its first steps is not dead)."""
        if epoch + 1 == epochs:
            # Trained to the end: pruning now would save nothing and throw the finished trial away (with 10
            # epochs, Hyperband at min_resource 1 and reduction factor 3 has its top rung at the last epoch).
            # A rung's end is judged by its report (after_rung).
            return
        cap = self.max_seconds_per_epoch
        if cap is not None and seconds > cap:  # its value is reported, the rest is not paid for
            over = (f"epoch {epoch + 1} took {seconds:.1f} s, over max_seconds_per_epoch = {cap:g}" if rung is None
                    else f"an epoch of rung {rung} stands for {seconds:.1f} s of the study's own, over "
                         f"max_seconds_per_epoch = {cap:g}")
            stop_over_cost(trial, over, cost_cap="max_seconds_per_epoch")
        if not pruner_judges or not trial.should_prune():
            return
        why = None if self.dead is None else self.dead.reason(epoch, value)
        if why is not None:
            trial.set_user_attr(DEAD, why)
        raise optuna.TrialPruned(why or f"pruned at epoch {epoch} with val accuracy {value:.4f}")


def after_rung(trial: optuna.Trial, k: int, value: float) -> None:
    """Successive halving's judgement of rung ``k``'s reported value: TrialPruned when it is not promoted (and why,
    in ``WAITED_ATTR``, when it was for arriving early rather than for its value)."""
    if not trial.should_prune():
        return
    pruner = trial.study.pruner
    waited = pruner.waited(trial.study, trial.number, k) if isinstance(pruner, SuccessiveHalving) else None
    if waited is not None:
        trial.set_user_attr(WAITED_ATTR, waited)
    raise optuna.TrialPruned(f"not promoted after rung {k} with val accuracy {value:.4f}"
                             + (f": {waited}" if waited else ""))


def diverged(trial: optuna.Trial, error: Exception) -> optuna.TrialPruned:
    """The training loss became NaN or infinite (train_types.Diverged): stored, and the exception to raise."""
    trial.set_user_attr(DIVERGED, str(error))
    return optuna.TrialPruned(f"diverged: {error}")
