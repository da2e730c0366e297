"""llorch on Ray Serve: llorch-cpud's HTTP API served by replicas across a Ray cluster (docs/scaling-out.md).

    llorch-serve --model gpt2 --replicas 2 [--address auto] [--threads 1] [--port 8000]
    serve run llorch.ray:app_builder model=gpt2 replicas=2        # or: serve run docs/serve-config.yaml

An application is three deployments, built by `app_builder` (the optional `ray` extra: ray[serve]):

- **LlorchModel**: each replica is one llorch-cpud worker -- llorch.server's Worker (the model on its
  continuous-batching scheduler thread) and the ASGI application of `llorch.server.create_app` -- driven
  in-process, one ASGI request per call. Validation, SSE and job handling are llorch-cpud's own code.
- **LlorchIngress**: the HTTP entry. It hands each request, its body read, to a model replica through a
  Serve handle and streams back the replica's ASGI messages. When the replica dies mid-request it ends the
  response itself: a 503 before the response started, an `error` event once a stream has.
- **CancelBoard**: one replica. A /cancel that lands on a replica not holding the job is offered through
  it to every other live replica (each watches the board); the holder's own /cancel answers.

Only this module imports ray: `import llorch` and llorch-cpud never do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field, fields

from llorch import server
from llorch.console import EXIT_INTERRUPTED, ArgumentParser, internal_error
from llorch.generate import DRAFT_CHOICES
from llorch.scheduler import FailureCode

try:
    import ray
    from ray import serve

    from llorch import http_guard   # the server extra, which the ray extra pulls in
    MISSING_EXTRA = None
except ImportError as e:   # reported by main(); importing this module stays harmless
    MISSING_EXTRA = e.name

PROG = "llorch-serve"
APP_NAME = "llorch"
log = logging.getLogger("llorch.ray")

CONTROL_HEADROOM = 8      # requests a replica takes beyond its jobs: /health, /cancel, refusals
POLL_S = 2.0              # a replica's wait on the cancel board before it asks again
LIVE_S = 2 * POLL_S + 1   # a replica that has not asked for that long is taken for gone
ANSWER_S = 5.0            # how long a relayed cancel waits for the replicas' answers
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"   # llorch-cpud's


# ---- options: one table for llorch-serve, `serve run ... key=value` and a config file's args ----

@dataclass(frozen=True)
class Options:
    model: str
    model_name: str | None = None          # as llorch-cpud's --model-name
    replicas: int = 1
    min_replicas: int | None = None        # with max_replicas: Serve autoscales between the two
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None   # per replica, when autoscaling (default: max_batch)
    threads: int | None = None             # kernel threads per replica (default: num_cpus)
    num_cpus: float | None = None          # CPUs Ray reserves per replica (default: threads, else 1)
    max_batch: int = 8
    max_queue: int = 64
    grace_period: float = 10.0
    draft: str = "lookup"                  # as llorch-cpud's --draft: lookup drafting of greedy jobs, or none
    callback_url: str | None = None        # announced once the application serves
    callback_token: str | None = field(default=None, repr=False)   # sent with it, as llorch-cpud's
    callback_timeout: float = 5.0
    public_url: str | None = None          # the uri announced: where clients reach the application
    # the replicas' HTTP guard (llorch-cpud's): its Host list defaults to the public host and localhost
    api_key: str | None = field(default=None, repr=False)
    allowed_hosts: str | None = None
    cors_origins: str = ""
    log_level: str = "info"                # of the replicas' llorch lines (stderr: Ray's worker logs)

    @classmethod
    def from_args(cls, args: dict) -> "Options":
        """Options from strings (`serve run` key=value) or typed values (a config file); ValueError, one
        line, for a missing model, an unknown name, a wrong type or a value out of range."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} (options: {', '.join(known)})")
        if not args.get("model"):
            raise ValueError("model is required (a directory, .safetensors file or hub id on every node)")
        values = {name: _convert(name, value, known[name].type) for name, value in args.items() if value is not None}
        options = cls(**values)
        options._check()
        return options

    def _check(self) -> None:
        for name, low, strict in (("replicas", 1, False), ("min_replicas", 0, False), ("max_replicas", 1, False),
                                  ("target_ongoing_requests", 0, True), ("threads", 1, False),
                                  ("num_cpus", 0, False), ("max_batch", 1, False), ("max_queue", 0, False),
                                  ("grace_period", 0, False), ("callback_timeout", 0, True)):
            value = getattr(self, name)
            if value is not None and (value <= low if strict else value < low):
                raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
        if self.draft not in DRAFT_CHOICES:
            raise ValueError(f"draft must be one of {', '.join(DRAFT_CHOICES)}, got {self.draft!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("min_replicas and max_replicas go together (autoscaling between them)")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")

    @property
    def cpus(self) -> float:
        return self.num_cpus if self.num_cpus is not None else float(self.threads or 1)

    def worker_argv(self, worker_id: str) -> list[str]:
        """llorch-cpud's command line for one replica: its Worker and its guard's Policy are built by llorch-cpud's
        own parser. Its host and port name the application's public address (Serve's default one): in its
        start-up line, and in the Host names its guard accepts. The API key is no argument: see LlorchModel."""
        threads = self.threads or max(1, math.floor(self.cpus))
        address = urllib.parse.urlsplit(self.public_url or "http://127.0.0.1:8000")
        optional = [(name, value) for name, value in (("--model-name", self.model_name),
                                                      ("--allowed-hosts", self.allowed_hosts)) if value]
        return ["--model", self.model, "--host", address.hostname or "127.0.0.1", "--port", str(address.port or 80),
                "--worker-id", worker_id, "--threads", str(threads), "--max-batch", str(self.max_batch),
                "--max-queue", str(self.max_queue), "--grace-period", str(self.grace_period), "--draft", self.draft,
                "--cors-origins", self.cors_origins, *(item for pair in optional for item in pair)]


