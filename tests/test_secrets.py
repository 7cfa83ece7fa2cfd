"""A password in a storage URL never appears in any output: stdout, stderr, log records or exceptions, whether
the database refuses the connection, the URL cannot be parsed, or the run succeeds."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest

from tests.conftest import spawn_cli
from tests.test_services import pg_url  # noqa: F401  (fixture)

SECRET = "s3cretPW"
URLS = [
    # PostgreSQL (trust authentication on 127.0.0.1 accepts any password of a known role): a missing database,
    # a role that does not exist, a port that is not a number, braces that Optuna would take for a template.
    f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:5432/nonexist",
    f"postgresql+psycopg://nouser_hpsearch:{SECRET}@127.0.0.1:5432/postgres",
    f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:badport/nonexist",
    "postgresql+psycopg://postgres:s3{cret}PW@127.0.0.1:5432/nonexist",
    # MariaDB checks the password: a wrong one is refused.
    f"mysql+pymysql://root:{SECRET}@127.0.0.1:3306/nonexist",
    # A proxy URL takes no credentials at all.
    f"grpc://user:{SECRET}@127.0.0.1:13000",
]
COMMANDS = [
    ["run", "study.toml"],
    ["worker", "tiny"],
    ["studies"],
    ["show", "tiny"],
    ["export", "tiny", "--out", "x.csv"],
    ["delete", "tiny", "--yes"],
    ["dashboard", "--port", "1"],
    ["proxy", "--port", "1"],
]


def secrets_of(url: str) -> list[str]:
    # For the braces URL: neither the whole password nor the part between the braces.
    return [SECRET] if SECRET in url else ["s3{cret}PW", "cret"]


@pytest.mark.parametrize("url", URLS, ids=["pg-nodb", "pg-norole", "pg-badport", "pg-braces", "mysql", "grpc"])
def test_password_never_in_output(url: str, run_cli, write_study, caplog: pytest.LogCaptureFixture):
    write_study()
    caplog.set_level(logging.DEBUG)
    for command in COMMANDS:
        try:
            r = run_cli(*command, "--storage", url)
        except Exception as e:  # an uncaught exception would end as a traceback on the terminal
            shown = "".join(traceback.format_exception(e))
            assert all(s not in shown for s in secrets_of(url)), shown
            raise AssertionError(f"{command}: uncaught {shown}") from None
        text = r.out + r.err + caplog.text
        assert all(s not in text for s in secrets_of(url)), (command, text)
        assert r.code in (1, 2), (command, r)
        assert r.err.startswith("error: ") and r.err.count("\n") == 1, (command, r.err)
        caplog.clear()


def test_password_never_in_output_of_a_run(write_study, tmp_path: Path, pg_url: str):  # noqa: F811
    # Trust authentication: the wrong password is accepted, the run succeeds, and still prints no password.
    url = pg_url.replace("postgres@", f"postgres:{SECRET}@")
    path = write_study(n_trials=1, epochs=1)
    proc = spawn_cli("run", str(path), "--storage", url, cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert SECRET not in out + err
    show = spawn_cli("show", "tiny", "--json", "--storage", url, cwd=tmp_path)
    out, err = show.communicate(timeout=120)
    assert show.returncode == 0, err
    assert SECRET not in out + err
