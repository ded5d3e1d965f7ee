-- name: migration_lock :exec
-- Serialise migrations between processes starting at once (released at session end too).
SELECT pg_advisory_lock(499851160420);

-- name: migration_unlock :exec
-- Release the migration lock taken by migration_lock.
SELECT pg_advisory_unlock(499851160420);

-- name: migration_prepare :exec
-- Create the schema and the ledger of applied migrations if this database has neither.
CREATE SCHEMA IF NOT EXISTS taskd;
CREATE TABLE IF NOT EXISTS taskd.migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migration_applied :many
-- Versions already applied to this database.
SELECT version FROM taskd.migrations ORDER BY version;

-- name: migration_record :exec
-- Record that migration $1 ($2) was applied, in the same transaction as its body.
INSERT INTO taskd.migrations (version, name) VALUES ($1::int, $2::text);
