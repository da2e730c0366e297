"""Continuous batching with chunked prefill: one thread owns the model and runs every active job together
(spec 14).

Each step the scheduler retires cancelled jobs, admits queued ones up to max_batch (a generation Session
each, with the KV cache a job that left gave back, if any), then runs ONE stacked pass
(`model.forward_batch`): the next token of every decoding job, plus at most step_tokens rows of the prompts
still being prefilled, taken in admission order and split at any position. A prompt's rows that the prefix
cache holds are copied instead of computed. While few jobs decode, a greedy job's next token brings its
drafts along (llorch.generate.LookupDrafter: exact speculative decoding) within what the prompts left of the
budget. Each job whose row completes a token hands it to its Session (a drafting job its rows, while they
confirm its drafts); the jobs that finished leave. So a long prompt never holds the running streams for more
than one step's budget. Jobs join and leave only between steps; each row is computed bitwise as if its job
ran alone, so neither batching, chunking, drafts nor the prefix cache change a job's tokens. Woken from idle,
the scheduler waits a moment (gather_s) for the jobs sent together with the first, so that a burst starts,
and ends, in one step.

Everything that touches the model runs on the scheduler thread: the model is not thread-safe. Other threads
only submit and cancel jobs, under a lock, and receive a job's events -- JobStarted, TokenReleased, then
JobEnded or JobFailed -- through the `emit` callable they gave it, called on a delivery thread so that
slow consumers never hold a step. What goes over the wire is the HTTP side's business (llorch.server).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from functools import partial
from typing import Callable, Sequence, Union

import numpy as np

from .generate import DRAFTS, LookupDrafter, NonFiniteError, Session, Step, StopReason
from .logits import LogitsProcessor, TopLogprobs
from .model import GPT2, PREFILL_ROWS, KVCache
from .prefix_cache import BLOCK_TOKENS, PrefixCache
from .runtime import build_info, set_num_threads
from .sampling import Sampler

log = logging.getLogger("llorch.scheduler")

# Prompt rows per step, beside the decode rows. A step's cost grows with its rows (the weights are read once
# per step whatever the rows; the matrices' work grows with them): at 124M on 2 threads, see spec 14 for the
# measurements behind this default.
DEFAULT_STEP_TOKENS = 64
DEFAULT_CACHE_BYTES = 512 * 2**20
# Drafted rows cost compute: while few jobs decode, a step reads the weights for little work and a greedy job's
# drafts ride along almost free; with many, the step is compute-bound and drafts would slow every job down.
# Drafts also share the step's prompt budget, after the prompts (spec 14, requirement 12a).
DRAFT_MAX_JOBS = 4
# Requests sent together reach the scheduler over a few ms, as the event loop parses each in turn. Started by
# its first job alone, a burst runs the others' prompts in later steps, while that job decodes, and ends over as
# many steps, each reading every weight for fewer rows. So an idle scheduler that gets a job waits until none
# has come for gather_s, for at most GATHER_INTERVALS of them, before its first step; a lone job waits
# gather_s once (spec 14, requirement 12).
DEFAULT_GATHER_S = 0.002
GATHER_INTERVALS = 10
# A job's first writes to a new KV cache fault its pages in (~6 ms of a 64-token job at 124M, on the model's
# threads), and dropping it unmaps them (~0.7 ms). So the caches of jobs that left are kept for the next
# jobs, and dropped once the worker has been idle this long: memory then falls back to the baseline.
SPARE_CACHES_IDLE_S = 5.0


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
    logprob: float | None = None                      # when the job asked for log-probs (Step's)
    top_logprobs: TopLogprobs = ()


@dataclass(frozen=True)
class PromptScored:
    """The log-probs of the prompt's tokens after the first under the model (no logits processing), for
    a job that asked for them; sent after its prompt pass, before its first TokenReleased."""
    logprobs: tuple[float, ...]
    top_logprobs: tuple[TopLogprobs, ...]


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
    INFERENCE_FAILED = "INFERENCE_FAILED"   # its forward pass or sampling went wrong; the other jobs go on
    NON_FINITE_LOGITS = "NON_FINITE_LOGITS"  # the model's activations overflowed; the other jobs go on


@dataclass(frozen=True)
class JobFailed:
    """The job ended without completing."""
    code: FailureCode
    message: str


JobEvent = Union[JobStarted, PromptScored, TokenReleased, JobEnded, JobFailed]


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
    processor: LogitsProcessor | None = None # the Session's options (llorch.generate)
    logprobs: int | None = None
    prompt_logprobs: int | None = None       # top-N: PromptScored is sent
    cancel_reason: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    # set by the scheduler thread
    session: Session | None = None           # from admission until the job leaves
    drafter: LookupDrafter | None = None     # a greedy job's, when the scheduler drafts
    finished: bool = False
    admitted_at: float = 0.0
    tokens_out: int = 0
    cached_tokens: int = 0                   # prompt positions copied from the prefix cache
    blocks_stored: int = 0                   # the prompt's blocks offered to the prefix cache so far

    @property
    def prefilling(self) -> bool:
        """Admitted, its prompt not yet run through."""
        return self.session is not None and not self.session.tokens

    def finish(self, memory_bytes: int) -> JobEnded:
        """The end of the job that its session stopped."""
        self.finished = True
        session = self.session
        self._log_end(session.stop_reason.name)
        return JobEnded(session.stop_reason, self.tokens_out, self.generation_s, memory_bytes,
                        session.stop_sequence)

    def fail(self, code: FailureCode, message: str) -> JobFailed:
        self.finished = True
        self._log_end(code.name)
        return JobFailed(code, message)

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
        log.info("job %s: %d prompt tokens (%d from the prefix cache), %d out, %s, ttft %s, decode %s, "
                 "queued %.1f ms, seed %s", self.job_id, len(self.prompt_ids), self.cached_tokens, self.tokens_out,
                 outcome, ttft, decode_rate, (admitted - self.submitted_at) * 1e3, self.seed,
                 extra={"job_id": self.job_id})


class Scheduler:
    """Owns the model on its own thread and runs every job through it, max_batch at a time, with at most
    step_tokens prompt rows per step and a prefix cache of cache_bytes. With draft="lookup" (the default;
    None turns it off) greedy jobs decode speculatively while at most DRAFT_MAX_JOBS jobs decode;
    `drafted_tokens` and `accepted_tokens` count the drafts run and those taken. Woken from idle by a job, it
    waits until no other has come for gather_s (0: not at all), for at most GATHER_INTERVALS of them.

    `loaded` is a Future of the model: it completes once the thread has loaded it (or failed to);
    `build_info` is then llorch.build_info() as the scheduler thread sees it (its threads, SIMD path).

    Jobs with the same prompt (n completions of one request) share its rows through the prefix cache: a job
    whose next block another prefilling job is computing waits for it and copies it."""

    def __init__(self, load_model: Callable[[], GPT2], *, max_batch: int, max_queue: int,
                 threads: int | str | None = None, step_tokens: int = DEFAULT_STEP_TOKENS,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, draft: str | None = "lookup",
                 gather_s: float = DEFAULT_GATHER_S) -> None:
        if max_batch < 1 or max_queue < 0 or step_tokens < 1 or not 0 <= gather_s < math.inf:
            raise ValueError(f"max_batch and step_tokens must be >= 1, max_queue and gather_s >= 0, got {max_batch}, "
                             f"{step_tokens}, {max_queue} and {gather_s}")
        if draft is not None and draft not in DRAFTS:
            raise ValueError(f"draft must be one of {', '.join(DRAFTS)} or None, got {draft!r}")
        self.max_batch, self.max_queue, self.step_tokens, self.draft = max_batch, max_queue, step_tokens, draft
        self.gather_s = gather_s
        self.drafted_tokens = self.accepted_tokens = 0
        self.prefix_cache = PrefixCache(cache_bytes)
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
        # events of a step, posted once it is done, and handed to their jobs' emit by the delivery thread
        self._outgoing: list[tuple[Callable[[JobEvent], None], JobEvent]] = []
        self._spare_caches: list[KVCache] = []   # of jobs that left, for the next ones
        self._deliveries: queue.SimpleQueue = queue.SimpleQueue()
        self._delivery = threading.Thread(target=self._deliver, name="llorch-events", daemon=True)

    def start(self) -> None:
        self._delivery.start()
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
        if self._delivery.is_alive():
            self._delivery.join(timeout)

    def counts(self) -> tuple[int, int]:
        """(active, queued) jobs."""
        with self._lock:
            return len(self._active), len(self._queue)

    def memory_bytes(self) -> int:
        """The weights, the KV caches of the active jobs and those kept for the next ones (their full size,
        resident or not) and the prefix cache."""
        model = self._model
        if model is None:
            return 0
        cfg = model.config
        cache_bytes = 2 * cfg.n_layer * cfg.n_positions * cfg.n_embd * 4   # k and v, float32
        caches = self.counts()[0] + len(self._spare_caches)
        return model.weight_bytes + caches * cache_bytes + self.prefix_cache.nbytes

    # ---- the scheduler thread ----

    def _serve(self) -> None:
        # the thread count applies to every pass whichever thread runs it (llorch.runtime)
        if self._threads:
            set_num_threads(self._threads)
        self.build_info = build_info()
        try:
            try:
                self._model = self._load_model()
            except BaseException as e:   # reported through the future; the thread has nothing left to do
                self.loaded.set_exception(e)
                return
            self.loaded.set_result(self._model)
            self._loop()
        finally:
            self._deliveries.put(None)   # the delivery thread ends after what was posted before

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._idle():
                    if not self._lock.wait_for(lambda: not self._idle(),
                                               SPARE_CACHES_IDLE_S if self._spare_caches else None):
                        self._spare_caches.clear()   # idle long enough: their pages go back
                        self._lock.wait_for(lambda: not self._idle())
                    self._gather()
                if self._stopping and not self._jobs:
                    return
            try:
                self._step()
            except Exception:   # a bug, not a bad job: fail every job rather than leave clients hanging
                log.exception("scheduler step failed; failing every job")
                self._fail_all(FailureCode.INFERENCE_FAILED, "internal error in the scheduler")
            if self._outgoing:
                self._deliveries.put(self._outgoing)
                self._outgoing = []

    def _idle(self) -> bool:
        return not (self._queue or self._active or self._stopping)

    def _gather(self) -> None:
        """Woken from idle by a job, wait while more keep coming, so that jobs sent together start in one step
        (called holding self._lock)."""
        deadline = time.perf_counter() + GATHER_INTERVALS * self.gather_s
        seen = len(self._queue)
        while self.gather_s and seen < self.max_batch and not self._stopping:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._lock.wait(min(self.gather_s, left))
            if len(self._queue) == seen:   # quiet for a whole interval (or woken by a cancel)
                return
            seen = len(self._queue)

    def _deliver(self) -> None:
        while (events := self._deliveries.get()) is not None:
            for emit, event in events:
                try:
                    emit(event)
                except Exception:   # one consumer's bug must not starve the others
                    log.exception("delivering %s failed", type(event).__name__)

    def _post(self, job: Job, event: JobEvent) -> None:
        self._outgoing.append((job.emit, event))

    def _step(self) -> None:
        started = time.perf_counter()
        self._retire(cancelled_only=True)
        self._admit()
        decoding = [job for job in self._active if not job.finished and not job.prefilling]
        # the budget bounds the gap between a running stream's tokens; with no stream to hold up, larger
        # passes read the weights fewer times per prompt row
        budget = self.step_tokens if decoding else max(self.step_tokens, PREFILL_ROWS)
        for job in self._active:
            if job.prefilling and not job.finished and job.prompt_logprobs is not None:
                self._score_prompt(job)
        chunks, prompt_rows = [], 0
        for job in self._active:
            if job.prefilling and not job.finished and prompt_rows < budget:
                if rows := self._next_chunk(job, budget - prompt_rows):
                    chunks.append((job, rows))
                    prompt_rows += rows
        draft_rows = self._draft(decoding, budget - prompt_rows if len(decoding) <= DRAFT_MAX_JOBS else 0)
        if decoding or chunks:
            self._run(decoding, chunks)
        self._retire(cancelled_only=False)
        log.debug("step: %d decoding, %d drafted rows, %d prompt rows, %.1f ms", len(decoding), draft_rows,
                  prompt_rows, (time.perf_counter() - started) * 1e3)

    def _draft(self, decoding: list[Job], room: int) -> int:
        """Each greedy job's drafts for this step, at most room rows in all (0: none); how many."""
        drafted = 0
        for job in decoding:
            if job.drafter is not None:
                drafted += len(job.drafter.draft(room - drafted))
        self.drafted_tokens += drafted
        return drafted

    def _admit(self) -> None:
        with self._lock:
            admitted = []
            while self._queue and len(self._active) < self.max_batch:
                job = self._queue.popleft()
                self._active.append(job)
                admitted.append(job)
        for job in admitted:
            job.admitted_at = time.perf_counter()
            self._post(job, JobStarted(job.job_id, datetime.now(timezone.utc)))
            try:
                spare = self._spare_caches.pop() if self._spare_caches else None
                job.session = Session(self._model, job.prompt_ids, job.max_tokens, job.sampler, stop=job.stop,
                                      processor=job.processor, logprobs=job.logprobs, cache=spare)
                if self.draft is not None and job.sampler.temperature == 0:
                    job.drafter = LookupDrafter(job.session)
            except ValueError as e:
                self._post(job, job.fail(FailureCode.INFERENCE_FAILED, str(e)))

    def _next_chunk(self, job: Job, budget: int) -> int:
        """How many of the job's next prompt rows this step computes, after copying what the prefix cache
        holds; 0 while another job computes the block it needs next."""
        cache, prompt = job.session.cache, job.prompt_ids
        job.cached_tokens += self.prefix_cache.extend(prompt, cache, upto=len(prompt) - 1)
        if self._computed_by_another(job):
            return 0
        return min(budget, len(prompt) - cache.length)

    def _score_prompt(self, job: Job) -> None:
        """A job that wants its prompt's log-probs (echo): every position's logits are needed, so its prompt
        runs as one whole pass of its own, neither chunked nor taken from the prefix cache."""
        try:
            logits = self._model.forward(job.prompt_ids, job.session.cache, logits="all")
        except (ValueError, FloatingPointError) as e:
            self._post(job, job.fail(FailureCode.INFERENCE_FAILED, str(e)))
            return
        scores = job.session.score_prompt(logits, job.prompt_logprobs)
        self._post(job, PromptScored(tuple(lp for lp, _ in scores), tuple(top for _, top in scores)))
        self._take(job, logits[-1])

    def _computed_by_another(self, job: Job) -> bool:
        """Whether an earlier prefilling job is computing the prompt block this job needs next, which the
        prefix cache will then hand over."""
        if not self.prefix_cache.capacity_bytes:
            return False
        end = (job.session.cache.length // BLOCK_TOKENS + 1) * BLOCK_TOKENS
        if end >= len(job.prompt_ids):
            return False
        for other in self._active:
            if other is job:
                return False
            if (other.prefilling and not other.finished and other.session.cache.length < end
                    and other.prompt_ids[:end] == job.prompt_ids[:end]):
                return True
        return False

    def _run(self, decoding: list[Job], chunks: list[tuple[Job, int]]) -> None:
        """One stacked pass: the rows of each decoding job (its last token, and its drafts), then each
        prompt chunk; the tokens it completes."""
        segments = [([job.session.tokens[-1]] + (job.drafter.drafted if job.drafter else []), job.session.cache)
                    for job in decoding]
        for job, rows in chunks:
            done = job.session.cache.length
            segments.append((job.prompt_ids[done:done + rows], job.session.cache))
        try:
            logits = self._model.forward_batch(segments, all_logits=range(len(decoding)))
        except (ValueError, FloatingPointError) as e:
            for job in decoding + [job for job, _ in chunks]:
                self._post(job, job.fail(FailureCode.INFERENCE_FAILED, str(e)))
            return
        first = 0
        for job, (ids, _) in zip(decoding, segments):
            rows, first = logits[first:first + len(ids)], first + len(ids)
            if job.drafter is None:
                self._take(job, rows[0])
            else:   # each Step's event is posted by _take; the drafts taken are the rows after the first
                self.accepted_tokens += max(0, sum(1 for _ in job.drafter.take(rows, partial(self._take, job))) - 1)
        for (job, _), row in zip(chunks, logits[first:]):
            job.blocks_stored = self.prefix_cache.store(job.prompt_ids, job.session.cache, job.blocks_stored)
            if job.session.cache.length == len(job.prompt_ids):   # its last prompt row: the first token
                self._take(job, row)

    def _take(self, job: Job, logits: np.ndarray) -> Step | None:
        """The job's next token from its row, posted; its end when a stop rule fires, its failure (and None)
        on bad logits."""
        try:
            step = job.session.take(logits)
        except NonFiniteError as e:
            self._post(job, job.fail(FailureCode.NON_FINITE_LOGITS, str(e)))
            return None
        except FloatingPointError as e:
            self._post(job, job.fail(FailureCode.INFERENCE_FAILED, str(e)))
            return None
        except ValueError as e:
            self._post(job, job.fail(FailureCode.INFERENCE_FAILED, f"sampling failed: {e}"))
            return None
        self._post(job, TokenReleased(job.tokens_out, step.token, step.text, step.logprob, step.top_logprobs))
        job.tokens_out += 1
        if step.stop_reason is not None:
            self._post(job, job.finish(self.memory_bytes()))
        return step

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
                self._post(job, job.fail(FailureCode.CANCELLED, job.cancel_reason))
            if job.session is not None:   # a slot's cache, in use or spare: at most max_batch in all
                self._spare_caches.append(job.session.cache)
            job.session = job.drafter = None

    def _fail_all(self, code: FailureCode, message: str) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
            self._active.clear()
            self._queue.clear()
        for job in jobs:
            if not job.finished:
                self._post(job, job.fail(code, message))
            job.session = job.drafter = None
