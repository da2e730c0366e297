"""llorch-cpud's Prometheus metrics, served at GET /metrics (docs/specs/14-worker-daemon.md, "Metrics").

Names follow vLLM's (`vllm:num_requests_running` -> `llorch:num_requests_running`). The latencies are
measured where the HTTP side receives each job's events, so they are what a client sees, give or take the
event loop's delay. Each worker has its own registry rather than prometheus_client's global one, so that
several workers in one process (as in tests) do not share or collide on metrics.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from .runtime import kernel_threads
from .scheduler import JobEnded, JobEvent, JobFailed, JobStarted, TokenReleased

# seconds; from a tiny model's sub-millisecond tokens to a long prompt queued behind a full batch
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The registry and its metrics; `counts()` gives (running, queued) jobs, `kv_cache_bytes()` the bytes
    held by the active jobs' KV caches and `drafts()` the (drafted, accepted) tokens so far, all read at
    scrape time."""

    # the classic text format, which every Prometheus parses (the names' colons are legal in it)
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, counts: Callable[[], tuple[int, int]], kv_cache_bytes: Callable[[], int],
                 drafts: Callable[[], tuple[int, int]]) -> None:
        self.registry = registry = CollectorRegistry()
        Gauge("llorch:num_requests_running", "Jobs in the batch being decoded.",
              registry=registry).set_function(lambda: counts()[0])
        Gauge("llorch:num_requests_waiting", "Jobs waiting in the queue for a place in the batch.",
              registry=registry).set_function(lambda: counts()[1])
        Gauge("llorch:kv_cache_usage_bytes", "Bytes reserved by the KV caches of the jobs in the batch and the "
              "spare ones (full size; only the written positions are resident), and by the prefix cache.",
              registry=registry).set_function(kv_cache_bytes)
        registry.register(DraftCounters(drafts))
        Gauge("llorch:kernel_threads", "Threads the kernels run with: the fixed count, or auto's latest choice.",
              registry=registry).set_function(kernel_threads)
        self.prompt_tokens = Counter("llorch:prompt_tokens", "Prompt tokens prefilled.", registry=registry)
        self.generation_tokens = Counter("llorch:generation_tokens", "Tokens generated.", registry=registry)
        self.requests = Counter("llorch:http_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=registry)

        def histogram(name: str, help_text: str) -> Histogram:
            return Histogram(name, help_text, buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = histogram("llorch:request_queue_time_seconds",
                                    "From a job's submission to its admission to the batch.")
        self.time_to_first_token = histogram("llorch:time_to_first_token_seconds",
                                             "From a job's submission to its first token.")
        self.inter_token_latency = histogram("llorch:inter_token_latency_seconds",
                                             "Between consecutive tokens of a job (vLLM: time_per_output_token).")
        self.e2e_latency = histogram("llorch:e2e_request_latency_seconds",
                                     "From a job's submission to its end, error or cancellation.")

    def job_tracker(self, prompt_tokens: int, submitted_at: float) -> Callable[[JobEvent], None]:
        """A function to call with each of one job's events, as it is consumed; submitted_at is a
        time.perf_counter() reading."""
        last_token_at = None

        def on_event(event: JobEvent) -> None:
            nonlocal last_token_at
            now = time.perf_counter()
            if isinstance(event, JobStarted):
                self.queue_time.observe(now - submitted_at)
                self.prompt_tokens.inc(prompt_tokens)
            elif isinstance(event, TokenReleased):
                self.generation_tokens.inc()
                if last_token_at is None:
                    self.time_to_first_token.observe(now - submitted_at)
                else:
                    self.inter_token_latency.observe(now - last_token_at)
                last_token_at = now
            elif isinstance(event, (JobEnded, JobFailed)):
                self.e2e_latency.observe(now - submitted_at)
        return on_event

    def count_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DraftCounters:
    """The scheduler's speculative-decoding counts as Prometheus counters, read when scraped (a Counter
    cannot read a function); vLLM's names."""

    def __init__(self, drafts: Callable[[], tuple[int, int]]) -> None:
        self.drafts = drafts

    def collect(self):
        drafted, accepted = self.drafts()
        yield CounterMetricFamily("llorch:spec_decode_num_draft_tokens", "Tokens drafted for greedy jobs and "
                                  "run in a verify pass.", value=drafted)
        yield CounterMetricFamily("llorch:spec_decode_num_accepted_tokens", "Drafted tokens that the model's "
                                  "greedy choice confirmed, and so were taken.", value=accepted)
