"""llorch.scheduler in process: jobs through a real model on the scheduler thread, their events into a sink.

The checkpoint is tiny but has GPT-2's 1024 positions, so a job can run long enough to be cancelled. What the
sinks receive are the scheduler's domain events; how they go over the wire is test_server.py's business.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

import llorch
from llorch.config import GPT2Config
from llorch.generate import Session, StopReason, run
from llorch.logits import LogitsProcessor
from llorch.sampling import Sampler
from llorch.prefix_cache import BLOCK_TOKENS
from llorch.scheduler import (GATHER_INTERVALS, FailureCode, Job, JobEnded, JobFailed, JobStarted, Rejected, Scheduler,
                              TokenReleased)
from llorch.testing import make_checkpoint
from llorch.tokenizer import EOT_TOKEN

LONG_TINY = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=1024)
TIMEOUT_S = 60
enc = llorch.tokenizer()
order = itertools.count()   # one clock for every sink's events: which came first across jobs


class Sink:
    """One job's events, in order, each with its place on the shared clock."""

    def __init__(self) -> None:
        self.events: list[tuple[int, object]] = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append((next(order), event))
        if isinstance(event, (JobEnded, JobFailed)):
            self.done.set()

    def wait(self):
        """The terminal event, once it has come."""
        assert self.done.wait(TIMEOUT_S)
        return self.events[-1][1]

    def of(self, kind) -> list:
        return [event for _, event in self.events if isinstance(event, kind)]

    def first(self, kind) -> int:
        return next(at for at, event in self.events if isinstance(event, kind))


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("long-tiny"), LONG_TINY)


@pytest.fixture(scope="module")
def alone(path):
    """alone(prompt, max_tokens, **sampler options) -> [(token, text)] of the job run alone, by llorch.generate."""
    model = llorch.load(path)

    def steps(prompt: str, max_tokens: int, stop=(), **options) -> list[tuple[int, str]]:
        sampler, processor = sampling(options)
        session = Session(model, enc.encode(prompt), max_tokens, sampler, stop=stop, processor=processor)
        return [(step.token, step.text) for step in run(model, session)]
    return steps


@pytest.fixture
def make_scheduler(path):
    """make_scheduler(max_batch, max_queue, load=..., **options) -> a started Scheduler with its model (by default
    the long tiny one) loaded; stopped after the test."""
    started = []

    def make(max_batch: int = 8, max_queue: int = 8, load=lambda: llorch.load(path), **options) -> Scheduler:
        scheduler = Scheduler(load, max_batch=max_batch, max_queue=max_queue, threads=1, **options)
        scheduler.start()
        scheduler.loaded.result(TIMEOUT_S)
        started.append(scheduler)
        return scheduler
    yield make
    for scheduler in started:
        scheduler.stop(TIMEOUT_S)


def wait_until(condition) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def sampling(options: dict) -> tuple[Sampler, LogitsProcessor | None]:
    """A job's Sampler and LogitsProcessor from its options (repetition_penalty is the processor's)."""
    options = dict(options)
    penalty = options.pop("repetition_penalty", None)
    return Sampler(**options), None if penalty is None else LogitsProcessor(repetition_penalty=penalty)


def job(job_id: str, prompt: str | list[int], max_tokens: int, sink: Sink, stop=(), logprobs=None, **options) -> Job:
    custom = options.pop("processor", None)
    sampler, processor = sampling(options)
    prompt_ids = enc.encode(prompt) if isinstance(prompt, str) else prompt
    processor = custom or processor
    return Job(job_id, prompt_ids, max_tokens, sampler, sink, stop=stop, processor=processor, logprobs=logprobs)


def released(sink: Sink) -> list[tuple[int, str]]:
    return [(event.token, event.text) for event in sink.of(TokenReleased)]


def test_a_job_is_started_streams_its_tokens_and_ends(make_scheduler, alone):
    scheduler, sink = make_scheduler(), Sink()
    scheduler.submit(job("one", "Hello, I'm a language model,", 12, sink))
    end = sink.wait()
    assert [type(event) for _, event in sink.events] == [JobStarted] + [TokenReleased] * 12 + [JobEnded]
    assert sink.of(JobStarted)[0].job_id == "one"
    assert [event.index for event in sink.of(TokenReleased)] == list(range(12))
    assert released(sink) == alone("Hello, I'm a language model,", 12)
    assert (end.stop_reason, end.tokens_out, end.stop_sequence) == (StopReason.MAX_TOKENS, 12, None)
    assert end.generation_s > 0 and end.memory_bytes >= scheduler.loaded.result().weight_bytes
    assert scheduler.counts() == (0, 0)


