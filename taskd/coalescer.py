"""Coalesce many concurrent calls into one batched call. Imports nothing from taskd.

Callers `await submit(item)` and each gets back its own result or its own
exception, or `await put(item)` to hand an item over without waiting for it to
be written (the hot path of a worker); one loop gathers what has arrived (waiting at most `window` seconds
after the first item, less once `max_items` are in hand) and hands the batch to
`flush`, which returns one result or exception per item, in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

log = logging.getLogger("taskd.coalescer")

T = TypeVar("T")
R = TypeVar("R")

Flush = Callable[[Sequence[T]], Awaitable[Sequence["R | BaseException"]]]


class _Slot(Generic[R]):
    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: R | None = None
        self.error: BaseException | None = None


class CoalescerClosed(RuntimeError):
    """The coalescer is no longer taking items (shutdown)."""


class Coalescer(Generic[T, R]):
    def __init__(
        self, flush: Flush[T, R], *, max_items: int, window: float, name: str, flush_timeout: float = 60.0
    ) -> None:
        self._flush = flush
        self.flush_timeout = flush_timeout
        self.max_items = max_items
        self.window = window
        self.name = name
        self._send, self._receive = trio.open_memory_channel[tuple[T, _Slot[R] | None]](max_items)
        self.batches = 0
        self.items = 0
        self._unflushed = 0
        self._last_size = 0
        self._idle = trio.Event()
        self._idle.set()

    async def _enqueue(self, item: T, slot: _Slot[R] | None) -> None:
        try:
            try:
                self._send.send_nowait((item, slot))
            except trio.WouldBlock:
                await self._send.send((item, slot))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise CoalescerClosed(f"{self.name} is shut down") from None
        if self._unflushed == 0:
            self._idle = trio.Event()
        self._unflushed += 1

    async def put(self, item: T) -> None:
        """Queue item for the next batch without waiting for the flush (waits only while the queue is full)."""
        await self._enqueue(item, None)

    async def wait_idle(self) -> None:
        """Return once everything queued so far has been flushed."""
        while self._unflushed:
            await self._idle.wait()

    async def submit(self, item: T) -> R:
        """Queue item for the next batch and wait until that batch is flushed."""
        slot: _Slot[R] = _Slot()
        await self._enqueue(item, slot)
        # Once queued, the item is flushed whatever happens to this caller, so
        # wait for the outcome even if cancelled: the caller then learns it.
        with trio.CancelScope(shield=True):
            await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.value  # type: ignore[return-value]

    def close(self) -> None:
        """Take no more items; run() flushes what is queued and returns."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Gather and flush batches until close() and everything queued is flushed."""
        task_status.started()
        batch: list[tuple[T, _Slot[R] | None]] = []
        try:
            while True:
                try:
                    batch = [await self._receive.receive()]
                except trio.EndOfChannel:
                    return
                self._take_ready(batch, self.max_items)
                # Wait for company only under load (the last batch was shared): a
                # lone item at a quiet time goes at once, with no added latency.
                if len(batch) < self.max_items and self.window > 0 and (len(batch) > 1 or self._last_size > 1):
                    with trio.move_on_after(self.window):
                        while len(batch) < self.max_items:
                            try:
                                batch.append(await self._receive.receive())
                            except trio.EndOfChannel:
                                break
                            self._take_ready(batch, self.max_items)
                with trio.CancelScope(shield=True):
                    await self._flush_batch(batch)
                self._last_size = len(batch)
                batch = []
        finally:
            # Cancelled before flushing: no caller may wait forever on its slot.
            self._take_ready(batch, math.inf)
            self._receive.close()
            if batch:
                log.error("%s stopped with %d items not flushed", self.name, len(batch))
            for _, slot in batch:
                if slot is not None and not slot.done.is_set():
                    slot.error = CoalescerClosed(f"{self.name} stopped before flushing")
                    slot.done.set()

    def _take_ready(self, batch: list[tuple[T, _Slot[R] | None]], cap: float) -> None:
        """Move what is already queued into batch, up to cap items in all."""
        while len(batch) < cap:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    async def _flush_batch(self, batch: list[tuple[T, _Slot[R] | None]]) -> None:
        items = [item for item, _ in batch]
        try:
            with trio.fail_after(self.flush_timeout):
                results: Sequence[R | BaseException] = await self._flush(items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: flush returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            results = [exc] * len(items)
        self.batches += 1
        self.items += len(items)
        self._unflushed -= len(items)
        if self._unflushed == 0:
            self._idle.set()
        for (_, slot), result in zip(batch, results, strict=True):
            if slot is None:
                if isinstance(result, BaseException):
                    log.error("%s: an item handed over without waiting failed: %r", self.name, result)
                continue
            if isinstance(result, BaseException):
                slot.error = result
            else:
                slot.value = result
            slot.done.set()
