"""llorch-cpud's protections (spec 14, "Security") over real HTTP on 127.0.0.1, against the daemon as a
subprocess: the API key, Host and CORS checks, JSON-only bodies, malformed input answered 400, model names
instead of paths, connection limits and timeouts (slowloris, idle keep-alive, the connection cap, running out
of file descriptors), the drain and a second signal, the ready callback, JSON logs. Every test is bounded in
time and stops what it started.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from test_server import LONG_TINY, LONG_TOKENS, Daemon, execute, free_port, job, long_job, start_in_background

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from llorch.testing import make_checkpoint   # noqa: E402

KEY = "test-key-8f3a1c"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
REQUEST_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1.0
MAX_CONNECTIONS = 8
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("long-tiny"), LONG_TINY)


@pytest.fixture(scope="module")
def secured(model_path, tmp_path_factory):
    """A daemon with a key (from a file), one CORS origin, short timeouts, a small connection cap, JSON logs."""
    directory = tmp_path_factory.mktemp("secured")
    key_file = directory / "key"
    key_file.write_text(KEY + "\n")
    d = Daemon(model_path, directory / "daemon.log", "--api-key-file", str(key_file), "--cors-origins", ORIGIN,
               "--request-timeout", str(REQUEST_TIMEOUT_S), "--keep-alive-timeout", str(KEEP_ALIVE_S),
               "--max-connections", str(MAX_CONNECTIONS), "--log-format", "json", "--model-name", "tiny-test")
    yield d
    assert d.stop() == 0
    assert "Traceback" not in d.log(), d.log()


def post(url: str, path: str, body: dict | str | bytes, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={**JSON, **AUTH, **(headers or {})}, timeout=30.0)


# ---- authentication, Host, CORS, content type ----

def test_every_route_but_health_needs_the_key(secured):
    url = secured.url
    assert httpx.get(url + "/health", timeout=5.0).status_code == 200   # a probe needs no key
    for method, path in (("POST", "/execute"), ("POST", "/cancel"), ("GET", "/metrics"), ("GET", "/v1/models"),
                         ("POST", "/v1/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
            response = httpx.request(method, url + path, headers={**JSON, **headers}, content="{}", timeout=5.0)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"] == "Bearer" and response.headers["x-request-id"]
            if path.startswith("/v1/"):
                assert response.json()["error"]["code"] == "invalid_api_key"
            else:
                assert response.json()["errors"][0]["field"] == "authorization"
    assert httpx.get(url + "/v1/models", headers=AUTH, timeout=5.0).status_code == 200
    assert execute(url, job("authorized", max_tokens=3), headers=AUTH).terminal[0] == "end"


def test_openai_client_sends_the_key(secured):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=secured.url + "/v1", api_key=KEY, timeout=60.0, max_retries=0)
    completion = client.completions.create(model="x", prompt="Hello", max_tokens=5, temperature=0)
    assert completion.usage.completion_tokens == 5 and completion.model == "tiny-test"
    wrong = openai.OpenAI(base_url=secured.url + "/v1", api_key="wrong", timeout=60.0, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_a_foreign_host_header_is_refused(secured):
    # DNS rebinding: a page on rebind.evil.example whose name now resolves to 127.0.0.1
    for host in ("rebind.evil.example", f"rebind.evil.example:{secured.port}", ""):
        response = post(secured.url, "/execute", job("rebound"), {"Host": host})
        assert response.status_code == 400 and response.json()["errors"][0]["field"] == "host", host
    for host in (f"localhost:{secured.port}", f"127.0.0.1:{secured.port}", "LOCALHOST"):
        assert httpx.get(secured.url + "/health", headers={"Host": host}, timeout=5.0).status_code == 200
    assert secured.health()["active_jobs"] == 0


def test_cors_headers_only_for_the_listed_origin(secured):
    url = secured.url
    plain = httpx.get(url + "/v1/models", headers=AUTH, timeout=5.0)
    assert not any(name.startswith("access-control-") for name in plain.headers)
    foreign = httpx.get(url + "/v1/models", headers={**AUTH, "Origin": "https://evil.example"}, timeout=5.0)
    assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers
    listed = httpx.get(url + "/v1/models", headers={**AUTH, "Origin": ORIGIN}, timeout=5.0)
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(url + "/v1/completions", headers={**preflight, "Origin": ORIGIN}, timeout=5.0)
    assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "Authorization" in allowed.headers["access-control-allow-headers"]
    refused = httpx.options(url + "/v1/completions", headers={**preflight, "Origin": "https://evil.example"},
                            timeout=5.0)
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers


def test_post_bodies_must_be_json(secured):
    # a cross-origin form or fetch may send text/plain without a preflight: that is the CSRF path
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        response = post(secured.url, "/execute", job("csrf"), {"Content-Type": content_type})
        assert response.status_code == 415 and response.json()["errors"][0]["field"] == "content-type"
    openai_shape = post(secured.url, "/v1/completions", {"prompt": "x"}, {"Content-Type": "text/plain"})
    assert openai_shape.status_code == 415 and openai_shape.json()["error"]["message"]
    assert post(secured.url, "/execute", job("charset", max_tokens=2),
                {"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    assert secured.wait_idle()["active_jobs"] == 0


# ---- malformed input: 400, never 500 ----

HUGE = "9" * 5000
MALFORMED = {   # name: (path, raw body, the field named in the answer)
    "deep arrays": ("/execute", "[" * 100_000 + "]" * 100_000, "body"),
    "deep objects in an ignored field": ("/execute", '{"job_id": "d", "prompt": "a", "max_tokens": 1, "x": '
                                         + '{"a": ' * 17 + "1" + "}" * 17 + "}", "body"),
    "unclosed deep arrays": ("/v1/completions", "[" * 50_000, "body"),
    "lone surrogate in job_id": ("/execute", '{"job_id": "\\ud800", "prompt": "a", "max_tokens": 50}', "job_id"),
    "lone surrogate in the prompt": ("/execute", '{"job_id": "s", "prompt": "a\\udfff", "max_tokens": 1}', "prompt"),
    "lone surrogate in a stop string": ("/execute", '{"job_id": "s", "prompt": "a", "max_tokens": 1, '
                                        '"stop": ["ok", "\\ud83d"]}', "stop[1]"),
    "lone surrogate in a cancel": ("/cancel", '{"job_id": "\\ud800"}', "job_id"),
    "lone surrogate in the model": ("/v1/completions", '{"model": "\\udc00", "prompt": "a"}', "model"),
    "lone surrogate in a type error": ("/execute", '{"job_id": ["\\ud800"], "prompt": "a", "max_tokens": 1}',
                                       "job_id"),
    "huge max_tokens": ("/execute", f'{{"job_id": "h", "prompt": "a", "max_tokens": {HUGE}}}', "max_tokens"),
    "huge negative seed": ("/execute", f'{{"job_id": "h", "prompt": "a", "max_tokens": 1, "seed": -{HUGE}}}', "seed"),
    "huge integer as the prompt": ("/execute", f'{{"job_id": "h", "prompt": {HUGE}, "max_tokens": 1}}', "prompt"),
    "huge temperature": ("/v1/completions", f'{{"prompt": "a", "temperature": {HUGE}}}', "temperature"),
    "not UTF-8": ("/execute", b'{"job_id": "\xff", "prompt": "a", "max_tokens": 1}', "body"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_is_400_naming_the_field(secured, case):
    path, body, field = MALFORMED[case]
    response = post(secured.url, path, body)
    assert response.status_code == 400, response.text
    if path.startswith("/v1/"):
        error = response.json()["error"]
        assert error["param"] == field and error["type"] == "invalid_request_error"
        message = error["message"]
    else:
        errors = response.json()["errors"]
        assert [e["field"] for e in errors] == [field]
        message = errors[0]["message"]
    # the daemon's own words, never a parser's or Python's internals
    for internal in ("sys.set_int_max_str_digits", "Exceeds the limit", "codec", "Traceback", "recursion"):
        assert internal not in response.text
    assert len(message) < 200
    if "huge" in case:
        assert "an integer of 5000 digits" in message
    assert secured.health()["active_jobs"] == 0   # no job started for it


def test_nothing_of_a_malformed_job_ran(secured):
    """The lone-surrogate job_id of the cases above never reached the scheduler (no stream, no job line)."""
    assert not [line for line in secured.log().splitlines() if json.loads(line).get("job_id") in ("\ud800", "d", "h")]


# ---- names, not paths ----

def test_model_is_a_name_never_a_path(secured, model_path):
    assert secured.health()["model"] == "tiny-test"
    assert [m["id"] for m in httpx.get(secured.url + "/v1/models", headers=AUTH, timeout=5.0).json()["data"]] \
        == ["tiny-test"]
    stream = execute(secured.url, job("named", max_tokens=2), headers=AUTH)
    assert stream.events[0][1]["model"] == "tiny-test"
    completion = post(secured.url, "/v1/completions", {"prompt": "a", "max_tokens": 2}).json()
    assert completion["model"] == "tiny-test"
    for text in (json.dumps(secured.health()), json.dumps(completion), json.dumps(stream.events)):
        assert str(model_path) not in text


# ---- connections ----

def slow_sockets(port: int, count: int) -> list[socket.socket]:
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=5.0) for _ in range(count)]
    for s in sockets:
        s.sendall(b"GET /health HTTP/1.1\r\n")   # a request that is never finished
    return sockets


def wait_closed(sockets: list[socket.socket], deadline_s: float, trickle: bool = False) -> list[float]:
    """Seconds until the server closed each socket (inf if it did not within deadline_s); with trickle,
    one more header byte is sent on each open socket every second, as a slowloris client does."""
    started = time.monotonic()
    closed = {}
    next_byte = started + 1.0
    while len(closed) < len(sockets) and time.monotonic() - started < deadline_s:
        open_sockets = [s for s in sockets if s not in closed]
        readable, _, _ = select.select(open_sockets, [], [], 0.1)
        for s in readable:
            try:
                if not s.recv(4096):
                    closed[s] = time.monotonic() - started
            except ConnectionError:
                closed[s] = time.monotonic() - started
        if trickle and time.monotonic() >= next_byte:
            next_byte += 1.0
            for s in open_sockets:
                if s not in closed:
                    try:
                        s.send(b"X")
                    except OSError:
                        closed[s] = time.monotonic() - started
    for s in sockets:
        s.close()
    return [closed.get(s, float("inf")) for s in sockets]


def test_slowloris_connections_are_closed_after_the_request_timeout(secured):
    log_before = len(secured.log())
    sockets = slow_sockets(secured.port, 20)
    health = httpx.get(secured.url + "/health", timeout=5.0)   # meanwhile, the worker answers
    assert health.status_code == 200
    closed_after = wait_closed(sockets, deadline_s=REQUEST_TIMEOUT_S + 8, trickle=True)
    print(f"slowloris: 20 sockets closed after {min(closed_after):.2f} to {max(closed_after):.2f} s")
    assert all(REQUEST_TIMEOUT_S - 0.5 < t < REQUEST_TIMEOUT_S + 5 for t in closed_after), closed_after
    assert secured.log()[log_before:].count("no complete request within") == 1   # the other 19 left out


def test_a_silent_connection_is_closed_after_the_request_timeout(secured):
    silent = socket.create_connection(("127.0.0.1", secured.port), timeout=5.0)
    [closed_after] = wait_closed([silent], deadline_s=REQUEST_TIMEOUT_S + 8)
    assert REQUEST_TIMEOUT_S - 0.5 < closed_after < REQUEST_TIMEOUT_S + 5, closed_after


def test_an_idle_keep_alive_connection_is_closed(secured):
    s = socket.create_connection(("127.0.0.1", secured.port), timeout=5.0)
    s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{secured.port}\r\n\r\n".encode())
    answer = b""
    while b"}" not in answer:   # the JSON body's end
        answer += s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200")
    [closed_after] = wait_closed([s], deadline_s=KEEP_ALIVE_S + 8)
    print(f"keep-alive: idle connection closed after {closed_after:.2f} s")
    assert KEEP_ALIVE_S - 0.5 < closed_after < KEEP_ALIVE_S + 5, closed_after


def test_connections_beyond_the_cap_get_503_but_health_answers(secured):
    sockets = slow_sockets(secured.port, MAX_CONNECTIONS)
    time.sleep(0.3)   # accepted by the server
    try:
        over = httpx.get(secured.url + "/v1/models", headers=AUTH, timeout=5.0)
        assert over.status_code == 503 and over.headers["connection"] == "close"
        assert httpx.get(secured.url + "/health", timeout=5.0).status_code == 200
    finally:
        closed_after = wait_closed(sockets, deadline_s=REQUEST_TIMEOUT_S + 8)
    assert max(closed_after) < float("inf")   # the read timeout frees the places
    assert httpx.get(secured.url + "/v1/models", headers=AUTH, timeout=5.0).status_code == 200


def limit_open_files(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return preexec


def test_running_out_of_file_descriptors_degrades_quietly(model_path, tmp_path):
    """The daemon may open 64 files; 300 connections are opened to it and held, then dropped."""
    d = Daemon(model_path, tmp_path / "fds.log", "--request-timeout", "3", preexec_fn=limit_open_files(64))
    try:
        log_before = len(d.log())
        flood = [socket.create_connection(("127.0.0.1", d.port), timeout=5.0) for _ in range(300)]
        time.sleep(5)   # descriptors run out; the accepted connections are closed by the read timeout
        for s in flood:
            s.close()
        deadline = time.monotonic() + 20
        while True:   # /health answers again once the load is gone
            try:
                if httpx.get(d.url + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "/health did not come back"
        recovered_after = time.monotonic() - (deadline - 20)
        log = d.log()[log_before:]
        print(f"fd exhaustion: {len(log)} bytes of log, /health back {recovered_after:.1f} s after the flood ended")
        assert "cannot accept connections: Too many open files" in log
        assert "Traceback" not in log and len(log) < 20_000, log[:2000]
        assert d.health()["model"] == pathlib.Path(model_path).name   # the directory's name, by default
    finally:
        assert d.stop() == 0


# ---- start-up options ----

def test_a_non_loopback_host_needs_a_key(model_path, tmp_path):
    refused = subprocess.run([sys.executable, "-m", "llorch.server", "--model", model_path, "--port", "1",
                              "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--insecure-no-auth" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty-key"
    empty.write_text("\n")
    no_key = subprocess.run([sys.executable, "-m", "llorch.server", "--model", model_path, "--port", "1",
                             "--api-key-file", str(empty)], capture_output=True, text=True, timeout=60)
    assert no_key.returncode == 2 and "is empty" in no_key.stderr


# ---- signals ----

def test_the_drain_answers_503_on_open_connections(model_path, tmp_path):
    d = Daemon(model_path, tmp_path / "drain.log", "--api-key", KEY, "--grace-period", "60", "--max-batch", "1",
               "--keep-alive-timeout", "30")
    try:
        assert "--api-key is visible to every local user" in d.log()
        with concurrent.futures.ThreadPoolExecutor(2) as pool, httpx.Client(timeout=30.0, headers=AUTH) as kept:
            assert kept.get(d.url + "/v1/models").status_code == 200   # opens the connection kept alive
            jobs = [start_in_background(pool, d.url, long_job("drained"), tokens=1, headers=AUTH),
                    pool.submit(execute, d.url, long_job("queued"), None, AUTH)]
            d.wait_health(lambda health: health["queued_jobs"] == 1)
            d.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (answer := kept.get(d.url + "/v1/models")).status_code == 200:   # until the drain begins
                assert "connection" not in answer.headers and time.monotonic() < deadline
            assert answer.status_code == 503 and answer.headers["connection"] == "close"
            assert answer.json()["error"]["message"] == "the worker is shutting down"
            with pytest.raises(httpx.ConnectError):   # a new connection is refused: the port is closed
                httpx.get(d.url + "/health", timeout=2.0)
            ends = [running.result(60).terminal for running in jobs]
        # the running and the queued job had the grace period to finish
        assert ends == [("end", end) for _, end in ends] and all(end["tokens_out"] == LONG_TOKENS for _, end in ends)
        assert d.process.wait(30) == 0
    finally:
        d.stop()


def test_a_second_signal_exits_at_once(model_path, tmp_path):
    d = Daemon(model_path, tmp_path / "second.log", "--grace-period", "60", "--max-batch", "1")
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            jobs = [start_in_background(pool, d.url, long_job("long"))]
            jobs += [pool.submit(execute, d.url, long_job(f"queued-{i}")) for i in range(3)]
            d.wait_health(lambda health: health["queued_jobs"] == 3)
            d.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert d.process.poll() is None   # draining: the jobs have 60 s
            d.process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            code = d.process.wait(10)
            print(f"second SIGTERM: exited after {time.monotonic() - sent:.2f} s")
            concurrent.futures.wait(jobs, timeout=30)
        assert code == 128 + signal.SIGTERM
        assert "second SIGTERM during the shutdown: exiting at once" in d.log()
    finally:
        d.stop()


def test_a_non_streamed_completion_is_cancelled_when_its_client_leaves(secured):
    body = json.dumps({"prompt": "The client will leave", "max_tokens": LONG_TOKENS}).encode()   # sampled
    s = socket.create_connection(("127.0.0.1", secured.port), timeout=5.0)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    secured.wait_health(lambda health: health["active_jobs"] == 1)
    s.close()
    secured.wait_idle()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in secured.log().splitlines()]
        ends = [line for line in lines if line.get("job_id", "").startswith("cmpl-") and "CANCELLED" in line["message"]]
        if ends:
            break
        time.sleep(0.05)
    assert ends and f"{LONG_TOKENS} out" not in ends[-1]["message"], ends


# ---- the ready callback ----

class StubbornReceiver:
    """The ready callback's endpoint: it accepts its first connection and never answers, answers the second
    with 503, and acknowledges the third with 204, recording each request's head."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/ready"
        self.heads: list[bytes] = []
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        self.listener.settimeout(60)
        for answer in (None, b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
                       b"HTTP/1.1 204 No Content\r\n\r\n"):
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            connection.settimeout(10)
            self.heads.append(connection.recv(65536))
            if answer is None:
                self.held.append(connection)   # accepted, never answered
            else:
                connection.sendall(answer)
                connection.close()

    def close(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


def test_the_callback_is_retried_until_acknowledged(model_path, tmp_path):
    receiver = StubbornReceiver()
    d = Daemon(model_path, tmp_path / "callback.log", "--callback-url", receiver.url, "--callback-timeout", "1",
               "--callback-token", "cb-token")
    try:
        d.wait_health(lambda health: health["callback_delivered"], timeout=30)
        log = d.log()
        assert "(attempt 1, next in 1 s): timed out after 1 s" in log
        assert "(attempt 2, next in 2 s): answered 503" in log
        assert len(receiver.heads) == 3
        assert all(b"authorization: bearer cb-token" in head.lower() for head in receiver.heads)
    finally:
        d.stop()
        receiver.close()
    assert d.process.returncode == 0


def test_json_logs_one_object_per_line_with_the_job_id(secured):
    execute(secured.url, job("logged", max_tokens=2), headers=AUTH)
    deadline = time.monotonic() + 5
    while "logged" not in secured.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [json.loads(line) for line in secured.log().splitlines()]   # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    [job_line] = [line for line in lines if line.get("job_id") == "logged"]
    assert job_line["logger"] == "llorch.scheduler" and "2 out, MAX_TOKENS" in job_line["message"]


# ---- the catch-all, on a tiny app behind the same guard (llorch-cpud has no route known to fail) ----

@pytest.fixture(scope="module")
def failing_app():
    """uvicorn on a thread serving HttpGuard around routes that fail: before answering, and mid-stream."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from llorch import http_guard

    async def fails(request):
        raise RuntimeError("internal detail 1234")

    async def fails_mid_stream(request):
        async def chunks():
            yield "data: first\n\n"
            yield "data: \ud800\n\n"   # cannot be encoded: fails as the lone-surrogate job_id once did
        return StreamingResponse(http_guard.guard_stream(chunks(), lambda request_id: f"event: error\ndata: "
                                                         f"{request_id}\n\n", request.state.request_id))
    policy = http_guard.Policy(api_key=None, allowed_hosts=None, cors_origins=frozenset())
    app = Starlette(routes=[Route("/execute", fails, methods=["POST"]),
                            Route("/v1/completions", fails, methods=["POST"]), Route("/stream", fails_mid_stream)],
                    middleware=[Middleware(http_guard.HttpGuard, policy=policy, draining=lambda: False,
                                           on_response=lambda route, status: None)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           http=http_guard.guarded_protocol(5.0)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_an_unexpected_error_is_a_logged_500_with_a_request_id(failing_app, caplog):
    for path, shape in (("/execute", "errors"), ("/v1/completions", "error")):
        response = httpx.post(failing_app + path, json={}, timeout=5.0)
        assert response.status_code == 500 and shape in response.json()
        request_id = response.headers["x-request-id"]
        assert response.json()["request_id"] == request_id and request_id in response.text
        assert "internal detail" not in response.text
        [record] = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
        assert record.levelname == "ERROR" and "internal detail 1234" in str(record.exc_info[1])


def test_a_stream_failing_mid_way_ends_with_an_error_event(failing_app, caplog):
    with httpx.stream("GET", failing_app + "/stream", timeout=5.0) as response:
        body = response.read().decode()   # a reset connection would raise here
    request_id = response.headers["x-request-id"]
    assert body == f"data: first\n\nevent: error\ndata: {request_id}\n\n"
    assert any(getattr(r, "request_id", None) == request_id for r in caplog.records)