def test_jobs_decoded_together_get_the_tokens_they_get_alone(make_scheduler, alone):
    scheduler = make_scheduler(max_batch=4)
    requests = [("one", "The quick brown fox", 40, (), {}),
                ("two", "Once upon a time", 25, (), dict(temperature=1.0, seed=3, top_k=40)),
                ("three", "Tell me a story" + " more" * 9, 33, (), dict(repetition_penalty=1.5)),
                ("four", "In 1905, Einstein", 30, (), dict(temperature=0.8, min_p=0.1, seed=9))]
    sinks = [Sink() for _ in requests]
    for (job_id, prompt, n, stop, options), sink in zip(requests, sinks):
        scheduler.submit(job(job_id, prompt, n, sink, stop, **options))
    for (job_id, prompt, n, stop, options), sink in zip(requests, sinks):
        assert isinstance(sink.wait(), JobEnded), job_id
        assert released(sink) == alone(prompt, n, stop, **options), job_id
    # they did run together: every job had started before the first one ended
    assert max(sink.first(JobStarted) for sink in sinks) < min(sink.first(JobEnded) for sink in sinks)


def test_a_stop_string_ends_the_job_before_it(make_scheduler, alone):
    full = "".join(text for _, text in alone("Tell me a story", 40))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    scheduler, sink = make_scheduler(), Sink()
    scheduler.submit(job("stopped", "Tell me a story", 40, sink, stop=["never seen", stop]))
    end = sink.wait()
    assert (end.stop_reason, end.stop_sequence) == (StopReason.STOP_SEQUENCE, stop)
    assert "".join(text for _, text in released(sink)) == full[:full.index(stop)]
    assert end.tokens_out == len(sink.of(TokenReleased)) < 40


def test_cancel_ends_a_running_or_queued_job_with_cancelled(make_scheduler):
    scheduler, running, queued = make_scheduler(max_batch=1, max_queue=1), Sink(), Sink()
    scheduler.submit(job("running", "The quick brown fox", 1000, running))
    scheduler.submit(job("queued", "The quick brown fox", 4, queued))
    wait_until(lambda: running.of(TokenReleased))
    assert scheduler.cancel("queued", "changed my mind")
    assert queued.wait() == JobFailed(FailureCode.CANCELLED, "changed my mind")
    assert not queued.of(JobStarted)   # it never left the queue
    assert scheduler.cancel("running", "cancelled by request")
    assert running.wait() == JobFailed(FailureCode.CANCELLED, "cancelled by request")
    assert len(running.of(TokenReleased)) < 1000
    assert not scheduler.cancel("running", "again") and scheduler.counts() == (0, 0)


def test_a_full_queue_and_a_duplicate_id_are_rejected(make_scheduler):
    scheduler = make_scheduler(max_batch=1, max_queue=1)
    first, second = Sink(), Sink()
    scheduler.submit(job("first", "Hello.", 1000, first))   # admitted, and running long enough
    wait_until(lambda: scheduler.counts() == (1, 0))
    scheduler.submit(job("second", "Hello.", 4, second))
    for job_id, reason in (("third", "queue_full"), ("first", "duplicate"), ("second", "duplicate")):
        with pytest.raises(Rejected) as refused:
            scheduler.submit(job(job_id, "Hello.", 4, Sink()))
        assert refused.value.reason == reason
    scheduler.cancel("first", "done checking")
    assert isinstance(first.wait(), JobFailed) and isinstance(second.wait(), JobEnded)
    scheduler.submit(job("first", "Hello.", 4, done := Sink()))   # a finished job's id is free again
    assert isinstance(done.wait(), JobEnded)


def test_draining_finishes_running_jobs_and_stop_cancels_the_rest(make_scheduler):
    scheduler, finishing, cut_short = make_scheduler(max_batch=2), Sink(), Sink()
    scheduler.submit(job("finishing", "Hello.", 20, finishing))
    scheduler.submit(job("cut-short", "Hello.", 1000, cut_short))
    scheduler.stop_accepting()
    with pytest.raises(Rejected) as refused:
        scheduler.submit(job("late", "Hello.", 4, Sink()))
    assert refused.value.reason == "not_accepting"
    assert isinstance(finishing.wait(), JobEnded)
    scheduler.stop(TIMEOUT_S)
    assert cut_short.wait() == JobFailed(FailureCode.CANCELLED, "the worker is shutting down")
    assert scheduler.counts() == (0, 0)


