"""The objective: suggest -> build -> fit (report + prune per epoch, or per rung) -> validation accuracy.

The test set is never touched here. Everything a trial decided or measured is stored on it as user attrs.

A study with ``rungs`` trains each configuration in stages: every rung is a complete, cheaper training (its own
epochs with the LR schedule run to its end, on part of the training images) whose best validation accuracy is
reported at step ``reduction_factor ** k``; Optuna's successive-halving pruner decides whether the trial goes on to
the next rung, and the last stage is the study's own training (its epochs on all its images). A study without
rungs has one stage and reports every epoch.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, NoReturn

import optuna
import torch
from optuna.trial import TrialState

from hpsearch import artifacts, signals
from hpsearch._errors import HpsearchError
from hpsearch.data import Data, Split
from hpsearch.devices import DTYPES, choose_precision, precision_candidates, precision_name
from hpsearch.explain import TrialExplainer, summarize
from hpsearch.signals import Terminated
from hpsearch.spec import StudySpec
from hpsearch.strategies import STRATEGIES, Rejected
from hpsearch.study import DeadTrialRule, check_study, rung_step, study_identity
from hpsearch.train import PROBE_BATCH, Built, Diverged, FitResult, fit, probe_steps

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(_running(trial))


def chance_accuracy(split: Split) -> float:
    """The validation accuracy of always guessing the split's most common class."""
    return torch.bincount(split.y).max().item() / len(split)


