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
from hpsearch._knobs import PRUNER_KNOBS, SAMPLER_KNOBS, Fail, algorithm, check_rung_pruner
from hpsearch._secrets import redact_url
from hpsearch.data import check_dataset_name
from hpsearch.space import Space, resolve_space
from hpsearch.strategies import STRATEGIES

# Keys of an [[enqueue]] row that describe it rather than set a parameter: stored as the trial's user attrs.
ENQUEUE_META = ("label", "paper_accuracy")
TOP_KEYS = ("name", "dataset", "strategy", "epochs", "n_trials", "timeout", "max_seconds_per_epoch", "max_flops",
            "val_fraction", "train_fraction",
            "sampler", "pruner", "seed", "tta", "rungs", "final", "target", "warm_start", "space", "enqueue")
TTA_LEVELS = ("none", "flip", "flip-translate")  # hpsearch.accuracy.tta_logits
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
    """The study file's content -> a StudySpec; each step raises a SpecError naming ``where``, the key, the value and
    the rule. The steps run in the file's reading order, so a file with several mistakes reports the first."""
    fail = _failer(where)
    _check_top_keys(data, where)
    name, dataset, strategy = _identity(data, where, fail)
    epochs = _number(data, "epochs", int, 1, 10_000, fail)
    n_trials, timeout = _budget(data, where, fail)
    max_seconds = (float(_number(data, "max_seconds_per_epoch", (int, float), 0.001, None, fail))
                   if "max_seconds_per_epoch" in data else None)
    max_flops = _number(data, "max_flops", int, 1, None, fail) if "max_flops" in data else None
    val_fraction, train_fraction = _fractions(data, fail)
    seed = _number(data, "seed", int, 0, 2**32 - 1, fail) if "seed" in data else 0
    sampler, pruner, rungs = _algorithms(data, epochs, fail)
    tta = data.get("tta", "none")
    if not isinstance(tta, str) or tta not in TTA_LEVELS:
        raise fail("tta", tta, f"is not known; allowed: {', '.join(TTA_LEVELS)}")
    final_epochs, final_fraction = _final(data.get("final", {}), fail)
    target = _target(data.get("target"), fail)
    warm_start = _warm_start(data["warm_start"], name, fail) if "warm_start" in data else None
    overrides, space = _space(data, strategy, where, fail)
    enqueue = _enqueue(data.get("enqueue", []), space, where, fail)
    _check_enqueued_sampler(sampler, enqueue, n_trials, fail)
    return StudySpec(
        name=name, dataset=dataset, strategy=strategy, epochs=epochs, n_trials=n_trials, timeout=timeout,
        max_seconds_per_epoch=max_seconds, max_flops=max_flops, val_fraction=val_fraction,
        train_fraction=train_fraction, sampler=sampler, pruner=pruner, seed=seed,
        space_overrides=overrides, enqueue=enqueue, space=space, tta=tta, rungs=rungs,
        final_epochs=final_epochs, final_train_fraction=final_fraction, target=target, warm_start=warm_start,
    )


def _failer(where: str) -> Fail:
    """The error of one bad value: ``FILE: key = value rule``."""

    def fail(key: str, value: Any, rule: str) -> SpecError:
        return SpecError(f"{where}: {key} = {_show(value)} {rule}")
    return fail


def _check_top_keys(data: dict[str, Any], where: str) -> None:
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(TOP_KEYS)}")
    for key in ("name", "dataset", "strategy", "epochs"):
        if key not in data:
            raise SpecError(f"{where}: missing required key {key!r}")


def _identity(data: dict[str, Any], where: str, fail: Fail) -> tuple[str, str, str]:
    """(name, dataset, strategy)."""
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
    return name, dataset, strategy


def _budget(data: dict[str, Any], where: str, fail: Fail) -> tuple[int | None, float | None]:
    """(n_trials, timeout): at least one of them."""
    n_trials = _number(data, "n_trials", int, 1, 1_000_000, fail) if "n_trials" in data else None
    timeout = float(_number(data, "timeout", (int, float), 1, None, fail)) if "timeout" in data else None
    if n_trials is None and timeout is None:
        raise SpecError(f"{where}: give n_trials and/or timeout (seconds): without either a study never ends")
    return n_trials, timeout


