"""A real PostgreSQL server for tests: initdb in a temporary folder, loopback only, scram auth.

The server runs as the `postgres` OS user when the tests run as root (PostgreSQL refuses to
run as root), listens on 127.0.0.1 on a free port and on a unix socket in its folder, and lets
in only roles with a password (scram-sha-256). Tests connect as a CREATEDB role through a
password file, so no password travels in a DSN. Stopped by its PID (SIGINT: a fast shutdown)
and its folder removed.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from .poll import wait_until
from .services import ServiceError, free_port

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SERVICE_USER = "postgres"  # the OS user Debian's package creates
TEST_ROLE = "polyarch_test"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class PostgresServer:
    """A running test server; `dsn(name)` reaches one of its databases as the test role."""

    port: int
    role: str
    password: str = field(repr=False)  # kept out of pytest's failure reports
    passfile: Path  # libpq's password file format, mode 0600: host:port:db:user:password
    socket_dir: Path
    data_dir: Path
    log_path: Path
    pid: int

    def dsn(self, database: str = "postgres") -> str:
        """A URI without the password: libpq finds it in `passfile`."""
        return (
            f"postgresql://{self.role}@127.0.0.1:{self.port}/{database}"
            f"?passfile={quote(str(self.passfile), safe='/')}&connect_timeout=10"
        )

    def create_database(self, name: str) -> str:
        """A new empty database owned by the test role; returns its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drops a database, closing whatever sessions a failed test left open on it."""
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def server_binaries() -> Path:
    """The bin folder of the newest PostgreSQL installed the Debian way."""
    versions = sorted(
        (p for p in DEBIAN_ROOT.glob("*") if re.fullmatch(r"\d+", p.name)),
        key=lambda p: int(p.name),
    )
    for version in reversed(versions):
        if (version / "bin" / "postgres").is_file() and (version / "bin" / "initdb").is_file():
            return version / "bin"
    raise ServiceError(
        f"no PostgreSQL server under {DEBIAN_ROOT}/<version>/bin: "
        "run deploy/dev/bootstrap.sh (it installs Debian's postgresql package)"
    )


def _as_service_user() -> dict[str, object]:
    """Popen arguments that run the server as `postgres` when we are root, else as ourselves."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise ServiceError(
            f"no OS user {SERVICE_USER!r} to run PostgreSQL as (it refuses root): "
            "run deploy/dev/bootstrap.sh (Debian's postgresql package creates it)"
        ) from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _give_to_service_user(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVICE_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _initdb(binaries: Path, data_dir: Path, superuser_password: str, log: Path) -> None:
    pwfile = data_dir.parent / "initdb-password"
    pwfile.write_text(superuser_password + "\n")
    _give_to_service_user(pwfile)
    os.chmod(pwfile, 0o600)
    try:
        done = subprocess.run(
            [str(binaries / "initdb"), "-D", str(data_dir), "-U", "postgres",
             f"--pwfile={pwfile}", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
            cwd=data_dir.parent, env=_server_env(), **_as_service_user(),  # type: ignore[arg-type]
        )  # fmt: skip
    finally:
        pwfile.unlink()
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise ServiceError(f"initdb failed with exit {done.returncode}:\n{done.stderr[-3000:]}")


def _server_env() -> dict[str, str]:
    """No PG* variables of the caller leak into the server; LC_ALL keeps messages English."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**env, "LC_ALL": "C.UTF-8"}


def _ready(proc: subprocess.Popen[bytes], port: int, password: str, log: Path) -> bool:
    if proc.poll() is not None:
        raise ServiceError(f"postgres exited with {proc.returncode}: {log.read_text()[-3000:]}")
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", password=password, dbname="postgres",
        connect_timeout=2,
    ) as conn:  # fmt: skip
        return conn.execute("SELECT 1").fetchone() == (1,)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to the postmaster we started: PostgreSQL's fast shutdown; SIGKILL past a deadline."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _add_test_role(port: int, superuser_password: str, role: str, password: str) -> None:
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", password=superuser_password,
        dbname="postgres", autocommit=True,
    ) as admin:  # fmt: skip
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )


@contextmanager
def running_postgres(timeout: float = READY_TIMEOUT) -> Iterator[PostgresServer]:
    """Starts a throwaway server; stops it (by PID) and removes its folder on exit."""
    binaries = server_binaries()
    # Not pytest's tmp_path: its folders are private to root, and the server runs as postgres.
    work = Path(tempfile.mkdtemp(prefix="polyarch-pg-"))
    os.chmod(work, 0o755)  # the server user traverses it; the data dir inside stays 0700
    try:
        data_dir, socket_dir = work / "data", work / "socket"
        for folder in (data_dir, socket_dir):
            folder.mkdir(mode=0o700)
            _give_to_service_user(folder)
        superuser_password = secrets.token_urlsafe(18)
        _initdb(binaries, data_dir, superuser_password, work / "initdb.log")
        yield from _serve(binaries, work, data_dir, socket_dir, superuser_password, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _serve(
    binaries: Path, work: Path, data_dir: Path, socket_dir: Path, superuser_password: str,
    timeout: float,
) -> Iterator[PostgresServer]:  # fmt: skip
    for attempt in range(5):
        port = free_port()
        log_path = work / f"postgres-{attempt}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(binaries / "postgres"), "-D", str(data_dir), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={socket_dir}",
                 "-c", "max_connections=60"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=_server_env(), cwd=work, **_as_service_user(),  # type: ignore[arg-type]
            )  # fmt: skip
        try:
            try:
                wait_until(
                    partial(_ready, proc, port, superuser_password, log_path),
                    timeout=timeout,
                    message=f"postgres on 127.0.0.1:{port} ready (log: {log_path})",
                    ignore=(psycopg.OperationalError,),
                )
            except ServiceError:
                if "could not bind" in log_path.read_text():
                    continue  # lost the port to someone else; try another
                raise
            role_password = secrets.token_urlsafe(18)
            _add_test_role(port, superuser_password, TEST_ROLE, role_password)
            passfile = work / "pgpass"
            passfile.write_text(f"127.0.0.1:{port}:*:{TEST_ROLE}:{role_password}\n")
            os.chmod(passfile, 0o600)  # libpq ignores a password file others can read
            yield PostgresServer(
                port=port, role=TEST_ROLE, password=role_password, passfile=passfile,
                socket_dir=socket_dir, data_dir=data_dir, log_path=log_path, pid=proc.pid,
            )  # fmt: skip
            return
        finally:
            _stop(proc)
    raise ServiceError("could not bind a PostgreSQL port after 5 attempts")
