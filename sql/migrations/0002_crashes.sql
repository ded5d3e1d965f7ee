-- Crashes are counted apart from retries: an attempt cut short because its process
-- died (or lost its lease) says nothing about the task, so it must not spend the
-- task's retry budget; a task that keeps taking its process down is quarantined
-- and, past MAX_CRASHES, failed.
ALTER TABLE taskd.tasks ADD COLUMN crashes integer NOT NULL DEFAULT 0;
