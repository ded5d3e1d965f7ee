-- name: stats_counts :many
-- Task counts per status as clients see it (a pending task not yet due is
-- scheduled), from the kept counts: totals plus deltas not folded yet, the current
-- hour's scheduled tasks found by taskd.scheduled_this_hour().
SELECT status, sum(n)::bigint AS n
FROM (SELECT CASE WHEN status = 'pending' AND due > now() THEN 'scheduled' ELSE status END AS status, n
      FROM (SELECT status, due, n FROM taskd.counts UNION ALL SELECT status, due, n FROM taskd.count_deltas) c
      UNION ALL
      SELECT s.status, h.n * s.sign
      FROM taskd.scheduled_this_hour() h
      CROSS JOIN (VALUES ('scheduled', 1), ('pending', -1)) AS s(status, sign)) x
GROUP BY 1
HAVING sum(n) <> 0;

-- name: stats_recent :one
-- Completions and failures in the last $1 seconds (whole seconds), from the timeline.
SELECT coalesce(sum(n) FILTER (WHERE status = 'completed'), 0)::bigint AS completed,
       coalesce(sum(n) FILTER (WHERE status = 'failed'), 0)::bigint AS failed
FROM (SELECT second, status, n FROM taskd.finished_seconds
      UNION ALL
      SELECT second, status, n FROM taskd.finished_deltas) f
WHERE second > now() - make_interval(secs => $1::float8);

-- name: stats_by_type :many
-- Per task type: counts per status, and how tasks that needed a retry ended.
WITH near AS (
    SELECT task_type, sum(n) AS n FROM taskd.scheduled_this_hour() GROUP BY 1
)
SELECT c.task_type,
       sum(c.n)::bigint AS total,
       (coalesce(sum(c.n) FILTER (WHERE c.status = 'pending' AND c.due > now()), 0)
        + coalesce(max(near.n), 0))::bigint AS scheduled,
       (coalesce(sum(c.n) FILTER (WHERE c.status = 'pending' AND c.due <= now()), 0)
        - coalesce(max(near.n), 0))::bigint AS pending,
       coalesce(sum(c.n) FILTER (WHERE c.status = 'running'), 0)::bigint AS running,
       coalesce(sum(c.n) FILTER (WHERE c.status = 'retrying'), 0)::bigint AS retrying,
       coalesce(sum(c.n) FILTER (WHERE c.status = 'completed'), 0)::bigint AS completed,
       coalesce(sum(c.n) FILTER (WHERE c.status = 'failed'), 0)::bigint AS failed,
       coalesce(sum(c.n) FILTER (WHERE c.status = 'cancelled'), 0)::bigint AS cancelled,
       coalesce(sum(c.n) FILTER (WHERE c.status = 'expired'), 0)::bigint AS expired,
       coalesce(sum(c.n) FILTER (WHERE c.status = 'completed' AND c.retried), 0)::bigint AS completed_after_retry,
       coalesce(sum(c.n) FILTER (WHERE c.retried), 0)::bigint AS finished_after_retry
FROM (SELECT task_type, status, due, retried, n FROM taskd.counts
      UNION ALL
      SELECT task_type, status, due, retried, n FROM taskd.count_deltas) c
LEFT JOIN near ON near.task_type = c.task_type
GROUP BY c.task_type
HAVING sum(c.n) <> 0
ORDER BY c.task_type;

-- name: stats_timings_by_type :many
-- Per task type, over tasks finished in the last $1 seconds (whole minutes): run
-- time of the final attempt and queue wait before the first, in milliseconds, read
-- from the per-minute histograms (a percentile is its bucket's upper bound: at most
-- 10 % above the true value).
WITH h AS (
    SELECT task_type, kind, bucket, sum(n) AS n, sum(sum_ms) AS sum_ms
    FROM (SELECT minute, task_type, kind, bucket, n, sum_ms FROM taskd.latency_minutes
          UNION ALL
          SELECT minute, task_type, kind, bucket, n, sum_ms FROM taskd.latency_deltas) l
    WHERE minute >= date_trunc('minute', now() - make_interval(secs => $1::float8))
    GROUP BY 1, 2, 3
), c AS (
    SELECT task_type, kind, bucket, n, sum_ms,
           sum(n) OVER (PARTITION BY task_type, kind ORDER BY bucket) AS cum,
           sum(n) OVER (PARTITION BY task_type, kind) AS total
    FROM h
), p AS (
    SELECT task_type,
           max(total) FILTER (WHERE kind = 'run') AS n,
           sum(sum_ms) FILTER (WHERE kind = 'run') / nullif(max(total) FILTER (WHERE kind = 'run'), 0) AS run_avg,
           ARRAY[0.01 * 1.1 ^ min(bucket) FILTER (WHERE kind = 'run' AND cum >= 0.50 * total),
                 0.01 * 1.1 ^ min(bucket) FILTER (WHERE kind = 'run' AND cum >= 0.95 * total),
                 0.01 * 1.1 ^ min(bucket) FILTER (WHERE kind = 'run' AND cum >= 0.99 * total)]::float8[] AS run_pct,
           sum(sum_ms) FILTER (WHERE kind = 'wait') / nullif(max(total) FILTER (WHERE kind = 'wait'), 0) AS wait_avg,
           ARRAY[0.01 * 1.1 ^ min(bucket) FILTER (WHERE kind = 'wait' AND cum >= 0.50 * total),
                 0.01 * 1.1 ^ min(bucket) FILTER (WHERE kind = 'wait' AND cum >= 0.95 * total),
                 0.01 * 1.1 ^ min(bucket) FILTER (WHERE kind = 'wait' AND cum >= 0.99 * total)]::float8[] AS wait_pct
    FROM c GROUP BY task_type
)
SELECT task_type, coalesce(n, 0)::bigint AS n, run_avg::float8 AS run_avg, run_pct,
       wait_avg::float8 AS wait_avg, wait_pct
FROM p
ORDER BY task_type;

-- name: stats_timeline :many
-- Completed and failed per second over the last $1 seconds.
SELECT second,
       coalesce(sum(n) FILTER (WHERE status = 'completed'), 0)::bigint AS completed,
       coalesce(sum(n) FILTER (WHERE status = 'failed'), 0)::bigint AS failed
FROM (SELECT second, status, n FROM taskd.finished_seconds
      UNION ALL
      SELECT second, status, n FROM taskd.finished_deltas) f
WHERE second > now() - make_interval(secs => $1::float8) AND status IN ('completed', 'failed')
GROUP BY 1
ORDER BY 1;

-- name: db_ping :val
-- Is the database answering, and taking writes (not a standby, not read-only)?
SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off';
