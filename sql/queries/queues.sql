-- name: queue_list :many
-- Every queue that holds a task or was ever paused (or only queue $1): counts per
-- status as clients see them (from the kept counts, the current hour's scheduled tasks
-- found by taskd.scheduled_this_hour()), how long its oldest due task
-- has waited, and whether it is paused. The oldest due task is found by a few probes
-- of the queue-led index (per priority in the queue, its earliest run_at), never by
-- reading the queue's backlog.
WITH near AS (
    SELECT queue, sum(n) AS n FROM taskd.scheduled_this_hour() WHERE $1::text IS NULL OR queue = $1::text GROUP BY 1
), counts AS (
    SELECT c.queue AS name,
           (coalesce(sum(c.n) FILTER (WHERE c.status = 'pending' AND c.due <= now()), 0)
            - coalesce(max(near.n), 0))::bigint AS pending,
           (coalesce(sum(c.n) FILTER (WHERE c.status = 'pending' AND c.due > now()), 0)
            + coalesce(max(near.n), 0))::bigint AS scheduled,
           coalesce(sum(c.n) FILTER (WHERE c.status = 'running'), 0)::bigint AS running,
           coalesce(sum(c.n) FILTER (WHERE c.status = 'retrying'), 0)::bigint AS retrying,
           coalesce(sum(c.n) FILTER (WHERE c.status = 'completed'), 0)::bigint AS completed,
           coalesce(sum(c.n) FILTER (WHERE c.status = 'failed'), 0)::bigint AS failed,
           coalesce(sum(c.n) FILTER (WHERE c.status = 'cancelled'), 0)::bigint AS cancelled,
           coalesce(sum(c.n) FILTER (WHERE c.status = 'expired'), 0)::bigint AS expired
    FROM (SELECT queue, status, due, n FROM taskd.counts WHERE $1::text IS NULL OR queue = $1::text
          UNION ALL
          SELECT queue, status, due, n FROM taskd.count_deltas WHERE $1::text IS NULL OR queue = $1::text) c
    LEFT JOIN near ON near.queue = c.queue
    GROUP BY c.queue
    HAVING sum(c.n) <> 0
)
SELECT COALESCE(c.name, q.name) AS name, COALESCE(q.paused, false) AS paused,
       COALESCE(c.pending, 0) AS pending, COALESCE(c.scheduled, 0) AS scheduled,
       COALESCE(c.running, 0) AS running, COALESCE(c.retrying, 0) AS retrying,
       COALESCE(c.completed, 0) AS completed, COALESCE(c.failed, 0) AS failed,
       COALESCE(c.cancelled, 0) AS cancelled, COALESCE(c.expired, 0) AS expired,
       CASE WHEN c.pending + c.retrying > 0 THEN (
           SELECT extract(epoch FROM now() - min(first.run_at))::float8
           FROM taskd.waiting_priorities(c.name) AS l(priority) CROSS JOIN LATERAL (
               SELECT t.run_at FROM taskd.tasks t
               WHERE t.queue = c.name AND t.status IN ('pending', 'retrying') AND t.priority = l.priority
               ORDER BY t.run_at LIMIT 1
           ) first
           WHERE first.run_at <= now()
       ) END AS oldest_wait_seconds
FROM counts c
FULL JOIN (SELECT * FROM taskd.queues WHERE $1::text IS NULL OR name = $1::text) q ON q.name = c.name
ORDER BY 1;

-- name: queue_set_paused :exec
-- Pause ($2 true) or resume queue $1; every process's next claim sees it, and a
-- trigger wakes idle claimers.
INSERT INTO taskd.queues (name, paused) VALUES ($1::text, $2::bool)
ON CONFLICT (name) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now();
