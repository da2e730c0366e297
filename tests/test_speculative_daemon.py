"""Drafting on vs off over real HTTP (spec 14, requirement 12a): two llorch-cpud daemons on the same
checkpoint, one `--draft lookup` and one `--draft none`, must answer every request the same, byte for byte
but for ids and timings -- tokens, text, log-probs, echo, n and best_of, stop strings, logit_bias,
penalties, streamed chunks and usage -- alone, beside other jobs, and after cancelled ones.

The trained test model writes repetitive Python, so greedy jobs copy from their prompts and drafts are
taken; the metrics counters show they were.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import re

import pytest

import llorch

from test_server import Daemon, execute, start_in_background

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

enc = llorch.tokenizer()
CODE = ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
        "    def get_x(self):\n        return self.x\n\n    def get_y(self):\n        return self.y\n\n"
        "    def set_x(self, value):\n        self.x = value\n\n    def set_y(self, value):\n")


@pytest.fixture(scope="module")
def daemons(trained_checkpoint, tmp_path_factory):
    """(drafting, plain): the same checkpoint, drafts on and off."""
    directory = tmp_path_factory.mktemp("speculative")
    started = []
    try:
        for draft in ("lookup", "none"):
            started.append(Daemon(trained_checkpoint, directory / f"{draft}.log", "--draft", draft,
                                  "--max-batch", "8", "--max-queue", "32", "--model-name", "stdlib"))
        yield tuple(started)
    finally:
        for d in started:
            assert d.stop() == 0
            assert "Traceback" not in d.log(), d.log()


@pytest.fixture(scope="module")
def clients(daemons):
    return tuple(openai.OpenAI(base_url=d.url + "/v1", api_key="unused", timeout=60.0, max_retries=0)
                 for d in daemons)


def drafts(daemon: Daemon) -> tuple[float, float]:
    """(drafted, accepted) tokens, from /metrics."""
    text = httpx.get(daemon.url + "/metrics", timeout=5.0).text
    values = [float(re.search(rf"^llorch:spec_decode_num_{name}_tokens_total (\S+)$", text, re.M).group(1))
              for name in ("draft", "accepted")]
    return values[0], values[1]


def completion(client, **request) -> dict:
    """A non-streamed answer, without what differs between any two answers (id, created)."""
    answer = client.completions.create(model="stdlib", **request).model_dump()
    del answer["id"], answer["created"]
    return answer


def streamed(client, **request) -> list[dict]:
    """A streamed answer's chunks, each choice's in their order (the choices' interleaving is the jobs' timing),
    the usage chunk last."""
    chunks = []
    for chunk in client.completions.create(model="stdlib", stream=True, **request):
        chunk = chunk.model_dump()
        del chunk["id"], chunk["created"]
        chunks.append(chunk)
    return sorted(chunks, key=lambda chunk: [c["index"] for c in chunk["choices"]] or [len(chunks)])


def same(clients, call=completion, **request):
    """Both daemons' answers to request, asserted equal; the drafting daemon's."""
    drafting, plain = (call(client, **request) for client in clients)
    assert drafting == plain
    return drafting


def test_greedy_answers_are_the_same_and_drafts_are_taken(daemons, clients):
    before = drafts(daemons[0])
    answer = same(clients, prompt=CODE, max_tokens=80, temperature=0, logprobs=5, echo=True)
    drafted, accepted = (after - b for after, b in zip(drafts(daemons[0]), before))
    assert answer["usage"]["completion_tokens"] == 80
    assert 0 < accepted <= drafted
    assert drafts(daemons[1]) == (0, 0)
    after = drafts(daemons[0])
    same(clients, prompt=CODE, max_tokens=40, temperature=0.7, seed=3, n=2)
    assert drafts(daemons[0]) == after   # sampled jobs never draft


@pytest.mark.parametrize("options", [
    dict(max_tokens=1, logprobs=3),
    dict(max_tokens=2, logprobs=0, echo=True),
    dict(max_tokens=48, presence_penalty=0.6, frequency_penalty=0.3, logprobs=2),
    dict(max_tokens=48, n=3, logprobs=1),
    dict(max_tokens=40, n=2, best_of=3, seed=5),
    dict(max_tokens=40, n=2, best_of=4, temperature=0.9, seed=11, logprobs=2),
], ids=["max1", "max2-echo", "penalties", "n3", "best-of-greedy", "best-of-sampled"])
def test_options_give_the_same_answer(clients, options):
    same(clients, prompt=CODE, **{"temperature": 0, **options})


def test_stop_strings_that_straddle_tokens_inside_drafts(clients):
    plain = completion(clients[1], prompt=CODE, max_tokens=80, temperature=0)["choices"][0]["text"]
    ends = list(itertools.accumulate(len(enc.decode([t])) for t in enc.encode(plain)))
    # strings starting inside a token and ending in a later one, first seen late in the text, where the
    # drafts are taken: the earliest one, where a run of drafts ends, and the last
    stops = [plain[end - 1:end + 5] for end in ends[15:-2] if plain.find(plain[end - 1:end + 5]) == end - 1]
    assert len(stops) >= 3
    for stop in (stops[0], stops[len(stops) // 2], stops[-1]):
        answer = same(clients, prompt=CODE, max_tokens=80, temperature=0, stop=[stop], logprobs=1)
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert answer["choices"][0]["text"] == plain[:plain.index(stop)]
        same(clients, streamed, prompt=CODE, max_tokens=80, temperature=0, stop=["zzz", stop])


def test_banning_the_token_drafts_would_propose(clients):
    ids = completion(clients[1], prompt=[enc.encode(CODE)], max_tokens=60, temperature=0, logprobs=0)
    tokens = enc.encode(ids["choices"][0]["text"])
    for position in (10, 30):
        same(clients, prompt=enc.encode(CODE), max_tokens=60, temperature=0, logprobs=3,
             logit_bias={str(tokens[position]): -100})


def test_streams_and_usage_are_the_same(clients):
    chunks = same(clients, streamed, prompt=[CODE, enc.encode(CODE[:120])], max_tokens=50, temperature=0,
                  logprobs=2, echo=True, stream_options={"include_usage": True})
    assert chunks[-1]["usage"]["completion_tokens"] == 100


def test_prompt_at_the_end_of_the_context(clients, daemons):
    context = 256
    ids = (enc.encode(CODE) * 10)[:context - 3]
    answer = same(clients, prompt=ids, max_tokens=3, temperature=0, logprobs=2)
    assert answer["choices"][0]["finish_reason"] == "length"
    same(clients, streamed, prompt=(enc.encode(CODE) * 10)[:context - 20], max_tokens=20, temperature=0, logprobs=1)


def execute_tokens(daemon: Daemon, body: dict) -> tuple[list[dict], dict]:
    stream = execute(daemon.url, body)
    name, end = stream.terminal
    assert name == "end", end
    del end["decode_time_ms"]
    return stream.tokens, end


def test_concurrent_greedy_and_sampled_jobs_and_cancellations(daemons):
    """Up to 8 greedy jobs sharing a prefix beside sampled ones, some cancelled mid-draft, then the same
    requests alone: every answer the plain daemon's."""
    drafting, plain = daemons
    bodies = [{"job_id": f"g{i}", "prompt": CODE + f"    def get_{i}(self):\n", "max_tokens": 60, "temperature": 0}
              for i in range(6)]
    bodies += [{"job_id": f"s{i}", "prompt": CODE, "max_tokens": 40, "temperature": 0.8, "seed": i} for i in range(2)]
    expected = {body["job_id"]: execute_tokens(plain, body) for body in bodies}

    def cancel_after_8_tokens(job_id: str):
        def on_event(stream) -> None:
            if len(stream.tokens) == 8:   # 404 if the job has ended already
                httpx.post(drafting.url + "/cancel", json={"job_id": job_id}, timeout=5.0)
        return on_event
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        # jobs with the same prompts cancelled mid-draft, by /cancel and by their client leaving, beside the
        # others (whose drafts stop while more than DRAFT_MAX_JOBS decode), then the same requests alone
        doomed = [pool.submit(execute, drafting.url, {**body, "job_id": f"c{i}", "max_tokens": 100},
                              cancel_after_8_tokens(f"c{i}")) for i, body in enumerate(bodies[:2])]
        for i, body in enumerate(bodies[2:4]):
            pool.submit(execute, drafting.url, {**body, "job_id": f"d{i}", "max_tokens": 100},
                        lambda stream: len(stream.tokens) >= 8)
        running = {body["job_id"]: pool.submit(execute_tokens, drafting, body) for body in bodies}
        assert {job_id: future.result() for job_id, future in running.items()} == expected
        assert [future.result().terminal[1].get("code") for future in doomed] == ["CANCELLED"] * 2
    drafting.wait_idle()
    for body in bodies:
        assert execute_tokens(drafting, body) == expected[body["job_id"]]
