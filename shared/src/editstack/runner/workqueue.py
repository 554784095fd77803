"""One stage's shared queue of batches, from which every endpoint of the stage takes its work.

An endpoint that stops answering hands its in-flight batch back (`give_back`, to the front of the
queue) and is marked down; the other endpoints take the batch, and the down one takes work again
once it answers (`set_alive`). A batch is given up only when no endpoint served it within the
stage's deadline: counted from its first attempt, or, for a batch never tried, from the moment no
endpoint of the stage is alive. The queue also counts, per endpoint, the items it served and its
failed attempts (the manifest's `endpoints`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Job(Generic[T]):
    """A batch on its way through a stage."""

    work: T
    size: int  # items
    started: float | None = None  # the first attempt, on the monotonic clock: the deadline counts from here
    error: tuple[str, str] = ("service_unavailable", "no endpoint took it")  # the last attempt's (code, message)


@dataclass
class Usage:
    """What one endpoint did for the stage."""

    items: int = 0  # items it answered for (edited or scored, or an item error of its own)
    failed_attempts: int = 0  # batches it took and handed back (unavailable, busy, loading, refused)


class WorkQueue(Generic[T]):
    """Batches for `endpoints`, given up `deadline_s` after their first attempt; with `max_items`,
    `put` waits while that many items wait (back-pressure on the stage before)."""

    def __init__(self, endpoints: Sequence[str], deadline_s: float, max_items: int | None = None) -> None:
        self.deadline_s = deadline_s
        self.usage = {endpoint: Usage() for endpoint in endpoints}
        self._max_items = max_items
        self._waiting: deque[Job[T]] = deque()
        self._in_flight = 0
        self._closed = False
        self._alive = set(endpoints)
        self._changed = threading.Condition()

    def put(self, work: T, size: int, wait_s: float = 1.0) -> None:
        """Queue `work`; with max_items, first wait until there is room, in waits of `wait_s`."""
        with self._changed:
            while self._max_items is not None and self._waiting and \
                    sum(job.size for job in self._waiting) + size > self._max_items:
                self._changed.wait(wait_s)
            self._waiting.append(Job(work, size))
            self._changed.notify_all()

    def close(self) -> None:
        """No more puts: the queue is done once what it holds is finished."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def done(self) -> bool:
        with self._changed:
            return self._closed and not self._waiting and not self._in_flight

    def take(self, wait_s: float) -> Job[T] | None:
        """The next batch, its first attempt stamped; None when none came within `wait_s`."""
        with self._changed:
            if not self._waiting:
                self._changed.wait(wait_s)
            if not self._waiting:
                return None
            job = self._waiting.popleft()
            self._in_flight += 1
            job.started = job.started or time.monotonic()
            self._changed.notify_all()
            return job

    def budget_s(self, job: Job[T]) -> float:
        """What is left of `job`'s deadline."""
        return self.deadline_s - (time.monotonic() - (job.started or time.monotonic()))

    def finish(self, job: Job[T], endpoint: str | None = None, items: int = 0) -> None:
        """Done with `job` (served, or failed for good); `endpoint` answered for `items` of it."""
        with self._changed:
            self._in_flight -= 1
            if endpoint is not None:
                self.usage[endpoint].items += items
            self._changed.notify_all()

    def give_back(self, job: Job[T], endpoint: str, code: str, message: str) -> bool:
        """`endpoint` could not serve `job`: it goes back to the front of the queue and `endpoint` is
        marked down. False when its deadline has passed: the caller fails it (and finishes it)."""
        with self._changed:
            job.error = (code, message)
            self.usage[endpoint].failed_attempts += 1
            self._alive.discard(endpoint)
            if self.budget_s(job) <= 0:
                return False
            self._in_flight -= 1
            self._waiting.appendleft(job)
            self._changed.notify_all()
            return True

    def set_alive(self, endpoint: str) -> None:
        """`endpoint` answers again."""
        with self._changed:
            self._alive.add(endpoint)

    def alive(self, endpoint: str) -> bool:
        with self._changed:
            return endpoint in self._alive

    def expired(self) -> list[Job[T]]:
        """The waiting batches past their deadline, taken out (and counted in flight: the caller
        fails and finishes each). While no endpoint is alive, the untried ones' clocks start."""
        with self._changed:
            now = time.monotonic()
            if not self._alive:
                for job in self._waiting:
                    job.started = job.started or now
            gone = [job for job in self._waiting if job.started is not None and now - job.started >= self.deadline_s]
            for job in gone:
                self._waiting.remove(job)
            self._in_flight += len(gone)
            return gone
