"""Where ``hpsearch evaluate`` keeps its test accuracies, readable without torch (show, export, report).

Optuna does not let a finished trial change, so a trial's results are the study's user attribute
``evaluate:<trial number>``: ``{"epochs", "schedule_epochs", "train_fraction", "mode", "runs": [{"test_accuracy",
...}], "mean", "std"}``. ``schedule_epochs``, ``train_fraction`` and ``mode`` may be absent: readers use ``.get``.
"""

from __future__ import annotations

from typing import Any

import optuna

ATTR_PREFIX = "evaluate:"


def attr_key(trial_number: int) -> str:
    return f"{ATTR_PREFIX}{trial_number}"


def stored(study: optuna.Study) -> dict[int, dict[str, Any]]:
    """Evaluation results stored on the study, by trial number."""
    return {int(key[len(ATTR_PREFIX):]): value for key, value in study.user_attrs.items()
            if key.startswith(ATTR_PREFIX) and key[len(ATTR_PREFIX):].isdigit()}


def test_columns(record: dict[str, Any] | None) -> dict[str, Any]:
    """A trial's results as the columns of show/export (None where the trial was not evaluated)."""
    if not record or not record.get("runs"):
        return {"test_accuracy_mean": None, "test_accuracy_std": None, "test_accuracies": None, "test_epochs": None,
                "test_train_fraction": None}
    return {"test_accuracy_mean": record["mean"], "test_accuracy_std": record["std"],
            "test_accuracies": [r["test_accuracy"] for r in record["runs"]], "test_epochs": record["epochs"],
            "test_train_fraction": record.get("train_fraction")}
