"""Continuous batching: one thread owns the model and decodes every active job together (spec 14).

Each step the scheduler retires cancelled jobs, admits queued ones up to max_batch (a generation Session
each, with a fresh KV cache, and its prompt pass), then runs one `decode_batch` pass in which every active
job contributes one row, hands each job's Session its row, and retires the jobs that finished. Jobs join
and leave only between steps; each job's row is computed bitwise as if it ran alone, so batching never
changes a job's tokens.

Everything that touches the model runs on the scheduler thread: the model is not thread-safe. Other threads
only submit and cancel jobs, under a lock, and receive a job's events -- JobStarted, TokenReleased, then
JobEnded or JobFailed -- through the `emit` callable they gave it. What goes over the wire is the HTTP
side's business (llorch.server).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Callable, Sequence, Union

import numpy as np

from .generate import Session, StopReason
from .model import GPT2
from .runtime import build_info, configure_from_env, set_num_threads
from .sampling import Sampler

log = logging.getLogger("llorch.scheduler")


@dataclass(frozen=True)
class JobStarted:
    """The job left the queue: its prompt pass runs now."""
    job_id: str
    started_at: datetime


@dataclass(frozen=True)
class TokenReleased:
    """One new token and the text it releases: "" while a character or a possible stop string is
    unfinished, and the eos token releases none of its own."""
    index: int      # 0, 1, ... within the job's output
    token: int
    text: str


@dataclass(frozen=True)
class JobEnded:
    """The job ran to completion."""
    stop_reason: StopReason
    tokens_out: int
    generation_s: float        # from admission (the prompt pass's start) to the last token
    memory_bytes: int          # the worker's, as Scheduler.memory_bytes() at the end
    stop_sequence: str | None  # the stop string that ended it (STOP_SEQUENCE)


class FailureCode(Enum):
    CANCELLED = "CANCELLED"                 # by request, a client that left, or shutdown
    INFERENCE_FAILED = "INFERENCE_FAILED"   # its logits or sampling went wrong; the other jobs go on


@dataclass(frozen=True)
class JobFailed:
    """The job ended without completing."""
    code: FailureCode
    message: str


JobEvent = Union[JobStarted, TokenReleased, JobEnded, JobFailed]


class Rejected(Exception):
    """A job the scheduler will not take; `reason` is "duplicate", "queue_full" or "not_accepting"."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)
class Job:
    """One generation request and its progress. Built by the caller, then driven by the scheduler thread;
    only `cancel_reason` is written from other threads (a single assignment, read between steps)."""
    job_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampler: Sampler
    emit: Callable[[JobEvent], None]
    stop: Sequence[str] = ()
    seed: int | None = None                  # reported in the job's log line, so any run can be replayed
    cancel_reason: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    # set by the scheduler thread
    session: Session | None = None           # from admission until the job leaves
    finished: bool = False
    admitted_at: float = 0.0
    tokens_out: int = 0

    def finish(self, memory_bytes: int) -> None:
        """End the job that its session stopped."""
        self.finished = True
        session = self.session
        self.emit(JobEnded(session.stop_reason, self.tokens_out, self.generation_s, memory_bytes,
                           session.stop_sequence))
        self._log_end(session.stop_reason.name)

    def fail(self, code: FailureCode, message: str) -> None:
        self.finished = True
        self.emit(JobFailed(code, message))
        self._log_end(code.name)

    @property
    def generation_s(self) -> float:
        """From admission (the prefill's start) to the last token."""
        return max(self.session.last_token_at - self.admitted_at, 1e-9) if self.tokens_out else 0.0

    def _log_end(self, outcome: str) -> None:
        admitted = self.admitted_at or time.perf_counter()
        first, last = (self.session.first_token_at, self.session.last_token_at) if self.tokens_out else (0.0, 0.0)
        ttft = f"{(first - admitted) * 1e3:.1f} ms" if self.tokens_out else "-"
        decoded = self.tokens_out - 1
        decode_rate = f"{decoded / (last - first):.1f} tok/s" if decoded > 0 and last > first else "-"
        log.info("job %s: %d prompt tokens, %d out, %s, ttft %s, decode %s, queued %.1f ms, seed %s",
                 self.job_id, len(self.prompt_ids), self.tokens_out, outcome, ttft, decode_rate,
                 (admitted - self.submitted_at) * 1e3, self.seed, extra={"job_id": self.job_id})


