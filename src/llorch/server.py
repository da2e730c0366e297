"""llorch-cpud: the CPU worker daemon (docs/specs/14-worker-daemon.md).

    llorch-cpud --model gpt2 --port 8081 [--callback-url http://orchestrator/workers/ready]

Serves the llama-orch worker contract (GET /health, POST /execute streaming named SSE events, POST /cancel)
and OpenAI-style completions (POST /v1/completions, GET /v1/models) over Starlette + uvicorn, the optional
`server` extra. The model runs on one scheduler thread that batches every active job (llorch.scheduler);
this module validates requests, turns the scheduler's job events into the wire formats (the worker
contract's named SSE events, OpenAI's JSON and SSE), and handles start-up and shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import itertools
import json
import logging
import math
import os
import pathlib
import re
import secrets
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

import numpy as np

import llorch
from llorch.console import EXIT_BAD_INPUT, EXIT_INTERRUPTED, ArgumentParser, thread_count
from llorch.generate import DRAFT_CHOICES, StopReason
from llorch.hub import resolve_model
from llorch.logits import LogitsProcessor, TopLogprobs
from llorch.runtime import threads_beyond_cpus
from llorch.sampling import Sampler
from llorch.scheduler import (DEFAULT_CACHE_BYTES, DEFAULT_GATHER_S, DEFAULT_STEP_TOKENS, GATHER_INTERVALS, FailureCode,
                              Job, JobEnded, JobEvent, JobFailed, JobStarted, PromptScored, Rejected, Scheduler,
                              TokenReleased)

try:
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from llorch import http_guard
    from llorch.log_format import JsonFormatter
    from llorch.metrics import Metrics
    MISSING_EXTRA = None
    UvicornServer = uvicorn.Server
except ImportError as e:   # reported by main(); importing this module stays harmless
    MISSING_EXTRA = e.name
    UvicornServer = object

PROG = "llorch-cpud"
log = logging.getLogger("llorch.server")

MAX_BODY_BYTES = 1 << 20   # a 32768-character prompt, fully \u-escaped, is well under this
MAX_JSON_DEPTH = 16        # every request is flat (an object holding a list at most); parsing recurses per level
MAX_INTEGER_DIGITS = 40    # 2**64 has 20; longer literals are not converted (Python caps int parsing itself)
MAX_PROMPT_CHARS = 32768
MAX_NEW_TOKENS = 2048
RETRY_AFTER_S = "1"
CALLBACK_FIRST_DELAY_S, CALLBACK_MAX_DELAY_S = 1.0, 30.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
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


class HugeInteger:
    """A JSON integer literal of more than MAX_INTEGER_DIGITS digits, left unconverted."""

    def __init__(self, literal: str) -> None:
        self.digits = len(literal.lstrip("-"))

    def __str__(self) -> str:
        return f"an integer of {self.digits} digits"


def parse_int(literal: str) -> int | HugeInteger:
    return int(literal) if len(literal) <= MAX_INTEGER_DIGITS else HugeInteger(literal)


def check(field: Field, value: object, name: str) -> list[dict]:
    """The violations of one present value (name is the field's path, e.g. stop[2])."""
    article = "an" if field.kind[0] in "aeiou" else "a"
    if isinstance(value, HugeInteger):
        if field.kind in ("integer", "number"):
            return [violation(name, "range", f"{name} must be {describe_range(field)}, got {value}")]
        return [violation(name, "type", f"{name} must be {article} {field.kind}, got {value}")]
    # bool is an int in Python, but true is not a number in JSON
    if not isinstance(value, KINDS[field.kind]) or (isinstance(value, bool) and field.kind != "boolean"):
        return [violation(name, "type", f"{name} must be {article} {field.kind}", value)]
    if field.kind == "number" and not math.isfinite(value):
        return [violation(name, "type", f"{name} must be a finite number", str(value))]
    if field.kind == "string":
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:   # JSON's \ud800 escapes decode to a lone surrogate, which no UTF-8 holds
            return [violation(name, "encoding", f"{name} is not valid Unicode: a lone surrogate at character "
                              f"{e.start}")]
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
MAX_CHOICES = 16   # completions one request may ask for (prompts x best_of): each is a job
COMPLETION_FIELDS = (Field("model", "string"),   # prompt, logit_bias and stream_options: start_completion
                     Field("max_tokens", "integer", 1, MAX_NEW_TOKENS, default=16),   # OpenAI's default
                     Field("n", "integer", 1, MAX_CHOICES, default=1), Field("best_of", "integer", 1, MAX_CHOICES),
                     Field("stream", "boolean", default=False), Field("echo", "boolean", default=False),
                     Field("logprobs", "integer", 0, 5), Field("suffix", "string"), Field("user", "string"),
                     Field("presence_penalty", "number", -2, 2, default=0.0),
                     Field("frequency_penalty", "number", -2, 2, default=0.0),
                     ) + SAMPLING_FIELDS
CANCEL_FIELDS = (Field("job_id", "string", 1, required=True),)


class RequestError(Exception):
    """A request answered with an error status; errors in the worker contract's shape."""

    def __init__(self, status: int, errors: list[dict]) -> None:
        super().__init__(", ".join(e["field"] for e in errors))
        self.status, self.errors = status, errors


JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def nesting_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, counted on its bytes (strings left out) before
    the recursive parser runs: a deep enough text would exhaust Python's recursion limit."""
    structure = np.frombuffer(JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    opens = (structure == ord("[")) | (structure == ord("{"))
    closes = (structure == ord("]")) | (structure == ord("}"))
    depth = np.cumsum(opens.astype(np.int32) - closes)
    return int(depth.max(initial=0))


def parse_json(raw: bytes) -> object:
    """The JSON value of a request body; RequestError 400 on `body` when it is not UTF-8 or not JSON, or nests
    deeper than MAX_JSON_DEPTH. The messages are this module's own: no parser internals reach the client."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, [violation("body", "json", f"the body is not UTF-8 (byte {e.start})")]) from None
    if nesting_depth(raw) > MAX_JSON_DEPTH:
        raise RequestError(400, [violation("body", "depth", f"the body nests deeper than {MAX_JSON_DEPTH} levels")])
    try:
        return json.loads(text, parse_int=parse_int)
    except json.JSONDecodeError as e:
        raise RequestError(400, [violation("body", "json", f"malformed JSON: {e.msg} at line {e.lineno} column "
                                           f"{e.colno}")]) from None


async def read_json(request: Request) -> object:
    """The parsed body; RequestError 400 on `body` when it is too large or not JSON."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(400, [violation("body", "size", f"the body exceeds {MAX_BODY_BYTES} bytes")])
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


def validated(body: object, fields: tuple[Field, ...]) -> dict:
    """validate(), raising RequestError 400 on any violation."""
    params, errors = validate(body, fields)
    if errors:
        raise RequestError(400, errors)
    return params


# ---- the worker: state shared by the routes ----

def model_name(model: str) -> str:
    """What clients see as `model`: a local checkpoint's directory name (a file's directory), or the hub id
    as given; never a filesystem path, which would tell any client how the machine is laid out."""
    path = pathlib.Path(model)
    if path.exists():
        return (path if path.is_dir() else path.parent).resolve().name
    return model


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.model_ref = args.model             # as given: for the log and the orchestrator's callback
        self.model_name = args.model_name or model_name(args.model)
        self.worker_id = args.worker_id
        self.uri = f"http://{args.host}:{args.port}"
        self.callback_url = args.callback_url
        self.callback_token = args.callback_token
        self.callback_timeout_s = args.callback_timeout
        self.callback_delivered = False
        self.grace_s = args.grace_period
        self.scheduler = Scheduler(lambda: llorch.load(resolve_model(args.model)), max_batch=args.max_batch,
                                   max_queue=args.max_queue, threads=args.threads, step_tokens=args.step_tokens,
                                   cache_bytes=args.cache_bytes, draft=None if args.draft == "none" else args.draft,
                                   gather_s=args.gather_ms / 1e3)
        self.metrics = Metrics(self.scheduler.counts, self.kv_cache_bytes,
                               lambda: (self.scheduler.drafted_tokens, self.scheduler.accepted_tokens))
        self.encoding = llorch.tokenizer()
        self.draining = False
        self.exit_code = 0
        self.request_exit: Callable[[], None] = lambda: None   # set by main: stops the HTTP server

    def kv_cache_bytes(self) -> int:
        if not self.model_loaded:
            return 0
        return self.scheduler.memory_bytes() - self.scheduler.loaded.result().weight_bytes

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
        try:
            self.scheduler.loaded.result().check_request(ids, params["max_tokens"])
        except llorch.ContextError as e:
            return ids, [violation("prompt", "context", str(e))]
        return ids, []

    def new_job(self, job_id: str, params: dict, prompt_ids: list[int], *, seed: int | None = None,
                logprobs: int | None = None) -> tuple[Job, asyncio.Queue]:
        """A job from validated params (seed, when given, overrides theirs), and the queue its events arrive
        on, in this event loop."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: JobEvent) -> None:   # called on the scheduler thread
            with contextlib.suppress(RuntimeError):   # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        if seed is None:
            seed = params["seed"] if params["seed"] is not None else secrets.randbits(63)
        temperature, top_p = params["temperature"], params["top_p"]
        if top_p == 0:   # top-p with p -> 0 keeps only the most probable token: greedy
            temperature, top_p = 0.0, None
        sampler = Sampler(temperature, top_k=params["top_k"], top_p=top_p, seed=seed, min_p=params["min_p"])
        processor = LogitsProcessor(params.get("logit_bias"), params.get("presence_penalty", 0.0),
                                    params.get("frequency_penalty", 0.0), params["repetition_penalty"])
        job = Job(job_id, prompt_ids, params["max_tokens"], sampler, emit, stop=params["stop"], seed=seed,
                  processor=processor, logprobs=logprobs)
        return job, events

    async def events(self, job: Job, queue: asyncio.Queue) -> AsyncIterator[JobEvent]:
        """The job's events as they are produced, up to its terminal one. If the consumer stops first (the
        client disconnected), the job is cancelled."""
        ended = False
        measure = self.metrics.job_tracker(len(job.prompt_ids), job.submitted_at)
        try:
            while not ended:
                event = await queue.get()
                ended = isinstance(event, (JobEnded, JobFailed))
                measure(event)
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
                 "draft %s, %d threads%s, SIMD %s", self.model_ref, model.weight_bytes / 1e6, self.uri, self.worker_id,
                 self.scheduler.max_batch, self.scheduler.max_queue, self.scheduler.draft or "none", build["threads"],
                 f" (auto, at most {build['threads_ceiling']})" if build["threads_mode"] == "auto" else "",
                 build["simd_selected"])
        if self.callback_url:
            await self.announce()

    async def announce(self) -> None:
        """POST the ready callback until it is acknowledged (announce)."""
        await announce(self.callback_url, {"worker_id": self.worker_id, "model_ref": self.model_ref,
                                           "memory_bytes": self.scheduler.memory_bytes(), "uri": self.uri},
                       self.callback_token, self.callback_timeout_s)
        self.callback_delivered = True


async def announce(callback_url: str, payload: dict, token: str | None, timeout_s: float) -> None:
    """POST a ready callback until it is acknowledged (a 2xx answer), each attempt bounded by timeout_s, the
    delays between them doubling up to CALLBACK_MAX_DELAY_S. llorch.ray's application announces with it too."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    delay, attempt = CALLBACK_FIRST_DELAY_S, 1
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        while True:
            try:
                response = await client.post(callback_url, json=payload, headers=headers)
                response.raise_for_status()
                log.info("announced to %s", callback_url)
                return
            except httpx.HTTPError as e:
                log.warning("callback to %s failed (attempt %d, next in %g s): %s", callback_url, attempt, delay,
                            callback_failure(e, timeout_s))
            await asyncio.sleep(delay)
            delay, attempt = min(2 * delay, CALLBACK_MAX_DELAY_S), attempt + 1


def callback_failure(error: httpx.HTTPError, timeout_s: float) -> str:
    """Why a callback attempt failed, never blank (httpx's timeouts carry no message)."""
    if isinstance(error, httpx.TimeoutException):
        return f"timed out after {timeout_s:g} s"
    if isinstance(error, httpx.HTTPStatusError):
        return f"answered {error.response.status_code}"
    return str(error) or type(error).__name__


# ---- routes ----

def rejection(status: int, content: dict, reason: str) -> Response:
    """A refused request: logged (never the prompt), and 503s tell when to come back. The body is escaped
    JSON: a rejected value is echoed back, and it may hold a lone surrogate or a huge integer."""
    log.warning("request refused with %d: %s", status, reason)
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return Response(http_guard.json_bytes(content), status_code=status, headers=headers,
                    media_type="application/json")


def sse(name: str | None, data: object) -> str:
    """One server-sent event: `event: NAME` (omitted for OpenAI's unnamed chunks) and a `data:` line."""
    head = f"event: {name}\n" if name else ""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"{head}data: {payload}\n\n"


def execute_sse(event: JobEvent, model_name: str) -> str:
    """A job event as the worker contract's named SSE events (spec 14, requirement 8)."""
    if isinstance(event, JobStarted):
        return sse("started", {"job_id": event.job_id, "model": model_name,
                               "started_at": event.started_at.isoformat()})
    if isinstance(event, TokenReleased):
        return sse("token", {"t": event.text, "i": event.index})
    if isinstance(event, JobFailed):
        return sse("error", {"code": event.code.value, "message": event.message})
    end = {"tokens_out": event.tokens_out, "decode_time_ms": round(event.generation_s * 1e3, 3),
           "stop_reason": event.stop_reason.name}
    if event.stop_sequence is not None:
        end["stop_sequence_matched"] = event.stop_sequence
    metrics = {"tokens_per_sec": round(event.tokens_out / event.generation_s, 3), "memory_bytes": event.memory_bytes}
    return sse("metrics", metrics) + sse("end", end)


async def health(request: Request) -> JSONResponse:
    worker: Worker = request.app.state.worker
    active, queued = worker.scheduler.counts()
    return JSONResponse({
        "status": "healthy" if worker.unavailable() is None else "unhealthy",
        "model_loaded": worker.model_loaded, "memory_type": "cpu", "memory_bytes": worker.scheduler.memory_bytes(),
        "model": worker.model_name, "worker_id": worker.worker_id, "active_jobs": active, "queued_jobs": queued,
        "max_batch": worker.scheduler.max_batch, "max_queue": worker.scheduler.max_queue,
        "callback_delivered": worker.callback_delivered if worker.callback_url else None,
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
            yield execute_sse(event, worker.model_name)

    def failure(request_id: str) -> str:
        return sse("error", {"code": FailureCode.INFERENCE_FAILED.value,
                             "message": f"internal error (request id {request_id})"})
    return StreamingResponse(http_guard.guard_stream(stream(), failure, request.state.request_id),
                             media_type="text/event-stream", headers=SSE_HEADERS)


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

def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    return rejection(status, http_guard.openai_error_body(status, message, param, code),
                     f"OpenAI route: {param or message}")


def refused(param: str, message: str, code: str = "invalid_value") -> RequestError:
    return RequestError(400, [violation(param, code, message)])


def finish_reason(stop_reason: StopReason) -> str:
    return "length" if stop_reason == StopReason.MAX_TOKENS else "stop"


def model_card(request: Request) -> dict:
    worker: Worker = request.app.state.worker
    return {"id": worker.model_name, "object": "model", "created": request.app.state.started, "owned_by": "llorch"}


async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [model_card(request)]})


async def model_info(request: Request) -> Response:
    card = model_card(request)
    if request.path_params["model_id"] != card["id"]:
        return openai_error(404, f"the model {request.path_params['model_id']!r} does not exist; this worker "
                            f"serves {card['id']!r}", "model", "model_not_found")
    return JSONResponse(card)


async def chat_completions(request: Request) -> Response:
    return openai_error(400, "GPT-2 has no chat template: it was trained on plain web text, not on dialogues, so "
                        "any role format would be made up and answers would silently be poor. Use "
                        "/v1/completions with a plain-text prompt.", "messages", "chat_not_supported")


async def unknown_v1(request: Request) -> Response:
    return openai_error(404, f"{request.method} {request.url.path} is not served here: llorch-cpud serves "
                        "POST /v1/completions, GET /v1/models and GET /v1/models/{id}", None, "unknown_url")


def is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Prompt:
    text: str          # for echo and text_offset: the string given, or the token ids decoded
    ids: list[int]


def read_prompts(worker: Worker, prompt: object) -> list[Prompt]:
    """OpenAI's four prompt forms (a string, a list of strings, token ids, a list of token-id lists) as
    Prompts; RequestError 400 on `prompt`."""
    def is_ids(item: object) -> bool:
        return isinstance(item, list) and len(item) > 0 and all(map(is_token_id, item))
    if prompt is None:
        raise refused("prompt", "prompt is required", "required")
    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise refused("prompt", "prompt must be a string, a list of strings, a list of token ids or a list of "
                      "token-id lists, none empty", "type")
    if len(prompts) > MAX_CHOICES:
        raise refused("prompt", f"at most {MAX_CHOICES} prompts, got {len(prompts)}", "length")
    vocab_size = worker.scheduler.loaded.result().config.vocab_size
    result = []
    for i, item in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            errors = check(PROMPT, item, name)
            if errors:
                raise RequestError(400, errors)
            result.append(Prompt(item, worker.encoding.encode(item, disallowed_special=())))
        elif len(item) > worker.scheduler.loaded.result().config.n_positions:
            raise refused(name, f"{name} has {len(item)} tokens, more than the context holds", "context")
        elif not all(0 <= t < vocab_size for t in item):
            raise refused(name, f"{name} holds token ids outside 0 to {vocab_size - 1}")
        else:
            result.append(Prompt(worker.encoding.decode(item), list(item)))
    return result


def read_logit_bias(bias: object, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias, {"token id": bias in [-100, 100]}, as {id: bias}; RequestError 400 on it."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise refused("logit_bias", "logit_bias must be an object mapping token ids to numbers", "type")
    result = {}
    for key, value in bias.items():
        if not (key.isdecimal() and int(key) < vocab_size):
            raise refused("logit_bias", f"logit_bias key {key!r} is not a token id (0 to {vocab_size - 1})")
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and -100 <= value <= 100):
            raise refused("logit_bias", f"logit_bias[{key!r}] must be a number from -100 to 100")
        result[int(key)] = float(value)
    return result


@dataclass
class Completion:
    """A validated /v1/completions request: its params, prompts and the jobs running it, best_of per prompt
    (job i serves prompt i // best_of)."""
    params: dict
    prompts: list[Prompt]
    best_of: int
    include_usage: bool
    jobs: list[tuple[Job, asyncio.Queue]]


def start_completion(worker: Worker, body: object, completion_id: str) -> Completion:
    """Validate a /v1/completions body and submit its jobs; RequestError as accept_job."""
    reason = worker.unavailable()
    if reason:
        raise RequestError(503, [violation("worker", "available", reason)])
    if isinstance(body, dict) and isinstance(body.get("stop"), str):   # OpenAI also takes one stop string
        body["stop"] = [body["stop"]]
    params = validated(body, COMPLETION_FIELDS)
    if params["suffix"]:
        raise refused("suffix", "suffix is not supported: GPT-2 was not trained for fill-in-the-middle")
    n, best_of = params["n"], params["best_of"] or params["n"]
    if best_of < n:
        raise refused("best_of", f"best_of ({best_of}) must be at least n ({n})")
    if params["stream"] and best_of > n:
        raise refused("best_of", "best_of larger than n cannot be streamed: the best completions are known only "
                      "once all have ended")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
        raise refused("stream_options", "stream_options must be an object with a boolean include_usage", "type")
    if options is not None and not params["stream"]:
        raise refused("stream_options", "stream_options is only allowed when stream is true")
    model = worker.scheduler.loaded.result()
    params["logit_bias"] = read_logit_bias(body.get("logit_bias"), model.config.vocab_size)
    prompts = read_prompts(worker, body.get("prompt"))
    if len(prompts) * best_of > MAX_CHOICES:
        raise refused("best_of" if best_of > n else "n", f"prompts x {'best_of' if best_of > n else 'n'} is "
                      f"{len(prompts) * best_of}, more than the {MAX_CHOICES} completions one request may ask for")
    for i, prompt in enumerate(prompts):
        try:
            model.check_request(prompt.ids, params["max_tokens"])
        except llorch.ContextError as e:
            raise refused("prompt" if len(prompts) == 1 else f"prompt[{i}]", str(e), "context") from None
    # best_of ranks completions by log-prob, so it needs them even when the client does not
    logprobs = params["logprobs"] if params["logprobs"] is not None or best_of == n else 0
    seed = params["seed"] if params["seed"] is not None else secrets.randbits(63)
    completion = Completion(params, prompts, best_of, bool(options and options.get("include_usage")), [])
    try:
        for i, prompt in enumerate(prompts):
            for k in range(best_of):   # each of a prompt's completions draws from its own seed
                job, queue = worker.new_job(f"{completion_id}-{i}-{k}", params, prompt.ids, seed=seed + k,
                                            logprobs=logprobs)
                if params["echo"]:
                    job.prompt_logprobs = params["logprobs"]
                worker.scheduler.submit(job)
                completion.jobs.append((job, queue))
    except Rejected as e:
        for job, _ in completion.jobs:
            worker.scheduler.cancel_job(job, "another completion of the request was refused")
        raise RequestError(503, [violation("worker", e.reason, str(e))]) from None
    return completion


@dataclass
class Choice:
    """One job's output, as it arrives."""
    prompt: Prompt
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float | None] = dataclasses.field(default_factory=list)
    top_logprobs: list[TopLogprobs | None] = dataclasses.field(default_factory=list)
    prompt_scored: PromptScored | None = None
    end: JobEnded | JobFailed | None = None

    def add(self, event: JobEvent) -> None:
        if isinstance(event, PromptScored):
            self.prompt_scored = event
        elif isinstance(event, TokenReleased):
            self.text += event.text
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.top_logprobs.append(event.top_logprobs)
        elif isinstance(event, (JobEnded, JobFailed)):
            self.end = event

    @property
    def total_logprob(self) -> float:
        return sum(self.logprobs)


