-- name: task_insert_many :many
-- Insert one task per array element (none with an idempotency key: see
-- task_insert_keyed); ids come from one identity sequence, so ascending ids follow
-- the order of the arrays.
-- A task runs from $6 (a time) or after $7 seconds, by the database's clock, else
-- now; a time already past counts as now, so it cannot jump ahead of the queue. It
-- expires at $9 or $10 seconds from now (NULL: never). Its queue is $8 (NULL: the
-- default queue). Any array may be NULL where every element would be: unnest pads it.
INSERT INTO taskd.tasks (task_type, payload, max_retries, timeout_seconds, priority, run_at, queue, expires_at)
SELECT t, p::jsonb, r, s, pr, GREATEST(COALESCE(ra, now() + make_interval(secs => COALESCE(d, 0))), now()),
       COALESCE(q, 'default'), COALESCE(ea, now() + make_interval(secs => ei))
FROM unnest($1::text[], $2::text[], $3::int[], $4::float8[], $5::smallint[], $6::timestamptz[], $7::float8[],
            $8::text[], $9::timestamptz[], $10::float8[])
     AS u(t, p, r, s, pr, ra, d, q, ea, ei)
RETURNING id, CASE WHEN run_at > now() THEN 'scheduled' ELSE 'pending' END AS status;

-- name: task_insert_keyed :many
-- As task_insert_many, for rows of which some carry an idempotency key ($11, with
-- the digest of its request in $12). Ids are drawn in the order given (the
-- MATERIALIZED step), so ascending ids still follow it. A row whose key is taken, by
-- an earlier task or by an earlier row of this same statement, is not inserted: the
-- caller looks the key up (task_by_idempotency_keys). Rows go in in key order, so
-- two transactions inserting overlapping keys wait on each other in the same order
-- and cannot deadlock.
WITH rows AS MATERIALIZED (
    SELECT nextval('taskd.tasks_id_seq') AS id, u.*
    FROM unnest($1::text[], $2::text[], $3::int[], $4::float8[], $5::smallint[], $6::timestamptz[], $7::float8[],
                $8::text[], $9::timestamptz[], $10::float8[], $11::text[], $12::text[]) WITH ORDINALITY
         AS u(t, p, r, s, pr, ra, d, q, ea, ei, k, h, n)
    ORDER BY n
)
INSERT INTO taskd.tasks (id, task_type, payload, max_retries, timeout_seconds, priority, run_at, queue, expires_at,
                         idempotency_key, idempotency_hash)
SELECT id, t, p::jsonb, r, s, pr, GREATEST(COALESCE(ra, now() + make_interval(secs => COALESCE(d, 0))), now()),
       COALESCE(q, 'default'), COALESCE(ea, now() + make_interval(secs => ei)), k, h
FROM rows
ORDER BY k NULLS LAST, n
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id, idempotency_key, idempotency_hash,
          CASE WHEN run_at > now() THEN 'scheduled' ELSE 'pending' END AS status;

-- name: task_by_idempotency_keys :many
-- The tasks holding the idempotency keys in $1, with the digest of the request that
-- made each and its status as clients see it.
SELECT id, idempotency_key, idempotency_hash,
       CASE WHEN status = 'pending' AND run_at > now() THEN 'scheduled' ELSE status END AS status
FROM taskd.tasks WHERE idempotency_key = ANY($1::text[]);

