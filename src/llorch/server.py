"""llorch-cpud: the CPU worker daemon (docs/specs/14-worker-daemon.md).

    llorch-cpud --model gpt2 --port 8081 [--callback-url http://orchestrator/workers/ready]

Serves the llama-orch worker contract (GET /health, POST /execute streaming named SSE events, POST /cancel)
and OpenAI-style completions (POST /v1/completions, GET /v1/models) over Starlette + uvicorn, the optional
`server` extra. The model runs on one scheduler thread that batches every active job (llorch.scheduler);
this module validates requests, turns scheduler events into SSE, and handles start-up and shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import secrets
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import llorch
from llorch.hub import resolve_model
from llorch.sampling import Sampler
from llorch.scheduler import CANCELLED, EOS, Event, Job, Rejected, Scheduler, STOP_SEQUENCE

try:
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
    MISSING_EXTRA = None
    UvicornServer = uvicorn.Server
except ImportError as e:   # reported by main(); importing this module stays harmless
    MISSING_EXTRA = e.name
    UvicornServer = object

PROG = "llorch-cpud"
EXIT_BAD_INPUT = 2
log = logging.getLogger("llorch.server")

MAX_BODY_BYTES = 1 << 20   # a 32768-character prompt, fully \u-escaped, is well under this
MAX_PROMPT_CHARS = 32768
MAX_NEW_TOKENS = 2048
RETRY_AFTER_S = "1"
CALLBACK_ATTEMPTS = 8
CALLBACK_FIRST_DELAY_S, CALLBACK_MAX_DELAY_S = 1.0, 30.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}   # no proxy may hold events back


# ---- request validation: one table per route, every violation reported ----

@dataclass(frozen=True)
class Field:
    """One JSON field: its kind ("string", "integer", "number", "boolean" or "list"), the allowed range of
    its value (numbers) or length (strings, lists), and its default when absent or null."""
    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    required: bool = False
    default: object = None
    low_exclusive: bool = False
    items: "Field | None" = None     # the rule for each item of a list


def violation(field: str, constraint: str, message: str, value: object = ...) -> dict:
    error = {"field": field, "constraint": constraint, "message": message}
    if value is not ...:
        error["value"] = value
    return error


KINDS = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "list": list}


def check(field: Field, value: object, name: str) -> list[dict]:
    """The violations of one present value (name is the field's path, e.g. stop[2])."""
    # bool is an int in Python, but true is not a number in JSON
    if not isinstance(value, KINDS[field.kind]) or (isinstance(value, bool) and field.kind != "boolean"):
        article = "an" if field.kind[0] in "aeiou" else "a"
        return [violation(name, "type", f"{name} must be {article} {field.kind}", value)]
    if field.kind == "number" and not math.isfinite(value):
        return [violation(name, "type", f"{name} must be a finite number", str(value))]
    if field.kind in ("string", "list"):
        size, unit = len(value), "characters" if field.kind == "string" else "items"
        errors = [] if in_range(field, size) else [
            violation(name, "length", f"{name} must have {describe_range(field)} {unit}, got {size}")]
        items = enumerate(value if field.items else [])
        return errors + [error for i, item in items for error in check(field.items, item, f"{name}[{i}]")]
    if field.kind in ("integer", "number") and not in_range(field, value):
        return [violation(name, "range", f"{name} must be {describe_range(field)}, got {value}", value)]
    return []


def in_range(field: Field, x: float) -> bool:
    above = field.low is None or (x > field.low if field.low_exclusive else x >= field.low)
    return above and (field.high is None or x <= field.high)


def describe_range(field: Field) -> str:
    if field.low_exclusive:
        return f"> {field.low} and <= {field.high}"
    if field.high is None:
        return f"{field.low} or more"
    return f"{field.low} to {field.high}" if field.low != field.high else f"exactly {field.low}"


def validate(body: object, fields: tuple[Field, ...]) -> tuple[dict, list[dict]]:
    """(values with defaults filled in, violations). Unknown fields are ignored, null means absent."""
    if not isinstance(body, dict):
        return {}, [violation("body", "type", "the body must be a JSON object")]
    values, errors = {}, []
    for field in fields:
        value = body.get(field.name)
        if value is None:
            if field.required:
                errors.append(violation(field.name, "required", f"{field.name} is required"))
            values[field.name] = field.default
        else:
            errors += check(field, value, field.name)
            values[field.name] = value
    return values, errors


PROMPT = Field("prompt", "string", 1, MAX_PROMPT_CHARS, required=True)
SAMPLING_FIELDS = (
    Field("temperature", "number", 0, 2, default=1.0),
    Field("seed", "integer", 0, 2**64 - 1),
    Field("top_p", "number", 0, 1, default=1.0),
    Field("top_k", "integer", 0, default=0),
    Field("repetition_penalty", "number", 0, 2, default=1.0, low_exclusive=True),
    Field("stop", "list", 0, 4, default=[], items=Field("stop[]", "string", 1, 100)),
    Field("min_p", "number", 0, 1, default=0.0),
)
EXECUTE_FIELDS = (Field("job_id", "string", 1, required=True), PROMPT,
                  Field("max_tokens", "integer", 1, MAX_NEW_TOKENS, required=True)) + SAMPLING_FIELDS
COMPLETION_FIELDS = (Field("model", "string"), PROMPT,
                     Field("max_tokens", "integer", 1, MAX_NEW_TOKENS, default=16),   # OpenAI's default
                     Field("n", "integer", 1, 1, default=1), Field("stream", "boolean", default=False),
                     ) + SAMPLING_FIELDS
CANCEL_FIELDS = (Field("job_id", "string", 1, required=True),)


class RequestError(Exception):
    """A request answered with an error status; errors in the worker contract's shape."""

    def __init__(self, status: int, errors: list[dict]) -> None:
        super().__init__(", ".join(e["field"] for e in errors))
        self.status, self.errors = status, errors


async def read_json(request: Request) -> object:
    """The parsed body; RequestError 400 on `body` when it is too large or not JSON."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(400, [violation("body", "size", f"the body exceeds {MAX_BODY_BYTES} bytes")])
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as e:   # JSONDecodeError and UnicodeDecodeError both are
        raise RequestError(400, [violation("body", "json", f"malformed JSON: {e}")]) from None


def validated(body: object, fields: tuple[Field, ...]) -> dict:
    """validate(), raising RequestError 400 on any violation."""
    params, errors = validate(body, fields)
    if errors:
        raise RequestError(400, errors)
    return params


# ---- the worker: state shared by the routes ----

class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.model_ref = args.model
        self.worker_id = args.worker_id
        self.uri = f"http://{args.host}:{args.port}"
        self.callback_url = args.callback_url
        self.grace_s = args.grace_period
        self.scheduler = Scheduler(lambda: llorch.load(resolve_model(args.model)), model_name=args.model,
                                   max_batch=args.max_batch, max_queue=args.max_queue, threads=args.threads)
        self.encoding = llorch.tokenizer()
        self.draining = False
        self.exit_code = 0
        self.request_exit: Callable[[], None] = lambda: None   # set by main: stops the HTTP server

    @property
    def model_loaded(self) -> bool:
        loaded = self.scheduler.loaded
        return loaded.done() and loaded.exception() is None

    def unavailable(self) -> str | None:
        """Why no job can be taken now, or None."""
        if self.draining:
            return "the worker is shutting down"
        if not self.model_loaded:
            return "the model is not loaded yet"
        return None

    def prompt_ids(self, params: dict) -> tuple[list[int], list[dict]]:
        """The prompt's tokens, or a violation on `prompt` when they and max_tokens overflow the context."""
        ids = self.encoding.encode(params["prompt"], disallowed_special=())   # <|endoftext|> is plain text
        context = self.scheduler.loaded.result().config.n_positions
        if len(ids) + params["max_tokens"] > context:
            return ids, [violation("prompt", "context", f"prompt of {len(ids)} tokens + {params['max_tokens']} "
                                   f"new tokens exceeds the context of {context} positions")]
        return ids, []

    def new_job(self, job_id: str, params: dict, prompt_ids: list[int]) -> tuple[Job, asyncio.Queue]:
        """A job from validated params, and the queue its events arrive on, in this event loop."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:   # called on the scheduler thread
            with contextlib.suppress(RuntimeError):   # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        seed = params["seed"] if params["seed"] is not None else secrets.randbits(63)
        temperature, top_p = params["temperature"], params["top_p"]
        if top_p == 0:   # top-p with p -> 0 keeps only the most probable token: greedy
            temperature, top_p = 0.0, None
        sampler = Sampler(temperature, top_k=params["top_k"], top_p=top_p, seed=seed, min_p=params["min_p"],
                          repetition_penalty=params["repetition_penalty"])
        job = Job(job_id, prompt_ids, params["max_tokens"], sampler, emit, stop=params["stop"], seed=seed)
        return job, events

    async def events(self, job: Job, queue: asyncio.Queue) -> AsyncIterator[Event]:
        """The job's events as they are produced, up to its terminal one. If the consumer stops first (the
        client disconnected), the job is cancelled."""
        ended = False
        try:
            while not ended:
                event = await queue.get()
                ended = event.terminal
                yield event
        finally:
            if not ended:
                self.scheduler.cancel_job(job, "the client disconnected")

    def drain(self) -> None:
        """On SIGTERM: take no more jobs; the running and queued ones have the grace period to finish."""
        if self.draining:
            return
        self.draining = True
        self.scheduler.stop_accepting()
        log.info("shutting down: %d active and %d queued jobs get %g s to finish", *self.scheduler.counts(),
                 self.grace_s)
        timer = threading.Timer(self.grace_s, self.scheduler.cancel_all, args=("the worker is shutting down",))
        timer.daemon = True
        timer.start()

    async def after_load(self) -> None:
        """Log the start-up line and announce the worker once the model is loaded; exit if it cannot be."""
        try:
            model = await asyncio.wrap_future(self.scheduler.loaded)
        except Exception as e:
            log.error("cannot load model %s: %s", self.model_ref, e)
            self.exit_code = EXIT_BAD_INPUT
            self.request_exit()
            return
        build = self.scheduler.build_info
        log.info("model %s loaded (%.1f MB), serving %s as worker %s, max batch %d, max queue %d, "
                 "%d threads, SIMD %s", self.model_ref, model.weight_bytes / 1e6, self.uri, self.worker_id,
                 self.scheduler.max_batch, self.scheduler.max_queue, build["max_threads"], build["simd_selected"])
        if self.callback_url:
            await self.announce()

    async def announce(self) -> None:
        await announce(self.callback_url, {"worker_id": self.worker_id, "model_ref": self.model_ref,
                                           "memory_bytes": self.scheduler.memory_bytes(), "uri": self.uri})


async def announce(callback_url: str, payload: dict) -> None:
    """POST the ready callback, retried with capped exponential back-off (llorch.ray announces with it too)."""
    delay = CALLBACK_FIRST_DELAY_S
    async with httpx.AsyncClient(timeout=10.0) as client:
        for attempt in range(1, CALLBACK_ATTEMPTS + 1):
            try:
                response = await client.post(callback_url, json=payload)
                response.raise_for_status()
                log.info("announced to %s", callback_url)
                return
            except httpx.HTTPError as e:
                log.warning("callback to %s failed (attempt %d of %d): %s", callback_url, attempt,
                            CALLBACK_ATTEMPTS, e or type(e).__name__)
            if attempt < CALLBACK_ATTEMPTS:
                await asyncio.sleep(delay)
                delay = min(2 * delay, CALLBACK_MAX_DELAY_S)
    log.error("callback to %s abandoned after %d attempts", callback_url, CALLBACK_ATTEMPTS)


# ---- routes ----

def rejection(status: int, content: dict, reason: str) -> JSONResponse:
    """A refused request: logged (never the prompt), and 503s tell when to come back."""
    log.warning("request refused with %d: %s", status, reason)
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse(content, status_code=status, headers=headers)


def sse(name: str | None, data: object) -> str:
    """One server-sent event: `event: NAME` (omitted for OpenAI's unnamed chunks) and a `data:` line."""
    head = f"event: {name}\n" if name else ""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {payload}\n\n"


async def health(request: Request) -> JSONResponse:
    worker: Worker = request.app.state.worker
    active, queued = worker.scheduler.counts()
    return JSONResponse({
        "status": "healthy" if worker.unavailable() is None else "unhealthy",
        "model_loaded": worker.model_loaded, "memory_type": "cpu", "memory_bytes": worker.scheduler.memory_bytes(),
        "model": worker.model_ref, "worker_id": worker.worker_id, "active_jobs": active, "queued_jobs": queued,
        "max_batch": worker.scheduler.max_batch, "max_queue": worker.scheduler.max_queue,
    })


def accept_job(worker: Worker, body: object, fields: tuple[Field, ...], job_id: str | None = None
               ) -> tuple[Job, asyncio.Queue, dict]:
    """Validate a request body against fields and submit its job (the body's job_id unless one is given).
    Returns the job, the queue of its events and the validated params; raises RequestError with 503 when
    the worker cannot take jobs now, 400 for invalid requests, 409 for a job_id already in use."""
    reason = worker.unavailable()
    if reason:
        raise RequestError(503, [violation("worker", "available", reason)])
    params = validated(body, fields)
    prompt_ids, errors = worker.prompt_ids(params)
    if errors:
        raise RequestError(400, errors)
    job, queue = worker.new_job(job_id or params["job_id"], params, prompt_ids)
    try:
        worker.scheduler.submit(job)
    except Rejected as e:
        duplicate = e.reason == "duplicate"
        raise RequestError(409 if duplicate else 503,
                           [violation("job_id" if duplicate else "worker", e.reason, str(e))]) from None
    return job, queue, params


async def execute(request: Request) -> Response:
    worker: Worker = request.app.state.worker
    try:
        job, queue, _ = accept_job(worker, await read_json(request), EXECUTE_FIELDS)
    except RequestError as e:
        return rejection(e.status, {"errors": e.errors}, f"/execute: {e}")

    async def stream() -> AsyncIterator[str]:
        async for event in worker.events(job, queue):
            yield sse(event.name, event.data)
    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


async def cancel(request: Request) -> JSONResponse:
    worker: Worker = request.app.state.worker
    try:
        job_id = validated(await read_json(request), CANCEL_FIELDS)["job_id"]
    except RequestError as e:
        return rejection(e.status, {"errors": e.errors}, f"/cancel: {e}")
    if not worker.scheduler.cancel(job_id, "cancelled by request"):
        return JSONResponse({"errors": [violation("job_id", "active", "no such queued or running job", job_id)]},
                            status_code=404)
    return JSONResponse({"job_id": job_id, "status": "cancelling"}, status_code=202)


# ---- OpenAI-style completions ----

def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {message, type, param, code}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return rejection(status, {"error": {"message": message, "type": kind, "param": param, "code": None}},
                     f"/v1/completions: {param or message}")


def finish_reason(stop_reason: str) -> str:
    return "stop" if stop_reason in (EOS, STOP_SEQUENCE) else "length"


async def models(request: Request) -> JSONResponse:
    worker: Worker = request.app.state.worker
    return JSONResponse({"object": "list", "data": [
        {"id": worker.model_ref, "object": "model", "created": request.app.state.started, "owned_by": "llorch"}]})


async def completions(request: Request) -> Response:
    worker: Worker = request.app.state.worker
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    try:
        body = await read_json(request)
        if isinstance(body, dict):   # OpenAI also takes one stop string, and a prompt as a list of one
            if isinstance(body.get("stop"), str):
                body["stop"] = [body["stop"]]
            if isinstance(body.get("prompt"), list) and len(body["prompt"]) == 1:
                body["prompt"] = body["prompt"][0]
        job, queue, params = accept_job(worker, body, COMPLETION_FIELDS, job_id=completion_id)
    except RequestError as e:
        return openai_error(e.status, "; ".join(error["message"] for error in e.errors), e.errors[0]["field"])
    head = {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": worker.model_ref}

    def choice(text: str, reason: str | None) -> dict:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}

    if params["stream"]:
        async def stream() -> AsyncIterator[str]:
            async for event in worker.events(job, queue):
                if event.name == "token" and event.data["t"]:
                    yield sse(None, {**head, "choices": [choice(event.data["t"], None)]})
                elif event.name == "end":
                    yield sse(None, {**head, "choices": [choice("", finish_reason(event.data["stop_reason"]))]})
                elif event.name == "error":
                    yield sse(None, {"error": {"message": event.data["message"], "type": "server_error",
                                               "param": None, "code": event.data["code"]}})
            yield sse(None, "[DONE]")
        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    text = []
    async for event in worker.events(job, queue):
        if event.name == "token":
            text.append(event.data["t"])
        elif event.name == "error":
            return openai_error(503 if event.data["code"] == CANCELLED else 500, event.data["message"])
        elif event.name == "end":
            usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": event.data["tokens_out"],
                     "total_tokens": len(job.prompt_ids) + event.data["tokens_out"]}
            return JSONResponse({**head, "choices": [choice("".join(text), finish_reason(event.data["stop_reason"]))],
                                 "usage": usage})


