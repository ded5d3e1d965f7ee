-- Deadlines move out of the task table's indexes into a list of their own.
--
-- A partial index on tasks (expires_at) was written on by every insert and every
-- claim and outcome (status changes are never HOT), whether or not the task had a
-- deadline: measured, it cost the claim and outcome statements about 0.15 ms per 50
-- tasks, a tenth of their time. A row here exists only for a task submitted with a
-- deadline; a statement trigger fills it from whatever inserted the task (the API,
-- taskd.enqueue, a user's own SQL), and the expiry sweep empties it. A task that goes
-- back to waiting (a retry, a release, a rescue) is listed again by the update trigger
-- of 0008, so a deadline that passed while it ran still ends it.

-- Writers wait until this commits: a task inserted while the list is filled would
-- otherwise be in neither the fill (not visible yet) nor the trigger (not there yet).
LOCK TABLE taskd.tasks IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE taskd.expiring (
    task_id    bigint      PRIMARY KEY,
    expires_at timestamptz NOT NULL
);

CREATE INDEX expiring_due_idx ON taskd.expiring (expires_at);

INSERT INTO taskd.expiring (task_id, expires_at)
SELECT id, expires_at FROM taskd.tasks
WHERE expires_at IS NOT NULL AND status IN ('pending', 'retrying');

CREATE FUNCTION taskd.note_expiring() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO taskd.expiring (task_id, expires_at)
    SELECT id, expires_at FROM new_tasks WHERE expires_at IS NOT NULL
    ON CONFLICT (task_id) DO UPDATE SET expires_at = excluded.expires_at;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_note_expiring AFTER INSERT ON taskd.tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION taskd.note_expiring();

DROP INDEX taskd.tasks_expiring_idx;