class PassRecorder:
    """The model, recording each stacked pass's segments as (cache, its length before, rows)."""

    def __init__(self, model) -> None:
        self.model, self.passes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_batch(self, segments, **options):
        self.passes.append([(cache, cache.length, len(ids)) for ids, cache in segments])
        return self.model.forward_batch(segments, **options)

    def ended_inside_a_draft(self, prompt_ids: list[int], tokens_out: int) -> bool:
        """With one job running: whether its last token came from a drafted row of its last pass (not the
        pass's first)."""
        _, length, rows = self.passes[-1][0]
        taken_before = length - len(prompt_ids) + 1     # a decode pass runs the last token at position length
        return length >= len(prompt_ids) and rows > 1 and tokens_out - 1 > taken_before


def submit_spaced(scheduler: Scheduler, n: int, every_s: float) -> list[Sink]:
    """n short jobs submitted every_s apart, as requests parsed one after another reach the scheduler."""
    sinks = [Sink() for _ in range(n)]
    for i, sink in enumerate(sinks):
        if i:
            time.sleep(every_s)
        scheduler.submit(job(f"spaced-{i}", f"Job {i} of a burst:", 3, sink))
    return sinks


def test_jobs_sent_together_to_an_idle_scheduler_start_in_one_step(make_scheduler, alone, path):
    """Each job comes within gather_s of the one before: the first pass runs every prompt, and the jobs end
    together, with the tokens they get alone."""
    recorder = PassRecorder(llorch.load(path))
    scheduler = make_scheduler(load=lambda: recorder, gather_s=0.5)
    sinks = submit_spaced(scheduler, 4, 0.05)
    assert all(isinstance(sink.wait(), JobEnded) for sink in sinks)
    assert [len(segments) for segments in recorder.passes] == [4, 4, 4]   # the prompts, then two decode steps
    assert [released(sink) for sink in sinks] == [alone(f"Job {i} of a burst:", 3) for i in range(4)]


def test_a_full_batch_or_the_gathering_limit_ends_the_wait(make_scheduler, path):
    # max_batch jobs queued: the first step starts at once, not after gather_s
    scheduler = make_scheduler(max_batch=2, gather_s=30.0)
    started = time.monotonic()
    assert all(isinstance(sink.wait(), JobEnded) for sink in submit_spaced(scheduler, 2, 0.0))
    assert time.monotonic() - started < 15.0
    # jobs that keep coming wait GATHER_INTERVALS * gather_s at most: the first step leaves later ones out
    recorder = PassRecorder(llorch.load(path))
    scheduler = make_scheduler(max_batch=64, max_queue=64, load=lambda: recorder, gather_s=0.05)
    total = round(3 * GATHER_INTERVALS * 0.05 / 0.02)   # 1.5 s of jobs every 0.02 s: three times the limit
    assert all(isinstance(sink.wait(), JobEnded) for sink in submit_spaced(scheduler, total, 0.02))
    assert len(recorder.passes[0]) < total


def test_a_job_takes_the_cache_a_job_that_left_gave_back_and_gets_its_own_tokens(make_scheduler, alone, path,
                                                                                  monkeypatch):
    """The cache keeps the long prompt's rows, none of which the next job reads; after SPARE_CACHES_IDLE_S
    of idleness the spare cache is dropped and memory is back at the weights and the prefix cache."""
    monkeypatch.setattr(llorch.scheduler, "SPARE_CACHES_IDLE_S", 1.0)
    recorder = PassRecorder(llorch.load(path))
    scheduler, first, second = make_scheduler(load=lambda: recorder, cache_bytes=0), Sink(), Sink()
    cache = recorder.new_cache()
    one_cache = cache.k.nbytes + cache.v.nbytes   # what memory_bytes counts for a cache, from a real one
    baseline = scheduler.memory_bytes()
    scheduler.submit(job("long", LONG_PROMPT, 30, first, temperature=1.0, seed=1))
    assert isinstance(first.wait(), JobEnded)
    assert scheduler.memory_bytes() == baseline + one_cache   # in use, then kept
    scheduler.submit(job("short", "Hello", 12, second, temperature=1.0, seed=2))
    assert isinstance(second.wait(), JobEnded)
    assert released(second) == alone("Hello", 12, temperature=1.0, seed=2)
    assert recorder.passes[0][0][0] is recorder.passes[-1][0][0]   # the first job's cache served the second
    wait_until(lambda: scheduler.memory_bytes() == baseline)