-- name: task_claim_many :many
-- Claim up to $2 runnable tasks of the types in $3 for process $1, highest
-- priority first, then oldest due first; each gets a lease of $4 seconds. Tasks
-- in $5 are skipped: this process still runs something of theirs (an attempt
-- cut off from its lease, or an abandoned thread), and must not run two at once.
-- Only from the queues in $6 (NULL: every queue), never from a paused one (read in
-- this statement, so a pause holds from its commit on), and never a task past its
-- expiry (the expiry sweep marks those expired).
-- Queue by queue: the served queues are $6, or (NULL) those holding waiting tasks,
-- found by a skip scan of the queue-led index (one probe a queue), less the paused.
-- Each offers its best $2, locked as its index is walked (skipping rows another claim
-- holds), and the best $2 of those are claimed. So a paused queue's backlog is never
-- read, and another queue's costs a claim at most $2 index rows (one walk of all
-- waiting rows cost 40-60 ms a claim with 200,000 waiting elsewhere, measured). With
-- several queues waiting, the candidates not claimed stay locked until this statement
-- ends (about a millisecond): a claim running at that moment skips them. Locking
-- lazily instead, after the merge, cost the drain 7-12 % here (measured).
WITH RECURSIVE waiting AS (
    SELECT min(queue) AS queue FROM taskd.tasks WHERE status IN ('pending', 'retrying') AND $6::text[] IS NULL
    UNION ALL
    SELECT (SELECT min(t.queue) FROM taskd.tasks t WHERE t.status IN ('pending', 'retrying') AND t.queue > w.queue)
    FROM waiting w WHERE w.queue IS NOT NULL
), served AS (
    SELECT queue FROM waiting WHERE queue IS NOT NULL
    UNION ALL
    SELECT unnest($6::text[])
), candidates AS (
    SELECT c.* FROM served s CROSS JOIN LATERAL (
        SELECT t.id, t.priority, t.run_at FROM taskd.tasks t
        WHERE t.queue = s.queue AND t.status IN ('pending', 'retrying') AND t.run_at <= now()
          AND t.task_type = ANY($3::text[]) AND NOT (t.id = ANY($5::bigint[]))
          AND (t.expires_at IS NULL OR t.expires_at > now())
        ORDER BY t.priority DESC, t.run_at, t.id
        LIMIT $2::int
        FOR UPDATE SKIP LOCKED
    ) c
    WHERE s.queue <> ALL (ARRAY(SELECT name FROM taskd.queues WHERE paused))
), next AS (
    SELECT id FROM candidates ORDER BY priority DESC, run_at, id LIMIT $2::int
)
UPDATE taskd.tasks t
SET status = 'running',
    attempts = t.attempts + 1,
    locked_by = $1::text,
    locked_until = now() + make_interval(secs => $4::float8),
    started_at = COALESCE(t.started_at, now()),
    attempt_started_at = now(),
    progress = NULL
FROM next
WHERE t.id = next.id
RETURNING t.id, t.task_type, t.payload::text AS payload, t.attempts, t.max_retries, t.timeout_seconds,
          t.crashes, t.snoozes, t.attempts_forgiven;

-- name: task_claim_queue :many
-- task_claim_many for one queue, $6: a walk of its index, locking as it goes (a
-- paused queue gives nothing). The common case (one queue served, or one waiting)
-- pays for no skip scan and no merge: 0.5 ms less a claim of 50 (measured).
WITH next AS (
    SELECT t.id FROM taskd.tasks t
    WHERE t.queue = $6::text AND t.status IN ('pending', 'retrying') AND t.run_at <= now()
      AND t.task_type = ANY($3::text[]) AND NOT (t.id = ANY($5::bigint[]))
      AND (t.expires_at IS NULL OR t.expires_at > now())
      AND NOT EXISTS (SELECT 1 FROM taskd.queues q WHERE q.name = $6::text AND q.paused)
    ORDER BY t.priority DESC, t.run_at, t.id
    LIMIT $2::int
    FOR UPDATE SKIP LOCKED
)
UPDATE taskd.tasks t
SET status = 'running',
    attempts = t.attempts + 1,
    locked_by = $1::text,
    locked_until = now() + make_interval(secs => $4::float8),
    started_at = COALESCE(t.started_at, now()),
    attempt_started_at = now(),
    progress = NULL
FROM next
WHERE t.id = next.id
RETURNING t.id, t.task_type, t.payload::text AS payload, t.attempts, t.max_retries, t.timeout_seconds,
          t.crashes, t.snoozes, t.attempts_forgiven;

