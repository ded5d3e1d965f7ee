-- Counts that are kept as the work happens, so that /stats, /stats/detailed and
-- GET /queues never scan the task table (they took 140-260 ms at a million rows,
-- growing without bound).
--
-- Writers never update a shared counter row (that row would serialise every claim
-- and outcome in every process behind one lock): statement triggers append what
-- each statement changed, summed per key, to delta tables, in the same transaction
-- as the change (so a rolled-back change counts nothing). One process at a time
-- folds the deltas into the totals every second; a read adds the totals and the
-- deltas not yet folded, so it is exact for everything committed. Now and then the
-- totals are checked against a full count and corrected (taskd.counts_fold and
-- counts_reconcile in sql/queries/counts.sql).
--
-- Their cost (development machine, 2026-11-29): a claim plus an outcome of 50 tasks
-- measured within noise of the same statements without them in interleaved runs, but
-- 0.5-0.7 ms more per 50-task outcome statement measured directly (trigger disabled
-- against enabled): one INSERT of a few summed rows per statement, plus the capture of
-- the transition rows. The drain figures in the README include it.

-- The key a task is counted under. A pending task scheduled for later carries the
-- hour it becomes due (its start, by the epoch, whatever the session's time zone);
-- other tasks carry -infinity. A function of the row alone, so that the row's old
-- image is uncounted under the key it was counted under, whenever that was. Hours,
-- not seconds: the totals hold a row per future hour that has scheduled tasks (a year
-- of them at random is 8,760 rows; per second it was 300,000 and reads of 65-90 ms).
-- A bucket in the future is all scheduled, one in the past all due; the current
-- hour's is split exactly at read time by taskd.scheduled_this_hour().
CREATE FUNCTION taskd.count_hour(at timestamptz)
    RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_timestamp(floor(extract(epoch FROM at) / 3600) * 3600)
$$;

CREATE FUNCTION taskd.count_due(status text, run_at timestamptz, created_at timestamptz)
    RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN status = 'pending' AND run_at > created_at
                THEN taskd.count_hour(run_at)
                ELSE '-infinity'::timestamptz END
$$;

-- Finished after more than one attempt (for the retry success rate).
CREATE FUNCTION taskd.count_retried(status text, attempts integer)
    RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT status IN ('completed', 'failed') AND attempts > 1
$$;

-- Tasks per (queue, type, status, due, retried): the folded totals.
CREATE TABLE taskd.counts (
    queue     text        NOT NULL,
    task_type text        NOT NULL,
    status    text        NOT NULL,
    due       timestamptz NOT NULL,
    retried   boolean     NOT NULL,
    n         bigint      NOT NULL,
    PRIMARY KEY (queue, task_type, status, due, retried)
);

-- The hours to come, for the fold (which moves the hours gone into the due key) and
-- for the read of the current hour's queues.
CREATE INDEX counts_due_idx ON taskd.counts (due) WHERE due > '-infinity';

-- Changes not folded yet: appended by the triggers, emptied by the fold.
CREATE TABLE taskd.count_deltas (
    queue     text        NOT NULL,
    task_type text        NOT NULL,
    status    text        NOT NULL,
    due       timestamptz NOT NULL,
    retried   boolean     NOT NULL,
    n         bigint      NOT NULL
);

-- The priorities a queue's waiting tasks have, highest first: a skip scan of the
-- queue-led runnable index, one probe a priority, never a walk of the backlog.
CREATE FUNCTION taskd.waiting_priorities(queue_name text) RETURNS SETOF smallint
    LANGUAGE sql STABLE AS $$
    WITH RECURSIVE levels AS (
        (SELECT r.priority FROM taskd.tasks r
         WHERE r.queue = queue_name AND r.status IN ('pending', 'retrying')
         ORDER BY r.priority DESC LIMIT 1)
        UNION ALL
        SELECT (SELECT r.priority FROM taskd.tasks r
                WHERE r.queue = queue_name AND r.status IN ('pending', 'retrying') AND r.priority < l.priority
                ORDER BY r.priority DESC LIMIT 1)
        FROM levels l WHERE l.priority IS NOT NULL
    )
    SELECT priority FROM levels WHERE priority IS NOT NULL
$$;

-- Of the current hour's bucket, the tasks not due yet, per queue and type: a few
-- probes of the queue-led runnable index per queue holding such a bucket (per
-- priority in it, the range of run_at from now to the hour's end), so a read costs
-- what is scheduled in the rest of this hour, never the backlog or the history.
CREATE FUNCTION taskd.scheduled_this_hour() RETURNS TABLE (queue text, task_type text, n bigint)
    LANGUAGE sql STABLE AS $$
    SELECT q.queue, t.task_type, count(*)
    FROM (SELECT DISTINCT c.queue
          FROM (SELECT queue, status, due FROM taskd.counts
                WHERE due = taskd.count_hour(now()) AND status = 'pending'
                UNION ALL
                SELECT queue, status, due FROM taskd.count_deltas
                WHERE due = taskd.count_hour(now()) AND status = 'pending') c) q
    CROSS JOIN LATERAL taskd.waiting_priorities(q.queue) AS l(priority)
    CROSS JOIN LATERAL (
        SELECT t.task_type FROM taskd.tasks t
        WHERE t.queue = q.queue AND t.status IN ('pending', 'retrying') AND t.priority = l.priority
          AND t.run_at > now() AND t.run_at < taskd.count_hour(now()) + interval '1 hour'
          AND t.status = 'pending'
    ) t
    GROUP BY 1, 2
$$;

-- Tasks that reached a final status, per second and type: the timeline (kept 16
-- minutes) and, per minute, the rates (kept 25 hours). Pruning or deleting a finished
-- task does not take it out of these: they are history.
CREATE TABLE taskd.finished_seconds (
    second    timestamptz NOT NULL,
    task_type text        NOT NULL,
    status    text        NOT NULL,
    n         bigint      NOT NULL,
    PRIMARY KEY (second, task_type, status)
);

CREATE TABLE taskd.finished_minutes (
    minute    timestamptz NOT NULL,
    task_type text        NOT NULL,
    status    text        NOT NULL,
    n         bigint      NOT NULL,
    PRIMARY KEY (minute, task_type, status)
);

CREATE TABLE taskd.finished_deltas (
    second    timestamptz NOT NULL,
    task_type text        NOT NULL,
    status    text        NOT NULL,
    n         bigint      NOT NULL
);

-- Run time (the final attempt) and queue wait (before the first) of finished tasks
-- that ran, per minute and type, as histograms: bucket b holds times up
-- to 0.01 ms * 1.1^b, so a percentile read from them is at most 10 % above the
-- true value. With their sums, for averages. Kept 25 hours.
CREATE FUNCTION taskd.latency_bucket(ms double precision)
    RETURNS smallint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT LEAST(32000, GREATEST(0, ceil(ln(GREATEST(ms, 0.01) / 0.01) / ln(1.1))))::smallint
$$;

CREATE TABLE taskd.latency_minutes (
    minute    timestamptz NOT NULL,
    task_type text        NOT NULL,
    kind      text        NOT NULL CHECK (kind IN ('run', 'wait')),
    bucket    smallint    NOT NULL,
    n         bigint      NOT NULL,
    sum_ms    double precision NOT NULL,
    PRIMARY KEY (minute, task_type, kind, bucket)
);

CREATE TABLE taskd.latency_deltas (
    minute    timestamptz NOT NULL,
    task_type text        NOT NULL,
    kind      text        NOT NULL,
    bucket    smallint    NOT NULL,
    n         bigint      NOT NULL,
    sum_ms    double precision NOT NULL
);

CREATE FUNCTION taskd.count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO taskd.count_deltas (queue, task_type, status, due, retried, n)
    SELECT queue, task_type, status, taskd.count_due(status, run_at, created_at),
           taskd.count_retried(status, attempts), count(*)
    FROM new_tasks GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END;
$$;

CREATE FUNCTION taskd.count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO taskd.count_deltas (queue, task_type, status, due, retried, n)
    SELECT queue, task_type, status, taskd.count_due(status, run_at, created_at),
           taskd.count_retried(status, attempts), -count(*)
    FROM old_tasks GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END;
$$;

-- An update is the old images uncounted and the new ones counted; keys whose sum is
-- zero (a lease renewed, progress written) add nothing. A task finished by this
-- statement is one whose finished_at is this transaction's now(): every statement
-- that ends a task sets it so, and none touches a finished task's time again (a
-- retry clears it). That needs no join of the old images with the new, which the
-- outcome writer's connection (hash and merge joins off) would run as a nested loop
-- over its whole batch.
CREATE FUNCTION taskd.count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO taskd.count_deltas (queue, task_type, status, due, retried, n)
    SELECT queue, task_type, status, due, retried, sum(n)
    FROM (SELECT queue, task_type, status, taskd.count_due(status, run_at, created_at) AS due,
                 taskd.count_retried(status, attempts) AS retried, 1 AS n
          FROM new_tasks
          UNION ALL
          SELECT queue, task_type, status, taskd.count_due(status, run_at, created_at),
                 taskd.count_retried(status, attempts), -1
          FROM old_tasks) d
    GROUP BY 1, 2, 3, 4, 5
    HAVING sum(n) <> 0;

    WITH finished AS MATERIALIZED (
        SELECT n.task_type, n.status, n.finished_at,
               extract(epoch FROM n.finished_at - n.attempt_started_at) * 1000 AS run_ms,
               extract(epoch FROM n.started_at - n.created_at) * 1000 AS wait_ms
        FROM new_tasks n
        WHERE n.finished_at = now()
    ), seconds AS (
        INSERT INTO taskd.finished_deltas (second, task_type, status, n)
        SELECT date_trunc('second', finished_at), task_type, status, count(*)
        FROM finished GROUP BY 1, 2, 3
    )
    INSERT INTO taskd.latency_deltas (minute, task_type, kind, bucket, n, sum_ms)
    SELECT date_trunc('minute', f.finished_at), f.task_type, k.kind, taskd.latency_bucket(k.ms), count(*), sum(k.ms)
    FROM finished f
    CROSS JOIN LATERAL (VALUES ('run', f.run_ms), ('wait', f.wait_ms)) AS k(kind, ms)
    WHERE k.ms IS NOT NULL AND f.run_ms IS NOT NULL
    GROUP BY 1, 2, 3, 4;

    -- Not a count: a task back to waiting with a deadline is listed again for the expiry
    -- sweep, which dropped it while the task ran (0005).
    INSERT INTO taskd.expiring (task_id, expires_at)
    SELECT id, expires_at FROM new_tasks WHERE expires_at IS NOT NULL AND status IN ('pending', 'retrying')
    ON CONFLICT (task_id) DO NOTHING;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_count_inserted AFTER INSERT ON taskd.tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION taskd.count_inserted();

CREATE TRIGGER tasks_count_updated AFTER UPDATE ON taskd.tasks
    REFERENCING OLD TABLE AS old_tasks NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION taskd.count_updated();

CREATE TRIGGER tasks_count_deleted AFTER DELETE ON taskd.tasks
    REFERENCING OLD TABLE AS old_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION taskd.count_deleted();


-- When the totals were last checked against a full count (one row). Never, yet: the
-- totals start empty and the first check, which the first process to start runs at
-- once, counts what is already there. Counting here instead would hold every writer
-- (CREATE TRIGGER's lock) for the whole count: about 19 s per ten million rows on the
-- development machine, long enough for an older process's heartbeats to wait out
-- their leases. Until that first check is done, the counts show only what changed
-- since this migration.
CREATE TABLE taskd.count_checks (
    one        boolean     PRIMARY KEY DEFAULT true CHECK (one),
    checked_at timestamptz NOT NULL
);
INSERT INTO taskd.count_checks (checked_at) VALUES ('-infinity');