def test_the_scheduler_refuses_a_negative_or_infinite_gather_interval(path):
    for gather_s in (-0.001, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="gather_s"):
            Scheduler(lambda: llorch.load(path), max_batch=1, max_queue=1, gather_s=gather_s)


LONG_PROMPT = "A long prompt, to be prefilled in many chunks: " + " ".join(f"item {i}," for i in range(60))


def test_a_long_prompt_is_prefilled_in_chunks_while_other_jobs_decode(make_scheduler, alone):
    """At most step_tokens prompt rows a step: a running job keeps releasing tokens while a long prompt is
    prefilled, and every job gets the tokens it gets alone (chunks split anywhere, rows beside others)."""
    scheduler, running, long = make_scheduler(step_tokens=7), Sink(), Sink()
    scheduler.submit(job("running", "The quick brown fox", 200, running))
    wait_until(lambda: running.of(TokenReleased))
    scheduler.submit(job("long", LONG_PROMPT, 20, long, temperature=0.9, seed=5))
    assert isinstance(long.wait(), JobEnded) and isinstance(running.wait(), JobEnded)
    assert released(long) == alone(LONG_PROMPT, 20, temperature=0.9, seed=5)
    assert released(running) == alone("The quick brown fox", 200)
    prefill = (long.first(JobStarted), long.first(TokenReleased))
    during = [at for at, event in running.events if isinstance(event, TokenReleased) and prefill[0] < at < prefill[1]]
    assert len(during) >= len(enc.encode(LONG_PROMPT)) // 7 - 1   # one token a step, one chunk a step


