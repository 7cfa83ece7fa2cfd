"""The samplers and pruners a study file may name, the knobs each accepts from its table form
(``[pruner] type = "median"  n_warmup_steps = 2``), and the one reader of that form (``algorithm``).

Free of torch; ``hpsearch.spec`` and ``hpsearch.stopping`` read the tables from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from hpsearch._errors import SpecError

# spec_from_dict's error maker: (key, value, rule) -> "FILE: key = value rule".
Fail = Callable[[str, Any, str], SpecError]


class Knob(NamedTuple):
    """A knob's accepted value types and its inclusive bounds (None: unbounded; bounds apply to numbers only)."""

    types: type | tuple[type, ...]
    low: float | None = None
    high: float | None = None


SAMPLER_KNOBS: dict[str, dict[str, Knob]] = {
    "tpe": {"n_startup_trials": Knob(int, 0), "multivariate": Knob(bool), "constant_liar": Knob(bool),
            "n_ei_candidates": Knob(int, 1)},
    "random": {},
    "gp": {"n_startup_trials": Knob(int, 0)},
    "cmaes": {"n_startup_trials": Knob(int, 0), "popsize": Knob(int, 2)},
    "qmc": {"qmc_type": Knob(str), "scramble": Knob(bool)},
    "enqueued": {},  # replays the [[enqueue]] rows and refuses to sample (the report's tables)
}
# Dead-trial pruning, on top of every pruner but "none": a trial whose validation accuracy is still within
# ``dead_margin`` of chance (what always guessing the majority class scores) after ``dead_after`` epochs is pruned.
DEAD_KNOBS: dict[str, Knob] = {"dead_trial": Knob(bool), "dead_margin": Knob((int, float), 0, 1),
                               "dead_after": Knob(int, 1)}
_PRUNER_OWN_KNOBS: dict[str, dict[str, Knob]] = {
    "none": {},
    "median": {"n_startup_trials": Knob(int, 0), "n_warmup_steps": Knob(int, 0), "interval_steps": Knob(int, 1),
               "n_min_trials": Knob(int, 1)},
    "percentile": {"percentile": Knob((int, float), 0, 100), "n_startup_trials": Knob(int, 0),
                   "n_warmup_steps": Knob(int, 0), "interval_steps": Knob(int, 1), "n_min_trials": Knob(int, 1)},
    "successive-halving": {"min_resource": Knob((int, str), 1), "reduction_factor": Knob(int, 2),
                           "min_early_stopping_rate": Knob(int, 0), "bootstrap_count": Knob(int, 0)},
    "hyperband": {"min_resource": Knob(int, 1), "max_resource": Knob((int, str), 1), "reduction_factor": Knob(int, 2)},
}
PRUNER_KNOBS = {kind: knobs if kind == "none" else {**knobs, **DEAD_KNOBS} for kind, knobs in _PRUNER_OWN_KNOBS.items()}


def algorithm(raw: Any, key: str, knobs: dict[str, dict[str, Knob]], fail: Fail) -> dict[str, Any]:
    """``"median"`` or ``{type = "median", n_warmup_steps = 2}`` -> ``{"type": "median", ...}``."""
    table = {"type": raw} if isinstance(raw, str) else dict(raw) if isinstance(raw, dict) else None
    if table is None or "type" not in table:
        raise fail(key, raw, f"must be a name or a table with type; allowed types: {', '.join(knobs)}")
    kind = table["type"]
    if not isinstance(kind, str) or kind not in knobs:
        raise fail(key, kind, f"is not known; allowed: {', '.join(knobs)}")
    for knob, value in table.items():
        if knob == "type":
            continue
        if knob not in knobs[kind]:
            allowed = ", ".join(knobs[kind]) or "none"
            raise fail(f"{key}.{knob}", value, f"is not a knob of {key} {kind!r}; allowed: {allowed}")
        _check_knob(f"{key}.{knob}", knob, value, knobs[kind][knob], fail)
    return table


def _check_knob(where: str, knob: str, value: Any, rule: Knob, fail: Fail) -> None:
    types = rule.types if isinstance(rule.types, tuple) else (rule.types,)
    # A string knob is an enumeration: qmc_type names the sequence, min/max_resource may be "auto".
    words = ("sobol", "halton") if knob == "qmc_type" else ("auto",)
    if type(value) not in types or (isinstance(value, str) and value not in words):
        allowed = " or ".join(t.__name__ for t in types if t is not str)
        allowed = " or ".join(filter(None, [allowed, ", ".join(f'"{w}"' for w in words) if str in types else ""]))
        raise fail(where, value, f"must be {allowed}")
    low, high = rule.low, rule.high
    if isinstance(value, int | float) and not isinstance(value, bool) and (
        (low is not None and value < low) or (high is not None and value > high)
    ):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        raise fail(where, value, f"must be {bounds}")


def check_rung_pruner(pruner: dict[str, Any], fail: Fail) -> None:
    """Rungs are promoted by successive halving (a trial goes on to the next rung when it is in the top
    1/reduction_factor of its rung so far), or all trained (``none``); the steps are rungs, not epochs."""
    if pruner["type"] not in ("successive-halving", "none"):
        raise fail("pruner", pruner["type"], 'with rungs must be "successive-halving" (it promotes the best of each '
                   'rung to the next) or "none"')
    for knob in ("min_resource", "min_early_stopping_rate"):
        if knob in pruner:
            raise fail(f"pruner.{knob}", pruner[knob], "is set by the rungs (each rung is one step); leave it out")
