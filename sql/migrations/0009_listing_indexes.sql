-- taskd: no-transaction
-- GET /tasks filters (status, task_type, queue, newest first) read an index however long
-- the history. A listing is two walks merged (sql/queries/tasks.sql task_list): finished
-- rows by the filtered column, and the rows not finished yet by id. Every index on
-- finished rows only gets its entry once, when a task finishes (later updates of a
-- finished row are rare); full indexes on these columns would get one at every claim,
-- outcome and lease renewal (none of those updates can be HOT), which measured as 15 to
-- 40 % more time in the claim and outcome statements, against about 6 % for these.
-- The index on unfinished rows also keeps a status a later release adds listed. They
-- are on -id, newest first, which the primary key cannot give: a walk of the primary
-- key, which the planner would otherwise pick for a common filter, crosses every task
-- still waiting (the newest ids) before the first finished one, or all of history
-- before an old unfinished one (measured: 2 s for status=pending with 600,000 waiting).
-- Replaces the index of failed rows (the status index covers it) and the one of
-- finish times (the timeline and rates now come from kept counts, 0008).
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_finished_status_idx ON taskd.tasks (status, (-id))
    WHERE finished_at IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_finished_type_idx ON taskd.tasks (task_type, (-id))
    WHERE finished_at IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_finished_queue_idx ON taskd.tasks (queue, (-id))
    WHERE finished_at IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_unfinished_idx ON taskd.tasks ((-id))
    WHERE finished_at IS NULL;
DROP INDEX CONCURRENTLY IF EXISTS taskd.tasks_failed_idx;
DROP INDEX CONCURRENTLY IF EXISTS taskd.tasks_finished_at_idx;