def test_a_repeated_prompt_reuses_its_cached_prefix_and_gets_the_same_tokens(make_scheduler, alone):
    scheduler = make_scheduler()
    n_prompt = len(enc.encode(LONG_PROMPT))
    reusable = min(n_prompt // BLOCK_TOKENS * BLOCK_TOKENS, n_prompt - 1)   # one row is always computed
    for i, max_tokens in enumerate((5, 9)):
        sink = Sink()
        scheduler.submit(job(f"repeat-{i}", LONG_PROMPT, max_tokens, sink, temperature=1.0, seed=i))
        assert isinstance(sink.wait(), JobEnded)
        assert released(sink) == alone(LONG_PROMPT, max_tokens, temperature=1.0, seed=i)
        assert scheduler.prefix_cache.hit_tokens == i * reusable
    extended = LONG_PROMPT + " and then some more words"      # a longer prompt reuses the shared blocks
    scheduler.submit(job("extended", extended, 6, sink := Sink()))
    assert isinstance(sink.wait(), JobEnded) and released(sink) == alone(extended, 6)
    assert scheduler.prefix_cache.hit_tokens == reusable + n_prompt // BLOCK_TOKENS * BLOCK_TOKENS
    assert scheduler.memory_bytes() >= scheduler.loaded.result().weight_bytes + scheduler.prefix_cache.nbytes > 0


def test_completions_of_one_prompt_submitted_together_share_its_prefill(make_scheduler, alone):
    """n > 1: the jobs after the first wait for the blocks it computes and copy them."""
    scheduler, sinks = make_scheduler(step_tokens=16), [Sink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        scheduler.submit(job(f"choice-{i}", LONG_PROMPT, 8, sink, temperature=1.0, seed=i))
    n_prompt = len(enc.encode(LONG_PROMPT))
    for i, sink in enumerate(sinks):
        assert isinstance(sink.wait(), JobEnded)
        assert released(sink) == alone(LONG_PROMPT, 8, temperature=1.0, seed=i)
    assert scheduler.prefix_cache.hit_tokens == 2 * min(n_prompt // BLOCK_TOKENS * BLOCK_TOKENS, n_prompt - 1)


def test_without_a_prefix_cache_nothing_is_reused(make_scheduler, alone):
    scheduler = make_scheduler(cache_bytes=0)
    for i in range(2):
        scheduler.submit(job(f"cold-{i}", LONG_PROMPT, 4, sink := Sink()))
        assert isinstance(sink.wait(), JobEnded) and released(sink) == alone(LONG_PROMPT, 4)
    assert scheduler.prefix_cache.hit_tokens == 0 and scheduler.prefix_cache.nbytes == 0


# --- exact speculative decoding of greedy jobs -----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    return llorch.load(trained_checkpoint)


def outcome(sink: Sink) -> tuple:
    """Everything a job's client sees: each token with its text and log-probs, and how the job ended."""
    end = sink.wait()
    tokens = [(e.index, e.token, e.text, e.logprob, e.top_logprobs) for e in sink.of(TokenReleased)]
    if isinstance(end, JobEnded):
        return tokens, (end.stop_reason, end.tokens_out, end.stop_sequence)
    return tokens, end


CODE = "def moving_average(values, width):\n    total = sum(values[:width])\n    return total / width\n"
COPY_HEAVY = [CODE + "\n# The same function again:\n" + CODE[:20], CODE * 2 + CODE[:30],
              "import os\nimport sys\nimport os\nimport sys\nimport", "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n",
              "return self\n" * 6, "if self._is_special:\nreturn self\n" * 3, "class Decimal(object):\n" * 4,
              "a b c a b c a b c a b", "self.assertEqual(a, b)\nself.assertEqual(a, b)\nself.assert"]
NOTHING_TO_COPY = ["import os\n", "class Decimal", "Once upon a time, in a village by the sea,",
                   "What is the best way to learn a new language?", "The lighthouse at Cape Verran was built",
                   "def parse(text):\n", "Hello, I'm a language model,", "# Licensed to the PSF under", "try:\n",
                   "The quick brown fox", "1, 2, 3,"]


def run_all(scheduler: Scheduler, requests: list[tuple], batch: int) -> list[tuple]:
    """The outcome of each (prompt, max_tokens, options) request, submitted batch at a time."""
    outcomes = []
    for first in range(0, len(requests), batch):
        sinks = [Sink() for _ in requests[first:first + batch]]
        for i, ((prompt, max_tokens, options), sink) in enumerate(zip(requests[first:first + batch], sinks)):
            scheduler.submit(job(f"job-{first + i}", prompt, max_tokens, sink, **options))
        outcomes += [outcome(sink) for sink in sinks]
    return outcomes


def test_drafting_gives_bitwise_the_tokens_logprobs_and_ends_of_plain_decoding(make_scheduler, trained):
    """Over 20 prompts, copy-heavy ones (drafts taken) and others (drafts refused or none), greedy with
    log-probs, stop strings and penalties, and sampled jobs beside them: everything a client sees is the same
    with and without drafting, and the drafts were put to the test."""
    greedy = [dict(logprobs=3), dict(stop=["\n\n\n"]), dict(repetition_penalty=1.3), dict()]
    requests = [(prompt, 30 + 7 * (i % 4), greedy[i % 4]) for i, prompt in enumerate(COPY_HEAVY + NOTHING_TO_COPY)]
    requests += [(prompt, 25, dict(temperature=0.8, seed=i, logprobs=2)) for i, prompt in enumerate(COPY_HEAVY[:3])]
    results = {}
    for draft in ("lookup", None):
        scheduler = make_scheduler(load=lambda: trained, draft=draft)
        copy_heavy = run_all(scheduler, requests[:len(COPY_HEAVY)], batch=1)
        greedy_tokens = sum(len(tokens) for tokens, _ in copy_heavy)
        accepted_on_copy = scheduler.accepted_tokens
        results[draft] = copy_heavy + run_all(scheduler, requests[len(COPY_HEAVY):], batch=3)
        if draft:
            assert accepted_on_copy > 0.2 * greedy_tokens        # drafts were taken where there was text to copy
            assert scheduler.drafted_tokens > scheduler.accepted_tokens   # and refused elsewhere
        else:
            assert scheduler.drafted_tokens == scheduler.accepted_tokens == 0
    assert len(requests) >= 20 and results["lookup"] == results[None]
    assert all(isinstance(end, tuple) for _, end in results[None])


def test_sampled_jobs_never_draft(make_scheduler, trained):
    scheduler = make_scheduler(load=lambda: trained)
    sampled = [(prompt, 20, dict(temperature=0.7, seed=i)) for i, prompt in enumerate(COPY_HEAVY[:4])]
    assert run_all(scheduler, sampled, batch=4) == run_all(make_scheduler(load=lambda: trained, draft=None),
                                                           sampled, batch=4)
    assert scheduler.drafted_tokens == 0


@pytest.mark.parametrize("rule", ["max_tokens", "stop string", "eos", "context"])
def test_a_job_stops_inside_a_draft_as_plain_decoding_does(make_scheduler, trained, rule):
    """Each stop rule firing at many places, some of them on a drafted row of a pass: the same outcome as
    without drafting, and the drafts never run past max_tokens or the context."""
    prompt = enc.encode(COPY_HEAVY[2])
    full = Session(trained, prompt, 60, Sampler())
    plain = [step.token for step in run(trained, full)]
    if rule == "max_tokens":
        requests = [(prompt, n, {}) for n in range(1, 24)]
    elif rule == "stop string":   # stops completed by token end - 1 (the text's loops make shorter ones early)
        requests = [(prompt, 60, dict(stop=[enc.decode(plain[1:end])])) for end in range(6, 30)]
    elif rule == "eos":           # eos forced at output index n, whatever the row would give
        requests = [(prompt, 60, dict(processor=EosAt(n))) for n in range(1, 24)]
    else:                         # the last token fills the context
        context = trained.config.n_positions
        requests = [((prompt * 40)[:context - n], n, {}) for n in range(1, 24)]
    recorder = PassRecorder(trained)
    drafting, plain_scheduler = make_scheduler(load=lambda: recorder), make_scheduler(load=lambda: trained, draft=None)
    inside_a_draft = 0
    for prompt_ids, max_tokens, options in requests:
        drafted = run_all(drafting, [(prompt_ids, max_tokens, options)], batch=1)
        assert drafted == run_all(plain_scheduler, [(prompt_ids, max_tokens, options)], batch=1)
        (tokens, end), = drafted
        assert isinstance(end, tuple) and end[0] is {"max_tokens": StopReason.MAX_TOKENS, "context": StopReason.MAX_TOKENS,
                                                     "stop string": StopReason.STOP_SEQUENCE, "eos": StopReason.EOS}[rule]
        inside_a_draft += recorder.ended_inside_a_draft(list(prompt_ids), len(tokens))
    assert inside_a_draft >= 3 and drafting.accepted_tokens > 0


class EosAt:
    """A logits processor that makes eos the greedy token at output index n, and only there."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, logits, prompt_ids, tokens):
        if len(tokens) == self.n:
            logits = logits.copy()
            logits[EOT_TOKEN] = logits.max() + 1
        return logits


def test_greedy_and_sampled_jobs_together_get_their_tokens_whether_drafting_or_not(make_scheduler, trained):
    """Up to 6 jobs at once: drafting stops while more than DRAFT_MAX_JOBS decode and resumes as they end."""
    requests = [(prompt, 20 + 9 * i, dict(temperature=0.9, seed=i) if i % 3 == 2 else dict(logprobs=1))
                for i, prompt in enumerate(COPY_HEAVY[:6] + NOTHING_TO_COPY[:6])]
    drafting = make_scheduler(load=lambda: trained)
    assert run_all(drafting, requests, batch=6) == run_all(make_scheduler(load=lambda: trained, draft=None),
                                                           requests, batch=6)
    assert drafting.accepted_tokens > 0


def test_cancel_ends_a_drafting_job_between_steps(make_scheduler, alone):
    scheduler, sink = make_scheduler(), Sink()
    scheduler.submit(job("drafting", "a b c a b c a b c a b", 1000, sink))
    wait_until(lambda: len(sink.of(TokenReleased)) >= 20)
    assert scheduler.cancel("drafting", "enough")
    assert sink.wait() == JobFailed(FailureCode.CANCELLED, "enough")
    tokens = released(sink)
    plain = [token for token, _ in alone("a b c a b c a b c a b", len(tokens))]
    assert 20 <= len(tokens) < 1000 and [token for token, _ in tokens] == plain
    assert scheduler.accepted_tokens > 0 and scheduler.counts() == (0, 0)
    scheduler.submit(job("after", "a b c a b c a b c a b", 30, after := Sink()))   # the scheduler goes on
    assert isinstance(after.wait(), JobEnded) and released(after) == alone("a b c a b c a b c a b", 30)


def test_the_scheduler_refuses_an_unknown_drafter(path):
    with pytest.raises(ValueError, match="draft must be one of lookup or None"):
        Scheduler(lambda: llorch.load(path), max_batch=1, max_queue=1, draft="model")