-- name: task_waiting_queues :many
-- The queues holding waiting tasks (a skip scan of the queue-led index, one probe a queue).
WITH RECURSIVE waiting AS (
    SELECT min(queue) AS queue FROM taskd.tasks WHERE status IN ('pending', 'retrying')
    UNION ALL
    SELECT (SELECT min(t.queue) FROM taskd.tasks t WHERE t.status IN ('pending', 'retrying') AND t.queue > w.queue)
    FROM waiting w WHERE w.queue IS NOT NULL
)
SELECT queue FROM waiting WHERE queue IS NOT NULL;

-- name: task_next_due :val
-- Seconds until the next runnable task of the types in $1 falls due, by the
-- database's clock (NULL if none is waiting; zero or less if one is due now),
-- leaving out what the claim would (tasks in $2 that this process may not claim for
-- now, other queues than $3, paused queues, expired tasks), or it would be woken for
-- work it may not take. Queue by queue, as the claim.
WITH RECURSIVE waiting AS (
    SELECT min(queue) AS queue FROM taskd.tasks WHERE status IN ('pending', 'retrying') AND $3::text[] IS NULL
    UNION ALL
    SELECT (SELECT min(t.queue) FROM taskd.tasks t WHERE t.status IN ('pending', 'retrying') AND t.queue > w.queue)
    FROM waiting w WHERE w.queue IS NOT NULL
), served AS (
    SELECT queue FROM waiting WHERE queue IS NOT NULL
    UNION ALL
    SELECT unnest($3::text[])
)
SELECT extract(epoch FROM min(d.run_at) - now())::float8
FROM served s CROSS JOIN LATERAL (
    SELECT min(t.run_at) AS run_at FROM taskd.tasks t
    WHERE t.queue = s.queue AND t.status IN ('pending', 'retrying') AND t.task_type = ANY($1::text[])
      AND NOT (t.id = ANY($2::bigint[])) AND (t.expires_at IS NULL OR t.expires_at > now())
) d
WHERE s.queue <> ALL (ARRAY(SELECT name FROM taskd.queues WHERE paused));

-- name: task_finish_many :many
-- Record many attempts' outcomes in one statement, fenced on the lease owner $1
-- and the attempt number: an attempt whose lease was lost writes nothing. Only a
-- running task has a lease owner, so the fence needs no status test (which would
-- tempt the planner into scanning every running row). An attempt that crashed
-- its quarantine process ($8) counts as a crash, not a retry. A task whose cancel
-- was asked for is not retried: an attempt that would be ends it cancelled (one
-- that completed or failed for good keeps that end). The handler's last progress
-- ($10) is kept with the outcome.
UPDATE taskd.tasks t
SET status = CASE WHEN u.status = 'retrying' AND t.cancel_requested_at IS NOT NULL THEN 'cancelled'
                  ELSE u.status END,
    progress = COALESCE(u.progress::jsonb, t.progress),
    crashes = t.crashes + CASE WHEN u.crashed THEN 1 ELSE 0 END,
    snoozes = t.snoozes + CASE WHEN u.snoozed THEN 1 ELSE 0 END,
    result = u.result::jsonb,
    last_error = COALESCE(u.error::jsonb, t.last_error),
    errors = CASE WHEN u.error IS NULL THEN t.errors ELSE t.errors || jsonb_build_array(u.error::jsonb) END,
    finished_at = CASE WHEN u.status <> 'retrying' OR t.cancel_requested_at IS NOT NULL THEN now() END,
    run_at = CASE WHEN u.status = 'retrying' THEN now() + make_interval(secs => u.delay) ELSE t.run_at END,
    locked_by = NULL,
    locked_until = NULL
FROM unnest($2::bigint[], $3::int[], $4::text[], $5::text[], $6::text[], $7::float8[], $8::bool[], $9::bool[],
            $10::text[])
     AS u(id, attempt, status, result, error, delay, crashed, snoozed, progress)
