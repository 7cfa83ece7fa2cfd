"""Property tests (Hypothesis): any TOML value for any key of a study file, its [space] and its [[enqueue]]
entries gives a valid spec or a one-line SpecError, never another exception; and the CLI answers wrong option
values, missing values, unknown studies, missing files and unreachable storage with one line and exit 2 (1 for
storage that cannot be reached), never a traceback."""

from __future__ import annotations

import datetime as dt
import json
import tomllib
from pathlib import Path
from typing import Any

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpsearch._errors import SpecError
from hpsearch.spec import TOP_KEYS, StudySpec, load_spec, spec_from_dict
from hpsearch.strategies import STRATEGIES
from tests.conftest import study_text

# ---------------------------------------------------------------- arbitrary TOML values

SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, 3, -1, 10_000, 2**31, 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1e-9, 1e300, -0.0]),
    st.text(max_size=12),
    st.sampled_from(["", "tpe", "median", "adam", "sgd", "same", "auto", "sobol", "max", "cosine", "scratch",
                     "zoo", "finetune", "synthetic", "mnist", "folder:x", "resnet18", "none", "hyperband"]),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)),
    st.dates(),
    st.times(),
)
TOML_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["low", "high", "log", "step", "type", "x", "percentile",
                                                             "n_startup_trials", "min_resource", "qmc_type"]),
                                            inner, max_size=4)),
    max_leaves=8,
)
BASE = tomllib.loads(study_text())
SPACE_KEYS = sorted({k for s in STRATEGIES.values() for k in s.params} | {"channels_0", "fc_width_1", "nope"})

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(data: dict[str, Any]) -> None:
    try:
        spec = spec_from_dict(data, where="s.toml")
    except SpecError as e:
        message = str(e)
        assert message.startswith("s.toml") and "\n" not in message and len(message) < 2000, message
        return
    assert isinstance(spec, StudySpec)
    json.dumps(spec.to_dict())  # what is stored on the study: must be plain JSON


@FUZZ
@given(key=st.sampled_from([*TOP_KEYS, "extra"]), value=TOML_VALUES)
def test_any_value_for_any_top_level_key(key: str, value: Any):
    _check({**BASE, key: value})


@FUZZ
@given(strategy=st.sampled_from(sorted(STRATEGIES)), space=st.dictionaries(st.sampled_from(SPACE_KEYS), TOML_VALUES,
                                                                           max_size=4))
def test_any_space_table(strategy: str, space: dict[str, Any]):
    _check({**BASE, "strategy": strategy, "space": space})


@FUZZ
@given(entries=st.lists(st.dictionaries(st.sampled_from(SPACE_KEYS), TOML_VALUES, max_size=4), max_size=3))
def test_any_enqueue_entries(entries: list[dict[str, Any]]):
    _check({**BASE, "enqueue": entries})


@FUZZ
@given(text=st.text(max_size=80))
def test_any_text_as_a_study_file(tmp_path_factory: pytest.TempPathFactory, text: str):
    path = tmp_path_factory.mktemp("f") / "s.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_spec(path)
    except SpecError as e:
        assert "\n" not in str(e), str(e)


# ---------------------------------------------------------------- the CLI's options

UNREACHABLE = "postgresql+psycopg://u:pw@127.0.0.1:1/none"  # port 1: connection refused at once


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A study file and an SQLite database holding study 's' (made with Optuna, no training)."""
    (tmp_path / "study.toml").write_text(study_text())
    optuna.create_study(study_name="s", storage="sqlite:///hpsearch.db", direction="maximize")
    return {"study": str(tmp_path / "study.toml")}


def _one_line(result: Any, code: int) -> None:
    assert result.code == code, result
    assert result.err.startswith("error: ") and result.err.count("\n") == 1, result
    assert "Traceback" not in result.err + result.out


CASES: dict[str, list[tuple[list[str], int]]] = {
    "run": [
        (["{study}", "--n-trials", "x"], 2), (["{study}", "--n-trials", "-1"], 2), (["{study}", "--timeout", "abc"], 2),
        (["{study}", "--threads", "0"], 2), (["{study}", "--workers", "two"], 2), (["{study}", "--device", "gpu7"], 2),
        (["{study}", "--device"], 2), (["{study}", "--storage"], 2), (["missing.toml"], 2), ([], 2),
        (["{study}", "--storage", "nonsense://"], 2), (["{study}", "--storage", "sqlite:///no/dir/x.db"], 2),
        (["{study}", "--bogus"], 2), (["{study}", "--storage", UNREACHABLE], 1),
    ],
    "worker": [
        (["nope"], 2), ([], 2), (["s", "--n-trials", "0"], 2), (["s", "--storage", "sqlite:///missing.db"], 2),
        (["s", "--timeout", "-5"], 2), (["s", "--storage", UNREACHABLE], 1),
    ],
    "studies": [
        (["--storage", "sqlite:///missing.db"], 2), (["--storage", "not a url"], 2), (["extra"], 2),
        (["--storage", UNREACHABLE], 1),
    ],
    "show": [
        (["nope"], 2), ([], 2), (["s", "--top", "0"], 2), (["s", "--top", "many"], 2), (["s", "--json=yes"], 2),
        (["s", "--storage", "sqlite:///missing.db"], 2), (["s", "--storage", UNREACHABLE], 1),
    ],
    "export": [
        (["nope", "--out", "x.csv"], 2), (["s"], 2), (["s", "--out"], 2), (["s", "--out", "x.txt"], 2),
        (["s", "--out", "no/such/dir/x.csv"], 1), (["s", "--out", "x.csv", "--storage", "sqlite:///missing.db"], 2),
        (["s", "--out", "x.csv", "--storage", UNREACHABLE], 1),
    ],
    "delete": [
        (["nope", "--yes"], 2), ([], 2), (["s"], 2), (["s", "--yes", "--storage", "sqlite:///missing.db"], 2),
        (["s", "--yes", "--storage", UNREACHABLE], 1),
    ],
    "dashboard": [
        (["--port", "0"], 2), (["--port", "http"], 2), (["--host"], 2), (["--storage", "sqlite:///missing.db"], 2),
        (["--storage", UNREACHABLE], 1),
    ],
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_cli_bad_options_are_one_line(command: str, run_cli, env: dict[str, str]):
    for args, code in CASES[command]:
        result = run_cli(command, *[a.format(**env) for a in args])
        try:
            _one_line(result, code)
        except AssertionError as e:
            raise AssertionError(f"hpsearch {command} {' '.join(args)}: {e}") from None
