"""Study files: ``load_spec(path)`` -> a validated, frozen ``StudySpec``.

Everything a study file can get wrong is caught here, before any database or data is touched, with one
line that names the file, the key, the bad value and what is allowed.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpsearch._errors import SpecError
from hpsearch._secrets import redact_url
from hpsearch.data import check_dataset_name
from hpsearch.space import Categorical, Fixed, FloatRange, IntRange, Space, resolve_space
from hpsearch.strategies import STRATEGIES

# Knobs each sampler / pruner accepts from a table form (``[pruner] type = "median"  n_warmup_steps = 2``):
# name -> (type, inclusive lower bound, inclusive upper bound).
Knob = tuple[type | tuple[type, ...], float | None, float | None]
SAMPLER_KNOBS: dict[str, dict[str, Knob]] = {
    "tpe": {"n_startup_trials": (int, 0, None), "multivariate": (bool, None, None),
            "constant_liar": (bool, None, None), "n_ei_candidates": (int, 1, None)},
    "random": {},
    "gp": {"n_startup_trials": (int, 0, None)},
    "cmaes": {"n_startup_trials": (int, 0, None), "popsize": (int, 2, None)},
    "qmc": {"qmc_type": (str, None, None), "scramble": (bool, None, None)},
    "enqueued": {},  # replays the [[enqueue]] rows and refuses to sample (the report's tables)
}
# Keys of an [[enqueue]] row that describe it rather than set a parameter: stored as the trial's user attrs.
ENQUEUE_META = ("label", "paper_accuracy")
# Dead-trial pruning, on top of every pruner but "none": a trial whose validation accuracy is still within
# ``dead_margin`` of chance (what always guessing the majority class scores) after ``dead_after`` epochs is pruned.
DEAD_KNOBS: dict[str, Knob] = {"dead_trial": (bool, None, None), "dead_margin": ((int, float), 0, 1),
                               "dead_after": (int, 1, None)}
_PRUNER_OWN_KNOBS: dict[str, dict[str, Knob]] = {
    "none": {},
    "median": {"n_startup_trials": (int, 0, None), "n_warmup_steps": (int, 0, None), "interval_steps": (int, 1, None),
               "n_min_trials": (int, 1, None)},
    "percentile": {"percentile": ((int, float), 0, 100), "n_startup_trials": (int, 0, None),
                   "n_warmup_steps": (int, 0, None), "interval_steps": (int, 1, None), "n_min_trials": (int, 1, None)},
    "successive-halving": {"min_resource": ((int, str), 1, None), "reduction_factor": (int, 2, None),
                           "min_early_stopping_rate": (int, 0, None)},
    "hyperband": {"min_resource": (int, 1, None), "max_resource": ((int, str), 1, None),
                  "reduction_factor": (int, 2, None)},
}
PRUNER_KNOBS = {kind: knobs if kind == "none" else {**knobs, **DEAD_KNOBS} for kind, knobs in _PRUNER_OWN_KNOBS.items()}
TOP_KEYS = ("name", "dataset", "strategy", "epochs", "n_trials", "timeout", "max_seconds_per_epoch", "max_flops",
            "val_fraction", "train_fraction",
            "sampler", "pruner", "seed", "tta", "rungs", "final", "target", "warm_start", "space", "enqueue")
TTA_LEVELS = ("none", "flip", "flip-translate")  # hpsearch.train.tta_logits
MAX_RUNGS = 8
# May change between runs of the same study without --force: the budget, the final training (evaluate's), the target
# that ends the study early, and the warm start (read only when the study is created).
BUDGET_KEYS = ("n_trials", "timeout", "final", "target", "warm_start")
WARM_START_TOP = 5  # best complete trials taken from each earlier study by default


@dataclass(frozen=True)
class Rung:
    """A cheaper, complete training every configuration passes through first: ``epochs`` with the LR schedule run to
    its end, on ``train_fraction`` of the study's training images (the validation images are the study's)."""

    epochs: int
    train_fraction: float


@dataclass(frozen=True)
class WarmStart:
    """``warm_start = { studies = ["mnist-scratch"], top = 5, storage = "..." }``: when the study is created, the best
    ``top`` complete configurations of each earlier study that fit this study's space are enqueued first."""

    studies: tuple[str, ...]
    top: int = WARM_START_TOP
    storage: str | None = None  # the earlier studies' database; None: this study's own


