-- name: process_heartbeat :exec
-- Record that process $1 is alive, with its worker count and how many are busy.
INSERT INTO taskd.processes (id, hostname, pid, workers, busy)
VALUES ($1::text, $2::text, $3::int, $4::int, $5::int)
ON CONFLICT (id) DO UPDATE SET busy = EXCLUDED.busy, workers = EXCLUDED.workers, last_seen = now();

-- name: process_remove :exec
-- Forget process $1 (clean shutdown).
DELETE FROM taskd.processes WHERE id = $1::text;

-- name: process_list_live :many
-- Processes seen within the last $1 seconds.
SELECT id, hostname, pid, workers, busy, started_at, last_seen
FROM taskd.processes
WHERE last_seen > now() - make_interval(secs => $1::float8)
ORDER BY started_at;

-- name: process_prune :exec
-- Forget processes not seen for $1 seconds.
DELETE FROM taskd.processes WHERE last_seen < now() - make_interval(secs => $1::float8);
