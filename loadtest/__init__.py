"""Load tests for taskd: standalone scripts that talk to a server over HTTP and SQL.

They never import tests/; only flaky_tasks imports taskd (to register a handler).
Run them with `python -m loadtest.<script> --help`.
"""