WHERE t.id = u.id AND t.attempts = u.attempt AND t.locked_by = $1::text
RETURNING t.id, t.attempts;

-- name: task_release_many :exec
-- Hand tasks that process $1 claimed but did not finish back to the queue
-- without counting the interrupted attempt (clean shutdown); one whose cancel was
-- asked for ends cancelled instead.
UPDATE taskd.tasks t
SET status = CASE WHEN t.cancel_requested_at IS NULL THEN 'pending' ELSE 'cancelled' END,
    finished_at = CASE WHEN t.cancel_requested_at IS NULL THEN NULL ELSE now() END,
    last_error = CASE WHEN t.cancel_requested_at IS NULL THEN t.last_error
                      ELSE taskd.stop_error('Cancelled', 'cancelled while running', t.attempts) END,
    errors = CASE WHEN t.cancel_requested_at IS NULL THEN t.errors
                  ELSE t.errors || jsonb_build_array(taskd.stop_error('Cancelled', 'cancelled while running',
                                                                      t.attempts)) END,
    -- (A cancelled one keeps its attempt: its number must not come round again.)
    attempts = CASE WHEN t.cancel_requested_at IS NULL THEN t.attempts - 1 ELSE t.attempts END,
    started_at = CASE WHEN t.attempts = 1 AND t.cancel_requested_at IS NULL THEN NULL ELSE t.started_at END,
    attempt_started_at = NULL,
    run_at = now(),
    locked_by = NULL,
    locked_until = NULL
FROM unnest($2::bigint[], $3::int[]) AS u(id, attempt)
WHERE t.id = u.id AND t.attempts = u.attempt AND t.locked_by = $1::text AND t.status = 'running';

-- name: task_extend_leases :many
-- Heartbeat: renew the leases of the tasks $3 (at attempts $4) that process $1
-- still holds to $2 seconds from now; returns those renewed. A lease that already ran out is not
-- revived (another process may have the task now), and rows the process owns but
-- no longer tracks (a claim whose reply was lost) are left to expire and be rescued.
-- Says of each whether its cancel was asked for: the notification of it may be lost.
UPDATE taskd.tasks t SET locked_until = now() + make_interval(secs => $2::float8)
FROM unnest($3::bigint[], $4::int[]) AS u(id, attempt)
WHERE t.id = u.id AND t.attempts = u.attempt AND t.locked_by = $1::text AND t.locked_until > now()
RETURNING t.id, t.attempts, t.cancel_requested_at IS NOT NULL AS cancel_requested;

-- name: task_progress_many :exec
-- The handlers' latest progress ($4, JSON text) of the attempts ($2, $3) process $1
-- still holds, in one statement.
UPDATE taskd.tasks t SET progress = u.progress::jsonb
FROM unnest($2::bigint[], $3::int[], $4::text[]) AS u(id, attempt, progress)
WHERE t.id = u.id AND t.attempts = u.attempt AND t.locked_by = $1::text;

-- name: task_rescue_expired :many
-- Tasks whose process stopped renewing their lease (it died, or lost the
-- database): run them again at once. The cut attempt counts as a crash, not as
-- a retry, and does not fail the task: it may not be the task's doing (an outage,
-- a neighbour that killed the process); a task with crashes runs in quarantine,
-- where a crash is its own. Only at $3 crashes, when even quarantine did not stop
-- its processes dying, is it failed here. Process $1 leaves alone the tasks in $2
-- that it still answers for (running, writing, or handing back itself). A task whose
-- cancel was asked for ends cancelled.
WITH expired AS (
    SELECT id FROM taskd.tasks
    WHERE status = 'running' AND locked_until < now()
      AND NOT (locked_by = $1::text AND id = ANY($2::bigint[]))
    FOR UPDATE SKIP LOCKED
), err AS (
    SELECT t.id, t.cancel_requested_at IS NOT NULL AS cancel, t.crashes + 1 >= $3::int AS give_up,
           jsonb_build_object(
        'type', CASE WHEN t.crashes + 1 >= $3::int THEN 'Crashed' ELSE 'LeaseExpired' END,
        'message', CASE WHEN t.crashes + 1 >= $3::int
            THEN 'the process running this task died or lost its lease ' || (t.crashes + 1)
                 || ' times, quarantine included; not run again (last: ' || coalesce(t.locked_by, '?') || ')'
            ELSE 'the process running this attempt stopped renewing its lease (' || coalesce(t.locked_by, '?')
                 || '); run again, without spending a retry' END,
        'attempt', t.attempts,
        'at', now()) AS error
    FROM taskd.tasks t JOIN expired USING (id)
)
UPDATE taskd.tasks t
SET status = CASE WHEN err.cancel THEN 'cancelled' WHEN err.give_up THEN 'failed' ELSE 'retrying' END,
    finished_at = CASE WHEN err.give_up OR err.cancel THEN now() END,
    crashes = t.crashes + 1,
    last_error = err.error,
    errors = t.errors || jsonb_build_array(err.error),
    run_at = now(),
    locked_by = NULL,
    locked_until = NULL
