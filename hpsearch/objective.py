"""The objective: suggest -> build -> fit (report + prune per epoch) -> best validation accuracy.

The test set is never touched here. Everything a trial decided or measured is stored on it as user attrs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import optuna
import torch

from hpsearch._errors import HpsearchError
from hpsearch._paths import checkpoint_dir as checkpoint_dir  # re-exported: its old home
from hpsearch.data import Data
from hpsearch.spec import StudySpec
from hpsearch.strategies import STRATEGIES, Rejected
from hpsearch.train import Diverged, FitResult, fit

# progress(trial_number, epoch, epochs, val_accuracy) after every epoch
Progress = Callable[[int, int, int, float], None]


def trial_seed(study_seed: int, trial_number: int) -> int:
    return (study_seed * 1_000_003 + trial_number) % 2**63


def make_objective(
    spec: StudySpec,
    data: Data,
    *,
    device: torch.device,
    checkpoints: Path | None = None,
    progress: Progress | None = None,
    compile: bool = False,
) -> Callable[[optuna.Trial], float]:
    strategy = STRATEGIES[spec.strategy]

    def objective(trial: optuna.Trial) -> float:
        try:
            return run_trial(trial)
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
            # Pruned, not failed: TPE then learns to avoid the region, and the trial counts towards n_trials.
            trial.set_user_attr("rejected", str(e))
            raise optuna.TrialPruned(f"rejected before training: {e}") from None
        trial.set_user_attr("config", asdict(config))
        seed = trial_seed(spec.seed, trial.number)
        torch.manual_seed(seed)  # weight initialisation
        built = strategy.build(config, data.info)
        trial.set_user_attr("param_count", sum(p.numel() for p in built.model.parameters()))
        trial.set_user_attr("trainable_param_count",
                            sum(p.numel() for p in built.model.parameters() if p.requires_grad))
        trial.set_user_attr("device", str(device))

        # A retried trial inherits the user attrs of the one whose worker died, this path included: it resumes.
        checkpoint = None
        if checkpoints is not None:
            checkpoint = Path(trial.user_attrs.get("checkpoint") or checkpoints / f"trial-{trial.number}.pt")
            trial.set_user_attr("checkpoint", str(checkpoint))
            if checkpoint.is_file():  # a dead worker's trial: fit resumes after its last finished epoch
                trial.set_user_attr("resumed_from_checkpoint", str(checkpoint))

        def on_epoch(epoch: int, result: FitResult) -> None:
            value = result.val_accuracy[-1]
            trial.report(value, epoch)
            trial.set_user_attr("train_loss", result.train_loss)
            trial.set_user_attr("val_accuracy", result.val_accuracy)
            trial.set_user_attr("seconds_per_epoch", sum(result.seconds_per_epoch) / len(result.seconds_per_epoch))
            trial.set_user_attr("best_epoch", result.best_epoch)
            if progress is not None:
                progress(trial.number, epoch, config.train.epochs, value)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} with val accuracy {value:.4f}")

        try:
            result = fit(built, data, config.train, device=device, seed=seed, on_epoch=on_epoch, checkpoint=checkpoint,
                         compile=compile)
        except Diverged as e:
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned(f"diverged: {e}") from None
        finally:
            # Reached on every ending but a killed process: only a dead worker's checkpoint is kept, for its retry.
            if checkpoint is not None:
                checkpoint.unlink(missing_ok=True)
        return result.best_val_accuracy

    return objective
