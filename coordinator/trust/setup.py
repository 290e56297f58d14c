"""Opens a coordinator's trust: its store, its TLS (own, shared or operator's CA), its tokens."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from polyarch.coordinator.trust.auth import TokenBook
from polyarch.coordinator.trust.pki import (
    CAMaterial,
    CertificateAuthority,
    ServerTLS,
    new_ca,
    operator_tls,
)
from polyarch.coordinator.trust.postgres_trust import PostgresTrustStore
from polyarch.coordinator.trust.store import SQLiteTrustStore, TrustStore, read_sqlite_trust

if TYPE_CHECKING:
    from polyarch.coordinator.config import CoordinatorConfig

log = logging.getLogger(__name__)


@dataclass
class Trust:
    """What the server wires in. tokens, authority and server_tls are None with --insecure;
    authority is None with an operator's PKI."""

    store: TrustStore
    tokens: TokenBook | None = None
    authority: CertificateAuthority | None = None
    server_tls: ServerTLS | None = None

    async def close(self) -> None:
        if isinstance(self.store, PostgresTrustStore):
            await self.store.aclose()
        else:
            self.store.close()


async def open_trust(cfg: CoordinatorConfig, dsn: str, names: list[str]) -> Trust:
    """With a PostgreSQL `dsn` the store, the CA and the drains are the database's, shared by
    every coordinator on it; else SQLite in data_dir/state.sqlite3 and the data dir's own CA.
    The store opens even with --insecure: drains are kept there."""
    store: TrustStore
    if dsn:
        store = await PostgresTrustStore.open(dsn)
    else:
        store = SQLiteTrustStore(cfg.data_dir / "state.sqlite3")
    try:
        if cfg.insecure:
            return Trust(store)
        if isinstance(store, PostgresTrustStore):
            # one coordinator at a time reads and seeds the shared state: two starting at
            # once agree on one CA, and only the first mints an admin token
            with store.exclusive():
                return _secure(cfg, names, store, store)
        return _secure(cfg, names, store, None)
    except BaseException:
        await Trust(store).close()
        raise


def _secure(
    cfg: CoordinatorConfig, names: list[str], store: TrustStore, shared: PostgresTrustStore | None
) -> Trust:
    authority: CertificateAuthority | None = None
    if cfg.tls_cert or cfg.tls_key or cfg.tls_client_ca:
        if not (cfg.tls_cert and cfg.tls_key and cfg.tls_client_ca):
            raise ValueError("--tls-cert, --tls-key and --tls-client-ca go together")
        # an operator's PKI: nothing is stored, every coordinator is given the same files
        server_tls = operator_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
    else:
        authority = CertificateAuthority(cfg.data_dir / "tls")
        if shared is not None:
            authority.shared = shared_ca(shared, authority.own_material())
        server_tls = authority.ensure(names)
    if shared is not None:
        _carry_over(shared, cfg.data_dir / "state.sqlite3")
    tokens = TokenBook(store, server_tls.ca_sha256)
    admin_token = cfg.data_dir / "admin.token"
    if tokens.ensure_admin_token(admin_token):
        log.info("wrote the first admin token to %s", admin_token)
    elif shared is not None and not admin_token.exists():
        log.info("the database holds tokens already, so no admin token is written here: the "
                 "first one is in the data dir of the coordinator that made it")  # fmt: skip
    return Trust(store, tokens, authority, server_tls)


def shared_ca(store: PostgresTrustStore, own: CAMaterial | None) -> CAMaterial:
    """The database's CA; the first coordinator stores its data dir's CA (an upgrade keeps
    every token's pin) or a new one. Only its sha256 is ever logged, never the key."""
    found = store.shared_ca()
    if found is None:
        found = own or new_ca()
        store.save_ca(found, time.time())
        log.info("stored %s CA (sha256 %s) in %s for every coordinator on it",
                 "this data dir's" if own else "a new", found.sha256, store.where)  # fmt: skip
    elif own is not None and own.sha256 != found.sha256:
        log.warning(
            "this data dir's own CA (sha256 %s) is not the one in %s (sha256 %s): the "
            "database's is used, so tokens pinned to this data dir's CA fail here",
            own.sha256, store.where, found.sha256,
        )  # fmt: skip
    return found


def _carry_over(store: PostgresTrustStore, sqlite_path: Path) -> None:
    """An upgrade from one coordinator: when the database holds no token yet, the tokens,
    enrolments and drains of this data dir's state.sqlite3 move in (once: from then on the
    database has tokens). A data dir joining a database that has tokens keeps its rows
    unused, and says so."""
    rows = read_sqlite_trust(sqlite_path)
    if not rows:
        return
    if store.list_tokens():
        left_behind = [t for t in rows.tokens if store.get_token(t.id) is None]
        if left_behind:  # else: carried in at an earlier start
            log.warning(
                "%d tokens of %s are not in %s, which had tokens when this coordinator first "
                "started on it: they do not work here (start an upgraded coordinator first)",
                len(left_behind), sqlite_path, store.where,
            )  # fmt: skip
        return
    store.import_rows(rows, time.time())
    log.info("carried %d tokens, %d enrolments and %d drains from %s into %s", len(rows.tokens),
             len(rows.enrolments), len(rows.drained), sqlite_path, store.where)  # fmt: skip
