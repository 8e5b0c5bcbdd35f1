//! Versioned schema migrations, applied in order under a transaction-scoped advisory lock:
//! replicas starting together apply each version once; a database migrated by a newer binary
//! is refused rather than written with an older understanding of its schema.

use deadpool_postgres::Client;

/// Advisory lock id of the migration transaction (any constant; "rdpmigr" in ASCII).
const LOCK_ID: i64 = 0x0072_6470_6d69_6772;

/// (version, name, SQL), append only.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "lockout guard attempts",
        "CREATE TABLE guard_attempt (
         id           bigserial   PRIMARY KEY,
         account      bytea       NOT NULL,          -- HMAC tag of the canonical account
         password     bytea       NOT NULL,          -- HMAC tag of (account, password)
         scope        bytea       NOT NULL,          -- directory, or HMAC tag of a target
         state        smallint    NOT NULL,          -- 0 in flight, 1 refused, 2 unknown, 3 proven
         reserved_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
         completed_at timestamptz,
         findings     jsonb       NOT NULL DEFAULT '[]',
         usable       boolean     NOT NULL DEFAULT false
     );
     CREATE INDEX guard_attempt_account ON guard_attempt (account);",
    ),
    (
        2,
        "audit records and their signed head",
        "CREATE TABLE audit_record (
         seq        bigint      PRIMARY KEY,
         line       text        NOT NULL,           -- the JSON line, exactly as hashed
         written_at timestamptz NOT NULL DEFAULT now()
     );
     CREATE TABLE audit_head (
         id   smallint PRIMARY KEY CHECK (id = 1),
         seq  bigint   NOT NULL,                    -- the last record's seq (0: none yet)
         hash text     NOT NULL,                    -- the SHA-256 of its line
         mac  text     NOT NULL                     -- HMAC of seq:hash with the key outside
     );
     INSERT INTO audit_head VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000', '');",
    ),
    (
        3,
        "certificate pins",
        "CREATE TABLE pin (
         target        text        PRIMARY KEY,     -- connected address:port
         fingerprint   text        NOT NULL,        -- SHA-256 of the certificate, lower-case hex
         expected_name text        NOT NULL DEFAULT '',
         first_seen    timestamptz NOT NULL DEFAULT now()
     );",
    ),
    (
        4,
        "check history",
        "CREATE TABLE check_history (
         check_id text        PRIMARY KEY,          -- time-sortable (ULID)
         target   text        NOT NULL,             -- host:port as requested
         at       timestamptz NOT NULL,             -- start of the check
         entry    jsonb       NOT NULL              -- the history entry (never a password)
     );
     CREATE INDEX check_history_at ON check_history (at);
     CREATE INDEX check_history_target ON check_history (target, check_id);",
    ),
    (
        5,
        "sweep lease",
        "CREATE TABLE sweep_lease (
         id       smallint    PRIMARY KEY CHECK (id = 1),
         slot     bigint      NOT NULL,             -- the last slot (epoch ms / interval) claimed
         holder   text        NOT NULL,             -- the replica that claimed it
         taken_at timestamptz NOT NULL DEFAULT now()
     );",
    ),
];

/// Applies what is missing.
pub(super) async fn apply(client: &mut Client) -> Result<(), String> {
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_ID])
        .await
        .map_err(|e| e.to_string())?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|e| e.to_string())?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations ORDER BY version", &[])
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(v) = applied.iter().find(|v| **v > newest) {
        return Err(format!(
            "the database has schema version {v}, newer than this binary's {newest}: upgrade the binary"
        ));
    }
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|e| format!("version {version} ({name}): {e}"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(|e| e.to_string())?;
        tracing::info!(version, name, "store: schema migration applied");
    }
    tx.commit().await.map_err(|e| e.to_string())
}
