"""A password in a storage URL never appears in any output: stdout, stderr, log records or exceptions, whether
the database refuses the connection, the URL cannot be parsed, or the run succeeds."""

from __future__ import annotations

import logging
import string
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ---------------------------------------------------------------- any password, every command (issue #27, item 1)

REPO = Path(__file__).resolve().parents[1]
# Every printable character, space included: people type @, :, / and % into passwords without escaping them.
PASSWORD_CHARS = string.printable.replace("\t", "").replace("\n", "").replace("\r", "").replace("\x0b", "").replace(
    "\x0c", "")
EVERY_COMMAND = [
    *COMMANDS,
    ["create", "study.toml"],
    ["evaluate", "tiny"],
    ["report", "tiny", "--out", "r"],
    ["reproduce", str(REPO / "studies" / "report" / "cifar10-table3.toml")],
]
# Port 1 refuses at once: every command gets as far as opening the database, and no further.
UNREACHABLE = {"postgresql": "postgresql+psycopg://u:{}@127.0.0.1:1/db", "mysql": "mysql+pymysql://u:{}@127.0.0.1:1/db",
               "grpc": "grpc://u:{}@127.0.0.1:1"}


def readable_secrets(password: str) -> set[str]:
    """The password and every part of it that a parser stopping at one of @ : / would show as a host, user or path:
    none may appear in output (parts of 5 characters and more: shorter ones occur in ordinary words)."""
    parts = {password}
    for sep in "@:/":
        parts.update(p for piece in list(parts) for p in piece.split(sep))
    return {p for p in parts if len(p) >= 5}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(password=st.one_of(st.text(PASSWORD_CHARS, min_size=8, max_size=24),
                          st.sampled_from(["s3cret@pw@pw2@xyzzy", "abcde:fghij/klmno@pqrst", "pass%40word@@host",
                                           "{cret}@12345@", "?x=1#frag@hostname"])),
       driver=st.sampled_from(sorted(UNREACHABLE)), via_env=st.booleans())
def test_any_password_is_masked_on_every_command(run_cli, write_study, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture, password: str, driver: str,
                                                 via_env: bool):
    write_study()
    caplog.set_level(logging.DEBUG)
    url = UNREACHABLE[driver].format(password)
    secrets = readable_secrets(password)
    for command in EVERY_COMMAND:
        if via_env:
            monkeypatch.setenv("HPSEARCH_STORAGE", url)
            r = run_cli(*command)
        else:
            r = run_cli(*command, "--storage", url)
        text = r.out + r.err + caplog.text
        shown = [s for s in secrets if s in text]
        assert not shown, (command, shown, text)
        assert r.code in (1, 2) and r.err.startswith("error: ") and r.err.count("\n") == 1, (command, r)
        caplog.clear()


def test_a_password_with_an_at_sign_is_the_password_the_user_typed():
    from sqlalchemy.engine import make_url

    from hpsearch._secrets import redact_url
    from hpsearch.storage import storage_url

    url = storage_url("postgresql+psycopg://u:s3cret@pw@127.0.0.1:5432/db")
    parsed = make_url(url)
    assert (parsed.password, parsed.host, parsed.database) == ("s3cret@pw", "127.0.0.1", "db")
    assert redact_url("postgresql+psycopg://u:s3cret@pw@127.0.0.1:1/db") == "postgresql+psycopg://u:***@127.0.0.1:1/db"
    assert redact_url("postgresql+psycopg://u@h/db?password=s3cret&x=1") == "postgresql+psycopg://u@h/db?password=***&x=1"
