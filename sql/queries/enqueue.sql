-- name: enqueue_defaults_publish :exec
-- Publish this process's settings and limits ($2..$12, by process $1) and its handlers'
-- defaults (one array element per type, $13..$19) where taskd.enqueue() reads them
-- (migration 0006). The last process to start wins, row by row; a type another process
-- published stays known. Types go in name order, so two processes starting at once
-- lock the same rows in the same order.
WITH settings AS (
    INSERT INTO taskd.settings AS s (singleton, max_retries, task_timeout, max_retries_limit, max_timeout_seconds,
                                     max_delay_seconds, priority_min, priority_max, max_type_chars, max_key_chars,
                                     queue_pattern, queue_rule, published_by, published_at)
    VALUES (true, $2::int, $3::float8, $4::int, $5::float8, $6::float8, $7::int, $8::int, $9::int, $10::int,
            $11::text, $12::text, $1::text, now())
    ON CONFLICT (singleton) DO UPDATE SET
        max_retries = excluded.max_retries, task_timeout = excluded.task_timeout,
        max_retries_limit = excluded.max_retries_limit, max_timeout_seconds = excluded.max_timeout_seconds,
        max_delay_seconds = excluded.max_delay_seconds, priority_min = excluded.priority_min,
        priority_max = excluded.priority_max, max_type_chars = excluded.max_type_chars,
        max_key_chars = excluded.max_key_chars, queue_pattern = excluded.queue_pattern,
        queue_rule = excluded.queue_rule, published_by = excluded.published_by, published_at = excluded.published_at
)
INSERT INTO taskd.task_types AS t (task_type, queue, priority, max_retries, timeout_seconds, unique_for,
                                   validates_in_python, published_by, published_at)
SELECT u.task_type, u.queue, u.priority, u.max_retries, u.timeout_seconds, u.unique_for, u.validates, $1::text, now()
FROM unnest($13::text[], $14::text[], $15::int[], $16::int[], $17::float8[], $18::float8[], $19::bool[])
     AS u(task_type, queue, priority, max_retries, timeout_seconds, unique_for, validates)
ORDER BY u.task_type
ON CONFLICT (task_type) DO UPDATE SET
    queue = excluded.queue, priority = excluded.priority, max_retries = excluded.max_retries,
    timeout_seconds = excluded.timeout_seconds, unique_for = excluded.unique_for,
    validates_in_python = excluded.validates_in_python, published_by = excluded.published_by,
    published_at = excluded.published_at;

-- name: task_enqueue :val
-- Insert one task through the SQL function taskd.enqueue (migration 0006) on a caller's
-- connection: $1 task type, $2 payload (JSON text), then the options in the order
-- taskd.client.enqueue_arguments gives them; NULL is "not given". Its id. Each $n
-- appears once, in order: taskd.sync_client sends it with %s placeholders instead.
SELECT taskd.enqueue($1::text, $2::jsonb, queue => $3::text, priority => $4::bigint, run_at => $5::timestamptz,
                     delay_seconds => $6::float8, expires_at => $7::timestamptz, expires_in_seconds => $8::float8,
                     max_retries => $9::bigint, timeout_seconds => $10::float8, idempotency_key => $11::text);
