-- Steering the work: cancel, expiry, idempotent submits, progress, and queues that
-- can be paused.
--
-- Two new final statuses. `cancelled`: stopped on request before it finished.
-- `expired`: not started before its expires_at, so never run.
ALTER TABLE taskd.tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE taskd.tasks ADD CONSTRAINT tasks_status_check
    CHECK (status IN ('pending', 'running', 'retrying', 'completed', 'failed', 'cancelled', 'expired'));

-- A waiting task past this time ends expired instead of running.
ALTER TABLE taskd.tasks ADD COLUMN expires_at timestamptz;
-- A durable request to cancel a running task: the process running it sees it in the
-- notification (fast path) or at its next heartbeat (a notification can be missed),
-- and whatever writes the attempt's end turns a retry into `cancelled`.
ALTER TABLE taskd.tasks ADD COLUMN cancel_requested_at timestamptz;
-- A digest of the request that created the task under its idempotency key: a repeat
-- with the same key and another body is a conflict, not a duplicate.
ALTER TABLE taskd.tasks ADD COLUMN idempotency_hash text;
-- Attempts that stopped counting against max_retries when the task was retried by hand.
ALTER TABLE taskd.tasks ADD COLUMN attempts_forgiven integer NOT NULL DEFAULT 0;
-- {fraction, message, updated_at}, written by the handler through ctx.progress().
ALTER TABLE taskd.tasks ADD COLUMN progress jsonb;

-- What the claimer reads, now queue by queue: runnable rows only, led by queue, in
-- claim order within it. It replaces the index that was not led by queue, so a
-- queue's claim never walks another's backlog, and each write still updates one.
DROP INDEX taskd.tasks_runnable_idx;
CREATE INDEX tasks_runnable_idx ON taskd.tasks (queue, priority DESC, run_at, id)
    WHERE status IN ('pending', 'retrying');

-- What the expiry sweep reads: only waiting rows that carry a deadline.
CREATE INDEX tasks_expiring_idx ON taskd.tasks (expires_at)
    WHERE expires_at IS NOT NULL AND status IN ('pending', 'retrying');

-- Queues exist by being used; a row here only records that one is paused.
CREATE TABLE taskd.queues (
    name        text        PRIMARY KEY,
    paused      boolean     NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Cancelling a running task tells the process running it, on the channel a deletion
-- uses: either way that process stops the attempt. The notice names the attempt
-- ("id:attempt"), so a process that hears it before its claim of that attempt lands
-- stops that attempt only, never a later one (a cancelled task may be retried).
CREATE FUNCTION taskd.notify_cancel_requested() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('taskd_cancel', NEW.id::text || ':' || NEW.attempts::text);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION taskd.notify_cancelled_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('taskd_cancel', OLD.id::text || ':' || OLD.attempts::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_notify_cancel_requested AFTER UPDATE OF cancel_requested_at ON taskd.tasks
    FOR EACH ROW WHEN (OLD.cancel_requested_at IS NULL AND NEW.cancel_requested_at IS NOT NULL
                       AND NEW.status = 'running')
    EXECUTE FUNCTION taskd.notify_cancel_requested();

-- A resumed queue wakes idle claimers, as new tasks do (its backlog is runnable at once).
CREATE TRIGGER queues_notify_change AFTER UPDATE OF paused ON taskd.queues
    FOR EACH STATEMENT EXECUTE FUNCTION taskd.notify_new_tasks();

-- The error recorded when a task stops without a failure of its own: cancelled on
-- request, or expired before it started. One shape with the attempts' errors.
CREATE FUNCTION taskd.stop_error(kind text, message text, attempt integer) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('type', kind, 'message', message, 'attempt', attempt, 'at', now());
$$;

-- A task retried by hand (the only statements that set attempts_forgiven) is new work:
-- wake the claimers everywhere, as an insert does.
CREATE TRIGGER tasks_notify_retried AFTER UPDATE OF attempts_forgiven ON taskd.tasks
    FOR EACH STATEMENT EXECUTE FUNCTION taskd.notify_new_tasks();