# ---- the application and the process ----

def create_app(worker: Worker) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        worker.scheduler.start()
        announcing = asyncio.create_task(worker.after_load())
        yield
        announcing.cancel()
        await asyncio.to_thread(worker.scheduler.stop, 10.0)

    app = Starlette(lifespan=lifespan, routes=[
        Route("/health", health, methods=["GET"]),
        Route("/execute", execute, methods=["POST"]),
        Route("/cancel", cancel, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ])
    app.state.worker = worker
    app.state.started = int(time.time())
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="GPT-2 worker daemon: llama-orch's worker contract "
                                     "and OpenAI-style completions, with continuous batching.")
    parser.add_argument("--model", required=True, help="directory, .safetensors file or hub id (as llorch-run -m)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--worker-id", default=None, help="default: a random UUID")
    parser.add_argument("--callback-url", help="POSTed {worker_id, model_ref, memory_bytes, uri} once loaded")
    parser.add_argument("--threads", type=int, help="kernel threads (default: LLORCH_NUM_THREADS, "
                        "OMP_NUM_THREADS, all cores)")
    parser.add_argument("--max-batch", type=int, default=8, help="jobs decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="jobs waiting beyond those; more get 503 "
                        "(default: 64)")
    parser.add_argument("--grace-period", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM, how long running jobs may finish before they are cancelled (default: 10)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


class DrainingServer(UvicornServer):
    """uvicorn, which on SIGTERM or SIGINT first lets the worker drain its jobs (Worker.drain)."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame) -> None:
        self.worker.drain()
        super().handle_exit(sig, frame)

    def request_exit(self) -> None:
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if MISSING_EXTRA:
        parser.exit(EXIT_BAD_INPUT, f"{PROG}: error: the server extra is not installed ({MISSING_EXTRA} is "
                                    "missing): pip install 'llorch[server]'\n")
    for name, value, low in (("--port", args.port, 1), ("--threads", args.threads or 1, 1),
                             ("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    args.worker_id = args.worker_id or str(uuid.uuid4())
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    worker = Worker(args)
    config = uvicorn.Config(create_app(worker), host=args.host, port=args.port, log_config=None,
                            log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.grace_period + 5)   # a backstop: drain() cancels first
    server = DrainingServer(config, worker)
    worker.request_exit = server.request_exit
    # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM's default action would then
    # kill the process with a signal status instead of the 0 a graceful stop exits with
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        server.run()
    except KeyboardInterrupt:   # SIGINT, re-raised by uvicorn after the same graceful shutdown
        return 130
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())
