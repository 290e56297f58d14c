"""--database / --database-file: a password never on the command line, never in a log line."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from polyarch.coordinator.config import (
    ConfigError,
    CoordinatorConfig,
    add_coordinator_flags,
    config_from,
)
from polyarch.coordinator.core.postgres_store import PostgresStore
from polyarch.coordinator.core.store import StoreError
from polyarch.coordinator.database_address import redacted_dsn
from polyarch.coordinator.server import EXIT_USAGE, Coordinator, run_coordinator
from tests.support.postgres import PostgresServer

SECRET = "s3cret-Pa55"
WITH_PASSWORDS = [
    f"postgresql://polyarch:{SECRET}@db.example:5432/polyarch",
    f"host=db.example user=polyarch password={SECRET} dbname=polyarch",
    f"postgresql://polyarch@db.example/polyarch?sslpassword={SECRET}",
]


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_coordinator_flags(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("dsn", WITH_PASSWORDS)
def test_a_password_on_the_command_line_is_refused_and_never_repeated(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from(parsed("--database", dsn))
    message = str(refused.value)
    assert message.startswith("--database holds a ")
    assert "--database-file" in message and "PGPASSFILE or PGPASSWORD" in message
    assert SECRET not in message
    caplog.set_level(logging.DEBUG)
    assert run_coordinator(parsed("--database", dsn)) == EXIT_USAGE  # logged, then exit 2
    assert "--database holds a " in caplog.text and SECRET not in caplog.text


def test_the_config_file_database_may_not_hold_a_password_either(tmp_path: Path) -> None:
    config_file = tmp_path / "coordinator.toml"
    config_file.write_text(f'[coordinator]\ndatabase = "{WITH_PASSWORDS[0]}"\n')
    with pytest.raises(ConfigError) as refused:
        config_from(parsed("--config", str(config_file)))
    assert str(refused.value).startswith(f"database in {config_file} holds a password")
    assert SECRET not in str(refused.value)


def test_bad_database_settings_are_named(tmp_path: Path) -> None:
    dsn_file = tmp_path / "database.dsn"
    dsn_file.write_text(WITH_PASSWORDS[0] + "\n")
    cases = {
        ("--database", "postgresql://a@h/db", "--database-file", str(dsn_file)):
            "give the database as --database or as --database-file, not both",
        ("--database-file", str(tmp_path / "missing")):
            f"cannot read --database-file {tmp_path / 'missing'}: No such file or directory",
        ("--database", f"host=h password={SECRET} junk"):
            "--database is not a PostgreSQL connection string: expected "
            "postgresql://USER@HOST:PORT/DATABASE or libpq key=value pairs",
        ("--database", " "): "--database is empty",
    }  # fmt: skip
    for argv, expected in cases.items():
        with pytest.raises(ConfigError) as refused:
            config_from(parsed(*argv))
        assert str(refused.value).startswith(expected), argv
        assert SECRET not in str(refused.value)
    config = config_from(parsed("--database-file", str(dsn_file)))
    assert (config.database, config.database_file) == ("", dsn_file)  # read again at start
    assert SECRET not in repr(config)


def test_a_redacted_address_keeps_where_and_drops_every_secret() -> None:
    assert [redacted_dsn(dsn) for dsn in WITH_PASSWORDS] == [
        "postgresql://polyarch@db.example:5432/polyarch",
        "postgresql://polyarch@db.example/polyarch",
        "postgresql://polyarch@db.example/polyarch",
    ]
    assert redacted_dsn("dbname=state") == "postgresql://(local socket)/state"
    assert redacted_dsn(f"password={SECRET} nonsense") == "(an unreadable connection string)"


def dsn_with_password(server: PostgresServer, database_dsn: str, password: str) -> str:
    database = conninfo_to_dict(database_dsn)["dbname"]
    return f"postgresql://{server.role}:{password}@127.0.0.1:{server.port}/{database}"


def coordinator_with(tmp_path: Path, **database: object) -> Coordinator:
    return Coordinator(
        CoordinatorConfig(
            listen="127.0.0.1:0", data_dir=tmp_path / "coordinator", metrics_listen="",
            insecure=True, **database,  # type: ignore[arg-type]
        )
    )  # fmt: skip


async def test_a_database_file_holds_the_password_and_no_log_line_shows_it(
    tmp_path: Path,
    postgres_server: PostgresServer,
    postgres_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    dsn_file = tmp_path / "database.dsn"
    dsn_file.write_text(dsn_with_password(postgres_server, postgres_dsn, postgres_server.password))
    dsn_file.chmod(0o600)
    coordinator = coordinator_with(tmp_path, database_file=dsn_file)
    await coordinator.start()
    try:
        assert coordinator.manager is not None
        assert isinstance(coordinator.manager.store, PostgresStore)
        address = f"postgresql://{postgres_server.role}@127.0.0.1:{postgres_server.port}/"
        assert f"build state in {address}" in caplog.text
    finally:
        await coordinator.stop(grace=0)
    wrong = "Wr0ng-" + postgres_server.password
    dsn_file.write_text(dsn_with_password(postgres_server, postgres_dsn, wrong))
    refused = coordinator_with(tmp_path, database_file=dsn_file)
    with pytest.raises(StoreError) as failed:
        await refused.start()
    assert "password authentication failed" in str(failed.value)
    assert wrong not in str(failed.value)
    assert postgres_server.password not in caplog.text and wrong not in caplog.text


async def test_pgpassword_in_the_environment_works_with_a_dsn_without_one(
    tmp_path: Path,
    postgres_server: PostgresServer,
    postgres_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bare = postgres_dsn.split("?")[0]  # no passfile: the password comes from PGPASSWORD
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))  # no ~/.pgpass either
    config = config_from(parsed("--database", bare, "--data-dir", str(tmp_path / "c")))
    assert config.database == bare
    coordinator = coordinator_with(tmp_path, database=bare)
    await coordinator.start()
    try:
        assert coordinator.manager is not None
        assert isinstance(coordinator.manager.store, PostgresStore)
        assert await coordinator.manager.store.unfinished_builds() == []
    finally:
        await coordinator.stop(grace=0)
