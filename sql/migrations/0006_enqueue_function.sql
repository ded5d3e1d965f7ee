-- Enqueue from any driver: taskd.enqueue(task_type, payload, ...), a SQL function that
-- validates a task as POST /tasks does, resolves its defaults and inserts it in the
-- caller's transaction (psycopg, Django, SQLAlchemy, Go, Ruby, asyncpg ...).
--
-- One rule for defaults: the task's own values, then its handler's, then the server's
-- settings. A server publishes its settings and its handlers' defaults here at every
-- start (taskd/store/defaults.py); when processes with different settings or handlers
-- share the database, the last to start wins, per table row. The rows below are this
-- release's own defaults and built-in types, so the function works as soon as the
-- schema exists; the first start replaces them.
--
-- What the function cannot do: run a handler's validate= callback, which is Python.
-- task_types.validates_in_python says which types have one; the Python clients run it
-- when the type is registered in the calling process, plain SQL never does.

CREATE TABLE taskd.settings (
    -- One row: the server settings and limits the last process to start published.
    singleton           boolean          PRIMARY KEY DEFAULT true CHECK (singleton),
    max_retries         integer          NOT NULL CHECK (max_retries >= 0),
    task_timeout        double precision NOT NULL CHECK (task_timeout > 0),
    max_retries_limit   integer          NOT NULL,
    max_timeout_seconds double precision NOT NULL,
    max_delay_seconds   double precision NOT NULL,
    priority_min        integer          NOT NULL,
    priority_max        integer          NOT NULL,
    max_type_chars      integer          NOT NULL,
    max_key_chars       integer          NOT NULL,
    queue_pattern       text             NOT NULL,  -- a PostgreSQL regular expression, anchored
    queue_rule          text             NOT NULL,  -- the same, in words, for error messages
    published_by        text,                       -- process id; NULL: this migration
    published_at        timestamptz      NOT NULL DEFAULT now()
);

INSERT INTO taskd.settings (max_retries, task_timeout, max_retries_limit, max_timeout_seconds, max_delay_seconds,
                            priority_min, priority_max, max_type_chars, max_key_chars, queue_pattern, queue_rule)
VALUES (3, 300, 1000, 604800, 31536000, -100, 100, 200, 200, '^(?:[a-z0-9_.-]{1,64})$',
        '1 to 64 of a-z, 0-9, ''_'', ''.'' and ''-''');

CREATE TABLE taskd.task_types (
    -- A type some process registered: known to taskd.enqueue. NULL: the handler sets no default.
    task_type           text             PRIMARY KEY,
    queue               text,
    priority            integer,
    max_retries         integer,
    timeout_seconds     double precision,
    unique_for          double precision,           -- seconds: one task per type, payload and window
    validates_in_python boolean          NOT NULL DEFAULT false,
    published_by        text,
    published_at        timestamptz      NOT NULL DEFAULT now()
);

INSERT INTO taskd.task_types (task_type, validates_in_python)
VALUES ('data_processing', true), ('echo', false), ('sleep', true);

-- Python's repr() of a float (what json.dumps writes): shortest round-trip digits,
-- positional from 1e-4 up to 1e16, else d.ddde+XX. PostgreSQL finds the same digits
-- (extra_float_digits = 1: shortest exact) but lays them out otherwise (1e+15, 100).
CREATE OR REPLACE FUNCTION taskd.python_float(value double precision) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
SET extra_float_digits = 1
AS $$
DECLARE
    t text := value::text;
    sign text := '';
    mantissa text;
    exponent integer := 0;
    digits text;
    point integer;  -- where the decimal point falls, counted in digits from the first
    n integer;
    shorter numeric;
    shorter_digits text;
    shorter_point integer;
