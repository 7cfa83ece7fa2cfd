"""The study file's ``warm_start``: the best configurations of earlier studies, enqueued first in a new study."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from hpsearch._errors import SpecError
from hpsearch._secrets import redact_url
from hpsearch.trials import best_first

if TYPE_CHECKING:  # the spec pulls in the strategies and torch
    from hpsearch.spec import StudySpec

WARM_START_ATTR = "hpsearch:warm_start"  # what the warm start enqueued and skipped, when the study was created


@dataclass(frozen=True)
class WarmRows:
    rows: list[tuple[str, dict[str, Any]]]  # ("<study>#<trial number>", params) to enqueue, best first per study
    skipped: list[str]  # "<study>#<trial>: <why it does not fit this space>"


def warm_start_rows(spec: StudySpec, storage: optuna.storages.BaseStorage) -> WarmRows:
    """The best ``top`` complete configurations of each earlier study that fit this study's space (every parameter
    known to this strategy and inside this space; those it does not set are sampled). A missing earlier study is bad
    input (exit 2); one without complete trials adds nothing."""
    from hpsearch.storage import open_storage

    assert spec.warm_start is not None
    warm = spec.warm_start
    source = storage if warm.storage is None else open_storage(warm.storage, create=False)
    names = optuna.get_all_study_names(source)
    rows: list[tuple[str, dict[str, Any]]] = []
    skipped: list[str] = []
    for name in warm.studies:
        if name not in names:
            raise SpecError(f"warm_start.studies: study {name!r} does not exist in "
                            f"{'this storage' if warm.storage is None else redact_url(warm.storage)}; studies: "
                            f"{', '.join(names) or 'none'}")
        complete = optuna.load_study(study_name=name, storage=source).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE,))
        taken = 0
        for trial in best_first(complete):
            if taken == warm.top:
                break
            why = _does_not_fit(spec, trial.params)
            if why is None:
                rows.append((f"{name}#{trial.number}", trial.params))
                taken += 1
            else:
                skipped.append(f"{name}#{trial.number}: {why}")
    return WarmRows(rows, skipped)


def _does_not_fit(spec: StudySpec, params: dict[str, Any]) -> str | None:
    for key, value in params.items():
        try:
            spec.space.check_fixed_value(key, value)
        except ValueError as e:
            return f"{key} = {value!r} {e}"
    return None


def enqueue(study: optuna.Study, warm: WarmRows) -> None:
    """Enqueues the rows (each tagged with where it came from) and records what was enqueued and skipped."""
    for source, params in warm.rows:
        study.enqueue_trial(params, user_attrs={"warm_start": source}, skip_if_exists=True)
    study.set_user_attr(WARM_START_ATTR, {"enqueued": [source for source, _ in warm.rows], "skipped": warm.skipped})