@dataclass(frozen=True)
class StudySpec:
    name: str
    dataset: str
    strategy: str
    epochs: int
    n_trials: int | None
    timeout: float | None
    max_seconds_per_epoch: float | None  # cost cap: a trial whose epoch takes longer is pruned after it
    max_flops: int | None  # cost cap: MACs per image; a model above it is rejected before training
    val_fraction: float
    train_fraction: float
    sampler: dict[str, Any]  # {"type": ..., knobs...}
    pruner: dict[str, Any]
    seed: int
    space_overrides: dict[str, Any]
    enqueue: tuple[dict[str, Any], ...]
    space: Space = field(compare=False, repr=False)
    tta: str = "none"  # test-time augmentation of the final validation and of the test (the same for every trial)
    rungs: tuple[Rung, ...] = ()  # cheaper complete trainings before the study's own (successive halving)
    # evaluate's defaults: the final training's epochs (the schedule stretched to them) and part of the training
    # images (plus val); None: the trial's best epoch count, the study's train_fraction
    final_epochs: int | None = None
    final_train_fraction: float | None = None
    target: float | None = None  # a complete trial with this validation accuracy ends the study (every worker)
    warm_start: WarmStart | None = None

    def to_dict(self) -> dict[str, Any]:
        """The study file's content as plain data (what is stored on the study and compared on resume)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in TOP_KEYS if k not in ("space", "enqueue", "final")}
        # An absent budget stays absent; so do the keys newer than a stored study when they have their defaults.
        out = {k: v for k, v in out.items() if v is not None and not (k == "tta" and v == "none")
               and not (k == "rungs" and not v) and k != "warm_start"}
        if self.rungs:
            out["rungs"] = [{"epochs": r.epochs, "train_fraction": r.train_fraction} for r in self.rungs]
        final = {k: v for k, v in (("epochs", self.final_epochs), ("train_fraction", self.final_train_fraction))
                 if v is not None}
        if final:
            out["final"] = final
        if self.warm_start is not None:
            # A password of another database is not stored on the study: the warm start is read only at its creation.
            storage = self.warm_start.storage
            out["warm_start"] = {"studies": list(self.warm_start.studies), "top": self.warm_start.top,
                                 **({} if storage is None else {"storage": redact_url(storage)})}
        out["space"], out["enqueue"] = self.space_overrides, list(self.enqueue)
        return json.loads(json.dumps(out))

    def search_definition(self) -> dict[str, Any]:
        """``to_dict`` without the budget: what must match for two runs to be the same study."""
        return {k: v for k, v in self.to_dict().items() if k not in BUDGET_KEYS}


def load_spec(path: str | Path) -> StudySpec:
    p = Path(path)
    try:
        # utf-8-sig: a leading byte-order mark (Windows editors write one) is dropped, not read as a stray character.
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SpecError(f"{p}: no such study file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: cannot read the study file ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: not valid TOML ({e})") from None
    return spec_from_dict(data, where=str(p))


def spec_from_dict(data: dict[str, Any], *, where: str) -> StudySpec:
    def fail(key: str, value: Any, rule: str) -> SpecError:
        return SpecError(f"{where}: {key} = {_show(value)} {rule}")

    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(TOP_KEYS)}")
    for key in ("name", "dataset", "strategy", "epochs"):
        if key not in data:
            raise SpecError(f"{where}: missing required key {key!r}")

    name = data["name"]
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise fail("name", name, "must be a non-empty string of at most 200 characters")
    dataset = data["dataset"]
    if not isinstance(dataset, str):
        raise fail("dataset", dataset, "must be a string")
    try:
        check_dataset_name(dataset)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    strategy = data["strategy"]
    if not isinstance(strategy, str) or strategy not in STRATEGIES:  # a list or table is not hashable
        raise fail("strategy", strategy, f"is not known; allowed: {', '.join(STRATEGIES)}")

    epochs = _number(data, "epochs", int, 1, 10_000, fail)
    n_trials = _number(data, "n_trials", int, 1, 1_000_000, fail) if "n_trials" in data else None
    timeout = float(_number(data, "timeout", (int, float), 1, None, fail)) if "timeout" in data else None
    if n_trials is None and timeout is None:
        raise SpecError(f"{where}: give n_trials and/or timeout (seconds): without either a study never ends")
    max_seconds = (float(_number(data, "max_seconds_per_epoch", (int, float), 0.001, None, fail))
                   if "max_seconds_per_epoch" in data else None)
    max_flops = _number(data, "max_flops", int, 1, None, fail) if "max_flops" in data else None
    val_fraction = data.get("val_fraction", 0.1)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
        raise fail("val_fraction", val_fraction, "must be a number with 0 < val_fraction < 1")
    val_fraction = float(val_fraction)
    train_fraction = data.get("train_fraction", 1.0)
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, int | float) or not 0 < train_fraction <= 1:
        raise fail("train_fraction", train_fraction, "must be a number with 0 < train_fraction <= 1")
    seed = _number(data, "seed", int, 0, 2**32 - 1, fail) if "seed" in data else 0

    sampler = _algorithm(data.get("sampler", "tpe"), "sampler", SAMPLER_KNOBS, fail)
    rungs = _rungs(data.get("rungs", []), epochs, fail)
    pruner = _algorithm(data.get("pruner", "successive-halving" if rungs else "median"), "pruner", PRUNER_KNOBS, fail)
    if rungs:
        _check_rung_pruner(pruner, fail)
    tta = data.get("tta", "none")
    if not isinstance(tta, str) or tta not in TTA_LEVELS:
        raise fail("tta", tta, f"is not known; allowed: {', '.join(TTA_LEVELS)}")
    final_epochs, final_fraction = _final(data.get("final", {}), fail)
    target = data.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)
                               or not 0 < target <= 1):
        raise fail("target", target, "must be a validation accuracy with 0 < target <= 1")
    warm_start = _warm_start(data["warm_start"], name, fail) if "warm_start" in data else None

    overrides = data.get("space", {})
    if not isinstance(overrides, dict):
        raise fail("space", overrides, "must be a table ([space])")
    space = resolve_space(STRATEGIES[strategy].params, overrides, where=f"{where}: space")
    check = STRATEGIES[strategy].check
    if check is not None:
        try:
            check(space)
        except ValueError as e:
            raise SpecError(f"{where}: space.{e}") from None

    enqueue = data.get("enqueue", [])
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise fail("enqueue", enqueue, "must be an array of tables ([[enqueue]])")
    for i, params in enumerate(enqueue):
        for key, value in params.items():
            if key in ENQUEUE_META:
                _check_meta(key, value, f"{where}: enqueue[{i}].{key} = {_show(value)}")
                continue
            if space.param_for(key) is None:
                raise SpecError(f"{where}: enqueue[{i}].{key} = {_show(value)} is not a parameter of this strategy; "
                                f"allowed: {_enqueue_keys(space)}")
            try:
                space.check_fixed_value(key, value)
            except ValueError as e:
                raise SpecError(f"{where}: enqueue[{i}].{key} = {_show(value)} {e}") from None
    enqueue = [_expand_row(row, space) for row in enqueue]

    if sampler["type"] == "enqueued":
        if not enqueue:
            raise fail("sampler", "enqueued", "replays [[enqueue]] rows, but the file has none")
        if n_trials is None or n_trials > len(enqueue):
            raise fail("n_trials", n_trials, f'must be given and <= the {len(enqueue)} [[enqueue]] rows with sampler '
                       '"enqueued" (it never samples)')

    return StudySpec(
        name=name, dataset=dataset, strategy=strategy, epochs=epochs, n_trials=n_trials, timeout=timeout,
        max_seconds_per_epoch=max_seconds, max_flops=max_flops, val_fraction=val_fraction,
        train_fraction=float(train_fraction), sampler=sampler, pruner=pruner, seed=seed,
        space_overrides=overrides, enqueue=tuple(enqueue), space=space, tta=tta, rungs=rungs,
        final_epochs=final_epochs, final_train_fraction=final_fraction,
        target=None if target is None else float(target), warm_start=warm_start,
    )


def _warm_start(raw: Any, name: str, fail: Any) -> WarmStart:
    example = 'a table such as { studies = ["mnist-scratch"], top = 5 }'
    if not isinstance(raw, dict):
        raise fail("warm_start", raw, f"must be {example}")
    for key in raw:
        if key not in ("studies", "top", "storage"):
            raise fail(f"warm_start.{key}", raw[key], "is not a key of warm_start; allowed: studies, top, storage")
    studies = raw.get("studies")
    if (not isinstance(studies, list) or not studies
            or not all(isinstance(s, str) and s.strip() for s in studies)):
        raise fail("warm_start.studies", studies, "must be a non-empty list of study names")
    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage.strip()):
        raise fail("warm_start.storage", storage, "must be a database URL (default: this study's own)")
    if storage is None and name in studies:
        raise fail("warm_start.studies", studies, f"names this study ({name!r}) itself")
    top = raw.get("top", WARM_START_TOP)
    if type(top) is not int or not 1 <= top <= 1000:
        raise fail("warm_start.top", top, "must be an integer with 1 <= top <= 1000")
    return WarmStart(studies=tuple(dict.fromkeys(studies)), top=top, storage=storage)


def _final(raw: Any, fail: Any) -> tuple[int | None, float | None]:
    """``final = { epochs = 10, train_fraction = 1.0 }``: what ``hpsearch evaluate`` trains by default."""
    if not isinstance(raw, dict):
        raise fail("final", raw, "must be a table such as { epochs = 10, train_fraction = 1.0 }")
    for key in raw:
        if key not in ("epochs", "train_fraction"):
            raise fail(f"final.{key}", raw[key], "is not a key of final; allowed: epochs, train_fraction")
    epochs = raw.get("epochs")
    if epochs is not None and (type(epochs) is not int or not 1 <= epochs <= 10_000):
        raise fail("final.epochs", epochs, "must be an integer >= 1 and <= 10000")
    fraction = raw.get("train_fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                                 or not 0 < fraction <= 1):
        raise fail("final.train_fraction", fraction, "must be a number with 0 < train_fraction <= 1")
    return epochs, None if fraction is None else float(fraction)


def _rungs(raw: Any, epochs: int, fail: Any) -> tuple[Rung, ...]:
    """``rungs = [{ epochs = 2, train_fraction = 0.1 }, ...]``: each a cheaper complete training than the next, the
    study's own (``epochs`` on all its training images) last."""
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw) or len(raw) > MAX_RUNGS:
        raise fail("rungs", raw, f"must be an array of at most {MAX_RUNGS} tables such as "
                   "[{ epochs = 2, train_fraction = 0.1 }]")
    rungs = []
    for i, table in enumerate(raw):
        for key in table:
            if key not in ("epochs", "train_fraction"):
                raise fail(f"rungs[{i}].{key}", table[key], "is not a rung key; allowed: epochs, train_fraction")
        e = table.get("epochs", epochs)
        if type(e) is not int or not 1 <= e <= epochs:
            raise fail(f"rungs[{i}].epochs", e, f"must be an integer >= 1 and <= epochs ({epochs})")
        f = table.get("train_fraction", 1.0)
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
            raise fail(f"rungs[{i}].train_fraction", f, "must be a number with 0 < train_fraction <= 1")
        rungs.append(Rung(epochs=e, train_fraction=float(f)))
    costs = [r.epochs * r.train_fraction for r in rungs] + [float(epochs)]
    for i, (a, b) in enumerate(zip(costs, costs[1:], strict=False)):
        if b <= a:
            nxt = f"rungs[{i + 1}]" if i + 1 < len(rungs) else f"the study's own {epochs} epochs on all its images"
            raise fail(f"rungs[{i}]", raw[i], f"must cost less (epochs x train_fraction = {a:g}) than {nxt} ({b:g})")
    return tuple(rungs)


