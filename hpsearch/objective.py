"""The objective: suggest -> build -> fit (report + prune per epoch, or per rung) -> validation accuracy.

The test set is never touched here. Everything a trial decided or measured is stored on it as user attrs. What the
objective measures (MACs, timed steps, each epoch's value and seconds), ``hpsearch.stopping`` judges: rejection, the
cost caps, the dead-trial rule, divergence and the pruner's decision, each stored as its own reason.

A study with ``rungs`` trains each configuration in stages: every rung is a complete, cheaper training (its own
epochs with the LR schedule run to its end, on part of the training images) whose best validation accuracy is
reported at step ``reduction_factor ** k``; Optuna's successive-halving pruner decides whether the trial goes on to
the next rung, and the last stage is the study's own training (its epochs on all its images). A trial stopped at a
rung that later ranks in the rung's top goes on as a new trial, a late promotion (``stopping.SuccessiveHalving``),
which starts at the next stage from the same initial weights. A study without rungs has one stage and reports every
epoch.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hpsearch import artifacts, signals, stopping
from hpsearch._errors import HpsearchError, Rejected
from hpsearch._optuna import quiet_experimental
from hpsearch.data import Data, Split
from hpsearch.devices import DTYPES, choose_precision, precision_candidates, precision_name
from hpsearch.explain import TrialExplainer, summarize
from hpsearch.heartbeat import queue_retry_with_fail
from hpsearch.signals import Terminated
from hpsearch.spec import StudySpec
from hpsearch.stopping import DeadTrialRule, EpochRules, rung_step
from hpsearch.strategies import STRATEGIES
from hpsearch.study import check_study, study_identity
from hpsearch.train import fit, probe_batch, probe_precisions, probe_steps
from hpsearch.train_types import Built, Diverged, FitResult
from hpsearch.trials import late_promotion

# progress(trial_number, epoch, epochs, val_accuracy) after every epoch
Progress = Callable[[int, int, int, float], None]


def trial_seed(study_seed: int, trial_number: int) -> int:
    return (study_seed * 1_000_003 + trial_number) % 2**63


def _running(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.number == trial.number)


def retried_from(trial: optuna.Trial) -> int | None:
    """The number of the dead trial this one retries (the first of its retry chain), or None for a fresh trial.
    Only Optuna's stale-trial retry (and hpsearch's SIGTERM, which builds the retry the same way) sets it."""
    with quiet_experimental():
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(_running(trial))


def chance_accuracy(split: Split) -> float:
    """The validation accuracy of always guessing the split's most common class."""
    return torch.bincount(split.y).max().item() / len(split)


@dataclass(frozen=True)
class Stage:
    """One training of a trial: a rung (``step``: where its value is reported) or the study's own (``step`` None:
    it reports every epoch when it is the only stage, else nothing before the trial's value)."""

    epochs: int
    data: Data
    step: int | None
    last: bool


RUNG_MIN_VAL = 500  # validation images of a rung at least (its standard error at 90% accuracy: 1.3 points)


def stages(spec: StudySpec, data: Data) -> list[Stage]:
    """The rungs, then the study's own training. A rung trains on the first ``train_fraction`` of the training images
    (a random subset: the split is a permutation) and validates on as large a part of the validation images (at least
    ``RUNG_MIN_VAL``): on CIFAR-10, validating 5,000 images every epoch was half of what a 2-epoch rung on 2,250
    images cost. Every trial of a rung sees the same images, so successive halving compares like with like."""
    out = []
    for k, rung in enumerate(spec.rungs):
        n = max(2, round(len(data.train) * rung.train_fraction))
        m = min(len(data.val), max(RUNG_MIN_VAL, round(len(data.val) * rung.train_fraction)))
        subset = Data(train=Split(data.train.x[:n], data.train.y[:n]), val=Split(data.val.x[:m], data.val.y[:m]),
                      info=data.info)
        out.append(Stage(epochs=rung.epochs, data=subset, step=rung_step(spec, k), last=False))
    out.append(Stage(epochs=spec.epochs, data=data, step=None, last=True))
    return out


def make_objective(
    spec: StudySpec,
    data: Data,
    *,
    device: torch.device,
    store: artifacts.ArtifactStore | None = None,
    progress: Progress | None = None,
    compile: bool = False,
    dead: DeadTrialRule | None = None,
    explain: bool = False,
    precision: str = "auto",
    deadline: float | None = None,
) -> Callable[[optuna.Trial], float]:
    """``dead``: the study's dead-trial rule (its pruner applies it per epoch; not with rungs; ``stopping`` stores
    the reason). With ``explain`` (and a ``store``), each trial that ran an epoch gets its PNGs and
    note (hpsearch.explain). ``precision``: --precision (auto: measured per trial, see ``devices``). ``deadline``:
    when the run's timeout ends (``time.monotonic``): a promoted trial starts no stage it would finish after it."""
    return Objective(spec, data, device=device, store=store, progress=progress, compile=compile, dead=dead,
                     explain=explain, precision=precision, deadline=deadline)


