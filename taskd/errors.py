"""The errors taskd raises on purpose. Imports nothing from taskd.

    TaskdError
    ├── ConfigError            a setting is invalid (the CLI exits 2 with one line)
    ├── SqlFileError           a file under sql/ is malformed, or a needed query is missing
    ├── DatabaseError          the database failed a statement
    │   └── DatabaseUnavailable  the database cannot be reached
    ├── InvalidTask            a task submitted by a client is not acceptable (HTTP 422)
    ├── IdempotencyConflict    an idempotency key already made a task from another request (HTTP 409)
    ├── StartupCancelled       SIGTERM/SIGINT before taskd was serving (the CLI exits 0 with one line)
    └── SchemaTooNew           the database's schema is newer than this taskd (the CLI exits 2)
"""

from __future__ import annotations


class TaskdError(Exception):
    """Base of every error taskd raises on purpose."""


class ConfigError(TaskdError):
    """A setting is invalid; the message names it."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class SqlFileError(TaskdError):
    """A file under sql/ is malformed, or a query taskd needs is missing."""


class DatabaseError(TaskdError):
    """The database failed a statement."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached."""


class InvalidTask(TaskdError):
    """A submitted task is not acceptable; `field` names what is wrong."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class IdempotencyConflict(TaskdError):
    """The idempotency key already made a task, from a request with another body."""

    def __init__(self, key: str, task_id: int) -> None:
        super().__init__(f"idempotency key {key!r} was used for task {task_id} with another request body")
        self.key = key
        self.task_id = task_id


class StartupCancelled(TaskdError):
    """A stop was asked for (SIGTERM/SIGINT) before taskd was serving; a clean stop, not a failure."""


class SchemaTooNew(TaskdError):
    """A later release migrated the database past what this taskd knows: it must not run there
    (nor migrate it). Raised before any migration is applied."""

    def __init__(self, database_version: int, known_version: int) -> None:
        super().__init__(f"the database's schema is at version {database_version}, newer than this taskd "
                         f"({known_version}): upgrade taskd, or point it at another database")
        self.database_version = database_version
        self.known_version = known_version
