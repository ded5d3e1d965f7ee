-- name: stats_counts :many
-- Task counts per status as clients see it (a pending task not yet due is scheduled).
SELECT CASE WHEN status = 'pending' AND run_at > now() THEN 'scheduled' ELSE status END AS status, count(*) AS n
FROM taskd.tasks GROUP BY 1;

-- name: stats_recent :one
-- Completions and failures in the last $1 seconds.
SELECT count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM taskd.tasks
WHERE finished_at > now() - make_interval(secs => $1::float8);

-- name: stats_by_type :many
-- Per task type: counts per status, and how tasks that needed a retry ended.
SELECT task_type,
       count(*) AS total,
       count(*) FILTER (WHERE status = 'pending' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'pending' AND run_at <= now()) AS pending,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'retrying') AS retrying,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE status = 'expired') AS expired,
       count(*) FILTER (WHERE status = 'completed' AND attempts > 1) AS completed_after_retry,
       count(*) FILTER (WHERE status IN ('completed', 'failed') AND attempts > 1) AS finished_after_retry
FROM taskd.tasks
GROUP BY task_type
ORDER BY task_type;

-- name: stats_timings_by_type :many
-- Per task type, over tasks finished in the last $1 seconds: run time of the
-- final attempt and queue wait before the first, in milliseconds.
WITH f AS (
    SELECT task_type,
           extract(epoch FROM finished_at - attempt_started_at) * 1000 AS run_ms,
           extract(epoch FROM started_at - created_at) * 1000 AS wait_ms
    FROM taskd.tasks
    WHERE finished_at > now() - make_interval(secs => $1::float8) AND attempt_started_at IS NOT NULL
)
SELECT task_type, count(*) AS n,
       avg(run_ms) AS run_avg,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY run_ms) AS run_pct,
       avg(wait_ms) AS wait_avg,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY wait_ms) AS wait_pct
FROM f
GROUP BY task_type
ORDER BY task_type;

-- name: stats_timeline :many
-- Completed and failed per second over the last $1 seconds.
SELECT date_trunc('second', finished_at) AS second,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM taskd.tasks
WHERE finished_at > now() - make_interval(secs => $1::float8)
GROUP BY 1
ORDER BY 1;

-- name: db_ping :val
-- Is the database answering, and taking writes (not a standby, not read-only)?
SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off';
