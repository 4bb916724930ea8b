"""One thread that runs every model call of a server, fed by a bounded queue.

A llama.cpp context is not thread-safe, so all `Engine` / `Session` work (decoding images, vision, prefill,
generation, closing sessions) runs on this thread, one job at a time, in arrival order. The asyncio side
submits jobs and awaits their results or iterates their streamed pieces; it never touches the model.

- Bounded: at most `max_queue` jobs wait behind the running one; beyond that `submit` raises `Busy`, which
  carries a Retry-After estimate in seconds (the server answers 503).
- Timed: each job has a deadline (`timeout_s` after submission). A job still queued at its deadline is
  dropped; a stream running at its deadline is stopped between two pieces. Either way its caller gets
  `Timeout`.
- Cancellable: a stream whose consumer goes away (client disconnect) is stopped between two pieces.
  A stopped stream runs its `on_stop` callback on this thread (e.g. to repair the session's state).
"""

from __future__ import annotations

import asyncio
import collections
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator


class Busy(Exception):
    """The queue is full. `retry_after` is a whole number of seconds to wait before trying again."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry after {retry_after} s")
        self.retry_after = retry_after


class Timeout(Exception):
    """The job passed its deadline (queued or running); `started` says whether it had begun."""

    def __init__(self, timeout_s: float, started: bool):
        where = "while answering" if started else "before it could start (queue)"
        super().__init__(f"the request timed out after {timeout_s:g} s {where}")
        self.started = started


_DONE = object()


@dataclass
class _Job:
    fn: Callable[[], Any]  # plain job: returns the result; stream job: returns an iterator of pieces
    stream: bool
    loop: asyncio.AbstractEventLoop
    deliver: Callable[[Any], None]  # called on the event loop with ("piece", x) / ("result", x) / ("error", exc)
    deadline: float
    timeout_s: float
    on_stop: Callable[[], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class ModelWorker:
    """The model thread. Create it inside a running event loop's process; `start()` before submitting."""

    def __init__(self, max_queue: int = 16, timeout_s: float = 120.0):
        if max_queue < 1 or timeout_s <= 0:
            raise ValueError("max_queue must be >= 1 and timeout_s > 0")
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="chatspot-model", daemon=True)
        self._recent: collections.deque[float] = collections.deque(maxlen=32)  # seconds per finished job
        self.running = False  # a job is executing now
        self.completed = 0
        self.rejected = 0
        self.stopped = 0  # streams stopped early (consumer gone, deadline, error)
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: float = 10.0) -> None:
        """Finish the running job, drop the queued ones (their callers get `Timeout`), end the thread."""
        self._stopping = True  # no new jobs
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._fail(job, Timeout(job.timeout_s, started=False))
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(wait)

    @property
    def queued(self) -> int:
        return self._q.qsize()

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: median recent job time x jobs ahead (at least 1)."""
        recent = sorted(self._recent)
        per_job = recent[len(recent) // 2] if recent else 1.0
        return max(1, math.ceil(per_job * (self.queued + 1)))

    # -- submitting (event loop side) -------------------------------------------------------------------
    def _submit(self, fn, stream: bool, deliver, on_stop=None, timeout_s: float | None = None) -> _Job:
        timeout_s = timeout_s or self.timeout_s
        job = _Job(fn, stream, asyncio.get_running_loop(), deliver, time.monotonic() + timeout_s, timeout_s, on_stop)
        if self._stopping:
            raise Busy(1)
        try:
            self._q.put_nowait(job)
        except queue.Full:
            self.rejected += 1
            raise Busy(self.retry_after()) from None
        return job

    async def run(self, fn: Callable[[], Any], timeout_s: float | None = None) -> Any:
        """Run `fn()` on the model thread and return its result (or raise its exception, `Busy`, `Timeout`)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()

        def deliver(msg):
            if not fut.done():
                kind, value = msg
                fut.set_exception(value) if kind == "error" else fut.set_result(value)

        job = self._submit(fn, False, deliver, timeout_s=timeout_s)
        try:
            return await asyncio.wait_for(fut, job.remaining())
        except asyncio.TimeoutError:
            raise Timeout(job.timeout_s, job.started) from None
        finally:
            job.cancelled.set()  # if it has not started, it never will

    def stream(self, fn: Callable[[], Iterator[Any]], on_stop: Callable[[], None] | None = None,
               timeout_s: float | None = None) -> AsyncIterator[Any]:
        """Iterate `fn()` on the model thread; yields its pieces here as they come. Raises `Busy` at once if the
        queue is full (before the first `await`), so a server can still answer with a status code."""
        pieces: asyncio.Queue = asyncio.Queue()
        job = self._submit(fn, True, pieces.put_nowait, on_stop=on_stop, timeout_s=timeout_s)
        return self._consume(job, pieces)

    async def _consume(self, job: _Job, pieces: asyncio.Queue) -> AsyncIterator[Any]:
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(pieces.get(), job.remaining())
                except asyncio.TimeoutError:  # the model thread stops it at its next piece, or skips it
                    raise Timeout(job.timeout_s, job.started) from None
                if kind == "piece":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            job.cancelled.set()  # the consumer left (disconnect, error): stop generating

    # -- the model thread --------------------------------------------------------------------------------
    def _post(self, job: _Job, msg) -> None:
        try:
            job.loop.call_soon_threadsafe(job.deliver, msg)
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def _fail(self, job: _Job, exc: BaseException) -> None:
        self._post(job, ("error", exc))

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            if time.monotonic() > job.deadline:
                self._fail(job, Timeout(job.timeout_s, started=False))
                continue
            t0 = time.perf_counter()
            job.started = self.running = True
            try:
                self._execute(job)
            finally:
                self.running = False
                self._recent.append(time.perf_counter() - t0)
                self.completed += 1

    def _execute(self, job: _Job) -> None:
        try:
            result = job.fn()
        except Exception as e:  # noqa: BLE001 - delivered to the caller, who maps it to a status
            self._fail(job, e)
            return
        if not job.stream:
            self._post(job, ("result", result))
            return
        it = iter(result)
        stopped: BaseException | None = None
        try:
            for piece in it:
                self._post(job, ("piece", piece))
                if job.cancelled.is_set():
                    stopped = asyncio.CancelledError()
                    break
                if time.monotonic() > job.deadline:
                    stopped = Timeout(job.timeout_s, started=True)
                    break
        except Exception as e:  # noqa: BLE001
            stopped = e
        if stopped is not None:
            self.stopped += 1
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - the stream is being abandoned anyway
                    pass
            if job.on_stop is not None:
                try:
                    job.on_stop()
                except Exception:  # noqa: BLE001
                    pass
            if not isinstance(stopped, asyncio.CancelledError):
                self._fail(job, stopped)
            return
        self._post(job, ("done", None))