def logprobs_payload(encoding, tokens: list[int], logprobs: list, tops: list, offset: int) -> dict:
    """OpenAI's logprobs object for these tokens, the first starting at character offset."""
    strings = [encoding.decode([t]) for t in tokens]
    offsets = list(itertools.accumulate((len(s) for s in strings[:-1]), initial=offset))
    return {"tokens": strings, "token_logprobs": logprobs, "text_offset": offsets[: len(strings)],
            "top_logprobs": [None if top is None else {encoding.decode([t]): lp for t, lp in top} for top in tops]}


def echo_logprobs(encoding, choice: Choice) -> dict:
    """The logprobs of an echoed prompt: the first token has none."""
    scored = choice.prompt_scored
    return logprobs_payload(encoding, choice.prompt.ids, [None, *scored.logprobs], [None, *scored.top_logprobs], 0)


def usage(completion: Completion, choices: list[Choice]) -> dict:
    """OpenAI counts every prompt once and every generated token, best_of's discarded ones included."""
    prompt_tokens = sum(len(prompt.ids) for prompt in completion.prompts)
    completion_tokens = sum(len(choice.tokens) for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def job_events(worker: Worker, completion: Completion) -> AsyncIterator[tuple[int, JobEvent]]:
    """Every job's events as (job number, event), interleaved as they arrive, until every job has ended.
    Leaving early cancels the jobs still running."""
    merged: asyncio.Queue = asyncio.Queue()

    async def forward(number: int, job: Job, queue: asyncio.Queue) -> None:
        async for event in worker.events(job, queue):
            await merged.put((number, event))
    tasks = [asyncio.ensure_future(forward(i, job, queue)) for i, (job, queue) in enumerate(completion.jobs)]
    try:
        ended = 0
        while ended < len(tasks):
            number, event = await merged.get()
            ended += isinstance(event, (JobEnded, JobFailed))
            yield number, event
    finally:
        for task in tasks:
            task.cancel()


async def completions(request: Request) -> Response:
    worker: Worker = request.app.state.worker
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    try:
        completion = start_completion(worker, await read_json(request), completion_id)
    except RequestError as e:
        return openai_error(e.status, "; ".join(error["message"] for error in e.errors), e.errors[0]["field"],
                            e.errors[0]["constraint"])
    params, encoding = completion.params, worker.encoding
    head = {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": worker.model_name}
    choices = [Choice(completion.prompts[i // completion.best_of]) for i in range(len(completion.jobs))]

    if params["stream"]:   # best_of == n here: job i is choice i
        async def stream() -> AsyncIterator[str]:
            extra = {"usage": None} if completion.include_usage else {}

            def chunk(index: int, text: str, logprobs: dict | None, reason: str | None) -> str:
                return sse(None, {**head, **extra, "choices": [
                    {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}]})
            async with contextlib.aclosing(job_events(worker, completion)) as events:
                async for index, event in events:
                    choice = choices[index]
                    first = isinstance(event, TokenReleased) and event.index == 0
                    if first and params["echo"]:
                        scored = echo_logprobs(encoding, choice) if choice.prompt_scored else None
                        yield chunk(index, choice.prompt.text, scored, None)
                    choice.add(event)
                    if isinstance(event, TokenReleased) and (event.text or params["logprobs"] is not None):
                        logprobs = None
                        if params["logprobs"] is not None:
                            offset = len(choice.prompt.text) + len(choice.text) - len(event.text)
                            logprobs = logprobs_payload(encoding, [event.token], [event.logprob],
                                                        [event.top_logprobs], offset)
                        yield chunk(index, event.text, logprobs, None)
                    elif isinstance(event, JobEnded):
                        yield chunk(index, "", None, finish_reason(event.stop_reason))
                    elif isinstance(event, JobFailed):
                        yield sse(None, http_guard.openai_error_body(500, event.message, code=event.code.value))
            if completion.include_usage:
                yield sse(None, {**head, "choices": [], "usage": usage(completion, choices)})
            yield sse(None, "[DONE]")

        def failure(request_id: str) -> str:
            error = http_guard.openai_error_body(500, f"internal error (request id {request_id})")
            return sse(None, error) + sse(None, "[DONE]")
        return StreamingResponse(http_guard.guard_stream(stream(), failure, request.state.request_id),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    async def complete() -> Response:
        async with contextlib.aclosing(job_events(worker, completion)) as events:
            async for index, event in events:
                choices[index].add(event)
                if isinstance(event, JobFailed):
                    return openai_error(503 if event.code == FailureCode.CANCELLED else 500, event.message)
        answers = []
        for first in range(0, len(choices), completion.best_of):
            ranked = choices[first:first + completion.best_of]
            if completion.best_of > params["n"]:
                ranked = sorted(ranked, key=lambda c: c.total_logprob, reverse=True)[: params["n"]]
            answers += ranked
        return JSONResponse({**head, "usage": usage(completion, choices),
                             "choices": [answer(encoding, params, i, choice) for i, choice in enumerate(answers)]})
    return await unless_disconnected(request, complete())


def answer(encoding, params: dict, index: int, choice: Choice) -> dict:
    """One choice of a non-streamed completion."""
    prompt_text = choice.prompt.text if params["echo"] else ""
    logprobs = None
    if params["logprobs"] is not None:
        logprobs = logprobs_payload(encoding, choice.tokens, choice.logprobs, choice.top_logprobs,
                                    len(choice.prompt.text))
        if params["echo"]:
            prompt = echo_logprobs(encoding, choice)
            logprobs = {key: prompt[key] + logprobs[key] for key in logprobs}
    return {"text": prompt_text + choice.text, "index": index, "logprobs": logprobs,
            "finish_reason": finish_reason(choice.end.stop_reason)}


async def tokenize(request: Request) -> Response:
    """llama.cpp's server's /tokenize: {"content": text} -> {"tokens": [ids]}."""
    worker: Worker = request.app.state.worker
    try:
        content = validated(await read_json(request), (Field("content", "string", 0, MAX_PROMPT_CHARS,
                                                              required=True),))["content"]
    except RequestError as e:
        return rejection(e.status, {"errors": e.errors}, f"/tokenize: {e}")
    return JSONResponse({"tokens": worker.encoding.encode(content, disallowed_special=())})


async def detokenize(request: Request) -> Response:
    """llama.cpp's server's /detokenize: {"tokens": [ids]} -> {"content": text}."""
    worker: Worker = request.app.state.worker
    vocab = worker.encoding.n_vocab
    token = Field("tokens[]", "integer", 0, vocab - 1)
    try:
        tokens = validated(await read_json(request), (Field("tokens", "list", 0, MAX_PROMPT_CHARS, required=True,
                                                            items=token),))["tokens"]
    except RequestError as e:
        return rejection(e.status, {"errors": e.errors}, f"/detokenize: {e}")
    return JSONResponse({"content": worker.encoding.decode(tokens)})


async def unless_disconnected(request: Request, answer: Awaitable[Response]) -> Response:
    """The awaited answer, unless the client disconnects first: then the answer is cancelled (and with it
    the job it waits on), and the response goes to nobody."""
    answering = asyncio.ensure_future(answer)

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watching = asyncio.ensure_future(disconnect())
    await asyncio.wait({answering, watching}, return_when=asyncio.FIRST_COMPLETED)
    watching.cancel()
    if answering.done():
        return answering.result()
    answering.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await answering
    return Response(status_code=499)   # nginx's "client closed request"; nobody reads it


async def metrics(request: Request) -> Response:
    worker: Worker = request.app.state.worker
    return Response(worker.metrics.render(), media_type=worker.metrics.content_type)


# ---- the application and the process ----

def create_app(worker: Worker, policy: http_guard.Policy) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        http_guard.quiet_floods(asyncio.get_running_loop())
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
        Route("/v1/models/{model_id:path}", model_info, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/{path:path}", unknown_v1, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ], middleware=[Middleware(http_guard.HttpGuard, policy=policy, draining=lambda: worker.draining,
                              on_response=worker.metrics.count_request)])
    app.state.worker = worker
    app.state.started = int(time.time())
    return app


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="GPT-2 worker daemon: llama-orch's worker contract "
                                     "and OpenAI-style completions, with continuous batching.")
    parser.add_argument("--model", required=True, help="directory, .safetensors file or hub id (as llorch-run -m)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1); any other "
                        "than a loopback one needs an API key or --insecure-no-auth")
    parser.add_argument("--model-name", help="the model's name in /health, /v1/models and every response "
                        "(default: the checkpoint's directory name, or the hub id)")
    parser.add_argument("--worker-id", default=None, help="default: a random UUID")
    add_callback_arguments(parser, when="once loaded")
    security = add_guard_arguments(parser)
    security.add_argument("--max-connections", type=int, default=256,
                          help="open connections served; a request beyond gets 503, except GET /health (default: 256)")
    security.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                          help="time to send a request's headers and body, and for a new connection to start one; "
                          "slower connections are closed (default: 10)")
    security.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                          help="idle time after which a kept-alive connection is closed (default: 5)")
    parser.add_argument("--threads", type=thread_count, metavar="N|auto", help="kernel threads (default: "
                        "LLORCH_NUM_THREADS, else OMP_NUM_THREADS, else auto: the CPUs this process may use minus "
                        "those other processes keep busy, checked a few times a second)")
    parser.add_argument("--max-batch", type=int, default=8, help="jobs decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="jobs waiting beyond those; more get 503 "
                        "(default: 64)")
    parser.add_argument("--step-tokens", type=int, default=DEFAULT_STEP_TOKENS,
                        help=f"prompt rows per scheduler step, beside the decode rows (default: {DEFAULT_STEP_TOKENS})")
    parser.add_argument("--gather-ms", type=float, default=DEFAULT_GATHER_S * 1e3, metavar="MS",
                        help="when idle, how long the scheduler waits after a job for others sent with it, so that "
                             f"they start in one step (while they keep coming, up to {GATHER_INTERVALS} times this; "
                             f"0: no wait; default: {DEFAULT_GATHER_S * 1e3:g})")
    parser.add_argument("--cache-bytes", type=int, default=DEFAULT_CACHE_BYTES,
                        help=f"prefix cache size in bytes, 0 for none (default: {DEFAULT_CACHE_BYTES})")
    parser.add_argument("--draft", choices=DRAFT_CHOICES, default="lookup",
                        help="exact speculative decoding of greedy jobs while few jobs decode: lookup drafts tokens "
                             "by finding the last words earlier in the prompt and output; the tokens are the same "
                             "either way (default: lookup)")
    parser.add_argument("--grace-period", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM, how long running jobs may finish before they are cancelled (default: 10)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="json: one object per line, with the job id where there is one (default: text)")
    return parser


def add_callback_arguments(parser: ArgumentParser, when: str) -> None:
    """The ready callback's options (announce's arguments; llorch-serve's too)."""
    parser.add_argument("--callback-url", help=f"POSTed {{worker_id, model_ref, memory_bytes, uri}} {when}, "
                        "retried until acknowledged")
    parser.add_argument("--callback-token", default=os.environ.get("LLORCH_CALLBACK_TOKEN"),
                        help="sent as Authorization: Bearer TOKEN with the callback (default: LLORCH_CALLBACK_TOKEN)")
    parser.add_argument("--callback-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="time limit of each callback attempt (default: 5)")


def add_guard_arguments(parser: ArgumentParser):
    """The options of the HTTP guard's Policy (llorch-serve's too): the API key, Host and CORS checks. Returns
    their argument group."""
    security = parser.add_argument_group("security (docs/specs/14-worker-daemon.md, Security)")
    security.add_argument("--api-key-file", metavar="PATH", help="file holding the API key every route but "
                          "GET /health requires as Authorization: Bearer KEY (or set LLORCH_API_KEY)")
    security.add_argument("--api-key", help="the API key itself; visible to every local user in ps: prefer "
                          "--api-key-file or LLORCH_API_KEY")
    security.add_argument("--insecure-no-auth", action="store_true",
                          help="allow a non-loopback --host without an API key")
    security.add_argument("--allowed-hosts", metavar="HOST,...", help="Host header names accepted, others get 400 "
                          "(default: the --host address and localhost names; * accepts any)")
    security.add_argument("--cors-origins", metavar="ORIGIN,...", default="",
                          help="origins browsers may call from (default: none, no CORS headers)")
    return security


def guard_policy(args: argparse.Namespace, api_key: str | None) -> http_guard.Policy:
    """The HTTP guard's Policy from add_guard_arguments' options and the key read_exposure_key gave."""
    allowed_hosts = split_list(args.allowed_hosts) or {args.host.lower(), *LOOPBACK_NAMES}
    return http_guard.Policy(api_key=api_key, cors_origins=split_list(args.cors_origins),
                             allowed_hosts=None if "*" in allowed_hosts else frozenset(allowed_hosts))


def read_exposure_key(args: argparse.Namespace, parser: ArgumentParser) -> str | None:
    """The API key (read_api_key); a --host reachable from other machines needs one, or --insecure-no-auth."""
    api_key = read_api_key(args, parser)
    if not is_loopback(args.host) and api_key is None and not args.insecure_no_auth:
        parser.error(f"--host {args.host} is reachable from other machines: set an API key (--api-key-file or "
                     "LLORCH_API_KEY) or pass --insecure-no-auth")
    return api_key


def read_api_key(args: argparse.Namespace, parser: ArgumentParser) -> str | None:
    """The API key from --api-key-file, --api-key or LLORCH_API_KEY, or None."""
    if args.api_key_file and args.api_key:
        parser.error("give --api-key-file or --api-key, not both")
    if args.api_key_file:
        try:
            key = pathlib.Path(args.api_key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"cannot read --api-key-file {args.api_key_file}: {getattr(e, 'strerror', None) or e}")
        if not key:
            parser.error(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get("LLORCH_API_KEY") or None


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:   # a name other than localhost may resolve to anything
        return False


def split_list(value: str | None) -> frozenset[str]:
    return frozenset(item.strip() for item in (value or "").split(",") if item.strip())


class DrainingServer(UvicornServer):
    """uvicorn, which on SIGTERM or SIGINT first stops listening and lets the worker drain its jobs
    (Worker.drain) while open connections stay open, so that a request on one gets its 503; once no job
    is left, uvicorn shuts down as usual. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self.worker = worker
        self.exit_signal: int | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self.exit_signal is not None:
            log.warning("second %s during the shutdown: exiting at once", signal.Signals(sig).name)
            os._exit(128 + sig)
        self.exit_signal = sig
        if not self.started:   # nothing to drain yet
            super().handle_exit(sig, frame)
            return
        self.loop.call_soon_threadsafe(self.start_drain, sig)

    def start_drain(self, sig: int) -> None:
        self.draining = self.loop.create_task(self.drain(sig))   # held: the loop keeps only a weak reference

    async def drain(self, sig: int) -> None:
        for listener in self.servers:
            listener.close()
        self.worker.drain()
        while any(self.worker.scheduler.counts()):
            await asyncio.sleep(0.05)
        super().handle_exit(sig, None)   # uvicorn's graceful shutdown, and the signal re-raised after it

    def request_exit(self) -> None:
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if MISSING_EXTRA:
        parser.error(f"the server extra is not installed ({MISSING_EXTRA} is missing): pip install 'llorch[server]'")
    for name, value, low in (("--port", args.port, 1),
                             ("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-connections", args.max_connections, 1),
                             ("--step-tokens", args.step_tokens, 1), ("--cache-bytes", args.cache_bytes, 0)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    if not 0 <= args.gather_ms < math.inf:
        parser.error(f"--gather-ms must be a number >= 0, got {args.gather_ms}")
    for name, value in (("--request-timeout", args.request_timeout), ("--keep-alive-timeout", args.keep_alive_timeout),
                        ("--callback-timeout", args.callback_timeout)):
        if not value > 0:
            parser.error(f"{name} must be > 0, got {value}")
    api_key = read_exposure_key(args, parser)
    args.worker_id = args.worker_id or str(uuid.uuid4())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if args.api_key:
        log.warning("--api-key is visible to every local user (ps, /proc): prefer --api-key-file or LLORCH_API_KEY")
    if args.threads not in (None, "auto") and (too_many := threads_beyond_cpus(args.threads)) is not None:
        log.warning("--threads %d %s", args.threads, too_many)

    worker = Worker(args)
    config = uvicorn.Config(create_app(worker, guard_policy(args, api_key)), host=args.host, port=args.port,
                            log_config=None, log_level=args.log_level, access_log=False,
                            # asyncio's loop, whose accept errors reach quiet_floods' handler, even when uvloop
                            # is installed (ray[serve] brings it): uvloop's never do
                            loop="asyncio", http=http_guard.guarded_protocol(args.request_timeout),
                            # uvicorn counts the connection asking among the open ones: N + 1 serves N
                            limit_concurrency=args.max_connections + 1, timeout_keep_alive=args.keep_alive_timeout,
                            timeout_graceful_shutdown=args.grace_period + 5)   # a backstop: drain() cancels first
    server = DrainingServer(config, worker)
    worker.request_exit = server.request_exit
    # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM's default action would then
    # kill the process with a signal status instead of the 0 a graceful stop exits with
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        server.run()
    except KeyboardInterrupt:   # SIGINT, re-raised by uvicorn after the same graceful shutdown
        return EXIT_INTERRUPTED
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())
