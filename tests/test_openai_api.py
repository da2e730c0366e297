"""The Completions API of llorch-cpud (spec 14, "OpenAI-style routes"), driven by the official `openai` client
against a real daemon on 127.0.0.1 behind an API key. Expected values are computed in-process from the same
tiny checkpoint, with one kernel thread as the daemon: log-probs against a log-softmax of the model's own
logits, logit_bias and the penalties against a greedy loop applying OpenAI's formulas directly.
"""

from __future__ import annotations

import numpy as np
import pytest

import llorch

from test_server import Daemon, model, model_path   # noqa: F401  (fixtures: the tiny checkpoint, loaded in-process)

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "openai-test-key-41d2"
enc = llorch.tokenizer()
PROMPT = "The OpenAI client says"


@pytest.fixture(scope="module")
def daemon(model_path, tmp_path_factory):
    directory = tmp_path_factory.mktemp("openai")
    (directory / "key").write_text(KEY)
    d = Daemon(model_path, directory / "daemon.log", "--api-key-file", str(directory / "key"),
               "--model-name", "tiny-test", "--max-batch", "8", "--max-queue", "32")
    yield d
    assert d.stop() == 0
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture(scope="module")
def client(daemon):
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=KEY, timeout=60.0, max_retries=0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def greedy(model, ids: list[int], max_tokens: int, *, bias: dict[int, float] | None = None,
           presence: float = 0.0, frequency: float = 0.0) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens after ids, OpenAI's logit_bias and penalties applied directly, and each step's log-probs
    (of the processed logits); stops after <|endoftext|>."""
    cache, out, logps = model.new_cache(), [], []
    logits = model.forward(ids, cache, logits="last")[0]
    while True:
        row = logits.copy()
        for token, count in zip(*np.unique(out, return_counts=True)) if out else ():
            row[token] -= np.float32(presence) + np.float32(frequency) * np.float32(count)
        for token, value in (bias or {}).items():
            row[token] += np.float32(value)
        logps.append(log_softmax(row))
        out.append(int(np.argmax(row)))
        if out[-1] == llorch.EOT_TOKEN or len(out) == max_tokens:
            return out, logps
        logits = model.forward([out[-1]], cache, logits="last")[0]


def text_of(tokens: list[int]) -> str:
    return enc.decode([t for t in tokens if t != llorch.EOT_TOKEN])


def top_dict(logp: np.ndarray, n: int) -> dict[str, float]:
    best = sorted(range(logp.size), key=lambda t: (-logp[t], t))[:n]
    return {enc.decode([t]): float(logp[t]) for t in best}


def test_logprobs_are_the_log_softmax_of_the_models_logits(client, model):
    completion = client.completions.create(model="tiny-test", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    tokens, logps = greedy(model, enc.encode(PROMPT), 8)
    choice = completion.choices[0]
    assert choice.text == text_of(tokens)
    got = choice.logprobs
    assert got.tokens == [enc.decode([t]) for t in tokens]
    np.testing.assert_allclose(got.token_logprobs, [lp[t] for t, lp in zip(tokens, logps)], atol=1e-5, rtol=0)
    for top, logp in zip(got.top_logprobs, logps):
        expected = top_dict(logp, 3)
        assert top.keys() == expected.keys()
        np.testing.assert_allclose([top[k] for k in expected], list(expected.values()), atol=1e-5, rtol=0)
    starts = np.cumsum([len(PROMPT)] + [len(s) for s in got.tokens[:-1]])
    assert got.text_offset == starts.tolist()


def test_echo_prepends_the_prompt_and_scores_its_tokens(client, model):
    plain = client.completions.create(model="tiny-test", prompt=PROMPT, max_tokens=6, temperature=0)
    echoed = client.completions.create(model="tiny-test", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                       logprobs=2)
    choice = echoed.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text
    ids = enc.encode(PROMPT)
    logits = model.forward(ids, model.new_cache(), logits="all")
    expected = [None] + [log_softmax(row)[t] for row, t in zip(logits, ids[1:])]
    got = choice.logprobs
    assert got.tokens[: len(ids)] == [enc.decode([t]) for t in ids]
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    np.testing.assert_allclose(got.token_logprobs[1:len(ids)], expected[1:], atol=1e-5, rtol=0)
    assert got.top_logprobs[1].keys() == top_dict(log_softmax(logits[0]), 2).keys()
    assert got.text_offset[0] == 0 and got.text_offset[len(ids)] == len(PROMPT)
    assert len(got.tokens) == len(ids) + 6


def test_logit_bias_forces_and_bans_tokens(client, model):
    forced = enc.encode(" banana")[0]
    completion = client.completions.create(model="tiny-test", prompt=PROMPT, max_tokens=5, temperature=0,
                                           logit_bias={str(forced): 100})
    assert completion.choices[0].text == enc.decode([forced] * 5)
    ids = enc.encode(PROMPT)
    first = greedy(model, ids, 1)[0][0]
    banned = client.completions.create(model="tiny-test", prompt=PROMPT, max_tokens=6, temperature=0,
                                       logit_bias={str(first): -100}, logprobs=1)
    tokens, logps = greedy(model, ids, 6, bias={first: -100})
    assert tokens[0] != first and banned.choices[0].text == text_of(tokens)
    np.testing.assert_allclose(banned.choices[0].logprobs.token_logprobs, [lp[t] for t, lp in zip(tokens, logps)],
                               atol=1e-5, rtol=0)


def test_presence_and_frequency_penalties_follow_openais_formula(client, model):
    ids = enc.encode(PROMPT)
    for presence, frequency in ((2.0, 0.0), (0.0, 1.5), (0.7, 0.9)):
        completion = client.completions.create(model="tiny-test", prompt=PROMPT, max_tokens=24, temperature=0,
                                               presence_penalty=presence, frequency_penalty=frequency)
        tokens, _ = greedy(model, ids, 24, presence=presence, frequency=frequency)
        assert completion.choices[0].text == text_of(tokens), (presence, frequency)
    assert text_of(greedy(model, ids, 24, presence=2.0)[0]) != text_of(greedy(model, ids, 24)[0])


def test_prompt_forms_and_choice_indices(client, model):
    prompts = [PROMPT, "Another prompt"]
    expected = [text_of(greedy(model, enc.encode(p), 5)[0]) for p in prompts]
    for form in (prompts, [enc.encode(p) for p in prompts]):
        completion = client.completions.create(model="tiny-test", prompt=form, max_tokens=5, temperature=0, n=2)
        assert [c.index for c in completion.choices] == [0, 1, 2, 3]
        assert [c.text for c in completion.choices] == [expected[0]] * 2 + [expected[1]] * 2
        assert completion.usage.prompt_tokens == sum(len(enc.encode(p)) for p in prompts)
        assert completion.usage.completion_tokens == 20
    as_ids = client.completions.create(model="tiny-test", prompt=enc.encode(PROMPT), max_tokens=5, temperature=0)
    assert as_ids.choices[0].text == expected[0]


def test_seed_n_and_best_of(client):
    def sample(**options):
        return client.completions.create(model="tiny-test", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=11,
                                         **options)
    three = sample(n=3, logprobs=0)
    assert [c.text for c in sample(n=3).choices] == [c.text for c in three.choices]   # seeded: reproducible
    assert len({c.text for c in three.choices}) > 1   # each choice draws from its own seed
    best = sample(n=2, best_of=3)
    ranked = sorted(three.choices, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == 30   # the discarded completion counts, as OpenAI bills it
    with pytest.raises(openai.BadRequestError, match="best_of"):
        sample(n=1, best_of=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        sample(n=3, best_of=2)


def test_stream_with_n_logprobs_and_usage(client):
    options = dict(model="tiny-test", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3, n=2, logprobs=2)
    whole = client.completions.create(**options)
    chunks = list(client.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 16 and last.usage.prompt_tokens == len(enc.encode(PROMPT))
    assert all(chunk.usage is None for chunk in body)
    for index, choice in enumerate(whole.choices):
        parts = [c.choices[0] for c in body if c.choices[0].index == index]
        assert "".join(p.text for p in parts) == choice.text
        streamed = [lp for p in parts if p.logprobs for lp in p.logprobs.token_logprobs]
        assert streamed == choice.logprobs.token_logprobs
        offsets = [o for p in parts if p.logprobs for o in p.logprobs.text_offset]
        assert offsets == choice.logprobs.text_offset
        assert parts[-1].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.completions.create(model="tiny-test", prompt=PROMPT, stream_options={"include_usage": True})


def test_refusals_come_in_openais_error_shape(client, daemon):
    with pytest.raises(openai.BadRequestError, match="fill-in-the-middle") as refused:
        client.completions.create(model="tiny-test", prompt=PROMPT, suffix="and then")
    assert refused.value.body["param"] == "suffix" and refused.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="embeddings"):
        client.embeddings.create(model="tiny-test", input="hi")
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="tiny-test", prompt=PROMPT, logit_bias={"50257": 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="tiny-test", prompt=PROMPT, logit_bias={"5": 101})
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="tiny-test", prompt=[[1, 2], [50300]])
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="tiny-test", prompt=PROMPT, presence_penalty=2.5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=daemon.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_models_and_one_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    assert client.models.retrieve("tiny-test").id == "tiny-test"
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.models.retrieve("gpt-4")


def test_tokenize_and_detokenize_as_llama_cpp(daemon):
    auth = {"Authorization": f"Bearer {KEY}"}
    text = "Hello, world <|endoftext|> é"
    tokens = httpx.post(daemon.url + "/tokenize", json={"content": text}, headers=auth).json()["tokens"]
    assert tokens == enc.encode(text, disallowed_special=())
    assert httpx.post(daemon.url + "/detokenize", json={"tokens": tokens}, headers=auth).json() == {"content": text}
    assert httpx.post(daemon.url + "/tokenize", json={"content": text}).status_code == 401
    assert httpx.post(daemon.url + "/detokenize", json={"tokens": [50257]}, headers=auth).status_code == 400


def test_a_client_leaving_a_streamed_n_request_cancels_every_completion(daemon):
    body = {"prompt": PROMPT, "max_tokens": 1000 - len(enc.encode(PROMPT)), "n": 3, "stream": True,
            "temperature": 1.0}
    cancelled_before = daemon.log().count("CANCELLED")
    with httpx.stream("POST", daemon.url + "/v1/completions", json=body, timeout=60.0,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()   # held: dropping the iterator closes the response
        assert next(lines).startswith("data: ")
        assert daemon.health()["active_jobs"] == 3
    assert daemon.wait_idle()["active_jobs"] == 0
    assert daemon.log().count("CANCELLED") == cancelled_before + 3