def _fractions(data: dict[str, Any], fail: Fail) -> tuple[float, float]:
    """(val_fraction, train_fraction)."""
    val_fraction = data.get("val_fraction", 0.1)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
        raise fail("val_fraction", val_fraction, "must be a number with 0 < val_fraction < 1")
    train_fraction = data.get("train_fraction", 1.0)
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, int | float) or not 0 < train_fraction <= 1:
        raise fail("train_fraction", train_fraction, "must be a number with 0 < train_fraction <= 1")
    return float(val_fraction), float(train_fraction)


def _algorithms(data: dict[str, Any], epochs: int,
                fail: Fail) -> tuple[dict[str, Any], dict[str, Any], tuple[Rung, ...]]:
    """(sampler, pruner, rungs): with rungs the pruner defaults to successive halving, and must promote by it."""
    sampler = algorithm(data.get("sampler", "tpe"), "sampler", SAMPLER_KNOBS, fail)
    rungs = _rungs(data.get("rungs", []), epochs, fail)
    pruner = algorithm(data.get("pruner", "successive-halving" if rungs else "median"), "pruner", PRUNER_KNOBS, fail)
    if rungs:
        check_rung_pruner(pruner, fail)
    elif pruner.get("bootstrap_count") and not isinstance(pruner.get("min_resource"), int):
        raise fail("pruner.bootstrap_count", pruner["bootstrap_count"], "needs an integer min_resource (Optuna counts "
                   'the trials at a rung only once the rungs are sized; "auto" sizes them later)')
    return sampler, pruner, rungs


def _target(target: Any, fail: Fail) -> float | None:
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)
                               or not 0 < target <= 1):
        raise fail("target", target, "must be a validation accuracy with 0 < target <= 1")
    return None if target is None else float(target)


def _space(data: dict[str, Any], strategy: str, where: str, fail: Fail) -> tuple[dict[str, Any], Space]:
    """(the ``[space]`` table as written, the strategy's space with it applied and the strategy's own check passed)."""
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
    return overrides, space


def _enqueue(enqueue: Any, space: Space, where: str, fail: Fail) -> tuple[dict[str, Any], ...]:
    """The ``[[enqueue]]`` rows, each value checked against the space, per-layer keys expanded (Space.expand_row)."""
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise fail("enqueue", enqueue, "must be an array of tables ([[enqueue]])")
    for i, params in enumerate(enqueue):
        for key, value in params.items():
            if key in ENQUEUE_META:
                _check_meta(key, value, f"{where}: enqueue[{i}].{key} = {_show(value)}")
                continue
            if space.param_for(key) is None:
                raise SpecError(f"{where}: enqueue[{i}].{key} = {_show(value)} is not a parameter of this strategy; "
                                f"allowed: {', '.join([*space.row_keys(), *ENQUEUE_META])}")
            try:
                space.check_fixed_value(key, value)
            except ValueError as e:
                raise SpecError(f"{where}: enqueue[{i}].{key} = {_show(value)} {e}") from None
    return tuple(space.expand_row(row) for row in enqueue)


def _check_enqueued_sampler(sampler: dict[str, Any], enqueue: tuple[dict[str, Any], ...], n_trials: int | None,
                            fail: Fail) -> None:
    """Sampler "enqueued" never samples: it needs rows, and no more trials than rows."""
    if sampler["type"] != "enqueued":
        return
    if not enqueue:
        raise fail("sampler", "enqueued", "replays [[enqueue]] rows, but the file has none")
    if n_trials is None or n_trials > len(enqueue):
        raise fail("n_trials", n_trials, f'must be given and <= the {len(enqueue)} [[enqueue]] rows with sampler '
                   '"enqueued" (it never samples)')


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


def _check_meta(key: str, value: Any, where: str) -> None:
    if key == "label" and (not isinstance(value, str) or not value.strip()):
        raise SpecError(f"{where} must be a non-empty string (the row's name in reports)")
    if key == "paper_accuracy" and (
        isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1
    ):
        raise SpecError(f"{where} must be a number with 0 <= paper_accuracy <= 1 (the accuracy a report gave)")


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


def _show(value: Any) -> str:
    # default=str: TOML dates and times have no JSON form; shown as their ISO text.
    return json.dumps(value, default=str) if not isinstance(value, float) or math.isfinite(value) else str(value)
