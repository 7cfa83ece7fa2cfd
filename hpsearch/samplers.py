"""The study's sampler, from the study file's ``sampler`` table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import optuna

from hpsearch._errors import SpecError
from hpsearch._optuna import quiet_experimental

if TYPE_CHECKING:  # the spec pulls in the strategies and torch
    from hpsearch.spec import StudySpec


def make_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    knobs = {k: v for k, v in spec.sampler.items() if k != "type"}
    kind = spec.sampler["type"]
    with quiet_experimental():
        if kind == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **knobs)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, **knobs)
        if kind == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, **knobs)
        if kind == "enqueued":
            return EnqueuedOnly()
        return optuna.samplers.QMCSampler(seed=seed, **knobs)


class EnqueuedOnly(optuna.samplers.BaseSampler):
    """Replays [[enqueue]] rows and samples nothing: a parameter a row does not give is an error, not a guess
    (a fixed one-value parameter of the [space] excepted)."""

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        if isinstance(param_distribution, optuna.distributions.CategoricalDistribution) and len(
                param_distribution.choices) == 1:
            return param_distribution.choices[0]
        raise SpecError(f'sampler "enqueued": trial {trial.number} needs {param_name!r}, which no [[enqueue]] row '
                        "gives it (every row is used once; a row must name each parameter it uses)")