BEGIN
    IF value = 'Infinity'::float8 THEN RETURN 'Infinity'; END IF;
    IF value = '-Infinity'::float8 THEN RETURN '-Infinity'; END IF;
    IF value = 'NaN'::float8 THEN RETURN 'NaN'; END IF;
    IF left(t, 1) = '-' THEN
        sign := '-';
        t := substr(t, 2);
    END IF;
    IF value = 0 THEN RETURN sign || '0.0'; END IF;
    n := strpos(t, 'e');
    IF n > 0 THEN
        exponent := substr(t, n + 1)::integer;
        mantissa := left(t, n - 1);
    ELSE
        mantissa := t;
    END IF;
    n := strpos(mantissa, '.');
    IF n > 0 THEN
        point := n - 1;
        digits := left(mantissa, n - 1) || substr(mantissa, n + 1);
    ELSE
        point := length(mantissa);
        digits := mantissa;
    END IF;
    point := point + exponent - (length(digits) - length(ltrim(digits, '0')));
    digits := rtrim(ltrim(digits, '0'), '0');
    n := length(digits);
    -- PostgreSQL writes some whole numbers past 2^53 with every digit (5.5360843950665856e+16
    -- where 5.536084395066586e+16 reads back the same): drop digits while it still does.
    WHILE n > 1 LOOP
        shorter := round(('0.' || digits)::numeric, n - 1);
        IF shorter >= 1 THEN
            shorter_digits := '1';
            shorter_point := point + 1;
        ELSE
            shorter_digits := rtrim(substr(shorter::text, 3), '0');
            shorter_point := point;
        END IF;
        EXIT WHEN (('0.' || shorter_digits)::numeric * power(10::numeric, shorter_point))::float8 <> abs(value);
        digits := shorter_digits;
        point := shorter_point;
        n := length(digits);
    END LOOP;
    IF point > -4 AND point <= 16 THEN
        IF point <= 0 THEN
            RETURN sign || '0.' || repeat('0', -point) || digits;
        ELSIF point >= n THEN
            RETURN sign || digits || repeat('0', point - n) || '.0';
        END IF;
        RETURN sign || left(digits, point) || '.' || substr(digits, point + 1);
    END IF;
    RETURN sign || left(digits, 1) || CASE WHEN n > 1 THEN '.' || substr(digits, 2) ELSE '' END
           || 'e' || CASE WHEN point - 1 < 0 THEN '-' ELSE '+' END
           || CASE WHEN abs(point - 1) < 10 THEN '0' ELSE '' END || abs(point - 1)::text;
END;
$$;

