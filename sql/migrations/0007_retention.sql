-- taskd: no-transaction
-- Retention: what the prune reads. Finished rows only (a task has finished_at only in a
-- final status), by status then age, so pruning one status walks only its own rows that
-- are due: never live rows, nor rows of a status kept longer (failed ones, 30 days by
-- default, while completed ones go after 7). Ends in id, so that its order, (finished_at,
-- id) within a status, is one no other index yields (sql/queries/retention.sql).
-- Built without blocking writes, so upgrading a large queue does not stop it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_prune_idx ON taskd.tasks (status, finished_at, id)
    WHERE finished_at IS NOT NULL;