FROM err
WHERE t.id = err.id
RETURNING t.id, t.status;

-- name: task_get :one
-- One task by id, everything a client may see; the jsonb columns as text, passed through to clients.
SELECT id, task_type, CASE WHEN status = 'pending' AND run_at > now() THEN 'scheduled' ELSE status END AS status, payload::text AS payload, result::text AS result,
       attempts, max_retries, crashes, timeout_seconds, created_at, started_at, finished_at,
       last_error::text AS last_error, errors::text AS errors, priority, run_at, queue, expires_at,
       idempotency_key, cancel_requested_at, progress::text AS progress
FROM taskd.tasks WHERE id = $1::bigint;

-- name: task_list :many
-- Summaries, newest first, optionally filtered by status $1, task type $2 and queue $5,
-- after the keyset cursor $3 (ids below it), at most $4 rows. Payload, result and
-- errors are never read (a large one would have to be fetched from TOAST), and
-- of the last error only its type and the first 500 characters of its message.
-- Every walk reads an index however long the history: with no filter, the primary key
-- from the newest; with one, finished rows by the filtered column and unfinished ones
-- apart, each newest first on -id (0009), which the primary key cannot give, so the
-- planner never walks it across the waiting backlog or all of history. A status
-- filter leaves out the walk that cannot hold it. The pool plans each call with its
-- values (plan_cache_mode = force_custom_plan), which folds the walks not needed away.
SELECT id, task_type, CASE WHEN status = 'pending' AND run_at > now() THEN 'scheduled' ELSE status END AS status,
       attempts, max_retries, crashes, created_at, started_at, finished_at, priority, run_at, queue,
       last_error IS NOT NULL AS has_error, last_error->>'type' AS error_type,
       left(last_error->>'message', 500) AS error_message
FROM ((SELECT * FROM taskd.tasks
       WHERE $1::text IS NULL AND $2::text IS NULL AND $5::text IS NULL
         AND ($3::bigint IS NULL OR id < $3::bigint)
       ORDER BY id DESC LIMIT $4::int)
      UNION ALL
      (SELECT * FROM taskd.tasks
       WHERE NOT ($1::text IS NULL AND $2::text IS NULL AND $5::text IS NULL)
         AND ($1::text IS NULL OR $1::text NOT IN ('pending', 'scheduled', 'running', 'retrying'))
         AND finished_at IS NOT NULL
         AND ($1::text IS NULL OR (status = $1::text AND ($1::text <> 'pending' OR run_at <= now()))
              OR ($1::text = 'scheduled' AND status = 'pending' AND run_at > now()))
         AND ($2::text IS NULL OR task_type = $2::text)
         AND ($5::text IS NULL OR queue = $5::text)
         AND ($3::bigint IS NULL OR -id > -$3::bigint)
       ORDER BY -id LIMIT $4::int)
      UNION ALL
      (SELECT * FROM taskd.tasks
       WHERE NOT ($1::text IS NULL AND $2::text IS NULL AND $5::text IS NULL)
         AND ($1::text IS NULL OR $1::text NOT IN ('completed', 'failed', 'cancelled', 'expired'))
         AND finished_at IS NULL
         AND ($1::text IS NULL OR (status = $1::text AND ($1::text <> 'pending' OR run_at <= now()))
              OR ($1::text = 'scheduled' AND status = 'pending' AND run_at > now()))
         AND ($2::text IS NULL OR task_type = $2::text)
         AND ($5::text IS NULL OR queue = $5::text)
         AND ($3::bigint IS NULL OR -id > -$3::bigint)
       ORDER BY -id LIMIT $4::int)) t