def _check_rung_pruner(pruner: dict[str, Any], fail: Any) -> None:
    """Rungs are promoted by successive halving (a trial goes on to the next rung when it is in the top
    1/reduction_factor of its rung so far), or all trained (``none``); the steps are rungs, not epochs."""
    if pruner["type"] not in ("successive-halving", "none"):
        raise fail("pruner", pruner["type"], 'with rungs must be "successive-halving" (it promotes the best of each '
                   'rung to the next) or "none"')
    for knob in ("min_resource", "min_early_stopping_rate"):
        if knob in pruner:
            raise fail(f"pruner.{knob}", pruner[knob], "is set by the rungs (each rung is one step); leave it out")


def _check_meta(key: str, value: Any, where: str) -> None:
    if key == "label" and (not isinstance(value, str) or not value.strip()):
        raise SpecError(f"{where} must be a non-empty string (the row's name in reports)")
    if key == "paper_accuracy" and (
        isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1
    ):
        raise SpecError(f"{where} must be a number with 0 <= paper_accuracy <= 1 (the accuracy a report gave)")


def _enqueue_keys(space: Space) -> str:
    """What an [[enqueue]] row may name: each parameter (a per-layer one also as ``key_<i>``, or ``key_<name>``)
    and the metadata keys."""
    keys = [f"{k} (or {k}_<{'name' if space.params[p.per].allowed is not None else 'i'}>)" if (p.per is not None)
            else k for k, p in sorted(space.params.items())]
    return ", ".join([*keys, *ENQUEUE_META])


