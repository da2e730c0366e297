"""llorch-cpud over real HTTP on 127.0.0.1 (spec 14): the daemon runs as a subprocess on a free port.

The checkpoint is tiny (2 layers, 64 wide) but has 4096 positions, so a job can run long enough to be
cancelled or disconnected mid-stream (long_job). The daemon, and the in-process model that computes the expected
texts, run one kernel thread: OpenMP teams stall badly on a loaded 2-core machine, and speed is not under
test here (bench/batching.py measures it).
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

import llorch
from llorch.logits import LogitsProcessor
from llorch.sampling import Sampler
from llorch.config import GPT2Config
from llorch.runtime import thread_setting
from llorch.scheduler import SPARE_CACHES_IDLE_S
from llorch.server import MAX_NEW_TOKENS
from llorch.testing import make_checkpoint

httpx = pytest.importorskip("httpx")       # the server extra (and the test extra, which includes it)
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

LONG_TINY = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=4096)
START_TIMEOUT_S = 60
REQUEST_TIMEOUT = httpx.Timeout(60.0)
enc = llorch.tokenizer()


# ---- the daemon and its clients ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """llorch-cpud in a subprocess, its stderr in a log file; env and preexec_fn go to Popen."""

    def __init__(self, model: str, log_path, *options: str, env: dict | None = None, preexec_fn=None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llorch.server", "--model", model, "--port", str(self.port), "--threads", "1",
             "--worker-id", "test-worker", *options], stdout=self._log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=preexec_fn)
        try:
            self._wait_ready()
        except BaseException:
            self.process.kill()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"daemon exited: {self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=1.0).json()["model_loaded"]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready after {START_TIMEOUT_S} s: {self.log()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5.0).json()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_health(self, condition, timeout: float = 10.0) -> dict:
        """/health once condition(health) holds (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if condition(health):
                return health
            time.sleep(0.01)
        raise AssertionError(f"/health after {timeout} s: {health}")

    def wait_idle(self) -> dict:
        return self.wait_health(lambda health: health["active_jobs"] == health["queued_jobs"] == 0)

    def wait_settled(self) -> dict:
        """/health once the daemon is idle and has dropped its spare KV caches (SPARE_CACHES_IDLE_S after
        its last job)."""
        self.wait_idle()
        time.sleep(SPARE_CACHES_IDLE_S + 1.0)
        return self.wait_idle()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@dataclass
class Stream:
    """What one POST /execute answered: the status, and each SSE event with its arrival time."""
    status: int
    body: dict | None = None               # the JSON body of a non-200 answer
    events: list[tuple[str, dict, float]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.events]

    @property
    def tokens(self) -> list[dict]:
        return [data for name, data, _ in self.events if name == "token"]

    @property
    def text(self) -> str:
        return "".join(token["t"] for token in self.tokens)

    @property
    def terminal(self) -> tuple[str, dict]:
        name, data, _ = self.events[-1]
        assert name in ("end", "error"), self.names
        return name, data


def execute(url: str, body: dict | str, on_event=None, headers: dict | None = None) -> Stream:
    """POST /execute and read the SSE stream; on_event(stream) may return True to hang up early."""
    content = body if isinstance(body, str) else json.dumps(body)
    with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
        with http.stream("POST", url + "/execute", content=content,
                         headers={"Content-Type": "application/json", **(headers or {})}) as response:
            if response.status_code != 200:
                response.read()
                return Stream(response.status_code, response.json())
            assert response.headers["content-type"].startswith("text/event-stream")
            stream, name = Stream(200), None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    stream.events.append((name, json.loads(line[len("data: "):]), time.perf_counter()))
                    if stream.names[-1] in ("end", "error") or (on_event and on_event(stream)):
                        return stream
            return stream


def job(job_id: str, prompt: str = "The quick brown fox", max_tokens: int = 16, **options) -> dict:
    return {"job_id": job_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **options}


LONG_TOKENS = MAX_NEW_TOKENS   # the most a job may ask for (spec 14)


def long_job(job_id: str, **options) -> dict:
    """A job that runs for a second or two, long enough to be cancelled, queued behind or cut short: sampled,
    so never drafted (greedy decoding of this random model soon repeats itself, and lookup drafts then take
    1000 tokens in a fifth of a second), for as many tokens as a job may have."""
    return job(job_id, max_tokens=LONG_TOKENS, temperature=1.0, seed=1, **options)


def start_in_background(pool: concurrent.futures.Executor, url: str, body: dict, tokens: int = 0,
                        headers: dict | None = None):
    """execute() on the pool; returns its future once the job has started and streamed `tokens` tokens."""
    ready = threading.Event()

    def on_event(stream: Stream) -> None:
        if len(stream.tokens) >= tokens:
            ready.set()
    running = pool.submit(execute, url, body, on_event, headers)
    assert ready.wait(30), running.result()
    return running


def greedy_text(model, prompt: str, max_tokens: int, repetition_penalty: float = 1.0) -> str:
    """The text a greedy job should produce, computed in-process, stopping after <|endoftext|>."""
    ids = enc.encode(prompt)
    penalty, cache, out = LogitsProcessor(repetition_penalty=repetition_penalty), model.new_cache(), []
    logits = model.forward(ids, cache, logits="last")
    while True:
        token = Sampler(0.0)(penalty(logits[0], ids, out))
        out.append(token)
        if token == llorch.EOT_TOKEN or len(out) == max_tokens:
            return enc.decode([t for t in out if t != llorch.EOT_TOKEN])
        logits = model.forward([token], cache, logits="last")


class CallbackReceiver(http.server.ThreadingHTTPServer):
    """Records the JSON bodies POSTed to it (the start-up callback)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/ready"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("long-tiny"), LONG_TINY)


@pytest.fixture(scope="module")
def model(model_path):
    threads = thread_setting()
    llorch.set_num_threads(1)
    yield llorch.load(model_path)
    llorch.set_num_threads(threads)


@pytest.fixture(scope="module")
def callback():
    receiver = CallbackReceiver()
    yield receiver
    receiver.shutdown()


@pytest.fixture(scope="module")
def daemon(model_path, callback, tmp_path_factory):
    d = Daemon(model_path, tmp_path_factory.mktemp("daemon") / "daemon.log", "--max-batch", "8",
               "--max-queue", "64", "--callback-url", callback.url)
    yield d
    assert d.stop() == 0
    log = d.log()
    assert "Traceback" not in log and " ERROR " not in log, log


# ---- the worker contract ----

def test_health_and_startup_callback(daemon, model, model_path, callback):
    health = daemon.health()
    assert health["status"] == "healthy" and health["model_loaded"] is True
    assert health["memory_type"] == "cpu" and health["memory_bytes"] >= model.weight_bytes
    assert health["worker_id"] == "test-worker" and health["active_jobs"] == health["queued_jobs"] == 0
    deadline = time.monotonic() + 10
    while not callback.bodies and time.monotonic() < deadline:
        time.sleep(0.05)
    assert callback.bodies == [{"worker_id": "test-worker", "model_ref": str(model_path),
                                "memory_bytes": model.weight_bytes, "uri": daemon.url}]
    assert daemon.health()["callback_delivered"] is True


def test_tokens_are_streamed_as_they_are_produced(daemon, model):
    prompt = "Streaming, one event per token:"
    sent = time.perf_counter()
    stream = execute(daemon.url, job("stream", prompt, max_tokens=900))
    assert stream.names[0] == "started" and stream.names[-2:] == ["metrics", "end"]
    assert stream.events[0][1]["job_id"] == "stream"
    _, end = stream.terminal
    assert [t["i"] for t in stream.tokens] == list(range(end["tokens_out"]))
    assert stream.text == greedy_text(model, prompt, 900)
    # Buffered until the end, every event would arrive at once. Streamed, the first token arrives early
    # and the last one a generation later.
    first_token_at, end_at = stream.events[1][2], stream.events[-1][2]
    assert end["tokens_out"] > 100
    assert end_at - first_token_at > 0.5 * (end_at - sent), (sent, first_token_at, end_at)


def test_greedy_output_is_the_same_alone_or_batched_with_seven_others(model_path, model, tmp_path):
    # without drafts: a job alone (or with 3 others) would draft and could end before the last one starts
    # (drafting against plain decoding: test_speculative_daemon.py)
    daemon = Daemon(model_path, tmp_path / "daemon.log", "--max-batch", "8", "--draft", "none")
    prompts = [f"Prompt number {i} says" + " more" * i for i in range(8)]
    lengths = [60 + 17 * i for i in range(8)]   # jobs leave the batch at different steps
    try:
        alone = [execute(daemon.url, job(f"alone-{i}", p, n)) for i, (p, n) in enumerate(zip(prompts, lengths))]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            batched = list(pool.map(lambda i: execute(daemon.url, job(f"batched-{i}", prompts[i], lengths[i])),
                                    range(8)))
    finally:
        assert daemon.stop() == 0
    for i in range(8):
        assert [t["t"] for t in batched[i].tokens] == [t["t"] for t in alone[i].tokens], i
        assert batched[i].text == greedy_text(model, prompts[i], lengths[i])
    # they did run together: every job had started before the first one ended
    first_end = min(s.events[-1][2] for s in batched)
    assert all(s.events[0][2] < first_end for s in batched)


def test_stop_strings_end_the_text_before_them(daemon, model):
    full = execute(daemon.url, job("full", "Tell me a story", 40)).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    stream = execute(daemon.url, job("stopped", "Tell me a story", 40, stop=["never seen", stop]))
    name, end = stream.terminal
    assert name == "end" and end["stop_reason"] == "STOP_SEQUENCE" and end["stop_sequence_matched"] == stop
    assert stream.text == full[:full.index(stop)]


def test_sampling_options_reach_the_sampler(daemon, model):
    prompt = "Once upon a time"
    greedy = greedy_text(model, prompt, 30)
    sampled = dict(temperature=1.0, seed=1234)
    assert execute(daemon.url, job("a", prompt, 30, **sampled)).text == \
        execute(daemon.url, job("b", prompt, 30, **sampled)).text != greedy
    # min_p 1 and top_p 0 both keep only the most likely token
    assert execute(daemon.url, job("c", prompt, 30, temperature=1.0, min_p=1.0)).text == greedy
    assert execute(daemon.url, job("d", prompt, 30, temperature=1.0, top_p=0)).text == greedy
    penalized = execute(daemon.url, job("e", prompt, 30, repetition_penalty=1.8)).text
    assert penalized == greedy_text(model, prompt, 30, repetition_penalty=1.8) != greedy


INVALID_BODIES = {
    "malformed JSON": ('{"job_id": "x", "prompt": ', {"body"}),
    "not an object": ("[1, 2]", {"body"}),
    "missing fields": ({}, {"job_id", "prompt", "max_tokens"}),
    "wrong types": ({"job_id": 7, "prompt": ["a"], "max_tokens": "9", "temperature": True, "seed": 1.5,
                     "top_p": "high", "top_k": 2.0, "repetition_penalty": None, "stop": "x", "min_p": {}},
                    {"job_id", "prompt", "max_tokens", "temperature", "seed", "top_p", "top_k", "stop", "min_p"}),
    "out of range": ({"job_id": "", "prompt": "", "max_tokens": 0, "temperature": 2.5, "seed": -1, "top_p": 1.5,
                      "top_k": -1, "repetition_penalty": 0, "stop": ["", "y" * 101, "a", "b", "c"], "min_p": -0.5},
                     {"job_id", "prompt", "max_tokens", "temperature", "seed", "top_p", "top_k",
                      "repetition_penalty", "stop", "stop[0]", "stop[1]", "min_p"}),
    "oversize prompt": (job("big", "x" * 32769), {"prompt"}),
    "body over 1 MiB": (job("huge", "x" * (1 << 20)), {"body"}),
    "prompt past the context": (job("ctx", "word " * LONG_TINY.n_positions, max_tokens=100), {"prompt"}),
    "not finite": ('{"job_id": "n", "prompt": "a", "max_tokens": 1, "temperature": NaN}', {"temperature"}),
}


@pytest.mark.parametrize("case", INVALID_BODIES)
def test_invalid_requests_get_400_listing_every_violated_field(daemon, case):
    body, fields = INVALID_BODIES[case]
    stream = execute(daemon.url, body)
    assert stream.status == 400
    errors = stream.body["errors"]
    assert {e["field"] for e in errors} == fields
    assert all(e["constraint"] and e["message"] for e in errors)
    if case == "prompt past the context":
        assert f"exceeds the context of {LONG_TINY.n_positions} positions" in errors[0]["message"]


def test_duplicate_active_job_id_is_409_and_cancel_ends_the_stream(daemon):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = start_in_background(pool, daemon.url, long_job("dup"), tokens=3)
        assert execute(daemon.url, job("dup")).status == 409
        response = httpx.post(daemon.url + "/cancel", json={"job_id": "dup"}, timeout=5.0)
        cancelled_at = time.perf_counter()
        assert response.status_code == 202
        stream = running.result(timeout=30)
    name, error = stream.terminal
    assert name == "error" and error["code"] == "CANCELLED"
    assert len(stream.tokens) < LONG_TOKENS and stream.events[-1][2] - cancelled_at < 1.0
    assert httpx.post(daemon.url + "/cancel", json={"job_id": "dup"}, timeout=5.0).status_code == 404
    assert execute(daemon.url, job("dup", max_tokens=2)).terminal[0] == "end"   # the id is free again


def test_client_disconnect_cancels_its_job(daemon):
    stream = execute(daemon.url, long_job("hangs-up"), on_event=lambda s: len(s.tokens) >= 2)
    assert stream.names[-1] == "token"
    daemon.wait_idle()
    deadline = time.monotonic() + 5
    while "job hangs-up:" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in daemon.log().splitlines() if "job hangs-up:" in line)
    assert "CANCELLED" in line and f"{LONG_TOKENS} out" not in line


def robustness_round(url: str, round_no: int) -> list[str]:
    """64 concurrent clients: valid jobs, malformed and invalid requests, cancels and hang-ups."""
    def client(i: int) -> str:
        job_id, kind = f"r{round_no}-{i}", i % 8
        if kind == 0:
            return f"400 {execute(url, '{not json').status}"
        if kind == 1:
            return f"400 {execute(url, job(job_id, max_tokens='many')).status}"
        if kind == 2:
            return f"400 {execute(url, job(job_id, 'x' * 40000)).status}"
        if kind == 3:   # hang up after the first token
            stream = execute(url, long_job(job_id), on_event=lambda s: bool(s.tokens))
            return f"hung up {stream.names[-1]}"
        if kind == 4:   # cancel mid-stream
            def cancel_after_first_token(stream: Stream) -> None:
                if len(stream.tokens) == 1:
                    httpx.post(url + "/cancel", json={"job_id": job_id}, timeout=10.0)
            return "error " + execute(url, long_job(job_id), cancel_after_first_token).terminal[1]["code"]
        return execute(url, job(job_id, f"client {i}", max_tokens=8 + i % 24)).terminal[0]

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        return list(pool.map(client, range(64)))


HEALTH_POLLER = """
import sys, time, httpx
for _ in range(3000):
    asked = time.perf_counter()
    httpx.get(sys.argv[1] + "/health", timeout=10.0)
    print(time.perf_counter() - asked, flush=True)
    time.sleep(0.01)
"""


def test_64_concurrent_clients_no_crash_no_leak(daemon):
    expected = sorted(["400 400"] * 24 + ["hung up token"] * 8 + ["error CANCELLED"] * 8 + ["end"] * 24)
    assert sorted(robustness_round(daemon.url, 0)) == expected   # warms up allocator pools and buffers
    baseline_health = daemon.wait_settled()
    baseline_rss = daemon.rss_bytes()
    # /health is timed from another process: this one's 64 client threads would delay its own timing
    poller = subprocess.Popen([sys.executable, "-c", HEALTH_POLLER, daemon.url], stdout=subprocess.PIPE, text=True)
    try:
        for round_no in (1, 2):
            assert sorted(robustness_round(daemon.url, round_no)) == expected
    finally:
        poller.terminate()
    latencies = sorted(float(line) for line in poller.communicate(timeout=30)[0].split())
    # The model runs on the scheduler thread, not the event loop, which keeps answering. Here the tiny
    # model's thousands of events a second and 64 clients share two cores with whatever else runs, so the
    # bound is loose; bench/batching.py measures spec 14's 100 ms on the 124M shape.
    assert latencies[len(latencies) // 2] < 0.5 and latencies[-1] < 5.0, latencies
    health = daemon.wait_settled()
    assert health["status"] == "healthy" and health["memory_bytes"] == baseline_health["memory_bytes"]
    assert daemon.process.poll() is None
    assert daemon.rss_bytes() < baseline_rss + 16 * 2**20, (baseline_rss, daemon.rss_bytes())


def test_missing_extra_and_bad_options_exit_2_with_a_message(model_path):
    block_uvicorn = "import sys; sys.modules['uvicorn'] = None; from llorch.server import main; sys.exit(main())"
    missing = subprocess.run([sys.executable, "-c", block_uvicorn, "--model", model_path, "--port", "1"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "pip install 'llorch[server]'" in missing.stderr
    bad = subprocess.run([sys.executable, "-m", "llorch.server", "--model", model_path, "--port", "1",
                          "--max-batch", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--max-batch must be >= 1" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "llorch.server", "--model", model_path, "--port", "1",
                          "--gather-ms", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--gather-ms must be a number >= 0, got -1.0" in bad.stderr


def test_a_model_that_cannot_be_loaded_exits_2(tmp_path):
    failed = subprocess.run([sys.executable, "-m", "llorch.server", "--model", str(tmp_path / "nothing"),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2 and "cannot load model" in failed.stderr


# ---- OpenAI-style routes ----

def test_openai_client_works_unchanged(daemon, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", timeout=60.0, max_retries=0)
    assert [m.id for m in client.models.list().data] == [daemon.health()["model"]]
    prompt = "The OpenAI client says"
    completion = client.completions.create(model="gpt2", prompt=prompt, max_tokens=20, temperature=0)
    assert completion.choices[0].text == greedy_text(model, prompt, 20)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 20 and completion.usage.prompt_tokens == len(enc.encode(prompt))
    chunks = list(client.completions.create(model="gpt2", prompt=prompt, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    stop = completion.choices[0].text[5:8]
    stopped = client.completions.create(model="gpt2", prompt=prompt, max_tokens=20, temperature=0, stop=stop)
    assert stopped.choices[0].text == completion.choices[0].text[:completion.choices[0].text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="gpt2", prompt=prompt, max_tokens=0)


def test_sigterm_lets_running_jobs_finish_then_exits_zero(daemon):
    """The last test of the shared daemon: it stops it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = start_in_background(pool, daemon.url, job("draining", max_tokens=600), tokens=1)
        daemon.process.send_signal(signal.SIGTERM)
        name, end = running.result(60).terminal
    assert name == "end" and end["tokens_out"] == 600   # within the 10 s grace period
    assert daemon.process.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(daemon.url + "/health", timeout=2.0)


# ---- limits and shutdown, on a daemon with one slot, one queue place and no grace period ----

@pytest.fixture(scope="module")
def small_daemon(model_path, tmp_path_factory):
    # the callback goes nowhere: its retries must not hold up the server
    d = Daemon(model_path, tmp_path_factory.mktemp("small") / "small.log", "--max-batch", "1", "--max-queue", "1",
               "--grace-period", "0", "--callback-url", f"http://127.0.0.1:{free_port()}/ready")
    yield d
    d.stop()


def test_requests_beyond_the_queue_get_503(small_daemon):
    url = small_daemon.url
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = start_in_background(pool, url, long_job("running"))
        queued = pool.submit(execute, url, job("queued", max_tokens=4))
        small_daemon.wait_health(lambda health: health["queued_jobs"] == 1)
        refused = execute(url, job("refused"))
        assert refused.status == 503 and refused.body["errors"][0]["constraint"] == "queue_full"
        httpx.post(url + "/cancel", json={"job_id": "running"}, timeout=5.0)
        assert running.result(30).terminal[1]["code"] == "CANCELLED"
        assert queued.result(30).terminal[0] == "end"
    assert "callback to" in small_daemon.log()   # retried, with a warning


def test_a_queued_job_whose_client_leaves_is_dropped(small_daemon):
    url = small_daemon.url
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = start_in_background(pool, url, long_job("occupies-the-slot"))
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            with http.stream("POST", url + "/execute", json=job("leaves-the-queue")) as response:
                assert response.status_code == 200   # the headers come at once, the events after admission
                assert small_daemon.health()["queued_jobs"] == 1
        small_daemon.wait_health(lambda health: health["queued_jobs"] == 0)
        httpx.post(url + "/cancel", json={"job_id": "occupies-the-slot"}, timeout=5.0)
        assert running.result(30).terminal[1]["code"] == "CANCELLED"
    assert "job leaves-the-queue: 4 prompt tokens (0 from the prefix cache), 0 out, CANCELLED" in small_daemon.log()


def test_sigterm_past_the_grace_period_cancels_jobs_and_exits_zero(small_daemon):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = start_in_background(pool, small_daemon.url, long_job("cut-short"))
        small_daemon.process.send_signal(signal.SIGTERM)
        name, error = running.result(30).terminal
    assert name == "error" and error["code"] == "CANCELLED"
    assert small_daemon.process.wait(30) == 0


# ---- checkpoints a GPT-2 tokenizer does not fully cover, or that overflow ----

def test_a_padded_vocabulary_streams_only_ids_the_tokenizer_has(padded_checkpoint, tmp_path):
    prompt = "The quick brown fox"
    expected = enc.decode(list(llorch.generate(llorch.load(padded_checkpoint), enc.encode(prompt), 8)))
    padded = Daemon(padded_checkpoint, tmp_path / "daemon.log")
    try:
        for options in ({}, {"temperature": 1.0, "seed": 3}):
            stream = execute(padded.url, job(f"padded-{len(options)}", prompt, max_tokens=8, **options))
            assert stream.terminal[0] == "end" and len(stream.tokens) == 8, stream.events
        assert stream.terminal[1]["stop_reason"] == "MAX_TOKENS"
        assert execute(padded.url, job("padded-greedy", prompt, max_tokens=8)).text == expected
    finally:
        assert padded.stop() == 0


def test_overflowing_activations_end_the_job_with_non_finite_logits(overflowing_checkpoint, tmp_path):
    overflowing = Daemon(overflowing_checkpoint, tmp_path / "daemon.log")
    try:
        for options in ({}, {"temperature": 1.0, "seed": 3}):
            name, data = execute(overflowing.url, job(f"overflow-{len(options)}", "The quick brown fox",
                                                      **options)).terminal
            assert name == "error" and data["code"] == "NON_FINITE_LOGITS", data
            assert data["message"].startswith("non-finite logits at position 3:")
        assert overflowing.health()["model_loaded"]   # the worker goes on serving
    finally:
        assert overflowing.stop() == 0


def test_more_threads_than_cpus_are_logged_as_a_warning(model_path, tmp_path):
    too_many = len(os.sched_getaffinity(0)) + 1
    daemon = Daemon(model_path, tmp_path / "daemon.log", "--threads", str(too_many))
    try:
        assert f"WARNING llorch.server: --threads {too_many} exceeds the {too_many - 1} CPUs available" in daemon.log()
    finally:
        assert daemon.stop() == 0