ORDER BY id DESC
LIMIT $4::int;

-- name: task_list_sizes :many
-- The rows task_list would list (same filters, cursor and walks) with about the bytes
-- of each as JSON in a response (the jsonb columns as text, plus 300 for the other
-- fields), so a full page is cut to size before anything large leaves the database.
SELECT id,
       octet_length(payload::text) + coalesce(octet_length(result::text), 4)
       + coalesce(octet_length(last_error::text), 4) + octet_length(errors::text)
       + octet_length(task_type) + 300 AS json_bytes
FROM ((SELECT * FROM taskd.tasks
       WHERE $1::text IS NULL AND $2::text IS NULL AND $5::text IS NULL
         AND ($3::bigint IS NULL OR id < $3::bigint)
       ORDER BY id DESC LIMIT $4::int)
      UNION ALL
      (SELECT * FROM taskd.tasks
       WHERE NOT ($1::text IS NULL AND $2::text IS NULL AND $5::text IS NULL)
         AND ($1::text IS NULL OR $1::text NOT IN ('pending', 'scheduled', 'running', 'retrying'))
         AND finished_at IS NOT NULL
         AND ($1::text IS NULL OR (status = $1::text AND ($1::text <> 'pending' OR run_at <= now()))
              OR ($1::text = 'scheduled' AND status = 'pending' AND run_at > now()))
         AND ($2::text IS NULL OR task_type = $2::text)
         AND ($5::text IS NULL OR queue = $5::text)
         AND ($3::bigint IS NULL OR -id > -$3::bigint)
       ORDER BY -id LIMIT $4::int)
      UNION ALL
      (SELECT * FROM taskd.tasks
       WHERE NOT ($1::text IS NULL AND $2::text IS NULL AND $5::text IS NULL)
         AND ($1::text IS NULL OR $1::text NOT IN ('completed', 'failed', 'cancelled', 'expired'))
         AND finished_at IS NULL
         AND ($1::text IS NULL OR (status = $1::text AND ($1::text <> 'pending' OR run_at <= now()))
              OR ($1::text = 'scheduled' AND status = 'pending' AND run_at > now()))
         AND ($2::text IS NULL OR task_type = $2::text)
         AND ($5::text IS NULL OR queue = $5::text)
         AND ($3::bigint IS NULL OR -id > -$3::bigint)
       ORDER BY -id LIMIT $4::int)) t
ORDER BY id DESC
LIMIT $4::int;

-- name: task_list_full :many
-- The tasks with the ids in $1, newest first, as task_get reads them (a row
-- deleted since its size was read is simply missing).
SELECT id, task_type, CASE WHEN status = 'pending' AND run_at > now() THEN 'scheduled' ELSE status END AS status, payload::text AS payload, result::text AS result,
       attempts, max_retries, crashes, timeout_seconds, created_at, started_at, finished_at,
       last_error::text AS last_error, errors::text AS errors, priority, run_at, queue, expires_at,
       idempotency_key, cancel_requested_at, progress::text AS progress
FROM taskd.tasks WHERE id = ANY($1::bigint[])
ORDER BY id DESC;

-- name: task_delete :val
-- Remove a task; a trigger tells the process running it to cancel it.
DELETE FROM taskd.tasks WHERE id = $1::bigint RETURNING status;

