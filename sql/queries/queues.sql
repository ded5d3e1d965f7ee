-- name: queue_list :many
-- Every queue that holds a task or was ever paused (or only queue $1): counts per
-- status as clients see them, how long its oldest due task has waited, and whether
-- it is paused.
WITH counts AS (
    SELECT queue AS name,
           count(*) FILTER (WHERE status = 'pending' AND run_at <= now()) AS pending,
           count(*) FILTER (WHERE status = 'pending' AND run_at > now()) AS scheduled,
           count(*) FILTER (WHERE status = 'running') AS running,
           count(*) FILTER (WHERE status = 'retrying') AS retrying,
           count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE status = 'expired') AS expired,
           extract(epoch FROM now() - min(run_at) FILTER (
               WHERE status IN ('pending', 'retrying') AND run_at <= now()))::float8 AS oldest_wait_seconds
    FROM taskd.tasks
    WHERE $1::text IS NULL OR queue = $1::text
    GROUP BY queue
)
SELECT COALESCE(c.name, q.name) AS name, COALESCE(q.paused, false) AS paused,
       COALESCE(c.pending, 0) AS pending, COALESCE(c.scheduled, 0) AS scheduled,
       COALESCE(c.running, 0) AS running, COALESCE(c.retrying, 0) AS retrying,
       COALESCE(c.completed, 0) AS completed, COALESCE(c.failed, 0) AS failed,
       COALESCE(c.cancelled, 0) AS cancelled, COALESCE(c.expired, 0) AS expired,
       c.oldest_wait_seconds
FROM counts c
FULL JOIN (SELECT * FROM taskd.queues WHERE $1::text IS NULL OR name = $1::text) q ON q.name = c.name
ORDER BY 1;

-- name: queue_set_paused :exec
-- Pause ($2 true) or resume queue $1; every process's next claim sees it, and a
-- trigger wakes idle claimers.
INSERT INTO taskd.queues (name, paused) VALUES ($1::text, $2::bool)
ON CONFLICT (name) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now();
