-- name: migration_lock :val
-- Try to take the lock that serialises migrations between processes (released at
-- session end too); true if taken. Never waited for inside a statement: a session
-- waiting in pg_advisory_lock holds a snapshot, which CREATE INDEX CONCURRENTLY run by
-- the holder must outwait, and PostgreSQL breaks that cycle by failing the index
-- build (measured). The caller polls instead.
SELECT pg_try_advisory_lock(499851160420);

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

-- name: migration_invalid_indexes :many
-- Of the indexes named in $1 in schema taskd, those an interrupted CREATE INDEX
-- CONCURRENTLY left INVALID (IF NOT EXISTS would skip them), each with the statement
-- that drops it, its name quoted by format(): DROP INDEX takes no parameters.
SELECT c.relname AS name, format('DROP INDEX CONCURRENTLY IF EXISTS %I.%I', n.nspname, c.relname) AS drop_statement
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'taskd' AND c.relname = ANY($1::text[]) AND NOT i.indisvalid
ORDER BY c.relname;