-- name: task_expire :many
-- End up to $1 waiting tasks whose expiry has passed as expired; they never ran
-- (again). Oldest deadline first, from the list of deadlines (taskd.expiring). The
-- task's own expires_at decides (a retry clears it); an entry whose task no longer
-- waits is dropped; a waiting task locked right now (being claimed, cancelled) keeps
-- its entry for the next sweep. Tasks are reached by id through arrays, so that the
-- plan is lookups by primary key whatever the planner guesses of the list's size
-- (a hash join against the whole task table, every second, was its first choice).
WITH due AS MATERIALIZED (
    SELECT e.task_id FROM taskd.expiring e
    WHERE e.expires_at <= now()
    ORDER BY e.expires_at
    LIMIT $1::int
    FOR UPDATE SKIP LOCKED
), hit AS MATERIALIZED (
    SELECT t.id FROM taskd.tasks t
    WHERE t.id = ANY (ARRAY(SELECT task_id FROM due))
      AND t.status IN ('pending', 'retrying') AND t.expires_at <= now()
    ORDER BY t.id
    FOR UPDATE OF t SKIP LOCKED
), held AS MATERIALIZED (
    -- Waiting and due, but locked by someone else: looked at again next time.
    SELECT t.id FROM taskd.tasks t
    WHERE t.id = ANY (ARRAY(SELECT task_id FROM due))
      AND t.status IN ('pending', 'retrying') AND t.expires_at <= now()
      AND t.id <> ALL (ARRAY(SELECT id FROM hit))
), dropped AS (
    -- Only entries whose task is gone or in a status known not to wait: a status a later
    -- release adds may be a waiting one, and its deadline must outlive this release.
    DELETE FROM taskd.expiring e
    WHERE e.task_id = ANY (ARRAY(SELECT task_id FROM due)) AND e.task_id <> ALL (ARRAY(SELECT id FROM held))
      AND NOT EXISTS (SELECT 1 FROM taskd.tasks t
                      WHERE t.id = e.task_id AND t.status NOT IN ('pending', 'retrying', 'running', 'completed',
                                                                  'failed', 'cancelled', 'expired'))
)
UPDATE taskd.tasks t
SET status = 'expired', finished_at = now(),
    last_error = taskd.stop_error('Expired', 'not started before it expired at ' || t.expires_at, t.attempts),
    errors = t.errors || jsonb_build_array(
        taskd.stop_error('Expired', 'not started before it expired at ' || t.expires_at, t.attempts))
WHERE t.id = ANY (ARRAY(SELECT id FROM hit))
RETURNING t.id;

-- name: task_cancel :one
-- Cancel task $1: a waiting one (pending, scheduled, retrying) ends cancelled now;
-- a running one gets a durable cancel request (a trigger tells its process), and
-- ends cancelled when its process stops it. Returns nothing for a task that is
-- finished already, or missing; asking again for a running task changes nothing.
UPDATE taskd.tasks t
SET status = CASE WHEN t.status = 'running' THEN t.status ELSE 'cancelled' END,
    cancel_requested_at = COALESCE(t.cancel_requested_at, now()),
    finished_at = CASE WHEN t.status = 'running' THEN NULL ELSE now() END,
    last_error = CASE WHEN t.status = 'running' THEN t.last_error
                      ELSE taskd.stop_error('Cancelled', 'cancelled before it ran', t.attempts) END,
    errors = CASE WHEN t.status = 'running' THEN t.errors
                  ELSE t.errors || jsonb_build_array(taskd.stop_error('Cancelled', 'cancelled before it ran',
                                                                      t.attempts)) END
WHERE t.id = $1::bigint AND t.status IN ('pending', 'retrying', 'running')
RETURNING t.id;