def _convert(name: str, value: object, kind: str) -> object:
    """A value of the field's type ('int | None', 'float', 'str | None', ...), from a string or itself."""
    kind = kind.split(" ")[0]
    target, expected = {"int": (int, "an integer"), "float": (float, "a finite number"), "str": (str, "a string")}[kind]
    converted = None
    if not isinstance(value, bool) and not (target is int and isinstance(value, float)):   # 2.5 is no replica count
        with contextlib.suppress(TypeError, ValueError):
            converted = target(value)
    if converted is None or (target is float and not math.isfinite(converted)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return converted


# ---- ASGI, carried over Serve handles ----

SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
              "headers", "server", "client")


def route(scope: dict) -> str:
    """The request's path below the application's route prefix."""
    return scope["path"][len(scope.get("root_path", "")):] or "/"


def status_of(messages: list[dict]) -> int:
    return next(m["status"] for m in messages if m["type"] == "http.response.start")


async def read_body(receive, limit: int) -> bytes | None:
    """The request body, at most limit bytes (an app given its own maximum + 1 refuses it as too large);
    None if the client left first."""
    chunks, size, more = [], 0, True
    while more and size < limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
    return b"".join(chunks)[:limit]


async def run_asgi(app, scope: dict, body: bytes):
    """Run one HTTP request through an ASGI app in this process; yields its response messages in batches.
    A consumer that stops early (its client left) cancels the request, as a disconnect would."""
    messages: asyncio.Queue = asyncio.Queue()
    request = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict:
        nonlocal request
        if request is None:
            await asyncio.Future()   # never: a client that leaves cancels this call instead
        message, request = request, None
        return message

    async def serve_request() -> None:
        try:
            await app(dict(scope), receive, messages.put)   # the app adds its own keys to the scope
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(serve_request())
    try:
        done = False
        while not done:
            batch = [await messages.get()]
            while not messages.empty():
                batch.append(messages.get_nowait())
            done = batch[-1] is None
            if batch[:-1] or not done:
                yield [m for m in batch if m is not None]
        await task   # the app's own exception, if it raised one
    finally:
        task.cancel()


async def collect(app, scope: dict, body: bytes) -> list[dict]:
    return [message async for batch in run_asgi(app, scope, body) for message in batch]


# ---- the deployments (plain classes, importable without ray: build_app makes them deployments) ----

