-- name: counts_lock :val
-- The fold and the check run one process at a time, for the rest of the transaction
-- (false: another process holds it; do nothing this time).
SELECT pg_try_advisory_xact_lock(499851160422);

-- name: counts_fold :val
-- Move the count deltas into the totals, and fold totals whose due hour has passed
-- into the due key (-infinity), so the totals hold one row per key and hour to come.
-- Returns how many delta rows were folded.
WITH moved AS (
    DELETE FROM taskd.count_deltas RETURNING queue, task_type, status, due, retried, n
), matured AS (
    DELETE FROM taskd.counts WHERE due > '-infinity' AND due <= now() - interval '1 hour'
    RETURNING queue, task_type, status, due, retried, n
), summed AS (
    SELECT queue, task_type, status,
           CASE WHEN due + interval '1 hour' <= now() THEN '-infinity'::timestamptz ELSE due END AS due,
           retried, sum(n)::bigint AS n
    FROM (SELECT * FROM moved UNION ALL SELECT * FROM matured) x
    GROUP BY 1, 2, 3, 4, 5
), upserted AS (
    INSERT INTO taskd.counts AS c (queue, task_type, status, due, retried, n)
    SELECT queue, task_type, status, due, retried, n FROM summed
    ON CONFLICT (queue, task_type, status, due, retried) DO UPDATE SET n = c.n + excluded.n
)
SELECT count(*)::int FROM moved;

-- name: counts_drop_zeros :exec
-- Keys nothing is counted under any more.
DELETE FROM taskd.counts WHERE n = 0;

-- name: finished_fold :exec
-- Move the finish deltas into the per-second timeline and the per-minute rates.
WITH moved AS (
    DELETE FROM taskd.finished_deltas RETURNING second, task_type, status, n
), seconds AS (
    INSERT INTO taskd.finished_seconds AS s (second, task_type, status, n)
    SELECT second, task_type, status, sum(n) FROM moved
    WHERE second > now() - interval '16 minutes'
    GROUP BY 1, 2, 3
    ON CONFLICT (second, task_type, status) DO UPDATE SET n = s.n + excluded.n
)
INSERT INTO taskd.finished_minutes AS m (minute, task_type, status, n)
SELECT date_trunc('minute', second), task_type, status, sum(n) FROM moved
WHERE second > now() - interval '25 hours'
GROUP BY 1, 2, 3
ON CONFLICT (minute, task_type, status) DO UPDATE SET n = m.n + excluded.n;

-- name: latency_fold :exec
-- Move the latency deltas into the per-minute histograms.
WITH moved AS (
    DELETE FROM taskd.latency_deltas RETURNING minute, task_type, kind, bucket, n, sum_ms
)
INSERT INTO taskd.latency_minutes AS l (minute, task_type, kind, bucket, n, sum_ms)
SELECT minute, task_type, kind, bucket, sum(n), sum(sum_ms) FROM moved
WHERE minute > now() - interval '25 hours'
GROUP BY 1, 2, 3, 4
ON CONFLICT (minute, task_type, kind, bucket) DO UPDATE SET n = l.n + excluded.n, sum_ms = l.sum_ms + excluded.sum_ms;

-- name: buckets_prune :exec
-- Forget what is older than the timeline (15 minutes) and the rates (a day) show.
WITH s AS (
    DELETE FROM taskd.finished_seconds WHERE second < now() - interval '16 minutes'
), m AS (
    DELETE FROM taskd.finished_minutes WHERE minute < now() - interval '25 hours'
)
DELETE FROM taskd.latency_minutes WHERE minute < now() - interval '25 hours';

-- name: counts_check_due :val
-- Is the last check against a full count more than $1 seconds ago?
SELECT coalesce(max(checked_at), '-infinity') < now() - make_interval(secs => $1::float8) FROM taskd.count_checks;

-- name: counts_check_isolation :exec
-- The check compares a full count with the totals as of one snapshot.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ;

-- name: counts_check :val
-- Compare a full count of the task table with totals plus deltas, as of this
-- transaction's snapshot, and append the difference as a delta (changes committed
-- since are in neither, so they are left alone). Returns the number of tasks the
-- totals were off by (0 unless something changed tasks without firing the triggers,
-- such as TRUNCATE or a session with session_replication_role = replica).
WITH truth AS (
    SELECT queue, task_type, status, taskd.count_due(status, run_at, created_at) AS due,
           taskd.count_retried(status, attempts) AS retried, count(*) AS n
    FROM taskd.tasks GROUP BY 1, 2, 3, 4, 5
), kept AS (
    SELECT queue, task_type, status, due, retried, n FROM taskd.counts
    UNION ALL
    SELECT queue, task_type, status, due, retried, n FROM taskd.count_deltas
), diff AS (
    SELECT queue, task_type, status,
           CASE WHEN due + interval '1 hour' <= now() THEN '-infinity'::timestamptz ELSE due END AS due,
           retried, sum(n)::bigint AS n
    FROM (SELECT * FROM truth UNION ALL SELECT queue, task_type, status, due, retried, -n FROM kept) x
    GROUP BY 1, 2, 3, 4, 5
    HAVING sum(n) <> 0
), fixed AS (
    INSERT INTO taskd.count_deltas (queue, task_type, status, due, retried, n)
    SELECT queue, task_type, status, due, retried, n FROM diff
    RETURNING n
), noted AS (
    INSERT INTO taskd.count_checks (one, checked_at) VALUES (true, now())
    ON CONFLICT (one) DO UPDATE SET checked_at = excluded.checked_at
)
SELECT coalesce(sum(abs(n)), 0)::bigint FROM fixed;
