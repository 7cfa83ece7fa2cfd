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

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import optuna

from hpsearch._knobs import DEAD_KNOBS
from hpsearch.trials import (
    COST_CAP_ATTR,
    LATE_ATTR,
    STOP_REASONS,
    WAITED_ATTR,
    is_enqueued,
    is_rejected,
    late_promotion,
)

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
    """Optuna's successive halving, with what its decision-on-arrival lacks for hpsearch's rungs.

    ``bootstrap_count`` waits for the sampled trials only. Optuna cannot pause a trial, so a trial reaching a rung
    before anything else is there has nothing to be compared with: by default it is promoted (the first trials of a
    study train to the end whatever they are worth), with ``bootstrap_count = n`` it is pruned until more than n
    trials have reached the rung. An enqueued row is the user's own starting point, the reference every sampled trial
    is measured against: it is never pruned for arriving first.

    Late promotion (``late = True``: studies with rungs, whose stages are separate trainings). Optuna decides once,
    when a trial arrives at a rung; asynchronous successive halving (ASHA) promotes any trial that is in the top
    1/reduction_factor of its rung whenever a worker asks for work. Without it a trial pruned for arriving early is
    lost, and while the best trials of a rung are such losses the rung's top third is out of reach of every later
    one (a Fashion-MNIST search promoted nothing past rung 1 for 14 minutes). ``promote_late`` enqueues those trials
    again: the new trial carries the old one's rung values (counted once, as the old one's) and starts at the next
    stage, from the same initial weights.
    """

    def __init__(self, *, late: bool = False, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.late = late
        self._no_bootstrap = optuna.pruners.SuccessiveHalvingPruner(**{**knobs, "bootstrap_count": 0})

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if self._min_resource is None:  # "auto" (no rungs): Optuna's own, which estimates it from complete trials
            return self._no_bootstrap.prune(study, trial) if is_enqueued(trial) else super().prune(study, trial)
        # Optuna's loop, with each configuration counted once at a rung (a late promotion's copies are not).
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        bootstrap = 0 if is_enqueued(trial) else self._bootstrap_count
        rung, trials = _current_rung(trial), None
        while step >= self._min_resource * self._reduction_factor ** (self._min_early_stopping_rate + rung):
            if math.isnan(value):
                return True
            trials = trials if trials is not None else study.get_trials(deepcopy=False)
            study._storage.set_trial_system_attr(trial._trial_id, _rung_key(rung), value)
            competing = [*rung_values(trials, rung, but=trial.number), value]
            if len(competing) <= bootstrap or not self._in_top(value, competing, study.direction):
                return True
            rung += 1
        return False

    def _in_top(self, value: float, competing: list[float], direction: optuna.study.StudyDirection) -> bool:
        """Optuna's rule: among the best len(competing) // reduction_factor values (at least the best one)."""
        ranked = sorted(competing, reverse=direction == optuna.study.StudyDirection.MAXIMIZE)
        cut = ranked[max(1, len(competing) // self._reduction_factor) - 1]
        return value >= cut if direction == optuna.study.StudyDirection.MAXIMIZE else value <= cut

    def waited(self, study: optuna.Study, number: int, rung: int) -> str | None:
        """Why trial ``number``, pruned at ``rung``, was when it was not for its value: too few trials had reached
        the rung to compare it with. None when it was compared and not in the top 1/reduction_factor."""
        if not self._bootstrap_count:
            return None
        trials = study.get_trials(deepcopy=False)
        there = len(rung_values(trials, rung))
        if there > self._bootstrap_count or any(t.number == number and is_enqueued(t) for t in trials):
            return None
        return (f"{there} trial{'s' * (there != 1)} had reached it, too few to compare with "
                f"(bootstrap_count = {self._bootstrap_count})")

    def promote_late(self, study: optuna.Study) -> list[int]:
        """Enqueues, best first, each trial this pruner stopped at a rung that is now in the rung's top
        1/reduction_factor and has not gone on yet; the numbers of the trials it goes on from."""
        if not self.late:
            return []
        trials = study.get_trials(deepcopy=False)
        gone_on = {(late["trial"], late["rung"]) for t in trials if (late := late_promotion(t)) is not None}
        found = []
        for t in trials:
            rung = _current_rung(t) - 1
            if t.state != optuna.trial.TrialState.PRUNED or rung < 0 or any(r in t.user_attrs for r in STOP_REASONS):
                continue  # not stopped by this pruner at a rung (a cost cap, divergence, the timeout)
            late = late_promotion(t)
            first = late["trial"] if late is not None else t.number
            if any(n == first and r >= rung for n, r in gone_on):
                continue
            value, competing = t.system_attrs[_rung_key(rung)], rung_values(trials, rung)
            bootstrap = 0 if is_enqueued(t) else self._bootstrap_count
            if len(competing) > bootstrap and self._in_top(value, competing, study.direction):
                found.append((value, t, first, rung))
        found.sort(key=lambda f: -f[0] if study.direction == optuna.study.StudyDirection.MAXIMIZE else f[0])
        for _, t, first, rung in found:
            late = {"trial": first, "rung": rung, "enqueued": is_enqueued(t),
                    "values": {str(k): t.system_attrs[_rung_key(k)] for k in range(rung + 1)},
                    "seconds_per_epoch": t.user_attrs.get("seconds_per_epoch")}
            label = {"label": t.user_attrs["label"]} if "label" in t.user_attrs else {}
            study.enqueue_trial(t.params, user_attrs={**label, LATE_ATTR: late})
        return [t.number for _, t, _, _ in found]


def refuse_duplicate_late(trial: optuna.Trial, late: dict[str, Any]) -> None:
    """Two workers that finish trials at the same moment can both enqueue the same late promotion (each looks for a
    queued one first and sees none yet). The copy with the higher number is refused before training while another
    copy is queued, running or finished, so one trains; a failed copy (whose retry is a copy too) and the refused
    ones do not count."""
    for t in trial.study.get_trials(deepcopy=False):
        if t.number >= trial.number or t.state == optuna.trial.TrialState.FAIL or is_rejected(t):
            continue
        other = late_promotion(t)
        if other is not None and (other["trial"], other["rung"]) == (late["trial"], late["rung"]):
            reject(trial, f"a second copy of trial {t.number}, the late promotion of trial {late['trial']} from "
                          f"rung {late['rung']} (two workers queued it at once)")


def _rung_key(rung: int) -> str:
    return f"completed_rung_{rung}"  # where Optuna's successive halving records each trial's value at a rung


def _current_rung(trial: optuna.trial.FrozenTrial) -> int:
    """The rungs the trial has passed through (and been judged at)."""
    rung = 0
    while _rung_key(rung) in trial.system_attrs:
        rung += 1
    return rung


def rung_values(trials: list[optuna.trial.FrozenTrial], rung: int, *, but: int | None = None) -> list[float]:
    """Each configuration's value at ``rung``, once: a late promotion's copies of the rungs it carries are not
    counted (the trial it goes on from is), nor is trial ``but``."""
    key = _rung_key(rung)
    return [t.system_attrs[key] for t in trials if key in t.system_attrs and t.number != but
            and not ((late := late_promotion(t)) is not None and rung <= late["rung"])]


def inherit_rungs(trial: optuna.Trial, late: dict[str, Any], steps: list[int]) -> None:
    """A late promotion takes the rung values of the trial it goes on from (rung k's at ``steps[k]``): reported (its
    curve; a retry has them already) and recorded where successive halving looks for the rungs a trial has passed,
    so it is judged from the next rung on."""
    storage = trial.study._storage
    reported = storage.get_trial(trial._trial_id).intermediate_values
    for rung, value in sorted((int(k), v) for k, v in late["values"].items()):
        if steps[rung] not in reported:
            trial.report(value, steps[rung])
        storage.set_trial_system_attr(trial._trial_id, _rung_key(rung), value)


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
        # The reduction factor rung_step places the rungs with (Optuna's own default, 4, would judge rung k at step
        # 4^k, and a rung reported at 3^k would never be judged past rung 0).
        knobs = {"reduction_factor": int(spec.pruner.get("reduction_factor", 3)), **knobs}
        return SuccessiveHalving(min_resource=1, min_early_stopping_rate=0, late=True, **knobs)
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