-- A string as Python's json.dumps writes it (ensure_ascii): quotes and backslashes
-- escaped, \b \f \n \r \t short, every other character outside space..~ as \u00XX
-- (lowercase hex), beyond U+FFFF as a surrogate pair.
CREATE OR REPLACE FUNCTION taskd.python_string(value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
AS $$
DECLARE
    result text;
BEGIN
    IF value !~ '[^ -~]' AND strpos(value, '"') = 0 AND strpos(value, E'\\') = 0 THEN
        RETURN '"' || value || '"';  -- the common case: nothing to escape
    END IF;
    SELECT string_agg(CASE
        WHEN c = '"' THEN E'\\"'
        WHEN c = E'\\' THEN E'\\\\'
        WHEN ascii(c) BETWEEN 32 AND 126 THEN c
        WHEN c = E'\b' THEN E'\\b'
        WHEN c = E'\f' THEN E'\\f'
        WHEN c = E'\n' THEN E'\\n'
        WHEN c = E'\r' THEN E'\\r'
        WHEN c = E'\t' THEN E'\\t'
        WHEN ascii(c) < 65536 THEN E'\\u' || lpad(to_hex(ascii(c)), 4, '0')
        ELSE E'\\u' || to_hex(55296 + ((ascii(c) - 65536) >> 10))
          || E'\\u' || to_hex(56320 + ((ascii(c) - 65536) & 1023))
    END, '' ORDER BY n)
    INTO result FROM regexp_split_to_table(value, '') WITH ORDINALITY AS chars(c, n);
    RETURN '"' || result || '"';
END;
$$;

-- A JSON value as Python's json.dumps(sort_keys=True, separators=(",", ":")) writes
-- what json.loads read from it: keys in code point order, numbers with a fraction as
-- floats. jsonb keeps no trace of an exponent, so a number written 1e2, or a float of
-- 1e16 or more (Python writes 1e+16), reads here as a whole number: such payloads
-- digest differently here and in Python (an idempotency key shared between the two
-- then reports a conflict).
CREATE OR REPLACE FUNCTION taskd.python_json(value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT
AS $$
DECLARE
    kind text := jsonb_typeof(value);
    number numeric;
    result text;
BEGIN
    IF kind = 'object' THEN
        SELECT '{' || coalesce(string_agg(taskd.python_string(k) || ':' || taskd.python_json(v), ','
                                          ORDER BY k COLLATE "C"), '') || '}'
        INTO result FROM jsonb_each(value) AS e(k, v);
        RETURN result;
    ELSIF kind = 'array' THEN
        SELECT '[' || coalesce(string_agg(taskd.python_json(v), ',' ORDER BY n), '') || ']'
        INTO result FROM jsonb_array_elements(value) WITH ORDINALITY AS a(v, n);
        RETURN result;
    ELSIF kind = 'string' THEN
        RETURN taskd.python_string(value #>> '{}');
    ELSIF kind = 'number' THEN
        result := value::text;
        IF strpos(result, '.') = 0 THEN
            RETURN result;  -- an int to Python, kept whole however long
        END IF;
        number := result::numeric;
        -- Past float8's range Python reads inf, or 0.0, where a cast here would raise.
        IF abs(number) > 1.7976931348623157e308 THEN
            RETURN CASE WHEN number < 0 THEN '-Infinity' ELSE 'Infinity' END;
        ELSIF abs(number) < 2.4703282292062328e-324 THEN
            RETURN CASE WHEN number < 0 THEN '-0.0' ELSE '0.0' END;
        END IF;
        RETURN taskd.python_float(number::float8);
    ELSIF kind = 'boolean' THEN
        RETURN value::text;
    END IF;
    RETURN 'null';
END;
$$;

-- A time as Python's datetime.isoformat() writes it in UTC, quoted as a JSON string.
CREATE OR REPLACE FUNCTION taskd.python_time(value timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT '"' || to_char(value AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
           || CASE WHEN date_trunc('second', value) = value THEN ''
                   ELSE '.' || to_char(value AT TIME ZONE 'UTC', 'US') END
           || '+00:00"';
$$;

-- The digest of an idempotent request as taskd.registry makes it (the request as
-- given, before defaults): sha256 of json.dumps(fields, sort_keys=True,
-- separators=(",", ":")), so a key used through the API and through this function
-- finds the same task.
CREATE OR REPLACE FUNCTION taskd.request_digest(
    task_type text, payload jsonb, max_retries bigint, timeout_seconds double precision, priority bigint,
    queue text, run_at timestamptz, delay_seconds double precision, expires_at timestamptz,
    expires_in_seconds double precision
) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT encode(sha256(convert_to(
        '{"delay_seconds":' || coalesce(taskd.python_float(delay_seconds), 'null')
        || ',"expires_at":' || coalesce(taskd.python_time(expires_at), 'null')
        || ',"expires_in_seconds":' || coalesce(taskd.python_float(expires_in_seconds), 'null')
        || ',"max_retries":' || coalesce(max_retries::text, 'null')
        || ',"payload":' || taskd.python_json(payload)
        || ',"priority":' || coalesce(priority::text, 'null')
        || ',"queue":' || coalesce(taskd.python_string(queue), 'null')
        || ',"run_at":' || coalesce(taskd.python_time(run_at), 'null')
        || ',"task_type":' || taskd.python_string(task_type)
        || ',"timeout_seconds":' || coalesce(taskd.python_float(timeout_seconds), 'null')
        || '}', 'UTF8')), 'hex');
$$;

-- The key unique_for derives: the type, the payload and the window of time, the same
-- as taskd.registry.unique_key derives (which reproduces jsonb's text in Python).
CREATE OR REPLACE FUNCTION taskd.unique_key(task_type text, payload jsonb, unique_for double precision,
                                            at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT 'unique:' || floor(extract(epoch FROM at)::float8 / unique_for)::bigint || ':'
           || encode(sha256(convert_to(jsonb_build_object('payload', payload, 'task_type', task_type)::text,
                                       'UTF8')), 'hex');
$$;

-- Refuse one argument: SQLSTATE 22023 (invalid_parameter_value), the argument's name
-- in the error's column field, and a message that starts 'invalid_task: '.
CREATE OR REPLACE FUNCTION taskd.refuse(field text, message text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'invalid_task: ' || message, COLUMN = field,
        HINT = 'taskd.enqueue refuses what POST /tasks refuses; see the message';
END;
$$;

CREATE OR REPLACE FUNCTION taskd.enqueue(
    task_type          text,
    payload            jsonb            DEFAULT NULL,
    queue              text             DEFAULT NULL,
    priority           bigint           DEFAULT NULL,
    run_at             timestamptz      DEFAULT NULL,
    delay_seconds      double precision DEFAULT NULL,
    expires_at         timestamptz      DEFAULT NULL,
    expires_in_seconds double precision DEFAULT NULL,
    max_retries        bigint           DEFAULT NULL,
    timeout_seconds    double precision DEFAULT NULL,
    idempotency_key    text             DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    -- The arguments under names no column has: the statements below name columns freely.
    a_type text := enqueue.task_type;
    a_payload jsonb := coalesce(enqueue.payload, '{}');
    a_queue text := enqueue.queue;
    a_priority bigint := enqueue.priority;
    a_run_at timestamptz := enqueue.run_at;
    a_delay float8 := enqueue.delay_seconds;
    a_expires_at timestamptz := enqueue.expires_at;
    a_expires_in float8 := enqueue.expires_in_seconds;
    a_retries bigint := enqueue.max_retries;
    a_timeout float8 := enqueue.timeout_seconds;
    a_key text := enqueue.idempotency_key;
    s taskd.settings;
    h taskd.task_types;
    a_hash text;
    start_at timestamptz;
    deadline timestamptz;
    found_id bigint;
    found_hash text;
    known text;
    -- The moment of the call, not the start of the caller's transaction (now()), which
    -- may be long before: delays, expiry and the unique_for window count from here.
    called_at timestamptz := statement_timestamp();
BEGIN
    SELECT * INTO s FROM taskd.settings;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = '55000',
            MESSAGE = 'taskd.settings is empty: start taskd once on this database (it publishes its settings there)';
    END IF;

    -- The checks of taskd.registry.Registry.new_task, in its order, with its messages.
    IF a_type IS NULL OR char_length(a_type) NOT BETWEEN 1 AND s.max_type_chars THEN
        PERFORM taskd.refuse('task_type', format('task_type must be a string of 1 to %s characters',
                                                 s.max_type_chars));
    END IF;
    IF jsonb_typeof(a_payload) <> 'object' THEN
        PERFORM taskd.refuse('payload', format('payload must be a JSON object, not %s', jsonb_typeof(a_payload)));
    END IF;
    IF a_retries NOT BETWEEN 0 AND s.max_retries_limit THEN
        PERFORM taskd.refuse('max_retries', format('max_retries must be a whole number from 0 to %s',
                                                   s.max_retries_limit));
    END IF;
    IF NOT (a_timeout > 0 AND a_timeout <= s.max_timeout_seconds) THEN
        PERFORM taskd.refuse('timeout_seconds', format('timeout_seconds must be > 0 and <= %s',
                                                       s.max_timeout_seconds));
    END IF;
    IF a_priority NOT BETWEEN s.priority_min AND s.priority_max THEN
        PERFORM taskd.refuse('priority', format('priority must be a whole number from %s to %s',
                                                s.priority_min, s.priority_max));
    END IF;
    IF a_run_at IS NOT NULL AND a_delay IS NOT NULL THEN
        PERFORM taskd.refuse('run_at', 'give run_at or delay_seconds, not both');
    END IF;
    -- Python's datetime holds years 1 to 9999: what the API could not read, this refuses too.
    IF NOT (a_run_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00') THEN
        PERFORM taskd.refuse('run_at', 'run_at is out of range');
    END IF;
    IF NOT (a_delay >= 0 AND a_delay <= s.max_delay_seconds) THEN
        PERFORM taskd.refuse('delay_seconds', format('delay_seconds must be from 0 to %s', s.max_delay_seconds));
    END IF;
    IF a_queue !~ s.queue_pattern THEN
        PERFORM taskd.refuse('queue', format('queue must be %s', s.queue_rule));
    END IF;
    IF a_expires_at IS NOT NULL AND a_expires_in IS NOT NULL THEN
        PERFORM taskd.refuse('expires_at', 'give expires_at or expires_in_seconds, not both');
    END IF;
    IF NOT (a_expires_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00') THEN
        PERFORM taskd.refuse('expires_at', 'expires_at is out of range');
    END IF;
    IF NOT (a_expires_in > 0 AND a_expires_in <= s.max_delay_seconds) THEN
        PERFORM taskd.refuse('expires_in_seconds', format('expires_in_seconds must be > 0 and <= %s',
                                                          s.max_delay_seconds));
    END IF;
    IF a_expires_at IS NOT NULL OR a_expires_in IS NOT NULL THEN
        -- An expiry must leave the task a chance to run: after its start, and not past.
        start_at := coalesce(a_run_at, called_at + make_interval(secs => coalesce(a_delay, 0)));
        deadline := coalesce(a_expires_at, called_at + make_interval(secs => a_expires_in));
        IF a_expires_at <= called_at THEN
            PERFORM taskd.refuse('expires_at', 'expires_at is in the past');
        END IF;
        IF deadline <= start_at THEN
            PERFORM taskd.refuse(CASE WHEN a_expires_at IS NOT NULL THEN 'expires_at' ELSE 'expires_in_seconds' END,
                'the task would expire before it may start (expiry not after run_at / delay_seconds)');
        END IF;
    END IF;
    IF char_length(a_key) NOT BETWEEN 1 AND s.max_key_chars THEN
        PERFORM taskd.refuse('idempotency_key', format('idempotency_key must be 1 to %s characters (no NUL)',
                                                       s.max_key_chars));
    END IF;

    SELECT * INTO h FROM taskd.task_types t WHERE t.task_type = a_type;
    IF NOT FOUND THEN
        SELECT coalesce(string_agg(t.task_type, ', ' ORDER BY t.task_type), 'none') INTO known
        FROM taskd.task_types t;
        PERFORM taskd.refuse('task_type', format('unknown task_type ''%s''; known types: %s', a_type, known));
    END IF;

    IF a_key IS NOT NULL THEN
        -- The request as given, before defaults (which may differ between processes).
        a_hash := taskd.request_digest(a_type, a_payload, a_retries, a_timeout, a_priority, a_queue, a_run_at,
                                       a_delay, a_expires_at, a_expires_in);
    ELSIF h.unique_for IS NOT NULL THEN
        a_key := taskd.unique_key(a_type, a_payload, h.unique_for, called_at);
        a_hash := 'unique_for';  -- any repeat within the window is the same job
    END IF;

    a_retries := coalesce(a_retries, h.max_retries, s.max_retries);
    a_timeout := coalesce(a_timeout, h.timeout_seconds, s.task_timeout);
    a_priority := coalesce(a_priority, h.priority, 0);
    a_queue := coalesce(a_queue, h.queue, 'default');

    -- As task_insert_many and task_insert_keyed insert (sql/queries/tasks.sql): a start
    -- time already past counts as now, so it cannot jump ahead of the queue.
    IF a_key IS NULL THEN
        INSERT INTO taskd.tasks (task_type, payload, max_retries, timeout_seconds, priority, run_at, queue,
                                 expires_at)
        VALUES (a_type, a_payload, a_retries, a_timeout, a_priority,
                greatest(coalesce(a_run_at, called_at + make_interval(secs => coalesce(a_delay, 0))), called_at),
                a_queue, coalesce(a_expires_at, called_at + make_interval(secs => a_expires_in)))
        RETURNING id INTO found_id;
        RETURN found_id;
    END IF;

    -- With a key: ON CONFLICT DO NOTHING rather than catching unique_violation, which
    -- would open a subtransaction per call (a transaction enqueuing many tasks would
    -- overflow the backend's subtransaction cache and slow every snapshot). A
    -- concurrent insert of the same key is waited for, then found.
    FOR attempt IN 1..3 LOOP
        INSERT INTO taskd.tasks (task_type, payload, max_retries, timeout_seconds, priority, run_at, queue,
                                 expires_at, idempotency_key, idempotency_hash)
        VALUES (a_type, a_payload, a_retries, a_timeout, a_priority,
                greatest(coalesce(a_run_at, called_at + make_interval(secs => coalesce(a_delay, 0))), called_at),
                a_queue, coalesce(a_expires_at, called_at + make_interval(secs => a_expires_in)), a_key, a_hash)
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING id INTO found_id;
        IF found_id IS NOT NULL THEN
            RETURN found_id;
        END IF;
        SELECT t.id, t.idempotency_hash INTO found_id, found_hash
        FROM taskd.tasks t WHERE t.idempotency_key = a_key;
        IF found_id IS NOT NULL THEN
            IF found_hash IS DISTINCT FROM a_hash THEN
                RAISE EXCEPTION USING ERRCODE = 'P0409',
                    MESSAGE = format('idempotency_conflict: idempotency key %L was already used, for task %s, with '
                                     'another request; send the same request to get that task, or use a new key',
                                     a_key, found_id),
                    DETAIL = format('task_id=%s', found_id), COLUMN = 'idempotency_key';
            END IF;
            RETURN found_id;
        END IF;
        -- The task holding the key was deleted in between: insert again.
    END LOOP;
    RAISE EXCEPTION USING ERRCODE = '40001',
        MESSAGE = 'the task holding this idempotency key changed while it was looked up; try again';
END;
$$;

COMMENT ON FUNCTION taskd.enqueue(text, jsonb, text, bigint, timestamptz, double precision, timestamptz,
                                  double precision, bigint, double precision, text) IS
'Insert one task in the caller''s transaction and return its id, as POST /tasks does: the same checks, '
'and defaults from the task, then its handler, then the server settings (taskd.task_types, taskd.settings). '
'With an idempotency key the same request returns the same id; another request raises SQLSTATE P0409 '
'(idempotency_conflict). Invalid input raises SQLSTATE 22023 naming the argument. A handler''s Python '
'validate= callback does not run here (taskd.task_types.validates_in_python).';
