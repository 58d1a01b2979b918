"""The job queue of ``psal serve``: one worker thread runs the jobs one after another, in the order
they came, so that a device never runs two at once; the event loop only waits for them.

Each job has an id (the client's, so that it can ask for the job's progress while its request is
still being answered) and reports ``progress(done, total)`` as it goes. The queue counts the jobs
waiting and running, and keeps the highest counts seen: ``max_running`` is the proof that jobs
never overlap (it stays 1), ``max_waiting`` that requests did arrive together.

Closing the queue (the server stopping) fails the jobs still waiting at once and stops the
running one at its next progress report, so that Ctrl+C does not wait for a long job. Cancelling
one job (its client went away) does the same to that job alone: it never starts, or it stops at
its next progress report, so that the jobs behind it do not wait for a result nobody will read.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import re
import threading
import time
import uuid

# Job ids that clients may choose: short, and safe in a URL path.
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class BusyError(Exception):
    """The queue is full: the client should try again later."""


class JobInUseError(Exception):
    """A waiting or running job already has this id."""


class StoppingError(Exception):
    """The queue is closed: the job did not run, or was stopped part way."""


class Job:
    """One job's state, as ``GET /api/jobs/{id}`` shows it."""

    def __init__(self, job_id: str, stop: threading.Event):
        self.id = job_id
        self.state = "queued"  # then "running", then "done", "failed" or "cancelled"
        self.done = 0
        self.total = 0
        self.seconds = None
        self._stop = stop
        self.cancelled = threading.Event()

    def progress(self, done, total, loss=None) -> None:
        """The callback that the task calls (``loss``: the upscaler's training loss, unused);
        raises :class:`StoppingError` once the queue is closed or the job cancelled, which ends the
        task there."""
        if self._stop.is_set():
            raise StoppingError("the server is stopping")
        if self.cancelled.is_set():
            raise StoppingError(f"job {self.id!r} was cancelled")
        self.done, self.total = int(done), int(total)


class JobQueue:
    """Runs ``fn(progress)`` callables on one worker thread, one at a time, in arrival order.

    ``max_waiting`` jobs may wait at most (beyond it :meth:`submit` raises :class:`BusyError`); the
    states of the last ``keep`` finished jobs stay readable.
    """

    def __init__(self, max_waiting: int = 16, keep: int = 256):
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"JobQueue: max_waiting must be a positive int, got {max_waiting!r}")
        self.max_waiting_allowed = max_waiting
        self._keep = keep
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._futures: dict[str, concurrent.futures.Future] = {}  # of the jobs waiting or running
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting = self.running = self.max_waiting = self.max_running = 0
        self.submitted = self.finished = 0
        # A daemon thread: a queue that is never closed does not keep the process alive.
        self._thread = threading.Thread(target=self._work, name="psal-jobs", daemon=True)
        self._thread.start()

    def submit(self, fn, job_id: str | None = None) -> tuple[Job, concurrent.futures.Future]:
        """Queue ``fn(progress)``; its future holds what it returns (or raises)."""
        job_id = job_id or uuid.uuid4().hex
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._refuse(job_id)
            job = Job(job_id, self._stop)
            self._jobs.pop(job_id, None)  # a finished job's id may be used again
            self._jobs[job_id] = job
            self._futures[job_id] = future
            self.waiting += 1
            self.submitted += 1
            self.max_waiting = max(self.max_waiting, self.waiting)
            finished = [k for k, j in self._jobs.items() if j.state in ("done", "failed")]
            for k in finished[: max(0, len(finished) - self._keep)]:
                del self._jobs[k]
        self._queue.put((job, fn, future))
        return job, future

    def check_room(self) -> None:
        """Raise :class:`BusyError` (or :class:`StoppingError`) now if :meth:`submit` would: the service asks
        before it decodes a request's pictures, so that a full queue costs no decoding."""
        with self._lock:
            self._refuse()

    def _refuse(self, job_id: str | None = None) -> None:
        """What :meth:`submit` refuses, in this order (called holding the lock): :class:`StoppingError`
        once closed, :class:`JobInUseError` for an id waiting or running, :class:`BusyError` when full."""
        if self._stop.is_set():
            raise StoppingError("the server is stopping")
        if job_id is not None and job_id in self._futures:
            raise JobInUseError(f"job {job_id!r} is already waiting or running; use another id")
        if self.waiting >= self.max_waiting_allowed:
            raise BusyError(f"{self.waiting} jobs are waiting already; try again later")

    def cancel(self, job_id: str) -> bool:
        """Cancel a waiting or running job: it never starts, or stops at its next progress report
        (its future then fails with :class:`StoppingError`); ``False`` if no such job waits or runs."""
        with self._lock:
            future = self._futures.get(job_id)
            if future is None:
                return False
            job = self._jobs[job_id]
            job.cancelled.set()
            if future.cancel():  # it was waiting (a running job sees the flag instead)
                job.state = "cancelled"
            return True

    def status(self, job_id: str) -> dict | None:
        """``{"id", "state", "done", "total", "ahead", "seconds"}`` of a job (``ahead``: the jobs
        to run before it), or ``None`` for an unknown id."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            ahead = 0
            if job.state == "queued":
                for other in self._jobs.values():
                    if other is job:
                        break
                    ahead += other.state in ("queued", "running")
            return {"id": job.id, "state": job.state, "done": job.done, "total": job.total, "ahead": ahead, "seconds": job.seconds}

    def stats(self) -> dict:
        """The counts: waiting and running now, the most seen at once, submitted and finished."""
        with self._lock:
            return {
                "waiting": self.waiting,
                "running": self.running,
                "max_waiting": self.max_waiting,
                "max_running": self.max_running,
                "submitted": self.submitted,
                "finished": self.finished,
            }

    def close(self) -> None:
        """Refuse new jobs, fail those waiting with :class:`StoppingError` and stop the running one at
        its next progress report (its request hears of it at once); then end the worker."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
            for future in self._futures.values():
                if not future.done():
                    future.set_exception(StoppingError("the server is stopping"))
        self._queue.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end (after :meth:`close`); ``False`` if it is still busy."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, fn, future = item
            with self._lock:
                self.waiting -= 1
                if future.done() or not future.set_running_or_notify_cancel():  # closed or cancelled
                    job.state = "cancelled" if job.cancelled.is_set() else "failed"
                    self.finished += 1
                    self._futures.pop(job.id, None)
                    continue
                job.state = "running"
                self.running += 1
                self.max_running = max(self.max_running, self.running)
            t0 = time.perf_counter()
            result, error = None, None
            try:
                result = fn(job.progress)
            except BaseException as exc:  # handed to the request, which answers it in one line
                error = exc
            with self._lock:  # counted before the request hears of it
                state = "done" if error is None else "cancelled" if job.cancelled.is_set() else "failed"
                job.state, job.seconds = state, time.perf_counter() - t0
                self.running -= 1
                self.finished += 1
                self._futures.pop(job.id, None)
                if not future.done():  # close() may have answered it already
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(result)