def _expand_row(row: dict[str, Any], space: Space) -> dict[str, Any]:
    """A per-layer key's base name in an [[enqueue]] row (``channels = 64``) sets every copy, as in ``[space]``:
    ``channels_0 .. channels_{n-1}`` with n the row's ``conv_layers``, or the most the space allows when the row
    does not fix it (Optuna ignores a fixed parameter a trial never suggests); for a key copied per name (zoo's
    ``input_size_<model>``), the row's model, or every model of the space. A copy the row names itself wins."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        param = space.params.get(key)
        if key in ENQUEUE_META or param is None or param.per is None:
            out[key] = value
            continue
        for copy in _copies(space, param.per, row):
            name = f"{key}_{copy}"
            out[name] = row.get(name, value)
    return out


def _copies(space: Space, per: str, row: dict[str, Any]) -> list[str]:
    """The copies (``_0``, ``_1``, ... or ``_<name>``) of a key repeated per ``per`` that a trial of ``row`` may use."""
    named = space.params[per].allowed is not None
    dim = space.dims[per]
    if per in row:
        values: list[Any] = [row[per]]
    elif isinstance(dim, Fixed):
        values = [dim.value]
    elif isinstance(dim, Categorical):
        values = list(dim.choices)
    elif isinstance(dim, IntRange | FloatRange):
        values = [dim.high]
    else:  # a PerChoice range: its widest
        values = [d.high for _, d in dim.dims]
    if named:
        return [str(v) for v in values]
    return [str(i) for i in range(int(max(values)))]


def split_row(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An [[enqueue]] row -> (parameters, metadata such as label and paper_accuracy)."""
    params = {k: v for k, v in row.items() if k not in ENQUEUE_META}
    return params, {k: v for k, v in row.items() if k in ENQUEUE_META}


