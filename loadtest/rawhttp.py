"""A small HTTP/1.1 keep-alive client on asyncio streams, and the two load shapes the bench uses.

Why not httpx: it spends several hundred µs of CPU per request, so at the ~1,000 req/s one
server core serves, the client core is full and the benchmark would measure the client.
This client does only what a JSON API over HTTP/1.1 needs (Content-Length or chunked
bodies, keep-alive, reconnect when the server closes) at a few tens of µs per request;
every result carries the client's own CPU use so a saturated client shows up in the report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable

# (method, path, body) for request number i
Request = tuple[str, str, bytes | None]
MakeRequest = Callable[[int], Request]


class HttpError(Exception):
    """The connection broke or the response was not HTTP/1.1 we understand."""


@dataclasses.dataclass(frozen=True)
class Target:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"need an http://host:port URL, got {url!r}")
        return cls(parts.hostname, parts.port or 80)


class Connection:
    """One keep-alive connection; not safe for concurrent requests (use one per worker)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._host_header = f"Host: {target.host}:{target.port}\r\n"

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        reused = self._writer is not None
        try:
            return await self._exchange(method, path, body)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            await self.close()
            # The server may have dropped an idle keep-alive connection before reading our
            # request; only then is sending it again safe, and only once.
            if reused and not getattr(exc, "partial", b""):
                try:
                    return await self._exchange(method, path, body)
                except (ConnectionError, asyncio.IncompleteReadError) as again:
                    await self.close()
                    raise HttpError(f"{method} {path}: {again!r}") from again
            raise HttpError(f"{method} {path}: {exc!r}") from exc

    async def _exchange(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.target.host, self.target.port)
        assert self._reader is not None
        head = f"{method} {path} HTTP/1.1\r\n{self._host_header}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode("latin-1") + b"\r\n" + (body or b""))
        status, payload, close = await self._read_response(self._reader, method)
        if close:
            await self.close()
        return status, payload

    @staticmethod
    async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[int, bytes, bool]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        try:
            status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"not an HTTP status line: {head[0]!r}") from None
        length: int | None = None
        chunked = close = False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                close = value.strip().lower() == "close"
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return status, b"", close
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await reader.readexactly(size + 2))
                if size == 0:
                    return status, b"".join(p[:-2] for p in parts), close
        if length is not None:
            return status, await reader.readexactly(length), close
        return status, await reader.read(), True  # body runs to end of stream

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


@dataclasses.dataclass
class LoadResult:
    """What a load run saw: per-request latency (s), status counts, bodies in request order."""

    elapsed: float
    latencies: list[float]
    statuses: Counter[int]
    bodies: list[bytes | None]
    errors: list[str]
    client_cpu: float  # this process's CPU seconds during the run

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def client_cpu_pct(self) -> float:
        return round(100 * self.client_cpu / self.elapsed, 1) if self.elapsed else 0.0


async def closed_loop(url: str, count: int, concurrency: int, make: MakeRequest) -> LoadResult:
    """Send `count` requests over `concurrency` connections, each sending its next as soon as
    the previous is answered: measures the most the server can take."""
    target = Target.parse(url)
    next_index = itertools.count()
    result = LoadResult(0.0, [], Counter(), [None] * count, [], 0.0)

    async def worker() -> None:
        conn = Connection(target)
        try:
            while (i := next(next_index)) < count:
                await _send(conn, i, make, result, time.perf_counter())
        finally:
            await conn.close()

    cpu, start = time.process_time(), time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, count)):
            group.create_task(worker())
    result.elapsed = time.perf_counter() - start
    result.client_cpu = time.process_time() - cpu
    return result


async def paced(url: str, rate: float, duration: float, concurrency: int, make: MakeRequest) -> LoadResult:
    """Send `rate` requests per second for `duration` seconds (an open loop). Latency counts
    from when a request was due, so a server that falls behind cannot hide it (no
    coordinated omission); at most `concurrency` are in flight."""
    target = Target.parse(url)
    count = int(rate * duration)
    result = LoadResult(0.0, [], Counter(), [None] * count, [], 0.0)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(concurrency):
        idle.put_nowait(Connection(target))

    async def one(i: int, due: float) -> None:
        conn = await idle.get()
        try:
            await _send(conn, i, make, result, due)
        finally:
            idle.put_nowait(conn)

    cpu, start = time.process_time(), time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            group.create_task(one(i, due))
    result.elapsed = time.perf_counter() - start
    result.client_cpu = time.process_time() - cpu
    while not idle.empty():
        await idle.get_nowait().close()
    return result


async def _send(conn: Connection, i: int, make: MakeRequest, result: LoadResult, since: float) -> None:
    method, path, body = make(i)
    try:
        status, payload = await conn.request(method, path, body)
    except HttpError as exc:
        result.statuses[0] += 1  # 0: no HTTP answer at all
        if len(result.errors) < 20:
            result.errors.append(str(exc))
        return
    result.latencies.append(time.perf_counter() - since)
    result.statuses[status] += 1
    result.bodies[i] = payload
    if not 200 <= status < 300 and len(result.errors) < 20:
        result.errors.append(f"{status}: {payload[:200]!r}")


async def get_json_status(url: str, path: str) -> tuple[int, bytes]:
    """One request on a fresh connection, for health checks and polling."""
    conn = Connection(Target.parse(url))
    try:
        return await conn.request("GET", path)
    finally:
        await conn.close()
