"""The PostgreSQL schema as numbered migrations, applied in order under an advisory lock."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from polyarch.coordinator.core.store import SchemaTooNew

# Step N brings a database from version N-1 to N. An applied step is never edited: a change
# is a new step at the end (ALTER TABLE ...), so every database ends up with the same schema.
MIGRATIONS: tuple[str, ...] = (
    # 1: builds, jobs and transitions as in SQLite. Times are epoch seconds in double
    # precision: a record's float comes back bit for bit (timestamptz keeps microseconds
    # only, and list_builds_page's cursor compares them exactly). `seq` is the creation order
    # (SQLite's rowid): an upsert keeps it.
    """
    CREATE TABLE builds (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        id text PRIMARY KEY,
        state text NOT NULL,
        spec text NOT NULL,
        created_at double precision NOT NULL,
        finished_at double precision,
        idempotency_key text CONSTRAINT builds_idempotency_key UNIQUE,
        index_digest text NOT NULL DEFAULT '',
        index_media_type text NOT NULL DEFAULT '',
        index_size bigint NOT NULL DEFAULT 0,
        error text NOT NULL DEFAULT '',
        owner text NOT NULL DEFAULT '',
        request_hash text NOT NULL DEFAULT ''
    );
    CREATE INDEX builds_by_created ON builds (created_at, id);
    -- unfinished_builds reads only the few builds not yet finished
    CREATE INDEX builds_unfinished ON builds (created_at, seq)
        WHERE state NOT IN ('succeeded', 'failed', 'cancelled');
    CREATE TABLE jobs (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        id text PRIMARY KEY,
        build_id text NOT NULL REFERENCES builds (id),
        platform text NOT NULL,
        state text NOT NULL,
        agent text NOT NULL DEFAULT '',
        mode text,
        attempt integer NOT NULL DEFAULT 0,
        digest text NOT NULL DEFAULT '',
        size bigint NOT NULL DEFAULT 0,
        media_type text NOT NULL DEFAULT '',
        error text NOT NULL DEFAULT '',
        failed_step text NOT NULL DEFAULT '',
        queued_at double precision NOT NULL,
        started_at double precision,
        finished_at double precision,
        requeue_reasons text NOT NULL DEFAULT '[]',
        config_digest text NOT NULL DEFAULT '',
        attestation_digest text NOT NULL DEFAULT '',
        attestation_size bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_by_build ON jobs (build_id, seq);
    CREATE TABLE job_transitions (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id text NOT NULL,
        attempt integer NOT NULL,
        state text NOT NULL,
        reason text NOT NULL,
        at double precision NOT NULL
    );
    CREATE INDEX job_transitions_by_job ON job_transitions (job_id, seq);
    """,
    # 2: the active coordinator's term (coordinator/ha/election.py). `epoch` grows with every
    # takeover; a store fenced at an epoch commits nothing once it moved (the fencing token).
    """
    CREATE TABLE coordinator_term (
        id integer PRIMARY KEY CHECK (id = 1),
        epoch bigint NOT NULL,
        holder text NOT NULL,
        since double precision NOT NULL
    );
    INSERT INTO coordinator_term VALUES (1, 0, '', 0);
    """,
    # 3: the trust state every coordinator on this database shares (issue 14): tokens (only
    # their secrets' sha256), enrolments, drained agent names and the farm's CA. A trigger
    # announces every changed row on TRUST_CHANNEL, whoever wrote it (another coordinator, or
    # an operator in psql), so each coordinator's in-memory view reloads that row; TRUNCATE
    # announces a null key (reload everything). `seq` keeps tokens' creation order for ties.
    """
    CREATE TABLE tokens (
        seq bigint GENERATED ALWAYS AS IDENTITY,
        id text PRIMARY KEY,
        role text NOT NULL,
        secret_sha256 text NOT NULL,
        description text NOT NULL,
        created_at double precision NOT NULL,
        expires_at double precision,
        revoked_at double precision
    );
    CREATE TABLE enrolments (
        name text PRIMARY KEY,
        cert_sha256 text NOT NULL,
        enrolled_at double precision NOT NULL,
        token_id text NOT NULL
    );
    CREATE TABLE drained_agents (
        name text PRIMARY KEY,
        drained_at double precision NOT NULL
    );
    -- At most one row. key_pem is the CA's private key in clear: the database's access
    -- control (who may connect as a role that can read this table, and its backups) is
    -- what protects it, as the data dir's 0600 file did for one coordinator.
    CREATE TABLE certificate_authority (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        cert_pem text NOT NULL,
        key_pem text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE FUNCTION polyarch_trust_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        changed jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
    BEGIN
        PERFORM pg_notify('polyarch_trust', json_build_object(
            'table', TG_TABLE_NAME,
            'key', CASE WHEN TG_LEVEL = 'ROW' THEN changed ->> TG_ARGV[0] END)::text);
        RETURN NULL;
    END $$;
    CREATE TRIGGER tokens_changed AFTER INSERT OR UPDATE OR DELETE ON tokens
        FOR EACH ROW EXECUTE FUNCTION polyarch_trust_changed('id');
    CREATE TRIGGER tokens_truncated AFTER TRUNCATE ON tokens
        FOR EACH STATEMENT EXECUTE FUNCTION polyarch_trust_changed('id');
    CREATE TRIGGER enrolments_changed AFTER INSERT OR UPDATE OR DELETE ON enrolments
        FOR EACH ROW EXECUTE FUNCTION polyarch_trust_changed('name');
    CREATE TRIGGER enrolments_truncated AFTER TRUNCATE ON enrolments
        FOR EACH STATEMENT EXECUTE FUNCTION polyarch_trust_changed('name');
    """,
    # 4: the active coordinator's agent (mTLS) address beside `holder`, its clients' address:
    # `holder` stays exactly what a standby sends clients (polyarch-active), and agents will
    # follow `agent_holder` without anyone parsing a combined string.
    """
    ALTER TABLE coordinator_term ADD COLUMN agent_holder text NOT NULL DEFAULT '';
    """,
    # 5: each agent's last arrival or departure (coordinator/core/presence.py), so the
    # coordinator that takes over accepts submits for its platforms before it reconnects.
    """
    CREATE TABLE agent_presence (
        name text PRIMARY KEY,
        native text NOT NULL,
        emulated text NOT NULL,
        present integer NOT NULL,
        at double precision NOT NULL
    );
    """,
    # 6: the active's renewals, on the server's clock. A standby that sees none for longer
    # than an active could live without one ends the holder's session: a frozen or hung
    # process keeps its socket (and so the lock) alive, a dead one does not.
    """
    CREATE TABLE coordinator_renewal (
        id integer PRIMARY KEY CHECK (id = 1),
        epoch bigint NOT NULL DEFAULT 0,
        renewed_at timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO coordinator_renewal (id) VALUES (1);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# The advisory lock key migrations hold (transaction-scoped), the same in every coordinator so
# that two starting at once migrate one after the other. Advisory locks are per database.
# The leader's session lock (coordinator/ha/election.py) is another key.
MIGRATION_LOCK = 0x706F_6C79_6172_6368  # "polyarch"
LEADER_LOCK = MIGRATION_LOCK + 1
# Held while a coordinator reads or seeds the shared trust state at start (the CA, an
# upgraded data dir's tokens, the first admin token), so two starting at once agree.
TRUST_BOOTSTRAP_LOCK = MIGRATION_LOCK + 2
# The LISTEN/NOTIFY channel of trust changes; payload {"table": ..., "key": id or name}.
TRUST_CHANNEL = "polyarch_trust"

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(
    conn: AsyncConnection[Any], where: str, migrations: tuple[str, ...] = MIGRATIONS
) -> tuple[int, int]:
    """Applies the steps the database lacks, in one transaction; returns (found, now).

    Refuses (SchemaTooNew, naming both versions) a database a newer polyarch migrated. The
    connection must be in autocommit mode (no transaction open).
    """
    known = len(migrations)
    async with conn.transaction():
        # First, before even the version table: a concurrent CREATE TABLE IF NOT EXISTS can fail.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(_VERSION_TABLE)
        cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = await cursor.fetchone()
        found = int(row[0]) if row else 0
        if found > known:
            raise SchemaTooNew(where, found, known)
        for version in range(found + 1, known + 1):
            await conn.execute(migrations[version - 1])
            await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return found, max(found, known)