@dataclass
class TrialRun:
    """One trial's state across its stages: what each stage's training and its epoch hook need."""

    trial: optuna.Trial
    identity: str | None  # the study's hpsearch id, checked before each epoch is stored (study.check_study)
    config: Any  # the strategy's frozen config
    retried: int | None  # the dead trial this one retries (retried_from)
    seed: int
    amp: torch.dtype | None = None  # the precision it trains in
    explainer: TrialExplainer | None = None
    checkpoint: str | None = None  # its checkpoint's id in the artifact store
    resume: dict[str, Any] | None = None  # the checkpoint a retry resumes from
    epoch_seconds: float | None = None  # wall seconds an epoch on all the study's images takes, from its last stage
    late: dict[str, Any] | None = None  # what a late promotion goes on from (trials.late_promotion)


class Objective:
    """The trial function: the study's settings, and what its trials share (the timed-step probes)."""

    def __init__(self, spec: StudySpec, data: Data, *, device: torch.device, store: artifacts.ArtifactStore | None,
                 progress: Progress | None, compile: bool, dead: DeadTrialRule | None, explain: bool,
                 precision: str, deadline: float | None) -> None:
        self.spec, self.data, self.device, self.store, self.progress = spec, data, device, store, progress
        self.compile, self.explain, self.precision, self.deadline = compile, explain, precision, deadline
        self.strategy = STRATEGIES[spec.strategy]
        self.plan = stages(spec, data)
        self.rules = EpochRules(max_seconds_per_epoch=spec.max_seconds_per_epoch, dead=dead)
        # Seconds per probe step in each precision, per architecture: trials that differ only in their training
        # hyperparameters (or a retry) do not probe again.
        self.probed: dict[tuple[str, int], dict[torch.dtype | None, float]] = {}

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self.run_trial(trial)
        except Terminated as e:
            signals.delivered(e)  # Optuna now stores FAIL: not to be interrupted by a resent SIGTERM
            e.trial_number = trial.number
            queue_retry_with_fail(trial.study._storage, trial._trial_id)  # with the FAIL, in one transaction
            raise
        except (optuna.TrialPruned, optuna.exceptions.UpdateFinishedTrialError):
            # UpdateFinishedTrialError: this worker was cut off from the database past the grace period and another
            # failed its trial as stale (its retry resumes from the checkpoint); the trial takes no more writes.
            raise
        except HpsearchError as e:
            # Not this configuration's fault (weights or files that cannot be had): every trial would fail the
            # same way, so the run stops after this one (see study.run_trials).
            trial.set_user_attr("error", str(e))
            trial.set_user_attr("fatal", True)
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")  # Optuna itself keeps no failure reason
            raise

    def run_trial(self, trial: optuna.Trial) -> float:
        """suggest -> build -> train with report/prune -> return: the optuna-examples objective, in stages."""
        run = self.suggest(trial)  # a configuration that cannot train is rejected here
        built = self.build(run)
        self.describe(trial, built)
        self.admit(run, built)  # the cost caps refuse a model here, before any training; the precision it trains in
        self.open_checkpoint(run)
        # A retry goes on in the stage its checkpoint was written in (older checkpoints: the study's own training);
        # the stages before it finished and reported their values, which the retry inherits.
        first = 0 if run.resume is None else run.resume.get("rung", len(self.plan) - 1)
        if run.late is not None:  # a late promotion goes on after the rung its configuration was stopped at
            stopping.inherit_rungs(trial, run.late, [s.step for s in self.plan if s.step is not None])
            first = max(first, run.late["rung"] + 1)
            rung = self.plan[run.late["rung"]]
            run.epoch_seconds = (run.late["seconds_per_epoch"] or 0) * self.scale(rung) or None
        value = 0.0
        try:
            for k, stage in enumerate(self.plan[first:], start=first):
                again = k != first  # a later stage trains a new model from the same initial weights
                if again or (run.late is not None and run.resume is None):
                    self.check_time_left(run, k, stage)
                value = self.train_stage(run, k, stage, self.build(run) if again else built,
                                         None if again else run.resume)
        except optuna.TrialPruned:
            if run.explainer is not None:  # still RUNNING here: the dashboard takes uploads only until the trial ends
                run.explainer.finish(trial, complete=False)
            raise
        if run.explainer is not None:
            run.explainer.finish(trial, complete=True)
        return value

    # ---- suggest, build, admit

    def suggest(self, trial: optuna.Trial) -> TrialRun:
        # The study this trial belongs to (run_trials checked it just before the trial was asked for): each epoch
        # checks it is still there before storing anything (study.StudyGone: deleted by someone else meanwhile).
        identity = study_identity(trial.study)
        late = late_promotion(trial)  # the user attributes it was enqueued with: no second read of the trial
        if late is not None:
            stopping.refuse_duplicate_late(trial, late)  # before its parameters are stored: not a sample for TPE
        try:
            config = self.strategy.suggest(trial, self.spec.space, self.spec.epochs, self.data.info)
        except Rejected as e:
            stopping.reject(trial, str(e))  # pruned, not failed: TPE learns to avoid the region
        trial.set_user_attr("config", asdict(config))
        # A retry is the same run as the dead trial it replaces (the first of its chain): same seed, so an epoch it
        # trains again (killed after that epoch's report, before its checkpoint) gives the value already reported.
        retried = retried_from(trial)
        # A late promotion trains from its configuration's first trial's initial weights too.
        first = late["trial"] if late is not None else trial.number if retried is None else retried
        return TrialRun(trial, identity, config, retried, trial_seed(self.spec.seed, first), late=late)

    def build(self, run: TrialRun) -> Built:
        torch.manual_seed(run.seed)  # weight initialisation: every stage of a trial starts from the same weights
        return self.strategy.build(run.config, self.data.info)

    def describe(self, trial: optuna.Trial, built: Built) -> None:
        trial.set_user_attr("param_count", sum(p.numel() for p in built.model.parameters()))
        trial.set_user_attr("trainable_param_count",
                            sum(p.numel() for p in built.model.parameters() if p.requires_grad))
        trial.set_user_attr("device", str(self.device))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # a retry says where it ran, too

    def admit(self, run: TrialRun, built: Built) -> None:
        """``max_flops``, then the precision (and ``max_seconds_per_epoch``'s estimate), before any training."""
        info = self.data.info
        if self.spec.max_flops is not None:
            size = built.input_size or (info.height, info.width)
            macs = summarize(built.model, channels=info.channels, size=size).macs
            stopping.refuse_over_max_flops(run.trial, macs, self.spec.max_flops)
        stored = run.trial.user_attrs.get("precision")  # a retry trains in its dead trial's precision
        run.amp = self.decide_precision(run.trial, built, run.config.train, stored)
        if self.explain and self.store is not None:
            run.explainer = TrialExplainer(self.store, built, info, device=self.device)

    def decide_precision(self, trial: optuna.Trial, built: Built, train: Any, stored: str | None) -> torch.dtype | None:
        """The autocast dtype this trial trains in, and the time cap's refusal: one probe of timed steps serves both.
        A retry keeps its dead trial's precision and its admission (it was under the cap)."""
        if stored is not None:
            return DTYPES[str(stored)]
        candidates = precision_candidates(self.precision, self.device)
        amp = candidates[0]
        if len(candidates) > 1:
            key = (repr(built.model), probe_batch(train.batch_size))
            if key not in self.probed:
                self.probed[key] = probe_precisions(built, self.data, train, self.device, candidates).cost
            amp = choose_precision(self.probed[key])
            trial.set_user_attr("step_seconds",
                                {precision_name(d): round(s, 5) for d, s in self.probed[key].items()})
        cap = self.spec.max_seconds_per_epoch
        if cap is not None and built.precomputed is None:  # (a cached trunk's epoch costs a fraction of this)
            # An epoch of the study's own training from a few timed steps of its batch, on the cost clock.
            probe = probe_steps(built, self.data, train, self.device, (amp,))
            stopping.refuse_slow_epoch(trial, probe.cost[amp] * probe.steps_per_epoch, cap)
        trial.set_user_attr("precision", precision_name(amp))
        return amp

    def open_checkpoint(self, run: TrialRun) -> None:
        """Resume only a retry of a dead worker's trial, from the checkpoint of the first trial of its chain (each
        retry writes there too). A fresh trial never loads a file, whatever lies in the store."""
        if self.store is None:
            return
        trial = run.trial
        checkpoint = artifacts.checkpoint_id(artifacts.study_id(trial.study),
                                             trial.number if run.retried is None else run.retried)
        if run.retried is not None:
            # the dead trial's own record wins: it is what its worker wrote to
            checkpoint = str(trial.user_attrs.get(artifacts.CHECKPOINT_ATTR, checkpoint))
            run.resume = artifacts.load_checkpoint(self.store, checkpoint)
            if run.resume is not None:
                trial.set_user_attr("resumed_after_epoch", run.resume["epoch"])
        trial.set_user_attr(artifacts.CHECKPOINT_ATTR, checkpoint)
        run.checkpoint = checkpoint

    # ---- train, report, prune

    def check_time_left(self, run: TrialRun, k: int, stage: Stage) -> None:
        """A promotion the run's time left cannot pay for is refused (stopping.refuse_past_deadline): the stage's
        epochs at the pace of the trial's last stage, on its share of the images."""
        if self.deadline is None or run.epoch_seconds is None:
            return
        need = stage.epochs * run.epoch_seconds / self.scale(stage)
        stopping.refuse_past_deadline(run.trial, "its last stage" if stage.last else f"rung {k}", need=need,
                                      left=self.deadline - time.monotonic())

    def scale(self, stage: Stage) -> float:
        """How many of ``stage``'s epochs one epoch on all the study's training images is worth (1: the study's own
        training; a rung trains on fewer images)."""
        return len(self.data.train) / len(stage.data.train)

    def train_stage(self, run: TrialRun, k: int, stage: Stage, built: Built, resume: dict[str, Any] | None) -> float:
        """Trains stage ``k`` (from ``resume``, a checkpoint of it); its value, reported at its step if it is a
        rung, where successive halving may prune the trial."""
        train = replace(run.config.train, epochs=stage.epochs)
        # No clean-up here: a database error inside the trial (trial.report in an outage) must leave the file for
        # the retry. The checkpoint goes once the trial's final state is stored (see checkpoints_after_trial).
        try:
            result = fit(built, stage.data, train, device=self.device, seed=run.seed,
                         on_epoch=partial(self.after_epoch, run, k, stage), resume=resume,
                         on_checkpoint=None if self.store is None else partial(self.save_checkpoint, run, k),
                         compile=self.compile, amp=run.amp, tta=self.spec.tta if stage.last else "none")
        except Diverged as e:
            raise stopping.diverged(run.trial, e) from None
        if result.seconds_per_epoch:
            run.epoch_seconds = sum(result.seconds_per_epoch) / len(result.seconds_per_epoch) * self.scale(stage)
        value = result.final_accuracy if result.final_accuracy is not None else result.best_val_accuracy
        if stage.step is not None:
            run.trial.set_user_attr("rung", k)
            run.trial.report(value, stage.step)
            stopping.after_rung(run.trial, k, value)
        return value

    def after_epoch(self, run: TrialRun, k: int, stage: Stage, epoch: int, result: FitResult) -> None:
        """fit's epoch hook: stores the epoch (reported to the pruner when the trial has one stage), then asks
        ``stopping`` whether the trial goes on."""
        trial = run.trial
        check_study(trial.study, run.identity)  # first: neither this epoch nor its checkpoint is stored otherwise
        value = result.val_accuracy[-1]
        # Seconds of the study's own epoch this stage's epochs stand for (a rung trains on fewer images).
        scale = self.scale(stage)
        seconds = result.cost_seconds_per_epoch[-1] * scale
        if run.explainer is not None:
            run.explainer.observe(result)
        reports_epochs = len(self.plan) == 1
        if reports_epochs:
            trial.report(value, epoch)
        trial.set_user_attr("train_loss", result.train_loss)
        trial.set_user_attr("val_accuracy", result.val_accuracy)
        trial.set_user_attr("seconds_per_epoch", sum(result.seconds_per_epoch) / len(result.seconds_per_epoch))
        trial.set_user_attr("cost_seconds_per_epoch", round(seconds, 4))  # the cap's clock (devices.cost_clock)
        trial.set_user_attr("best_epoch", result.best_epoch)
        if self.progress is not None:
            self.progress(trial.number, epoch, stage.epochs, value)
        self.rules.after_epoch(trial, epoch=epoch, epochs=stage.epochs, value=value, seconds=seconds,
                               rung=None if scale == 1 else k, pruner_judges=reports_epochs)

    def save_checkpoint(self, run: TrialRun, k: int, state: dict[str, Any]) -> None:
        assert self.store is not None and run.checkpoint is not None  # only passed to fit with both
        try:
            artifacts.save_checkpoint(self.store, run.checkpoint, {**state, "rung": k})
        except artifacts.CheckpointNotWritten as e:  # a full disk costs the trial its resumability, not its value
            artifacts.checkpoint_not_written(run.trial, e)