class Scheduler:
    """Owns the model on its own thread and runs every job through it, max_batch at a time.

    `loaded` is a Future of the model: it completes once the thread has loaded it (or failed to);
    `build_info` is then llorch.build_info() as the scheduler thread sees it (its threads, SIMD path)."""

    def __init__(self, load_model: Callable[[], GPT2], *, max_batch: int, max_queue: int,
                 threads: int | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.loaded: concurrent.futures.Future[GPT2] = concurrent.futures.Future()
        self._load_model, self._threads = load_model, threads
        self._model: GPT2 | None = None
        self.build_info: dict = {}
        self._lock = threading.Condition()
        self._queue: deque[Job] = deque()
        self._active: list[Job] = []
        self._jobs: dict[str, Job] = {}      # queued and active jobs by id
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="llorch-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- called from other threads ----

    def submit(self, job: Job) -> None:
        """Queue a job; raises Rejected if its id is already queued or active, the queue is full, or the
        scheduler no longer accepts jobs (not loaded yet, or shutting down)."""
        with self._lock:
            if not self._accepting or self._model is None:
                raise Rejected("not_accepting", "the worker is not accepting jobs (loading or shutting down)")
            if job.job_id in self._jobs:
                raise Rejected("duplicate", f"job {job.job_id!r} is already queued or running")
            waiting = len(self._queue) + len(self._active) - self.max_batch
            if waiting >= self.max_queue:
                raise Rejected("queue_full", f"{self.max_batch} jobs running and {self.max_queue} queued: "
                                             "the queue is full")
            self._jobs[job.job_id] = job
            self._queue.append(job)
            self._lock.notify()

    def cancel(self, job_id: str, reason: str) -> bool:
        """Ask the queued or active job of this id to end with error CANCELLED at the next step; False if
        there is none."""
        with self._lock:
            job = self._jobs.get(job_id)
            return job is not None and self.cancel_job(job, reason)

    def cancel_job(self, job: Job, reason: str) -> bool:
        """cancel() by the job itself, which cannot hit a later job that reuses its id."""
        with self._lock:
            if self._jobs.get(job.job_id) is not job or job.finished:
                return False
            job.cancel_reason = job.cancel_reason or reason
            self._lock.notify()
            return True

    def cancel_all(self, reason: str) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.cancel_reason = job.cancel_reason or reason
            self._lock.notify()

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def stop(self, timeout: float) -> None:
        """Cancel every job, end the thread and wait for it (at most timeout seconds)."""
        self.cancel_all("the worker is shutting down")
        with self._lock:
            self._accepting, self._stopping = False, True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def counts(self) -> tuple[int, int]:
        """(active, queued) jobs."""
        with self._lock:
            return len(self._active), len(self._queue)

    def memory_bytes(self) -> int:
        """The weights plus the KV caches of the active jobs (their full size, resident or not)."""
        model = self._model
        if model is None:
            return 0
        cfg = model.config
        cache_bytes = 2 * cfg.n_layer * cfg.n_positions * cfg.n_embd * 4   # k and v, float32
        return model.weight_bytes + self.counts()[0] * cache_bytes

    # ---- the scheduler thread ----

    def _serve(self) -> None:
        # OpenMP's thread count is per thread: set it on the thread that runs the kernels
        configure_from_env()
        if self._threads:
            set_num_threads(self._threads)
        self.build_info = build_info()
        try:
            self._model = self._load_model()
        except BaseException as e:   # reported through the future; the thread has nothing left to do
            self.loaded.set_exception(e)
            return
        self.loaded.set_result(self._model)
        while True:
            with self._lock:
                while not (self._queue or self._active or self._stopping):
                    self._lock.wait()
                if self._stopping and not self._jobs:
                    return
            try:
                self._step()
            except Exception:   # a bug, not a bad job: fail every job rather than leave clients hanging
                log.exception("scheduler step failed; failing every job")
                self._fail_all(FailureCode.INFERENCE_FAILED, "internal error in the scheduler")

    def _step(self) -> None:
        started = time.perf_counter()
        self._retire(cancelled_only=True)
        for job in self._admit():
            self._prefill(job)
        decoding = [job for job in self._active if not job.finished and job.cancel_reason is None]
        if decoding:
            self._decode(decoding)
        self._retire(cancelled_only=False)
        log.debug("step: batch %d, %.1f ms", len(decoding), (time.perf_counter() - started) * 1e3)

    def _admit(self) -> list[Job]:
        with self._lock:
            admitted = []
            while self._queue and len(self._active) < self.max_batch:
                job = self._queue.popleft()
                self._active.append(job)
                admitted.append(job)
        for job in admitted:
            job.admitted_at = time.perf_counter()
            job.emit(JobStarted(job.job_id, datetime.now(timezone.utc)))
        return admitted

    def _prefill(self, job: Job) -> None:
        # A fresh cache per job rather than one per slot reused: its pages are resident only as they are
        # written, and dropping it returns them, so memory falls back to the baseline when idle.
        try:
            job.session = Session(self._model, job.prompt_ids, job.max_tokens, job.sampler, stop=job.stop)
            logits = self._model.forward(job.prompt_ids, job.session.cache, logits="last")
        except (ValueError, FloatingPointError) as e:
            job.fail(FailureCode.INFERENCE_FAILED, str(e))
            return
        self._take(job, logits[0])

    def _decode(self, jobs: list[Job]) -> None:
        try:
            logits = self._model.decode_batch([job.session.tokens[-1] for job in jobs],
                                              [job.session.cache for job in jobs])
        except (ValueError, FloatingPointError) as e:
            for job in jobs:
                job.fail(FailureCode.INFERENCE_FAILED, str(e))
            return
        for job, row in zip(jobs, logits):
            self._take(job, row)

    def _take(self, job: Job, logits: np.ndarray) -> None:
        """The job's next token from its row; its end when a stop rule fires, its failure on bad logits."""
        try:
            step = job.session.take(logits)
        except FloatingPointError as e:
            job.fail(FailureCode.INFERENCE_FAILED, str(e))
            return
        except ValueError as e:
            job.fail(FailureCode.INFERENCE_FAILED, f"sampling failed: {e}")
            return
        job.emit(TokenReleased(job.tokens_out, step.token, step.text))
        job.tokens_out += 1
        if step.stop_reason is not None:
            job.finish(self.memory_bytes())

    def _retire(self, cancelled_only: bool) -> None:
        """Drop cancelled jobs (queued or active) and, unless cancelled_only, finished ones; free their slots."""
        with self._lock:
            leaving = [job for job in self._jobs.values()
                       if job.cancel_reason is not None or (job.finished and not cancelled_only)]
            for job in leaving:
                del self._jobs[job.job_id]
                if job in self._active:
                    self._active.remove(job)
                else:
                    self._queue.remove(job)
        for job in leaving:
            if not job.finished:
                job.fail(FailureCode.CANCELLED, job.cancel_reason)
            job.session = None   # its cache's memory goes back

    def _fail_all(self, code: FailureCode, message: str) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._active.clear()
            self._queue.clear()
        for job in jobs:
            if not job.finished:
                job.fail(code, message)
            job.session = None
