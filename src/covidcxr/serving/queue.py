"""The bounded inference queue: admission (503 when full) and thread jobs with a deadline and a budget."""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import ThreadPoolExecutor


class QueueTimeout(Exception):
    """The request's overall deadline passed while its job waited for, or ran in, a thread."""


class BudgetExceeded(Exception):
    """The job ran longer than its own budget (the decode budget)."""


class InferenceQueue:
    """At most ``limit`` predictions admitted at once (running + waiting for a thread; 503 above).

    A request's slot is held until it is answered *and* its last thread job has finished: Python
    cannot stop a thread, so a decode abandoned at its deadline keeps its slot while it runs and a
    flood of heavy uploads meets a full queue (503) instead of piling up behind busy threads.
    """

    def __init__(self, executor: ThreadPoolExecutor, limit: int):
        self.executor, self.limit = executor, limit
        self.admitted = 0
        self._lock = threading.Lock()

    def full(self) -> bool:
        return self.admitted >= self.limit

    def admit(self) -> "Slot | None":
        with self._lock:
            if self.admitted >= self.limit:
                return None
            self.admitted += 1
        return Slot(self)


class Slot:
    def __init__(self, queue: InferenceQueue):
        self.queue, self.refs = queue, 1

    def _release(self, *_ignored) -> None:
        with self.queue._lock:
            self.refs -= 1
            if self.refs == 0:
                self.queue.admitted -= 1

    def close(self) -> None:
        self._release()

    async def run(self, fn, *args, deadline: float, budget: float = math.inf):
        """``fn(*args)`` in a thread; ``budget`` counts from when the thread starts, ``deadline``
        (loop time) bounds queueing + running. Raises :class:`QueueTimeout` / :class:`BudgetExceeded`."""
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def job():
            try:
                loop.call_soon_threadsafe(started.set)
            except RuntimeError:  # the loop is gone (shutdown): nobody waits for this job
                return None
            return fn(*args)

        with self.queue._lock:
            self.refs += 1
        cfut = self.queue.executor.submit(job)
        cfut.add_done_callback(self._release)
        fut = asyncio.wrap_future(cfut)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # abandoned jobs: no warnings
        try:
            await asyncio.wait_for(started.wait(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            cfut.cancel()  # still waiting for a thread: never runs, frees its slot now
            raise QueueTimeout from None
        remaining = deadline - loop.time()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, min(budget, remaining)))
        except asyncio.TimeoutError:
            raise (BudgetExceeded if budget < remaining else QueueTimeout) from None