class LlorchModel:
    """One llorch-cpud worker per replica: llorch.server's Worker and ASGI app, with its lifespan."""

    async def __init__(self, options: Options, board) -> None:
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        self.watching: asyncio.Task | None = None   # what __del__ stops, also after a failed start
        self.lifespan = None
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # llorch-cpud's log lines (start-up, one per job) on the replica's stderr, which Ray keeps per worker
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        llorch_log = logging.getLogger("llorch")
        llorch_log.handlers, llorch_log.propagate = [handler], False
        llorch_log.setLevel(options.log_level.upper())
        self.board = board
        args = server.build_parser().parse_args(options.worker_argv(worker_id=self.replica_id))
        self.worker = server.Worker(args)
        # the guard of llorch-cpud's app checks the key, Host (the client's, relayed), CORS and content type:
        # the ingress relays requests unchecked
        self.app = server.create_app(self.worker, server.guard_policy(args, options.api_key))
        self.lifespan = LifespanOn(Config(self.app, lifespan="on", log_config=None))
        await self.lifespan.startup()
        # The replica is ready once its model is: Serve routes nothing to it before, and a model that cannot
        # be loaded fails the replica with the loader's message.
        await asyncio.wrap_future(self.worker.scheduler.loaded)
        self.watching = asyncio.create_task(self.watch_cancels())

    async def http(self, scope: dict, body: bytes):
        """One request through llorch-cpud's app; yields its ASGI messages as they are produced."""
        async for batch in run_asgi(self.app, scope, body):
            yield batch

    async def http_cancel(self, scope: dict, body: bytes):
        """POST /cancel: this replica's answer, unless it does not hold the job and another replica does."""
        answer = await collect(self.app, scope, body)
        if status_of(answer) == 404:
            answer = await self.board.cancel.remote(self.replica_id, scope, body) or answer
        yield answer

    async def describe(self) -> dict:
        return {"model_ref": self.worker.model_ref, "memory_bytes": self.worker.scheduler.memory_bytes()}

    async def watch_cancels(self) -> None:
        """Answer the cancels other replicas relay through the board, with this replica's own /cancel."""
        while True:
            try:
                for request_id, scope, body in await self.board.poll.remote(self.replica_id):
                    self.board.answer.remote(request_id, await collect(self.app, scope, body))
            except Exception as e:   # the board is restarting (its node was lost): ask again shortly
                log.warning("cancel board unreachable: %s", type(e).__name__)
                await asyncio.sleep(POLL_S / 2)

    async def __del__(self) -> None:   # Serve lets the ongoing requests finish first (graceful_shutdown_timeout_s)
        if self.watching:
            self.watching.cancel()
        if self.lifespan:
            await self.lifespan.shutdown()


class CancelBoard:
    """Relays a /cancel between replicas. Each replica polls it for the cancels meant for others; a cancel
    is offered to every replica that polled recently, and the first that holds the job answers it."""

    def __init__(self) -> None:
        self.mailboxes: dict[str, asyncio.Queue] = {}
        self.polled_at: dict[str, float] = {}
        self.answers: dict[str, asyncio.Queue] = {}
        self.relayed = 0

    async def poll(self, replica_id: str) -> list:
        self.polled_at[replica_id] = time.monotonic()
        mailbox = self.mailboxes.setdefault(replica_id, asyncio.Queue())
        try:
            requests = [await asyncio.wait_for(mailbox.get(), POLL_S)]
        except asyncio.TimeoutError:
            return []
        while not mailbox.empty():
            requests.append(mailbox.get_nowait())
        return requests

    def answer(self, request_id: str, messages: list[dict]) -> None:
        if request_id in self.answers:
            self.answers[request_id].put_nowait(messages)

    async def cancel(self, asker: str, scope: dict, body: bytes) -> list[dict] | None:
        """The answer of the replica holding the job (202), or None when no other live replica holds it."""
        now = time.monotonic()
        for gone in [r for r, t in self.polled_at.items() if now - t > LIVE_S]:
            del self.polled_at[gone], self.mailboxes[gone]
        peers = [r for r in self.polled_at if r != asker]
        request_id, answers = uuid.uuid4().hex, asyncio.Queue()
        self.answers[request_id] = answers
        for peer in peers:
            self.mailboxes[peer].put_nowait((request_id, scope, body))
        try:
            deadline = now + ANSWER_S
            for _ in peers:
                messages = await asyncio.wait_for(answers.get(), max(deadline - time.monotonic(), 0))
                if status_of(messages) == 202:
                    self.relayed += 1
                    return messages
        except asyncio.TimeoutError:
            pass
        finally:
            del self.answers[request_id]
        return None

    def stats(self) -> dict:
        return {"relayed": self.relayed, "replicas": len(self.polled_at)}


class LlorchIngress:
    """The HTTP entry: its ASGI app is a Tunnel to the model replicas; it also announces the application."""

    def __init__(self, model, options: Options) -> None:
        self.model, self.options = model, options
        # one id per public address: every ingress replica, and one Serve restarts, announces the same worker
        self.worker_id = f"{APP_NAME}-{uuid.uuid5(uuid.NAMESPACE_URL, options.public_url or APP_NAME)}"
        if options.callback_url:
            self.announcing = asyncio.get_running_loop().create_task(self.announce())

    def __serve_build_asgi_app__(self):
        return Tunnel(self.model)

    async def announce(self) -> None:
        """The application announces itself once, as one worker at its public uri, when a replica serves."""
        described = await self.model.describe.remote()
        await server.announce(self.options.callback_url, {"worker_id": self.worker_id, **described,
                                                          "uri": self.options.public_url},
                              self.options.callback_token, self.options.callback_timeout)


