"""The reference for the `bare` scenario: the same web stack as taskd with no work behind it.

One route, POST /tasks, parses the JSON body and answers 201, served like taskd serves
(hypercorn's trio worker, one process, no access log), so `submit / bare` says how much of
the per-request cost is taskd's own and how much the stack's.

    python -m loadtest.bare_app --port 18200      # SIGTERM or Ctrl-C stops it
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import signal

import hypercorn.trio
import trio
from hypercorn.config import Config
from quart import Response, request
from quart_trio import QuartTrio

app = QuartTrio("bare")
_ids = itertools.count(1)


@app.post("/tasks")
async def create_task() -> Response:
    data = json.loads(await request.get_data(cache=False))
    body = json.dumps({"id": next(_ids), "task_type": data.get("task_type"), "status": "pending"})
    return Response(body, status=201, headers={"Content-Type": "application/json"})


@app.get("/health")
async def health() -> Response:
    return Response('{"status":"ok"}', headers={"Content-Type": "application/json"})


async def serve(host: str, port: int) -> None:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    stop = trio.Event()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()  # hypercorn finishes open requests, then serve() returns
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        await nursery.start(functools.partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait))
        print(f"bare: API http://{host}:{port}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    trio.run(serve, args.host, args.port)


if __name__ == "__main__":
    main()
