"""Commands that do not train start without importing torch (it takes seconds), and Click's usage errors are
one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

# Runs the CLI in a fresh interpreter and reports which heavy modules it imported. optuna_dashboard.run_server is
# replaced so that `dashboard` returns instead of serving.
PROBE = """
import json, sys
import optuna_dashboard
optuna_dashboard.run_server = lambda *a, **k: None
from hpsearch.cli import main
sys.argv = ["hpsearch", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "torchvision") if m in sys.modules)}),
      file=sys.stderr)
"""


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return url


@pytest.mark.parametrize("args", [
    ["--help"], ["run", "--help"], ["studies"], ["show", "s"], ["show", "s", "--json"],
    ["export", "s", "--out", "e.csv"], ["delete", "s", "--yes"], ["dashboard"],
])
def test_commands_that_do_not_train_do_not_import_torch(args: list[str], db: str, tmp_path: Path):
    env_args = [*args, "--storage", db] if args[-1] != "--help" else args
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(env_args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["run", "s.toml", "--n-trials", "0"], "error: --n-trials '0': input should be greater than or equal to 1\n"),
    (["run", "s.toml", "--n-trials=-3"], "error: --n-trials '-3': input should be greater than or equal to 1\n"),
    (["show", "s", "--top", "abc"],
     "error: --top 'abc': input should be a valid integer, unable to parse string as an integer\n"),
    (["dashboard", "--port", "70000"], "error: --port '70000': input should be less than or equal to 65535\n"),
    (["run", "s.toml", "--workerz", "2"], "error: No such option: --workerz (Possible options: --force, --workers)\n"),
    (["run", "s.toml", "--device"], "error: Option '--device' requires an argument\n"),
    (["export", "s"], "error: Missing option '--out'\n"),
    (["show"], "error: Missing argument 'name'\n"),
    (["frobnicate"], "error: No such command 'frobnicate'\n"),
])
def test_usage_errors_are_one_line_with_exit_2(run_cli, args: list[str], message: str):
    result = run_cli(*args)
    assert (result.code, result.err, result.out) == (2, message, "")
