-- name: task_prune_settings :exec
-- Run before task_prune, in its transaction (SET LOCAL, in one preparable statement):
-- plan it as a walk of tasks_prune_idx in order whatever the statistics say. Otherwise a
-- table not yet analyzed gets a bitmap scan that sorts every due row on every batch, and
-- one analyzed may get a walk of tasks_finished_at_idx (finished rows of every status, in
-- the order they were written).
SELECT set_config('enable_sort', 'off', true), set_config('enable_incremental_sort', 'off', true),
       set_config('enable_bitmapscan', 'off', true), set_config('enable_seqscan', 'off', true),
       set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true),
       set_config('jit', 'off', true);

-- name: task_prune :one
-- Delete up to $3 tasks in final status $1 that finished more than $2 seconds ago by the
-- database's clock, oldest first, and none that finished before $4 (where this run's
-- previous batch of that status stopped: the index entries of the rows it deleted stay
-- until vacuum, and are not walked again). Only while holding the prune lock, which ends
-- with this statement: `locked` false means another process is pruning and nothing was
-- deleted. A row someone else holds is skipped, never waited for. Returns how many were
-- deleted and the latest finished_at among them.
-- Reads tasks_prune_idx (status, finished_at, id) from ($1, $4) up to ($1, cut-off), in its
-- order, and stops there: neither live rows nor rows not yet due (failed ones kept 30 d
-- while completed ones go after 7) are walked. Ordered by (finished_at, id), which only
-- that index yields without a sort (tasks_finished_at_idx, in finished_at order, would
-- otherwise look as good to the planner, and walk every finished row of the other statuses).
WITH lock AS MATERIALIZED (
    -- One number for every taskd process; the migrations' lock is 499851160420.
    SELECT pg_try_advisory_xact_lock(499851160421) AS held
), due AS (
    SELECT t.id, t.finished_at FROM taskd.tasks t
    WHERE $1::text IN ('completed', 'failed', 'cancelled', 'expired') AND t.status = $1::text
      AND t.finished_at < now() - make_interval(secs => $2::float8)
      AND t.finished_at >= coalesce($4::timestamptz, '-infinity')
      AND (SELECT held FROM lock)
      -- Dependencies (depends_on, a later issue) go here: a task that a waiting task
      -- depends on is not pruned while that task waits, e.g.
      --   AND NOT EXISTS (SELECT 1 FROM taskd.task_dependencies d JOIN taskd.tasks w ON w.id = d.task_id
      --                   WHERE d.depends_on = t.id AND w.status IN ('pending', 'running', 'retrying'))
    ORDER BY t.finished_at, t.id
    LIMIT $3::int
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM taskd.tasks t USING due WHERE t.id = due.id
    RETURNING due.finished_at
)
SELECT (SELECT held FROM lock) AS locked, count(*)::int AS deleted, max(finished_at) AS reached FROM gone;
