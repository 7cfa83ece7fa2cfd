"""Search-space declarations and the one place that turns them into Optuna suggestions.

A strategy declares its default space as ``{key: Param}``. A study file's ``[space]`` table overrides
entries: a list is a categorical choice, a table ``{low, high, log, step}`` a range, a scalar a fixed
value. ``resolve_space`` validates the overrides against each ``Param``'s rule and returns a ``Space``
that strategies sample from with ``space.suggest(trial, key)``.

Repeated parameters (one per conv block, one per FC layer) are declared once (``per=...``) and sampled
as ``key_0, key_1, ...`` with the same distribution, unless ``[space]`` gives a copy its own (``channels_2 = 128``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from hpsearch._errors import SpecError

Scalar = bool | int | float | str


@dataclass(frozen=True)
class Categorical:
    choices: tuple[Scalar, ...]


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    step: float | None = None
    log: bool = False


@dataclass(frozen=True)
class Fixed:
    value: Scalar


@dataclass(frozen=True)
class PerChoice:
    """A range that depends on the value an earlier key took in the same trial: the learning rate per optimizer
    (Adam wants ~1e-3, SGD ~1e-2..1e-1). The parameter has one name (``lr``) whatever the earlier key's value, so
    enqueued rows, report files and exports name it the same way; Optuna allows one name with different ranges (TPE
    samples it independently)."""

    key: str  # the earlier key (sampled first), e.g. "optimizer"
    dims: tuple[tuple[Scalar, FloatRange | IntRange], ...]  # (that key's value, range) pairs

    def dim_for(self, value: Any) -> FloatRange | IntRange:
        for choice, dim in self.dims:
            if choice == value:
                return dim
        raise KeyError(f"{self.key} = {value!r} has no range")


Dim = Categorical | IntRange | FloatRange | Fixed | PerChoice


@dataclass(frozen=True)
class Param:
    """One key of a strategy's space: its default distribution and the rule any override must obey.

    ``kind`` is the value type (int, float, str, bool); ``allowed`` a closed set of values, or ``low``/
    ``high`` an inclusive numeric interval; ``check`` an extra rule on one value (raises ValueError saying
    what is wrong: e.g. a weights file that does not exist). ``per`` names the key whose value is how many
    copies (``key_0 .. key_{n-1}``) a trial samples, or, for a key with ``allowed`` names, which copy
    (``key_<name>``: zoo's ``input_size_alexnet``, whose choices differ per model).
    """

    default: Dim
    kind: type | tuple[type, ...]
    help: str
    allowed: tuple[Scalar, ...] | None = None
    low: float | None = None
    high: float | None = None
    per: str | None = None
    check: Callable[[Any], None] | None = None

    def rule(self) -> str:
        if self.allowed is not None:
            return "one of " + ", ".join(_fmt(a) for a in self.allowed)
        lo = "" if self.low is None else f"{_fmt(self.low)} <= "
        hi = "" if self.high is None else f" <= {_fmt(self.high)}"
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        return f"{lo}{' or '.join(k.__name__ for k in kinds)}{hi}"

    def check_value(self, value: Any) -> Scalar:
        """Returns ``value`` converted to ``kind``; raises ValueError with the rule when it breaks it."""
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if float in kinds and type(value) is int:
            value = float(value)
        if type(value) not in kinds:
            raise ValueError(f"must be {self.rule()}")
        if self.allowed is not None and value not in self.allowed:
            raise ValueError(f"must be {self.rule()}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"must be {self.rule()}")
            if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                raise ValueError(f"must be {self.rule()}")
        if self.check is not None:
            self.check(value)
        return value


def _fmt(value: Any) -> str:
    # json.dumps for strings: a newline or quote in a value must not break the one-line message.
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value).lower() if isinstance(value, bool) else str(value)


def parse_dim(param: Param, raw: Any) -> Dim:
    """One ``[space]`` override value -> a Dim; ValueError says what is wrong with it."""
    if isinstance(raw, list):
        if not raw:
            raise ValueError("is an empty list; give at least one choice")
        choices = tuple(param.check_value(v) for v in raw)
        if len(set(choices)) != len(choices):
            raise ValueError("has repeated choices")
        return Categorical(choices)
    if isinstance(raw, Mapping):
        unknown = sorted(set(raw) - {"low", "high", "log", "step"})
        if unknown:
            raise ValueError(f"has unknown range key {unknown[0]!r}; a range takes low, high, log, step")
        if "low" not in raw or "high" not in raw:
            raise ValueError("is a range without low and high")
        if param.kind not in (int, float):  # a mixed-type key (padding: 0 or "same") takes choices only
            raise ValueError(f"is a range, but this key takes {param.rule()}: give a list of choices")
        low, high = param.check_value(raw["low"]), param.check_value(raw["high"])
        assert isinstance(low, int | float) and isinstance(high, int | float)
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise ValueError("has log that is not true/false")
        if low > high:
            raise ValueError(f"is an inverted range: low {_fmt(low)} > high {_fmt(high)}")
        if low == high:
            raise ValueError(f"is an empty range: low == high == {_fmt(low)}; use a scalar for a fixed value")
        if log and low <= 0:
            raise ValueError(f"is a log range with low {_fmt(low)}; a log range needs low > 0")
        step = raw.get("step")
        if step is not None:
            step = param.check_value(step) if param.kind is int else float(step)
            if isinstance(step, bool) or not isinstance(step, int | float) or step <= 0:
                raise ValueError(f"has step {step!r}; step must be > 0")
            if log:
                raise ValueError("has both step and log; Optuna allows only one")
        if param.kind is int:
            return IntRange(int(low), int(high), step=int(step or 1), log=log)
        return FloatRange(float(low), float(high), step=None if step is None else float(step), log=log)
    return Fixed(param.check_value(raw))


class Space:
    """A resolved search space: ``suggest`` is the only way strategies read a value from a trial."""

    def __init__(self, params: Mapping[str, Param], dims: Mapping[str, Dim]) -> None:
        self.params = dict(params)
        self.dims = dict(dims)

    def suggest(self, trial: optuna.Trial, key: str, index: int | str | None = None) -> Any:
        name = key if index is None else f"{key}_{index}"
        dim = self.dims.get(name, self.dims[key])  # a copy's own override (``channels_2 = 256``) wins
        if isinstance(dim, PerChoice):
            dim = dim.dim_for(trial.params[dim.key])
        if isinstance(dim, Fixed):
            # A fixed value is still recorded as a (one-choice) parameter: every trial's params are complete.
            return trial.suggest_categorical(name, [dim.value])
        if isinstance(dim, Categorical):
            return trial.suggest_categorical(name, list(dim.choices))
        if isinstance(dim, IntRange):
            return trial.suggest_int(name, dim.low, dim.high, step=dim.step, log=dim.log)
        return trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)

    def param_for(self, name: str) -> tuple[str, Param] | None:
        """The declared key behind a trial parameter name (``channels_1`` -> ``channels``)."""
        if name in self.params:
            return name, self.params[name]
        base, _, idx = name.rpartition("_")
        per = self.params[base].per if base in self.params else None
        if per is not None and (idx.isdigit() or idx in {str(a) for a in self.params[per].allowed or ()}):
            return base, self.params[base]
        return None

    def check_fixed_value(self, name: str, value: Any) -> None:
        """An ``[[enqueue]]`` value must name a known parameter and lie inside its resolved distribution."""
        found = self.param_for(name)
        if found is None:
            raise ValueError("is not a parameter of this strategy")
        key, param = found
        value = param.check_value(value)
        # A copy is checked against its own override, a base name (which sets every copy) against each copy's.
        copies = [name] if name != key else [key, *(n for n in self.dims if self.param_for(n) == (key, param))]
        for copy in dict.fromkeys(copies):
            dim = self.dims.get(copy, self.dims[key])
            # A row's value is checked against every range of a PerChoice (the row's other keys are checked apart).
            dims = [d for _, d in dim.dims] if isinstance(dim, PerChoice) else [dim]
            if not any(_inside(value, d) for d in dims):
                named = copy if copy in self.dims else key  # the entry of [space] the value breaks
                raise ValueError(f"is outside this study's space for {named!r}: {describe(dim)}")

    def describe(self) -> dict[str, str]:
        return {key: describe(dim) for key, dim in self.dims.items()}

    def row_keys(self) -> list[str]:
        """What an ``[[enqueue]]`` row may name: each parameter, a per-layer one also as ``key_<i>`` (or
        ``key_<name>``)."""
        return [f"{k} (or {k}_<{'name' if self.params[p.per].allowed is not None else 'i'}>)" if (p.per is not None)
                else k for k, p in sorted(self.params.items())]

    def expand_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A per-layer key's base name in an [[enqueue]] row (``channels = 64``) sets every copy, as in ``[space]``:
        ``channels_0 .. channels_{n-1}`` with n the row's ``conv_layers``, or the most the space allows when the row
        does not fix it (Optuna ignores a fixed parameter a trial never suggests); for a key copied per name (zoo's
        ``input_size_<model>``), the row's model, or every model of the space. A copy the row names itself wins.
        Keys that are not per-layer parameters (the row's label, ...) are kept as they are."""
        out: dict[str, Any] = {}
        for key, value in row.items():
            param = self.params.get(key)
            if param is None or param.per is None:
                out[key] = value
                continue
            for copy in self._copies(param.per, row):
                name = f"{key}_{copy}"
                out[name] = row.get(name, value)
        return out

    def _copies(self, per: str, row: dict[str, Any]) -> list[str]:
        """The copies (``_0``, ``_1``, ... or ``_<name>``) of a key repeated per ``per`` that a trial of ``row`` may
        use."""
        named = self.params[per].allowed is not None
        dim = self.dims[per]
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


def _inside(value: Any, dim: Categorical | IntRange | FloatRange | Fixed) -> bool:
    if isinstance(dim, Fixed):
        return bool(value == dim.value)
    if isinstance(dim, Categorical):
        return value in dim.choices
    return dim.low <= value <= dim.high


def describe(dim: Dim) -> str:
    if isinstance(dim, PerChoice):
        return "; ".join(f"{dim.key} {_fmt(choice)}: {describe(d)}" for choice, d in dim.dims)
    if isinstance(dim, Fixed):
        return _fmt(dim.value)
    if isinstance(dim, Categorical):
        return "[" + ", ".join(_fmt(c) for c in dim.choices) + "]"
    extra = " log" if dim.log else f" step {dim.step}" if dim.step not in (None, 1) else ""
    return f"{_fmt(dim.low)}..{_fmt(dim.high)}{extra}"


def resolve_space(params: Mapping[str, Param], overrides: Mapping[str, Any], *, where: str) -> Space:
    """Defaults overridden by a ``[space]`` table; SpecError names ``where``, the key, the value and the rule."""
    dims: dict[str, Dim] = {key: p.default for key, p in params.items()}
    for key, raw in overrides.items():
        # A per-layer key's copy (``channels_1``) may have its own distribution; the base name sets every copy.
        found = Space(params, dims).param_for(key)
        if found is None:
            known = ", ".join(sorted(params))
            raise SpecError(f"{where}.{key}: unknown key; this strategy's space has: {known} (a per-layer key also "
                            "as key_<i>)")
        try:
            dims[key] = parse_dim(found[1], raw)
        except ValueError as e:
            raise SpecError(f"{where}.{key}: {_show(raw)} {e}") from None
    space = Space(params, dims)
    for key in overrides:
        base, param = space.param_for(key) or (key, params[key])
        if base != key and key.removeprefix(f"{base}_") not in space._copies(param.per or "", {}):
            raise SpecError(f"{where}.{key}: no trial has this copy: {param.per} is "
                            f"{describe(dims[param.per or ''])} in this space")
    return space


def _show(raw: Any) -> str:
    if isinstance(raw, Mapping):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in raw.items()) + "}"
    if isinstance(raw, list):
        return "[" + ", ".join(_show(v) for v in raw) + "]"
    return _fmt(raw)