-- name: task_cancel_where :val
-- Cancel, as task_cancel does, up to $5 tasks that are waiting or running (not yet
-- asked to stop) and match the filters: reported status $1 (NULL: any of those),
-- task type $2, queue $3, created before $4, and created no later than $6 (when the
-- bulk cancel began: a steady producer cannot keep it going). How many were cancelled.
WITH chosen AS (
    SELECT id FROM taskd.tasks
    WHERE status IN ('pending', 'retrying', 'running') AND cancel_requested_at IS NULL
      AND ($1::text IS NULL OR (status = $1::text AND ($1::text <> 'pending' OR run_at <= now()))
           OR ($1::text = 'scheduled' AND status = 'pending' AND run_at > now()))
      AND ($2::text IS NULL OR task_type = $2::text)
      AND ($3::text IS NULL OR queue = $3::text)
      AND ($4::timestamptz IS NULL OR created_at < $4::timestamptz)
      AND created_at <= $6::timestamptz
    ORDER BY id
    LIMIT $5::int
    FOR UPDATE
), done AS (
    UPDATE taskd.tasks t
    SET status = CASE WHEN t.status = 'running' THEN t.status ELSE 'cancelled' END,
        cancel_requested_at = now(),
        finished_at = CASE WHEN t.status = 'running' THEN NULL ELSE now() END,
        last_error = CASE WHEN t.status = 'running' THEN t.last_error
                          ELSE taskd.stop_error('Cancelled', 'cancelled before it ran', t.attempts) END,
        errors = CASE WHEN t.status = 'running' THEN t.errors
                      ELSE t.errors || jsonb_build_array(taskd.stop_error('Cancelled', 'cancelled before it ran',
                                                                          t.attempts)) END
    FROM chosen WHERE t.id = chosen.id
    RETURNING 1
)
SELECT count(*)::int FROM done;

-- name: task_retry :one
-- Run a failed, cancelled or expired task $1 again: pending now, with a fresh
-- max_retries and a fresh crash budget (the attempts so far stop counting against
-- either; their errors stay).
-- Returns the task as it then is (a claim may take it the moment this commits), as
-- task_get reads it; nothing for a task in another state, or missing.
UPDATE taskd.tasks t
SET status = 'pending', run_at = now(), finished_at = NULL, result = NULL, cancel_requested_at = NULL,
    expires_at = NULL, progress = NULL, crashes = 0, attempts_forgiven = t.attempts - t.snoozes
WHERE t.id = $1::bigint AND t.status IN ('failed', 'cancelled', 'expired')
RETURNING id, task_type, status, payload::text AS payload, result::text AS result,
          attempts, max_retries, crashes, timeout_seconds, created_at, started_at, finished_at,
          last_error::text AS last_error, errors::text AS errors, priority, run_at, queue, expires_at,
          idempotency_key, cancel_requested_at, progress::text AS progress;

-- name: task_retry_where :val
-- Retry, as task_retry does, up to $6 tasks that match the filters: status $1 (NULL:
-- failed, cancelled or expired), task type $2, queue $3, finished before $4, and
-- finished no later than $5 (when the bulk retry began: a retried task that ends
-- again meanwhile is not retried twice). How many were retried.
WITH chosen AS (
    SELECT id FROM taskd.tasks
    WHERE status IN ('failed', 'cancelled', 'expired') AND ($1::text IS NULL OR status = $1::text)
      AND ($2::text IS NULL OR task_type = $2::text)
      AND ($3::text IS NULL OR queue = $3::text)
      AND ($4::timestamptz IS NULL OR finished_at < $4::timestamptz)
      AND finished_at <= $5::timestamptz
    ORDER BY id
    LIMIT $6::int
    FOR UPDATE
), done AS (
    UPDATE taskd.tasks t
    SET status = 'pending', run_at = now(), finished_at = NULL, result = NULL, cancel_requested_at = NULL,
        expires_at = NULL, progress = NULL, crashes = 0, attempts_forgiven = t.attempts - t.snoozes
    FROM chosen WHERE t.id = chosen.id
    RETURNING 1
)
SELECT count(*)::int FROM done;

-- name: db_now :val
-- The database's clock (bulk operations fence on it, not on this machine's).
SELECT now();