class Tunnel:
    """An ASGI app that serves each HTTP request on a model replica, over a Serve handle, and streams back the
    replica's response."""

    def __init__(self, model) -> None:
        self.model = model.options(stream=True)

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":   # nothing to start or stop here
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = await read_body(receive, server.MAX_BODY_BYTES + 1)
        if body is None:
            return
        request_scope = {key: scope[key] for key in SCOPE_KEYS if key in scope}
        call = self.model.http_cancel if route(scope) == "/cancel" else self.model.http
        response = call.remote(request_scope, body)
        started = ended = False
        try:
            async for batch in response:
                for message in batch:
                    await send(message)
                    started = started or message["type"] == "http.response.start"
                    ended = message["type"] == "http.response.body" and not message.get("more_body", False)
        except Exception as e:   # the replica died, or could not be reached
            log.warning("%s %s: replica failed: %s", scope["method"], route(scope), type(e).__name__)
            if not ended:
                await self.end_failed(scope, receive, send, started)
        finally:
            response.cancel()   # a no-op once finished; else the client left: the replica cancels its job

    @staticmethod
    async def end_failed(scope: dict, receive, send, started: bool) -> None:
        """End a response whose replica failed as llorch-cpud would end it: a 503 (retry) before it started,
        a stream's `error` event after, in the route's own shape."""
        message = "the replica serving this request failed"
        openai = route(scope).startswith("/v1/")
        if not started:
            answer = (server.openai_error(503, message) if openai else
                      server.rejection(503, {"errors": [server.violation("worker", "available", message)]}, message))
            await answer(scope, receive, send)
            return
        if openai:
            error = http_guard.openai_error_body(500, message, code=FailureCode.INFERENCE_FAILED.value)
            event = server.sse(None, error) + server.sse(None, "[DONE]")
        else:
            event = server.sse("error", {"code": FailureCode.INFERENCE_FAILED.value, "message": message})
        await send({"type": "http.response.body", "body": event.encode(), "more_body": False})