def _reject(trial: optuna.Trial, why: str) -> NoReturn:
    """A configuration refused before training: pruned for TPE, not counted toward n_trials (``study.is_rejected``)."""
    trial.set_user_attr("rejected", why)
    raise optuna.TrialPruned(f"rejected before training: {why}")


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
) -> Callable[[optuna.Trial], float]:
    """``dead``: the study's dead-trial rule (its pruner applies it per epoch; not with rungs; the objective stores
    the reason). With ``explain`` (and a ``store``), each trial that ran an epoch gets its PNGs and
    note (hpsearch.explain). ``precision``: --precision (auto: measured per trial, see ``devices``)."""
    strategy = STRATEGIES[spec.strategy]
    plan = stages(spec, data)
    cap = spec.max_seconds_per_epoch
    # Seconds per probe step in each precision, per architecture: trials that differ only in their training
    # hyperparameters (or a retry) do not probe again.
    probed: dict[tuple[str, int], dict[torch.dtype | None, float]] = {}

    def objective(trial: optuna.Trial) -> float:
        try:
            return run_trial(trial)
        except Terminated as e:
            signals.delivered(e)  # Optuna now stores FAIL: not to be interrupted by a resent SIGTERM
            e.trial_number = trial.number
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

    def run_trial(trial: optuna.Trial) -> float:
        # The study this trial belongs to (run_trials checked it just before the trial was asked for): each epoch
        # checks it is still there before storing anything (study.StudyGone: deleted by someone else meanwhile).
        identity = study_identity(trial.study)
        try:
            config = strategy.suggest(trial, spec.space, spec.epochs, data.info)
        except Rejected as e:
            _reject(trial, str(e))  # pruned, not failed: TPE learns to avoid the region; not counted toward n_trials
        trial.set_user_attr("config", asdict(config))
        # A retry is the same run as the dead trial it replaces (the first of its chain): same seed, so an epoch it
        # trains again (killed after that epoch's report, before its checkpoint) gives the value already reported.
        retried = retried_from(trial)
        seed = trial_seed(spec.seed, trial.number if retried is None else retried)

        def build() -> Built:
            torch.manual_seed(seed)  # weight initialisation: every stage of a trial starts from the same weights
            return strategy.build(config, data.info)

        built = build()
        trial.set_user_attr("param_count", sum(p.numel() for p in built.model.parameters()))
        trial.set_user_attr("trainable_param_count",
                            sum(p.numel() for p in built.model.parameters() if p.requires_grad))
        trial.set_user_attr("device", str(device))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # a retry says where it ran, too
        if spec.max_flops is not None:
            # Cost cap, before any training: multiply-accumulates of one image through the model. Stored like a
            # rejected architecture: pruned for TPE, not counted toward n_trials.
            size = built.input_size or (data.info.height, data.info.width)
            macs = summarize(built.model, channels=data.info.channels, size=size).macs
            trial.set_user_attr("macs", macs)
            if macs > spec.max_flops:
                _reject(trial, f"{macs:,} MACs per image, over max_flops = {spec.max_flops:,}")
        stored = trial.user_attrs.get("precision")  # a retry trains in its dead trial's precision
        amp = decide_precision(trial, built, config.train, stored)
        explainer = TrialExplainer(store, built, data.info, device=device) if explain and store is not None else None

        # Resume only a retry of a dead worker's trial, from the checkpoint of the first trial of its chain (each
        # retry writes there too). A fresh trial never loads a file, whatever lies in the store.
        checkpoint: str | None = None
        resume: dict[str, Any] | None = None
        if store is not None:
            checkpoint = artifacts.checkpoint_id(artifacts.study_id(trial.study),
                                                 trial.number if retried is None else retried)
            if retried is not None:
                # the dead trial's own record wins: it is what its worker wrote to
                checkpoint = str(trial.user_attrs.get(artifacts.CHECKPOINT_ATTR, checkpoint))
                resume = artifacts.load_checkpoint(store, checkpoint)
                if resume is not None:
                    trial.set_user_attr("resumed_after_epoch", resume["epoch"])
            trial.set_user_attr(artifacts.CHECKPOINT_ATTR, checkpoint)

        # A retry goes on in the stage its checkpoint was written in (older checkpoints: the study's own training);
        # the stages before it finished and reported their values, which the retry inherits.
        first = 0 if resume is None else resume.get("rung", len(plan) - 1)
        value = 0.0
        for k, stage in enumerate(plan[first:], start=first):
            result = train_stage(trial, k, stage, built if k == first else build(), config, seed, amp, explainer,
                                 checkpoint, resume if k == first else None, identity)
            value = result.final_accuracy if result.final_accuracy is not None else result.best_val_accuracy
            if stage.step is not None:
                trial.set_user_attr("rung", k)
                trial.report(value, stage.step)
                if trial.should_prune():
                    if explainer is not None:
                        explainer.finish(trial, complete=False)
                    raise optuna.TrialPruned(f"not promoted after rung {k} with val accuracy {value:.4f}")
        if explainer is not None:
            explainer.finish(trial, complete=True)
        return value

    def decide_precision(trial: optuna.Trial, built: Built, train: Any, stored: str | None) -> torch.dtype | None:
        """The autocast dtype this trial trains in, and the time cap's refusal: one probe of timed steps serves both.
        A retry keeps its dead trial's precision and its admission (it was under the cap)."""
        if stored is not None:
            return DTYPES[str(stored)]
        candidates = precision_candidates(precision, device)
        amp = candidates[0]
        if len(candidates) > 1:
            key = (repr(built.model), min(PROBE_BATCH, train.batch_size))
            if key not in probed:
                probed[key] = probe_steps(built, data, train, device, candidates, batch=key[1], warmup=2).cost
            amp = choose_precision(probed[key])
            trial.set_user_attr("step_seconds", {precision_name(d): round(s, 5) for d, s in probed[key].items()})
        if cap is not None and built.precomputed is None:  # (a cached trunk's epoch costs a fraction of this)
            # Cost cap, before any training: an epoch of the study's own training from a few timed steps of its batch
            # (an estimate that errs low), on the cost clock (devices.cost_clock: not time lost to other processes).
            probe = probe_steps(built, data, train, device, (amp,))
            estimate = probe.cost[amp] * probe.steps_per_epoch
            trial.set_user_attr("estimated_seconds_per_epoch", round(estimate, 3))
            if estimate > cap:
                _reject(trial, f"estimated {estimate:.1f} s per epoch from timed steps, over "
                               f"max_seconds_per_epoch = {cap:g}")
        trial.set_user_attr("precision", precision_name(amp))
        return amp

    def train_stage(trial: optuna.Trial, k: int, stage: Stage, built: Built, config: Any, seed: int,
                    amp: torch.dtype | None, explainer: TrialExplainer | None, checkpoint: str | None,
                    resume: dict[str, Any] | None, identity: str | None) -> FitResult:
        train = replace(config.train, epochs=stage.epochs)
        # Seconds of the study's own epoch this stage's epochs stand for (a rung trains on fewer images).
        scale = len(data.train) / len(stage.data.train)
        reports_epochs = len(plan) == 1

        def on_epoch(epoch: int, result: FitResult) -> None:
            check_study(trial.study, identity)  # first: neither this epoch nor its checkpoint is stored otherwise
            value = result.val_accuracy[-1]
            seconds = result.cost_seconds_per_epoch[-1] * scale
            if explainer is not None:
                explainer.observe(result)
            if reports_epochs:
                trial.report(value, epoch)
            trial.set_user_attr("train_loss", result.train_loss)
            trial.set_user_attr("val_accuracy", result.val_accuracy)
            trial.set_user_attr("seconds_per_epoch", sum(result.seconds_per_epoch) / len(result.seconds_per_epoch))
            trial.set_user_attr("cost_seconds_per_epoch", round(seconds, 4))  # the cap's clock (devices.cost_clock)
            trial.set_user_attr("best_epoch", result.best_epoch)
            if progress is not None:
                progress(trial.number, epoch, stage.epochs, value)
            if epoch + 1 == stage.epochs:
                # Trained to the end: pruning now would save nothing and throw the finished trial away (with 10
                # epochs, Hyperband at min_resource 1 and reduction factor 3 has its top rung at the last epoch).
                # A rung's end is judged by its report (run_trial).
                return
            if cap is not None and seconds > cap:  # cost cap: its value is reported, the rest is not paid for
                over = (f"epoch {epoch + 1} took {seconds:.1f} s, over max_seconds_per_epoch = {cap:g}"
                        if scale == 1 else f"an epoch of rung {k} stands for {seconds:.1f} s of the study's own, over "
                                           f"max_seconds_per_epoch = {cap:g}")
                trial.set_user_attr("over_cost", over)
                raise optuna.TrialPruned(over)
            # The study's pruner, which applies the dead-trial rule too. With rungs, successive halving judges each
            # rung's end instead: a rung is short by design, and a trial still at chance in its first steps is not dead.
            if not reports_epochs or not trial.should_prune():
                return
            why = None if dead is None else dead.reason(epoch, value)
            if why is not None:
                trial.set_user_attr("dead", why)
            raise optuna.TrialPruned(why or f"pruned at epoch {epoch} with val accuracy {value:.4f}")

        def on_checkpoint(state: dict[str, Any]) -> None:
            assert store is not None and checkpoint is not None  # only passed to fit with both
            try:
                artifacts.save_checkpoint(store, checkpoint, {**state, "rung": k})
            except artifacts.CheckpointNotWritten as e:  # a full disk costs the trial its resumability, not its value
                artifacts.checkpoint_not_written(trial, e)

        # No clean-up here: a database error inside the trial (trial.report in an outage) must leave the file for
        # the retry. The checkpoint goes once the trial's final state is stored (see checkpoints_after_trial).
        try:
            return fit(built, stage.data, train, device=device, seed=seed, on_epoch=on_epoch, resume=resume,
                       on_checkpoint=None if store is None else on_checkpoint, compile=compile, amp=amp,
                       tta=spec.tta if stage.last else "none")
        except Diverged as e:
            trial.set_user_attr("diverged", str(e))
            if explainer is not None:
                explainer.finish(trial, complete=False)
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except optuna.TrialPruned:
            if explainer is not None:  # still RUNNING here: the dashboard takes uploads only until the trial ends
                explainer.finish(trial, complete=False)
            raise

    return objective
