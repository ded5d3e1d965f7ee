-- A handler that raises taskd.Retry(after=...) snoozes its task: the attempt is
-- neither a failure nor a crash, so it spends no retry. Counted apart, like crashes.
ALTER TABLE taskd.tasks ADD COLUMN snoozes integer NOT NULL DEFAULT 0;
