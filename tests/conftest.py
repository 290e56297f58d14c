"""Session-wide real services (registries, base image, dockerd) and marker wiring for all tests.

Expensive services start once per session; tests isolate themselves with
`unique_repo`. Everything listens on, and is reached through, 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import pytest

from tests.support import services
from tests.support.postgres import PostgresServer, running_postgres
from tests.support.services import Registry, ServiceError

# testcontainers' reaper (Ryuk) is an image on Docker Hub, which CI can't pull.
os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"


def _keep_loopback_off_proxies() -> None:
    """A proxy configured for package downloads must never carry test traffic to 127.0.0.1."""
    loopback = ["127.0.0.1", "localhost", "::1"]
    for name in ("NO_PROXY", "no_proxy"):
        present = [h for h in os.environ.get(name, "").split(",") if h]
        os.environ[name] = ",".join(present + [h for h in loopback if h not in present])


_keep_loopback_off_proxies()

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test under tests/integration/ as `integration` (select with -m)."""
    for item in items:
        if INTEGRATION_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


def _fail_on_service_error(exc: ServiceError) -> NoReturn:
    # pytrace=False: the message already says what broke and how to fix it.
    pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """An anonymous plain-HTTP registry on 127.0.0.1 (delete enabled), shared by the session."""
    try:
        with services.running_registry(tmp_path_factory.mktemp("registry")) as reg:
            yield reg
    except ServiceError as exc:
        _fail_on_service_error(exc)


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Like `registry` but with htpasswd (bcrypt) basic auth; see .username/.password."""
    credentials = ("polyarch-test", "pw-" + secrets.token_hex(12))
    try:
        with services.running_registry(
            tmp_path_factory.mktemp("auth-registry"), credentials=credentials
        ) as reg:
            yield reg
    except ServiceError as exc:
        _fail_on_service_error(exc)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server on 127.0.0.1 (scram auth), shared by the session."""
    try:
        with running_postgres() as server:
            yield server
    except ServiceError as exc:
        _fail_on_service_error(exc)


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A DSN (no password: a password file) of a new empty database, dropped after the test."""
    name = f"test_{secrets.token_hex(6)}"
    dsn = postgres_server.create_database(name)
    yield dsn
    postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def base_image(registry: Registry) -> str:
    """ "127.0.0.1:PORT/polyarch/busybox:latest": linux/amd64, linux/arm64, linux/arm/v7 busybox.

    Built offline by deploy/dev/base-image.sh and pushed into `registry`.
    """
    try:
        return services.build_base_image(registry.address)
    except ServiceError as exc:
        _fail_on_service_error(exc)


@pytest.fixture(scope="session")
def debian_bases(registry: Registry) -> Iterator[dict[str, Future[str]]]:
    """The two Debian bases of polyarch's own images, started side by side as soon as either
    is needed: "python" (python-base.sh) and "agent" (agent-base.sh). A cold run of each spends
    most of its time on one core (arm64's package scripts under QEMU), so both together take
    about as long as the slower one alone. Teardown waits for both."""
    with ThreadPoolExecutor(2, thread_name_prefix="debian-base") as pool:
        yield {
            "python": pool.submit(services.build_python_base, registry.address),
            "agent": pool.submit(services.build_agent_base, registry.address),
        }


@pytest.fixture(scope="session")
def python_base_image(debian_bases: dict[str, Future[str]]) -> str:
    """ "127.0.0.1:PORT/polyarch/python-base:bookworm": linux/amd64 and linux/arm64 Debian
    minbase with python3, for images of polyarch itself (deploy/docker/).

    Built offline by deploy/docker/python-base.sh and pushed into `registry`. Its rootfs tars
    and images are cached on disk (/var/cache/polyarch, buildah storage), so only the first
    session on a machine pays for mmdebstrap; later ones push in seconds.
    """
    try:
        return debian_bases["python"].result()
    except ServiceError as exc:
        _fail_on_service_error(exc)


@pytest.fixture(scope="session")
def agent_base_image(debian_bases: dict[str, Future[str]]) -> str:
    """ "127.0.0.1:PORT/polyarch/agent-base:bookworm": the python base with buildah, uidmap,
    libcap2-bin and ca-certificates from Debian, for the agent image (agent.Dockerfile).

    Built offline by deploy/docker/agent-base.sh (python-base.sh with more packages, under
    its own cache key), cached on disk the same way.
    """
    try:
        return debian_bases["agent"].result()
    except ServiceError as exc:
        _fail_on_service_error(exc)


@pytest.fixture(scope="session")
def docker_binary() -> str:
    """The Docker CLI to use: $POLYARCH_DOCKER or the Debian 20.10 client /usr/bin/docker."""
    return services.docker_binary()


@pytest.fixture(scope="session")
def docker_available(docker_binary: str) -> str:
    """Fails (never skips) when dockerd doesn't answer; returns the Docker CLI path."""
    problem = services.docker_problem(docker_binary)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    return docker_binary


_SLUG_UNSAFE = re.compile(r"[^a-z0-9]+")


@pytest.fixture
def unique_repo(request: pytest.FixtureRequest) -> str:
    """A repository name no other test (or earlier run) uses: polyarch-test/<test-slug>-<random>."""
    slug = _SLUG_UNSAFE.sub("-", request.node.name.lower()).strip("-")[:40].strip("-") or "test"
    return f"polyarch-test/{slug}-{secrets.token_hex(4)}"
