"""Batches that form when the model is free: everything waiting then, up to the batch size.

Why not `@serve.batch`: since ray-project/ray#53096 ("make serve.batch concurrent", 2025) its
loop forms a batch as soon as the first item's `batch_wait_timeout_s` has passed and only then
waits for its `max_concurrent_batches` slot. While one batch computes, the loop keeps cutting
the arrivals of every 50 ms into batches of their own, which then run one after another. Measured
on the ASR replica (bench/serve_load.py, 16 clients, 2 cores): mean batch 3.0 of 16 with windows
queued 9 s on average and the model 99 % busy, i.e. the queue was full and the batches small.

Here one loop takes a batch, runs it to the end, and only then takes the next: the windows that
arrived during a computation are all waiting, and go together (up to `max_batch_size`).

How long a batch waits for company follows the recent demand, not a fixed timer. After each
batch the batcher remembers how many items were in play during it (the batch plus what queued
meanwhile); the next batch waits, at most `batch_wait_timeout_s`, until that many are there. The
callers of the batch that just finished send their next windows within a moment (their HTTP
round trip), and without the wait the model would take the others alone and split one group of
callers into two batches for good (measured at 16 clients: "1 16 2 14 2 14 2"). A lone caller
(demand 1) never waits; the first item on an idle replica neither.

Nothing here knows Ray; the replica owns the instance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]


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
        self.demand = 1
        """Items in play during the last batch (its own plus those that queued meanwhile): how
        many the next batch waits for, up to `batch_wait_timeout_s`."""

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
        """Wait for a first item, then until `demand` items are there (at most the batch size)
        or `batch_wait_timeout_s` has passed; take what is there, up to the batch size."""
        assert self._arrived is not None
        while True:
            self._queue = [p for p in self._queue if not p.future.done()]  # callers gone
            if self._queue:
                break
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.monotonic() + self.batch_wait_timeout_s
        while len(self._queue) < min(self.demand, self.max_batch_size):
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
            self.demand = 1
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self.demand = len(batch) + self.waiting
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)
