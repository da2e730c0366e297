"""llorch.trace beyond the table itself: keys, the tracers, the trace driver and the structural rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llorch.trace import (DirectoryTracer, Tracer, checkpoint_key, forward_order, key_order, parse_key, run_trace,
                          structural_problems)


def test_forward_order_is_embed_then_the_blocks_then_the_head():
    order = forward_order(2)
    assert len(order) == 14 * 2 + 4
    assert order[:3] == [("embed", None), ("ln_1", 0), ("attn.qkv", 0)]
    assert order[14:16] == [("block_out", 0), ("ln_1", 1)]
    assert order[-3:] == [("ln_f", None), ("logits", None), ("next_token", None)]


def test_keys_round_trip_and_sort_in_forward_order():
    keys = [checkpoint_key(name, layer, step) for step in range(2) for name, layer in forward_order(12)]
    assert [parse_key(k) for k in keys] == [(n, l, s) for s in range(2) for n, l in forward_order(12)]
    assert sorted(reversed(keys), key=key_order) == keys


@pytest.mark.parametrize("key", ["x0.embed", "s0.h1.embed", "s0.ln_1", "s0.h0.attn.nothing", "s0.h0."])
def test_parse_key_rejects_what_is_not_a_key(key):
    with pytest.raises(ValueError):
        parse_key(key)


def test_record_before_start_forward_is_an_error():
    with pytest.raises(RuntimeError, match="before any tracer.start_forward"):
        Tracer().record("embed", None, np.zeros((1, 4)))


def test_directory_tracer_writes_arrays_and_strict_json_lines(tmp_path):
    scores = np.array([[[0.5, -np.inf], [0.25, 0.75]]], dtype=np.float32)
    with DirectoryTracer(tmp_path) as tracer:
        tracer.start_forward(0, 2)
        tracer.record("embed", None, np.ones((2, 4), dtype=np.float32))
        tracer.record("attn.scores", 3, scores)
        tracer.start_forward(2, 1)
        tracer.record("next_token", None, np.array([7], dtype=np.int64))

    np.testing.assert_array_equal(np.load(tmp_path / "s0.h3.attn.scores.npy"), scores)
    lines = [json.loads(line, parse_constant=pytest.fail) for line in (tmp_path / "trace.jsonl").open()]
    assert [line["key"] for line in lines] == ["s0.embed", "s0.h3.attn.scores", "s1.next_token"]
    scores_line = lines[1]
    assert scores_line.pop("mean") == pytest.approx(0.5) and scores_line.pop("std") > 0  # finite entries only
    assert scores_line == {
        "key": "s0.h3.attn.scores", "name": "attn.scores", "layer": 3, "step": 0, "start_pos": 0, "T": 2,
        "shape": [1, 2, 2], "dtype": "float32", "min": 0.25, "max": 0.75, "first": [0.5, "-inf", 0.25, 0.75]}
    assert (lines[2]["start_pos"], lines[2]["T"], lines[2]["dtype"]) == (2, 1, "int64")


class CountingModel:
    """A stand-in model: logits [T, 4] whose every entry is start_pos + t; remembers its calls."""

    def __init__(self) -> None:
        self.calls: list = []

    def reset(self) -> None:
        self.calls.append("reset")

    def forward(self, token_ids, start_pos=0, tracer=None):
        self.calls.append((list(token_ids), start_pos, tracer))
        return np.repeat(start_pos + np.arange(len(token_ids), dtype=np.float32)[:, None], 4, axis=1)


def test_run_trace_resets_then_feeds_the_prompt_and_each_decode_id_at_its_position():
    model, tracer = CountingModel(), Tracer()
    last_logits = run_trace(model, [5, 6, 7], [8, 9], tracer)
    assert model.calls == ["reset", ([5, 6, 7], 0, tracer), ([8], 3, tracer), ([9], 4, tracer)]
    assert [row[0] for row in last_logits] == [2, 3, 4]


def _attention_trace(scores: np.ndarray, probs: np.ndarray, k_cache: np.ndarray) -> dict:
    T = scores.shape[1]
    return {"s0.embed": np.zeros((T, 4)), "s0.h0.attn.scores": scores, "s0.h0.attn.probs": probs,
            "s0.h0.attn.k_cache": k_cache}


def _causal_pass(T: int = 3, n_head: int = 2):
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(future, -np.inf, 0.0)[None].repeat(n_head, axis=0)
    probs = np.where(future, 0.0, 1.0 / np.arange(1, T + 1)[:, None])[None].repeat(n_head, axis=0)
    return scores, probs, np.zeros((n_head, T, 5))


def test_structural_rules_hold_for_a_causal_pass():
    assert structural_problems(_attention_trace(*_causal_pass())) == []


@pytest.mark.parametrize("break_it,problem", [
    (lambda s, p, k: s.__setitem__((0, 0, 2), 1.0), "a future key (j > start_pos + t) is not -inf"),
    (lambda s, p, k: s.__setitem__((1, 2, 0), -np.inf), "a visible key is not finite"),
    (lambda s, p, k: p.__setitem__((0, 0, 1), 1e-9), "a future key (j > start_pos + t) has probability other"),
    (lambda s, p, k: p.__setitem__((0, 2, 0), 0.5), "a row does not sum to 1 within 1e-6"),
])
def test_structural_rules_catch_each_violation(break_it, problem):
    scores, probs, k_cache = _causal_pass()
    break_it(scores, probs, k_cache)
    problems = structural_problems(_attention_trace(scores, probs, k_cache))
    assert len(problems) == 1 and problem in problems[0]


def test_structural_rules_know_each_steps_start_pos():
    """Step 1 follows a 3-token prompt: T = 1, S = 4, so its cache must hold 4 positions."""
    trace = _attention_trace(*_causal_pass())
    trace |= {"s1.embed": np.zeros((1, 4)), "s1.h0.attn.k_cache": np.zeros((2, 1, 5)),
              "s1.h0.attn.scores": np.zeros((2, 1, 4)), "s1.h0.attn.probs": np.full((2, 1, 4), 0.25)}
    assert structural_problems(trace) == ["s1.h0.attn.k_cache: shape (2, 1, 5) does not hold S = 4 positions"]