def _number(data: dict[str, Any], key: str, kind: Any, low: float, high: float | None, fail: Any) -> Any:
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = type(value) in kinds and math.isfinite(value) and value >= low and (high is None or value <= high)
    if not ok:
        noun = "an integer" if kinds == (int,) else "a number"
        upper = f" and <= {high}" if high is not None else ""
        raise fail(key, value, f"must be {noun} >= {low}{upper}")
    return value


def _algorithm(raw: Any, key: str, knobs: dict[str, dict[str, Knob]], fail: Any) -> dict[str, Any]:
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
        types, low, high = knobs[kind][knob]
        types = types if isinstance(types, tuple) else (types,)
        # A string knob is an enumeration: qmc_type names the sequence, min/max_resource may be "auto".
        words = ("sobol", "halton") if knob == "qmc_type" else ("auto",)
        if type(value) not in types or (isinstance(value, str) and value not in words):
            rule = " or ".join(t.__name__ for t in types if t is not str)
            rule = " or ".join(filter(None, [rule, ", ".join(f'"{w}"' for w in words) if str in types else ""]))
            raise fail(f"{key}.{knob}", value, f"must be {rule}")
        if isinstance(value, int | float) and not isinstance(value, bool) and (
            (low is not None and value < low) or (high is not None and value > high)
        ):
            bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
            raise fail(f"{key}.{knob}", value, f"must be {bounds}")
    return table


def _show(value: Any) -> str:
    # default=str: TOML dates and times have no JSON form; shown as their ISO text.
    return json.dumps(value, default=str) if not isinstance(value, float) or math.isfinite(value) else str(value)
