"""One worker thread runs a continuous batch of generations; requests wait in a bounded FIFO.

Only the worker touches the model and the caches. A request becomes a `Job`: the HTTP side
submits it and reads its events (text deltas, then one `Finished` or one exception) from an
asyncio queue; the worker fills that queue from its thread. Between steps the worker admits
waiting jobs into free slots of the batch (`mtpspec.batch`), and every step advances all running
generations in one target pass (a long prompt by one prefill chunk). Cancelling a job (its client
went away) drops it from the queue, or drops its generation from the batch after the current step,
prefill included. Targets that cannot share a pass run one generation at a time. A job
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

from ..batch import PREFILL_CHUNK, PREFIX_CACHE_MB, Batch, Slot
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
        self.received = self.started = time.perf_counter()
        self.first_token_s: float | None = None
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
    def __init__(
        self,
        engine: Engine,
        max_queue: int,
        metrics: Metrics,
        max_batch: int = 8,
        speculation: str = "auto",
        queue_timeout_s: float | None = None,
        prefix_cache_mb: float = PREFIX_CACHE_MB,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        self.batch = Batch(
            engine.target,
            engine.drafter,
            max_batch,
            prefill_chunk=prefill_chunk,
            speculation=speculation,
            prefix_cache_mb=prefix_cache_mb,
        )
        self.max_queue = max_queue  # requests that may wait while every slot is busy
        self.queue_timeout_s = queue_timeout_s  # longest wait in the queue; None: no limit
        self.metrics = metrics
        self.waiting = 0
        self.running: dict[Slot, Job] = {}  # written by the worker only
        self._lock = threading.Lock()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._mean_job_s = 1.0  # moving average of a generation's duration, for Retry-After

    @property
    def max_batch(self) -> int:
        return self.batch.max_batch

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
            jobs = [j for j in (*self.running.values(), *self._jobs.queue) if j is not None]
        for job in jobs:
            job.cancel()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit(self, prompt_ids: list[int], config: GenerationConfig, endpoint: str) -> Job:
        """Queue a generation (call on the event loop); `QueueFull` when max_queue already wait."""
        with self._lock:
            if self.waiting + len(self.running) >= self.max_queue + self.max_batch:
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
        waves = (self.waiting + 1) / self.max_batch  # batches that run before a new job starts
        return max(1, math.ceil(self._mean_job_s * waves))

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

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.running.set(len(self.running))

    def _work(self) -> None:
        while self._admit():
            try:
                events = self.batch.step()
            except Exception as e:  # noqa: BLE001 - a failing step must not take the worker down
                log.exception("generation failed")
                for slot in list(self.running):
                    self._finish(slot, "error", e)
                continue
            now = time.perf_counter()
            for slot, chunk in events:
                job = self.running[slot]
                if job.first_token_s is None:
                    job.first_token_s = now
                    self.metrics.ttft.labels(job.endpoint).observe(now - job.received)
                if chunk.text:
                    job.emit(chunk.text)
            for slot, job in list(self.running.items()):
                if job.cancelled:
                    self._finish(slot, "cancelled")
                elif slot.done:
                    self._finish(slot, "ok")

    def _admit(self) -> bool:
        """Move waiting jobs into free slots (waiting for one when nothing runs); False on stop."""
        while not self.batch.full:
            try:
                job = self._jobs.get(block=not self.running)
            except queue.Empty:
                return True
            if job is None:
                return False
            with self._lock:
                if job.state != "queued":
                    continue
                job.state = "running"
                self.waiting -= 1
            try:
                slot = self.batch.add(job.prompt_ids, job.config)
            except MtpspecError as e:
                job.state = "done"
                job.emit(e)
                continue
            with self._lock:
                self.running[slot] = job
            job.started = time.perf_counter()
            self._gauges()
        return True

    def _finish(self, slot: Slot, outcome: str, error: BaseException | None = None) -> None:
        job = self.running[slot]
        self.batch.remove(slot, keep_cache=outcome != "error")
        self.metrics.prefix_cache_bytes.set(self.batch.idle_cache_bytes)
        with self._lock:
            del self.running[slot]
            job.state = "done"
        job.emit(error if error is not None else Finished(slot.result, outcome))
        now = time.perf_counter()
        self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (now - job.started)
        self.metrics.record_generation(
            job.endpoint, outcome, len(job.prompt_ids), slot.result.stats, now - job.received
        )
        self._gauges()