def build_app(options: Options):
    """The Serve application: the ingress, the model replicas and the cancel board."""
    scaling = ({"num_replicas": options.replicas} if options.min_replicas is None else
               {"autoscaling_config": {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                       "target_ongoing_requests": options.target_ongoing_requests or options.max_batch}})
    board = serve.deployment(CancelBoard, name="CancelBoard", num_replicas=1, max_ongoing_requests=1000,
                             ray_actor_options={"num_cpus": 0},
                             logging_config={"enable_access_log": False})   # a poll per replica every 2 s
    model = serve.deployment(
        LlorchModel, name="LlorchModel", ray_actor_options={"num_cpus": options.cpus},
        max_ongoing_requests=options.max_batch + options.max_queue + CONTROL_HEADROOM,
        graceful_shutdown_timeout_s=options.grace_period + 5, **scaling)
    ingress = serve.deployment(serve.ingress()(LlorchIngress), name="LlorchIngress", max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(model.bind(options, board.bind()), options)


def app_builder(args: dict):
    """`serve run llorch.ray:app_builder model=M replicas=N ...` and config files' import_path. The API key,
    unless given as api_key, is LLORCH_API_KEY's where the builder runs (keys stay off command lines)."""
    return build_app(Options.from_args({"api_key": os.environ.get("LLORCH_API_KEY"), **args}))


# ---- llorch-serve ----

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="llorch-cpud's HTTP API on Ray Serve: replicas of the worker "
                            "across a Ray cluster, one model and one batching scheduler each.")
    parser.add_argument("--model", required=True, help="directory, .safetensors file or hub id, as every node "
                        "resolves it (its own path or Hugging Face cache)")
    parser.add_argument("--model-name", help="the model's name in /health, /v1/models and every response "
                        "(default: the checkpoint's directory name, or the hub id)")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (default: 1)")
    parser.add_argument("--min-replicas", type=int, help="autoscale between --min-replicas and --max-replicas")
    parser.add_argument("--max-replicas", type=int)
    parser.add_argument("--target-ongoing-requests", type=float, help="per replica, when autoscaling "
                        "(default: --max-batch)")
    parser.add_argument("--address", help="the Ray cluster: auto (the one this machine belongs to) or "
                        "ray://HOST:10001 (default: start a local Ray)")
    parser.add_argument("--threads", type=int, help="kernel threads per replica (default: --num-cpus)")
    parser.add_argument("--num-cpus", type=float, help="CPUs Ray reserves per replica (default: --threads, else 1)")
    parser.add_argument("--host", default="127.0.0.1", help="where Serve's HTTP proxies listen (default: 127.0.0.1); "
                        "any other than a loopback address needs an API key or --insecure-no-auth")
    parser.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    parser.add_argument("--max-batch", type=int, default=8, help="jobs a replica decodes together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="jobs a replica queues beyond those (default: 64)")
    parser.add_argument("--grace-period", type=float, default=10.0, metavar="SECONDS",
                        help="how long a stopping replica lets its jobs finish (default: 10)")
    server.add_callback_arguments(parser, when="once, when the application serves")
    parser.add_argument("--public-url", help="the uri announced, whose host the replicas accept in Host headers "
                        "(default: http://HOST:PORT)")
    server.add_guard_arguments(parser)   # enforced by each replica's guard, as llorch-cpud's
    parser.add_argument("--draft", choices=DRAFT_CHOICES, default="lookup",
                        help="as llorch-cpud's: lookup drafting of greedy jobs (exact), or none (default: lookup)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if MISSING_EXTRA:
        parser.error(f"the ray extra is not installed ({MISSING_EXTRA} is missing): pip install 'llorch[ray]'")
    try:
        return run(args, parser)
    except KeyboardInterrupt:   # before the application serves (after, Ctrl-C stops it: wait_for_signal)
        return EXIT_INTERRUPTED
    except Exception as e:   # a bug, not bad input (bad input exited 2 above)
        return internal_error(PROG, e)


def run(args, parser: ArgumentParser) -> int:
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1 to 65535, got {args.port}")
    given = vars(args) | {"api_key": server.read_exposure_key(args, parser),
                          "public_url": args.public_url or f"http://{args.host}:{args.port}"}
    try:
        options = Options.from_args({f.name: given[f.name] for f in fields(Options) if f.name in given})
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
    if args.api_key:
        log.warning("--api-key is visible to every local user (ps, /proc): prefer --api-key-file or LLORCH_API_KEY")
    try:
        check_reachable(args.address)
        ray.init(address=args.address, logging_level=args.log_level.upper())
    except (ConnectionError, RuntimeError, ValueError) as e:
        parser.error(f"cannot reach the Ray cluster {args.address}: {str(e).splitlines()[0]}")
    needed, available = (options.min_replicas or options.replicas) * options.cpus, ray.cluster_resources().get("CPU", 0)
    if args.address is None and needed > available:   # a cluster may grow (an autoscaler); this machine will not
        ray.shutdown()
        parser.error(f"{describe_scaling(options)} of {options.cpus:g} CPUs need {needed:g} CPUs; this machine "
                     f"has {available:g}")
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
    except Exception as e:   # a model no replica could load, a port in use, too few CPUs...
        cause = root_cause(e)
        ray.shutdown()
        parser.error(f"the application did not start: {cause}")
    print(f"{PROG}: serving {options.model} at {options.public_url} ({describe_scaling(options)}); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        asyncio.run(wait_for_signal())
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()
    return 0


def check_reachable(address: str | None) -> None:
    """ConnectionError unless HOST:PORT (or ray://HOST:PORT) accepts a connection within 5 s: Ray itself
    retries an unreachable address for minutes. Ray checks `auto` (and no address) at once itself."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        raise ConnectionError("expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConnectionError(str(e) or type(e).__name__) from None


def root_cause(error: Exception) -> str:
    """Why the application failed: the last `SomeError: message` line of the tracebacks its deployments
    report (a replica's constructor that raised), else the error's first line."""
    reports = []
    with contextlib.suppress(Exception):   # Serve may not be reachable any more
        reports = [d.message for d in serve.status().applications[APP_NAME].deployments.values()]
    text = "\n".join([str(error), *reports])
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
    causes = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
    return causes[-1] if causes else lines[0]


def describe_scaling(options: Options) -> str:
    if options.min_replicas is None:
        return f"{options.replicas} replicas"
    return f"{options.min_replicas} to {options.max_replicas} replicas"


async def wait_for_signal() -> None:
    """Until SIGINT or SIGTERM."""
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


if __name__ == "__main__":
    sys.exit(main())
