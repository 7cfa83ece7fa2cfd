"""The objective: suggest -> build -> fit (report + prune per epoch) -> best validation accuracy.

The test set is never touched here. Everything a trial decided or measured is stored on it as user attrs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, NoReturn

import optuna
import torch
from optuna.trial import TrialState

from hpsearch import artifacts, signals
from hpsearch._errors import HpsearchError
from hpsearch.data import Data, Split
from hpsearch.explain import TrialExplainer, summarize
from hpsearch.signals import Terminated
from hpsearch.spec import StudySpec
from hpsearch.strategies import STRATEGIES, Rejected
from hpsearch.study import DeadTrialRule
from hpsearch.train import Diverged, FitResult, estimate_epoch_seconds, fit

# progress(trial_number, epoch, epochs, val_accuracy) after every epoch
Progress = Callable[[int, int, int, float], None]


def trial_seed(study_seed: int, trial_number: int) -> int:
    return (study_seed * 1_000_003 + trial_number) % 2**63


def retried_from(trial: optuna.Trial) -> int | None:
    """The number of the dead trial this one retries (the first of its retry chain), or None for a fresh trial.
    Only Optuna's stale-trial retry (and hpsearch's SIGTERM, which builds the retry the same way) sets it."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def chance_accuracy(split: Split) -> float:
    """The validation accuracy of always guessing the split's most common class."""
    return torch.bincount(split.y).max().item() / len(split)


def _reject(trial: optuna.Trial, why: str) -> NoReturn:
    """A configuration refused before training: pruned for TPE, not counted toward n_trials (``study.is_rejected``)."""
    trial.set_user_attr("rejected", why)
    raise optuna.TrialPruned(f"rejected before training: {why}")


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
) -> Callable[[optuna.Trial], float]:
    """``dead``: the study's dead-trial rule (its pruner applies it; the objective stores the reason). With
    ``explain`` (and a ``store``), each trial that ran an epoch gets its PNGs and note (hpsearch.explain)."""
    strategy = STRATEGIES[spec.strategy]

    def objective(trial: optuna.Trial) -> float:
        try:
            return run_trial(trial)
        except Terminated as e:
            signals.delivered(e)  # Optuna now stores FAIL: not to be interrupted by a resent SIGTERM
            e.trial_number = trial.number
            raise
        except optuna.TrialPruned:
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
        try:
            config = strategy.suggest(trial, spec.space, spec.epochs, data.info)
        except Rejected as e:
            # Pruned, not failed: TPE then learns to avoid the region; it does not count toward n_trials.
            trial.set_user_attr("rejected", str(e))
            raise optuna.TrialPruned(f"rejected before training: {e}") from None
        trial.set_user_attr("config", asdict(config))
        # A retry is the same run as the dead trial it replaces (the first of its chain): same seed, so an epoch it
        # trains again (killed after that epoch's report, before its checkpoint) gives the value already reported.
        retried = retried_from(trial)
        seed = trial_seed(spec.seed, trial.number if retried is None else retried)
        torch.manual_seed(seed)  # weight initialisation
        built = strategy.build(config, data.info)
        trial.set_user_attr("param_count", sum(p.numel() for p in built.model.parameters()))
        trial.set_user_attr("trainable_param_count",
                            sum(p.numel() for p in built.model.parameters() if p.requires_grad))
        trial.set_user_attr("device", str(device))
        if spec.max_flops is not None:
            # Cost cap, before any training: multiply-accumulates of one image through the model. Stored like a
            # rejected architecture: pruned for TPE, not counted toward n_trials.
            size = built.input_size or (data.info.height, data.info.width)
            macs = summarize(built.model, channels=data.info.channels, size=size).macs
            trial.set_user_attr("macs", macs)
            if macs > spec.max_flops:
                _reject(trial, f"{macs:,} MACs per image, over max_flops = {spec.max_flops:,}")
        cap = spec.max_seconds_per_epoch
        if cap is not None and built.precomputed is None:  # (a cached trunk's epoch costs a fraction of this)
            # Cost cap, before any training: seconds per epoch from a few timed steps (an estimate that errs low).
            estimate = estimate_epoch_seconds(built, data, config.train, device)
            trial.set_user_attr("estimated_seconds_per_epoch", round(estimate, 3))
            if estimate > cap:
                _reject(trial, f"estimated {estimate:.1f} s per epoch from timed steps, over max_seconds_per_epoch = "
                               f"{cap:g}")
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

        def on_epoch(epoch: int, result: FitResult) -> None:
            value = result.val_accuracy[-1]
            if explainer is not None:
                explainer.observe(result)
            trial.report(value, epoch)
            trial.set_user_attr("train_loss", result.train_loss)
            trial.set_user_attr("val_accuracy", result.val_accuracy)
            trial.set_user_attr("seconds_per_epoch", sum(result.seconds_per_epoch) / len(result.seconds_per_epoch))
            trial.set_user_attr("best_epoch", result.best_epoch)
            if progress is not None:
                progress(trial.number, epoch, config.train.epochs, value)
            if epoch + 1 == config.train.epochs:
                # Trained to the end: pruning now would save nothing and throw the finished trial away (with 10
                # epochs, Hyperband at min_resource 1 and reduction factor 3 has its top rung at the last epoch).
                return
            seconds = result.seconds_per_epoch[-1]
            if cap is not None and seconds > cap:  # cost cap: its value is reported, the rest is not paid for
                over = f"epoch {epoch + 1} took {seconds:.1f} s, over max_seconds_per_epoch = {cap:g}"
                trial.set_user_attr("over_cost", over)
                raise optuna.TrialPruned(over)
            if trial.should_prune():
                why = None if dead is None else dead.reason(epoch, value)
                if why is not None:
                    trial.set_user_attr("dead", why)
                raise optuna.TrialPruned(why or f"pruned at epoch {epoch} with val accuracy {value:.4f}")

        def on_checkpoint(state: dict[str, Any]) -> None:
            assert store is not None and checkpoint is not None  # only passed to fit with both
            artifacts.save_checkpoint(store, checkpoint, state)

        # No clean-up here: a database error inside the trial (trial.report in an outage) must leave the file for
        # the retry. The checkpoint goes once the trial's final state is stored (see checkpoints_after_trial).
        try:
            result = fit(built, data, config.train, device=device, seed=seed, on_epoch=on_epoch, resume=resume,
                         on_checkpoint=None if store is None else on_checkpoint, compile=compile)
        except Diverged as e:
            trial.set_user_attr("diverged", str(e))
            if explainer is not None:
                explainer.finish(trial, complete=False)
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except optuna.TrialPruned:
            if explainer is not None:  # still RUNNING here: the dashboard takes uploads only until the trial ends
                explainer.finish(trial, complete=False)
            raise
        if explainer is not None:
            explainer.finish(trial, complete=True)
        return result.best_val_accuracy

    return objective

