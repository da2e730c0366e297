"""llorch.logits: the LogitsProcessor's rules against direct computations, and the log-probs a Session reports
from the row it samples."""

import numpy as np
import pytest

import llorch
from llorch.generate import Session
from llorch.logits import LogitsProcessor, log_softmax, penalize_repetitions, score
from llorch.sampling import Sampler

V = 50257


@pytest.fixture(scope="module")
def model(checkpoint):
    return llorch.load(checkpoint("tiny"))


def logits_row(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(V).astype(np.float32)


def test_no_rule_leaves_the_row_itself():
    row = logits_row()
    assert LogitsProcessor()(row, [1, 2], [3, 3]) is row


def test_rules_follow_their_formulas():
    row, prompt, generated = logits_row(), [5, 9], [7, 7, 7, 9, 11]
    processed = LogitsProcessor({7: 2.5, 100: -100.0}, presence_penalty=0.5, frequency_penalty=0.25,
                                repetition_penalty=1.3)(row, prompt, generated)
    expected = penalize_repetitions(row, prompt + generated, 1.3)
    for token, count in ((7, 3), (9, 1), (11, 1)):
        expected[token] -= np.float32(0.5) + np.float32(0.25) * np.float32(count)
    expected[7] += np.float32(2.5)
    expected[100] += np.float32(-100.0)
    np.testing.assert_array_equal(processed, expected)
    assert processed[5] == expected[5] and row[7] != processed[7]   # the input row is not written


def test_score_is_the_log_softmax_and_its_best_tokens():
    row = logits_row(1)
    row[[10, 20]] = row.max() + 1   # a tie: the lower id first
    logprob, top = score(row, 123, 3)
    logp = row.astype(np.float64) - np.log(np.exp(row.astype(np.float64)).sum())
    assert logprob == pytest.approx(logp[123], abs=1e-12)
    assert [t for t, _ in top] == [10, 20, int(np.argsort(-logp, kind="stable")[2])]
    np.testing.assert_allclose([lp for _, lp in top], logp[[t for t, _ in top]], atol=1e-12)
    assert np.exp(log_softmax(row)).sum() == pytest.approx(1.0)


def test_a_session_samples_and_scores_the_processed_row(model):
    forced = 42
    session = Session(model, [1, 2, 3], 2, Sampler(), processor=LogitsProcessor({forced: 100.0}), logprobs=2)
    row = logits_row(2)
    step = session.take(row)
    biased = row.copy()
    biased[forced] += 100
    assert step.token == forced and step.top_logprobs[0][0] == forced
    assert step.logprob == pytest.approx(log_softmax(biased)[forced], abs=1e-12)
    plain = Session(model, [1, 2, 3], 2, Sampler()).take(row)
    assert plain.token == int(np.argmax(row)) and plain.logprob is None and plain.top_logprobs == ()
