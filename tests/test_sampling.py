"""The sampler (spec 10): greedy, seeded temperature / top-k / top-p sampling through a model, the options
the daemon adds (repetition penalty, step 1; min-p, step 6), and the options refused."""

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

import llorch
from llorch.sampling import Sampler, penalize_repetitions

V = 1000


def random_row(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, V).astype(np.float32)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_hf_processor(penalty):
    row, previous = random_row(0), [3, 3, 17, 999, 0, 512, 17]
    hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([previous]), torch.tensor(row[None]).clone())
    assert np.array_equal(penalize_repetitions(row, previous, penalty), hf[0].numpy())


def test_repetition_penalty_steers_greedy_away_from_repeats_and_leaves_logits_alone():
    row = random_row(1)
    top, second = np.argsort(-row)[:2]
    row[top] = abs(row[top]) + 5          # a clear winner, positive so the penalty divides it
    original = row.copy()
    assert Sampler(0.0, repetition_penalty=1.0)(row, [top]) == top
    assert Sampler(0.0, repetition_penalty=100.0)(row, [top]) != top
    assert Sampler(0.0, repetition_penalty=100.0)(row, []) == top
    assert np.array_equal(row, original)  # spec 10, requirement 4


def test_min_p_keeps_exactly_the_tokens_near_the_most_likely():
    logits = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], dtype=np.float32))
    sampler = Sampler(1.0, min_p=0.3, seed=0)      # keeps p >= 0.3 * 0.4 = 0.12
    drawn = {sampler(logits) for _ in range(500)}
    assert drawn == {0, 1, 2}
    assert {Sampler(1.0, min_p=1.0, seed=s)(logits) for s in range(50)} == {0}


def test_defaults_leave_seeded_sampling_unchanged():
    row = random_row(2)
    plain = Sampler(0.9, top_k=40, top_p=0.9, seed=5)
    defaults = Sampler(0.9, top_k=40, top_p=0.9, seed=5, min_p=0.0, repetition_penalty=1.0)
    assert [plain(row) for _ in range(32)] == [defaults(row, previous_ids=[1, 2, 3]) for _ in range(32)]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=1.5),
                                    dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
                                    dict(repetition_penalty=float("nan"))])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        Sampler(**{"temperature": 1.0, **kwargs})


def test_sampling_is_seeded_and_respects_top_k_and_top_p(checkpoint):
    model = llorch.load(checkpoint("tiny"))
    ids = llorch.tokenizer().encode("Hello")

    def generated(**options) -> list[int]:
        return list(llorch.generate(model, ids, 12, Sampler(**options)))
    greedy = generated()
    sampled = generated(temperature=1.0, seed=7)
    assert sampled == generated(temperature=1.0, seed=7)
    assert sampled != generated(temperature=1.0, seed=8)
    assert generated(temperature=0.8, top_k=1, seed=3) == greedy
    assert generated(temperature=0.8, top_p=1e-9, seed=3) == greedy
    logits = model.forward(ids, model.new_cache())[-1]
    top2 = set(np.argsort(-logits)[:2].tolist())
    sampler = Sampler(temperature=5.0, top_k=2, seed=0)
    assert {sampler(logits) for _ in range(200)} == top2
