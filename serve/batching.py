"""Batches that form when the model is free: everything waiting then, up to the batch size.

Why not `@serve.batch`: since ray-project/ray#53096 ("make serve.batch concurrent", 2025) its
loop forms a batch as soon as the first item's `batch_wait_timeout_s` has passed and only then
waits for its `max_concurrent_batches` slot. While one batch computes, the loop keeps cutting
the arrivals of every 50 ms into batches of their own, which then run one after another. Measured
on the ASR replica (bench/serve_load.py, 16 clients, 2 cores): mean batch 3.0 of 16 with windows
queued 9 s on average and the model 99 % busy, i.e. the queue was full and the batches small.

Here one loop takes a batch, runs it to the end, and only then takes the next: the windows that
arrived during a computation are all waiting, and go together (up to `max_batch_size`). When the
model is idle, a first item waits at most `batch_wait_timeout_s` (counted from its arrival) for
company, as with Serve's decorator. Nothing here knows Ray; the replica owns the instance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[Item, Result]):
    """`await submit(item)` returns `run(batch)`'s result for that item; one batch at a time.

    Created and used on one event loop (a Serve replica's); the loop task starts with the
    first item. A caller that goes away (cancelled) leaves its item out of the batch if the
    batch has not started yet.
    """

    def __init__(self, run: Callable[[list[Item]], Awaitable[Sequence[Result]]], *,
                 max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._queue: list[_Pending[Item, Result]] = []
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def configure(self, *, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """New limits, from the next batch on."""
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s

    @property
    def waiting(self) -> int:
        """Items queued and not yet taken by a batch."""
        return sum(1 for p in self._queue if not p.future.done())

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop(), name="micro-batcher")
        pending: _Pending[Item, Result] = _Pending(item, loop.create_future())
        self._queue.append(pending)
        self._arrived.set()
        return await pending.future

    async def _loop(self) -> None:
        assert self._arrived is not None
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run_batch(batch)

    async def _next_batch(self) -> list[_Pending[Item, Result]]:
        """Wait for a first item, then until the batch is full or the first item has waited
        `batch_wait_timeout_s`; take what is there."""
        assert self._arrived is not None
        while True:
            self._queue = [p for p in self._queue if not p.future.done()]  # callers gone
            if self._queue:
                break
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0].arrived + self.batch_wait_timeout_s
        while len(self._queue) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break
            self._queue = [p for p in self._queue if not p.future.done()]
        batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size:]
        return [p for p in batch if not p.future.done()]

    async def _run_batch(self, batch: list[_Pending[Item, Result]]) -> None:
        try:
            results = await self._run([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
