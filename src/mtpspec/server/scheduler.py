"""One worker thread runs generations one at a time; requests wait their turn in a bounded FIFO.

The engine owns one KV cache and is not reentrant, so exactly one thread ever touches it. A
request becomes a `Job`: the HTTP side submits it and reads its events (text deltas, then one
`Finished` or one exception) from an asyncio queue; the worker fills that queue from its thread.
Cancelling a job (its client went away) drops it from the queue, or stops its generation after
the current verification round by closing the engine's generator, which rolls the cache back. A job
still queued after `queue_timeout_s` expires: it leaves the queue and its request gets `QueueTimeout`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

from ..engine import Engine, GenerationConfig, GenerationResult
from ..errors import MtpspecError
from .metrics import Metrics

log = logging.getLogger("mtpspec.server")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the server is busy; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class QueueTimeout(Exception):
    def __init__(self, waited_s: float, retry_after_s: int):
        super().__init__(
            f"the request waited {waited_s:.0f} s in the queue without reaching the engine; retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


@dataclass
class Finished:
    result: GenerationResult
    outcome: str  # "ok" or "cancelled"


class Job:
    """One request's generation. States: queued → running → done, or queued → dropped / expired."""

    def __init__(self, scheduler: Scheduler, prompt_ids: list[int], config: GenerationConfig, endpoint: str):
        self.prompt_ids = prompt_ids
        self.config = config
        self.endpoint = endpoint
        self.received = time.perf_counter()
        self.state = "queued"  # guarded by the scheduler's lock
        self.events: asyncio.Queue = asyncio.Queue()  # str deltas, then a Finished or an exception
        self._loop = asyncio.get_running_loop()
        self._cancelled = threading.Event()
        self._scheduler = scheduler

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop this job wherever it is; a no-op once it is done. Safe from any thread."""
        self._cancelled.set()
        self._scheduler._drop(self)

    def emit(self, item) -> None:
        """Hand an event to the request's event loop (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self._cancelled.set()

    async def finished(self) -> Finished:
        """Wait for the end of the generation, skipping the text deltas; re-raise its failure."""
        while True:
            item = await self.events.get()
            if isinstance(item, Finished):
                return item
            if isinstance(item, BaseException):
                raise item


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics, queue_timeout_s: float | None = None):
        self.engine = engine
        self.max_queue = max_queue  # requests that may wait behind the running one
        self.queue_timeout_s = queue_timeout_s  # longest wait in the queue; None: no limit
        self.metrics = metrics
        self.waiting = 0
        self.running: Job | None = None
        self._lock = threading.Lock()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._mean_job_s = 1.0  # moving average of a generation's duration, for Retry-After

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it never ends before `stop` unless something killed it)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="mtpspec-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel what runs and waits, then end the worker."""
        with self._lock, self._jobs.mutex:
            jobs = [j for j in (self.running, *self._jobs.queue) if j is not None]
        for job in jobs:
            job.cancel()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit(self, prompt_ids: list[int], config: GenerationConfig, endpoint: str) -> Job:
        """Queue a generation (call on the event loop); `QueueFull` when max_queue already wait."""
        with self._lock:
            if self.waiting + (self.running is not None) > self.max_queue:
                raise QueueFull(self._retry_after_s())
            job = Job(self, prompt_ids, config, endpoint)
            self.waiting += 1
            self._jobs.put(job)
        if self.queue_timeout_s is not None:
            job._loop.call_later(self.queue_timeout_s, self._expire, job)
        self._gauges()
        return job

    def _retry_after_s(self) -> int:
        """Seconds until the queue has likely drained, from recent generations' durations."""
        return max(1, math.ceil(self._mean_job_s * (self.waiting + 1)))

    def _expire(self, job: Job) -> None:
        """Take `job` out of the queue if it is still there (on the event loop, `queue_timeout_s` after submit)."""
        with self._lock:
            if job.state != "queued":
                return
            job.state = "expired"
            self.waiting -= 1
            error = QueueTimeout(time.perf_counter() - job.received, self._retry_after_s())
        self.metrics.generations.labels(job.endpoint, "queue_timeout").inc()
        self._gauges()
        job.events.put_nowait(error)

    def _drop(self, job: Job) -> None:
        with self._lock:
            if job.state != "queued":
                return
            job.state = "dropped"
            self.waiting -= 1
        self.metrics.generations.labels(job.endpoint, "cancelled").inc()  # it never reached the engine
        self._gauges()

    def _take(self, job: Job) -> bool:
        with self._lock:
            if job.state != "queued":
                return False
            job.state = "running"
            self.waiting -= 1
            self.running = job
        self._gauges()
        return True

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(self.running is not None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not self._take(job):
                continue
            t0 = time.perf_counter()
            try:
                self._generate(job)
            finally:
                with self._lock:
                    job.state = "done"
                    self.running = None
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.perf_counter() - t0)
                self._gauges()

    def _generate(self, job: Job) -> None:
        result = GenerationResult(list(job.prompt_ids))
        chunks = self.engine.stream(job.prompt_ids, job.config, result)
        outcome = "error"
        try:
            for i, chunk in enumerate(chunks):
                if i == 0:
                    self.metrics.ttft.labels(job.endpoint).observe(time.perf_counter() - job.received)
                if chunk.text:
                    job.emit(chunk.text)
                if job.cancelled:
                    break
            outcome = "cancelled" if job.cancelled else "ok"
            job.emit(Finished(result, outcome))
        except MtpspecError as e:
            job.emit(e)
        except Exception as e:  # noqa: BLE001 - one failing request must not take the worker down
            log.exception("generation failed")
            job.emit(e)
        finally:
            chunks.close()  # stops decoding if it was cut short; the engine rolls back in `finally`
            latency = time.perf_counter() - job.received
            self.metrics.record_generation(job.endpoint, outcome, len(job.prompt_ids), result.stats, latency)
