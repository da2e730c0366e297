"""llorch-cpud's GET /metrics (spec 14, "Metrics") over real HTTP: the Prometheus text format, behind the API
key, and values that move as requests run."""

from __future__ import annotations

import concurrent.futures
import os
import time

import pytest

from test_server import LONG_TINY, Daemon, enc, execute, job, long_job, start_in_background

httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families   # noqa: E402

from llorch.scheduler import SPARE_CACHES_IDLE_S   # noqa: E402
from llorch.testing import make_checkpoint   # noqa: E402

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
KV_CACHE_BYTES = 2 * LONG_TINY.n_layer * LONG_TINY.n_positions * LONG_TINY.n_embd * 4   # k and v, float32


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    directory = tmp_path_factory.mktemp("metrics")
    model = make_checkpoint(directory / "model", LONG_TINY)
    d = Daemon(model, directory / "daemon.log", env={**os.environ, "LLORCH_API_KEY": KEY})
    yield d
    assert d.stop() == 0


def scrape(url: str) -> dict[tuple, float]:
    """Every sample of /metrics: {(name, (label, value), ...): value}."""
    response = httpx.get(url + "/metrics", headers=AUTH, timeout=5.0)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_need_the_key(daemon):
    assert httpx.get(daemon.url + "/metrics", timeout=5.0).status_code == 401
    assert httpx.get(daemon.url + "/metrics", headers={"Authorization": "Bearer no"}, timeout=5.0).status_code == 401


def test_metrics_move_as_requests_run(daemon):
    before = scrape(daemon.url)
    prompt = "Counting the tokens of this prompt"
    stream = execute(daemon.url, job("counted", prompt, max_tokens=20), headers=AUTH)
    assert stream.terminal[0] == "end"
    assert execute(daemon.url, job("refused", max_tokens=0), headers=AUTH).status == 400
    after = scrape(daemon.url)

    def moved(*key) -> float:
        return after[key] - before.get(key, 0.0)
    assert moved("llorch:prompt_tokens_total") == len(enc.encode(prompt))
    assert moved("llorch:generation_tokens_total") == 20
    # a greedy job alone drafts where its text repeats (a random model's soon does), each token its own event
    assert moved("llorch:spec_decode_num_draft_tokens_total") >= moved("llorch:spec_decode_num_accepted_tokens_total") > 0
    assert moved("llorch:request_queue_time_seconds_count") == 1
    assert moved("llorch:time_to_first_token_seconds_count") == 1
    assert moved("llorch:inter_token_latency_seconds_count") == 19
    assert moved("llorch:e2e_request_latency_seconds_count") == 1
    assert moved("llorch:e2e_request_latency_seconds_sum") > 0
    assert moved("llorch:http_requests_total", ("route", "/execute"), ("status", "200")) == 1
    assert moved("llorch:http_requests_total", ("route", "/execute"), ("status", "400")) == 1
    assert moved("llorch:http_requests_total", ("route", "/metrics"), ("status", "200")) == 1   # the first scrape
    assert after[("llorch:num_requests_running",)] == after[("llorch:num_requests_waiting",)] == 0
    assert after[("llorch:kv_cache_usage_bytes",)] == KV_CACHE_BYTES   # the job's, kept for the next job
    assert after[("llorch:kernel_threads",)] == 1   # the daemon's --threads 1


def test_running_jobs_and_their_kv_caches_are_visible(daemon):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = start_in_background(pool, daemon.url, long_job("long"), tokens=1, headers=AUTH)
        during = scrape(daemon.url)
        httpx.post(daemon.url + "/cancel", json={"job_id": "long"}, headers=AUTH, timeout=5.0)
        assert running.result(30).terminal[1]["code"] == "CANCELLED"
    assert during[("llorch:num_requests_running",)] == 1
    assert during[("llorch:kv_cache_usage_bytes",)] == KV_CACHE_BYTES   # the spare cache, taken by the job
    daemon.wait_idle()
    idle = scrape(daemon.url)
    assert idle[("llorch:num_requests_running",)] == 0 and idle[("llorch:kv_cache_usage_bytes",)] == KV_CACHE_BYTES
    # once the worker has been idle for SPARE_CACHES_IDLE_S, the spare cache is dropped
    deadline = time.monotonic() + SPARE_CACHES_IDLE_S + 30
    while scrape(daemon.url)[("llorch:kv_cache_usage_bytes",)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scrape(daemon.url)[("llorch:kv_cache_usage_bytes",)] == 0
