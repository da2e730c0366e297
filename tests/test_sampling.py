"""The sampler (spec 10): greedy, seeded temperature / top-k / top-p sampling through a model, the options
the daemon adds (repetition penalty, step 1; min-p, step 6), and the options refused."""

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

import llorch
from llorch import _kernels as K
from llorch.logits import LogitsProcessor, penalize_repetitions
from llorch.sampling import Sampler

V = 1000


def random_row(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, V).astype(np.float32)


def reference_draw(logits, rng, temperature, top_k=None, top_p=None, min_p=None) -> int:
    """Spec 10's table with a sort of the whole row: the survivors found most likely first, then drawn by
    Generator.choice in id order."""
    scaled = logits.astype(np.float64) / temperature
    candidates = np.argsort(-scaled, kind="stable")
    if top_k:
        candidates = candidates[scaled[candidates] >= scaled[candidates[top_k - 1]]]
    probs = np.exp(scaled[candidates] - scaled[candidates[0]])
    probs /= probs.sum()
    if top_p:
        keep = np.searchsorted(np.cumsum(probs), top_p, side="left") + 1
        candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
    if min_p:
        keep = np.count_nonzero(probs >= min_p * probs[0])
        candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
    by_id = np.argsort(candidates)
    return int(candidates[by_id][rng.choice(len(candidates), p=probs[by_id])])


@pytest.mark.parametrize("options", [dict(temperature=0.8), dict(temperature=1.5), dict(temperature=0.7, top_k=40),
                                     dict(temperature=0.8, top_p=0.95), dict(temperature=3.0, top_p=0.5),
                                     dict(temperature=0.8, min_p=0.05),
                                     dict(temperature=1.0, top_k=100, top_p=0.9, min_p=0.01)])
@pytest.mark.parametrize("vocabulary", [V, 50257])
def test_seeded_draws_equal_a_full_sort_of_the_vocabulary(options, vocabulary):
    # the partial selection sorts only a growing prefix; heavy-tailed rows make the draws reach deep into it
    rows = [(np.random.default_rng(seed).standard_t(3, vocabulary) * 3).astype(np.float32) for seed in range(8)]
    sampler, rng = Sampler(**options, seed=11), np.random.default_rng(11)
    drawn = [sampler(row) for row in rows for _ in range(25)]
    assert drawn == [reference_draw(row, rng, **options) for row in rows for _ in range(25)]


def test_draws_follow_the_renormalised_distribution():
    logits = random_row(4)
    sampler, draws = Sampler(0.7, top_k=50, seed=3), 40_000
    counts = np.bincount([sampler(logits) for _ in range(draws)], minlength=V)
    top = np.argsort(-logits, kind="stable")[:50]
    probs = np.zeros(V)
    probs[top] = np.exp((logits[top] - logits[top[0]]) / 0.7)
    probs /= probs.sum()
    sigma = np.sqrt(draws * probs * (1 - probs))
    assert np.all(np.abs(counts - draws * probs) <= 5 * sigma + 1e-9)   # outside the top 50: never drawn


def test_top_k_keeps_every_token_tied_with_the_kth_like_hf():
    logits = np.array([1.0, 3.0, 2.0, 2.0, 0.5, 2.0, -1.0, 2.0], dtype=np.float32)   # k=2 cuts inside the 2.0s
    hf = TopKLogitsWarper(2)(None, torch.tensor(logits[None]))[0].numpy()
    sampler = Sampler(1e6, top_k=2, seed=0)                                          # nearly uniform survivors
    assert {sampler(logits) for _ in range(400)} == set(np.flatnonzero(np.isfinite(hf)).tolist()) == {1, 2, 3, 5, 7}


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-30])
def test_tiny_temperatures_draw_the_most_likely_token(temperature):
    logits = random_row(5)
    for options in [{}, dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)]:
        assert Sampler(temperature, seed=1, **options)(logits) == int(np.argmax(logits))


def test_huge_temperatures_draw_nearly_uniformly():
    drawn = {Sampler(1e308, top_k=3, seed=seed)(random_row(6)) for seed in range(200)}
    assert drawn == set(np.argsort(-random_row(6))[:3].tolist())


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
    assert Sampler(0.0)(LogitsProcessor(repetition_penalty=1.0)(row, [top], [])) == top
    assert Sampler(0.0)(LogitsProcessor(repetition_penalty=100.0)(row, [top], [])) != top
    assert Sampler(0.0)(LogitsProcessor(repetition_penalty=100.0)(row, [], [])) == top
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
    defaults = Sampler(0.9, top_k=40, top_p=0.9, seed=5, min_p=0.0)
    unpenalized = LogitsProcessor(repetition_penalty=1.0)(row, [1, 2, 3], [])
    assert [plain(row) for _ in range(32)] == [defaults(unpenalized) for _ in range(32)]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=1.5)])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        Sampler(**{"temperature": 1.0, **kwargs})


@pytest.mark.parametrize("penalty", [0.0, -1.0, float("nan")])
def test_bad_repetition_penalties_are_refused(penalty):
    with pytest.raises(ValueError, match="repetition_penalty"):
        LogitsProcessor(repetition_penalty=penalty)


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


def kernel_rows() -> dict[str, np.ndarray]:
    """Rows that stress the bucketed cuts: ties, -inf, a range stretched by one outlier, ±0, tiny rows."""
    rng = np.random.default_rng(21)
    rows = {
        "tiny": np.array([1.0, 3.0, 2.0, 2.0, 0.5, 2.0, -1.0, 2.0]),
        "65 normal": rng.normal(0, 2, 65),
        "ties": rng.integers(0, 5, 5000).astype(np.float64),
        "all equal": np.full(3000, 0.25),
        "heavy tail": rng.standard_t(3, 50257) * 3,
        "flat": rng.normal(0, 0.5, 50257),
        "one outlier": np.concatenate([rng.normal(0, 1, 4000), [-1e30]]),
        "signed zeros": rng.choice([-0.0, 0.0, 1.0, -1.0], 4000),
    }
    with_inf = rng.normal(0, 1, 4000)
    with_inf[rng.choice(4000, 1000, replace=False)] = -np.inf
    rows["-inf"] = with_inf
    rows["one finite"] = np.where(np.arange(3000) == 1234, 0.5, -np.inf)
    return {name: row.astype(np.float32) for name, row in rows.items()}


def sorted_prefix(logits: np.ndarray, weights: np.ndarray | None, target: float) -> np.ndarray:
    """Ids of the shortest most-likely-first prefix (stable sort) whose count or weight reaches target."""
    order = np.argsort(-logits, kind="stable")
    running = np.cumsum(np.ones(len(order)) if weights is None else weights[order])
    return order[:min(int(np.searchsorted(running, target, side="left")) + 1, len(order))]


@pytest.mark.parametrize("name", list(kernel_rows()))
def test_the_cut_kernels_keep_what_a_full_sort_keeps(name):
    logits = kernel_rows()[name]
    V = len(logits)
    scratch = np.empty(V, np.int32)
    with np.errstate(invalid="ignore"):
        weights = np.exp(logits.astype(np.float64) - logits.max())
    for k in sorted({1, 2, 7, 40, V // 2, V - 1, V} & set(range(1, V + 1))):
        count = K.top_k(logits, k, scratch)
        kth = logits[sorted_prefix(logits, None, k)[-1]]
        assert np.array_equal(scratch[:count], np.flatnonzero(logits >= kth)), k
    for p in [1e-9, 0.3, 0.77, 0.95, 0.999]:
        kept = weights.copy()
        K.keep_top_p(logits, kept, p * weights.sum(), scratch)
        want = np.zeros(V)
        survivors = sorted_prefix(logits, weights, p * weights.sum())
        want[survivors] = weights[survivors]
        assert np.array_equal(kept, want), p


def test_a_mass_an_ulp_past_a_prefix_still_cuts():
    """The cut's bucket is chosen from one order of summation and walked in another: a mass that the first
    reaches and the second misses by rounding must still cut there, not keep the whole row."""
    rng = np.random.default_rng(263)
    V, scratch = 1000, np.empty(1000, np.int32)
    logits = rng.standard_normal(V).astype(np.float32)
    weights = np.exp(rng.standard_normal(V) * 0.3) / 7
    running = np.cumsum(weights[np.lexsort((np.arange(V), -logits))])
    for prefix in range(0, V - 1, 7):
        kept = weights.copy()
        K.keep_top_p(logits, kept, np.nextafter(running[prefix], np.inf), scratch)
        assert abs(np.count_nonzero(kept) - (prefix + 2)) <= 1, prefix


def test_draw_is_the_first_id_whose_running_sum_passes_u():
    rng = np.random.default_rng(3)
    weights = np.where(rng.random(5000) < 0.3, 0.0, rng.random(5000))
    for floor in [5e-324, 0.5]:
        kept = np.where(weights >= floor, weights, 0)
        running = np.cumsum(kept)
        for u in rng.random(500):
            assert K.draw(weights, floor, float(u)) == int(np.searchsorted(running, u * running[-1], side="right"))
        assert K.draw(weights, floor, 0.0) == int(np.flatnonzero(kept)[0])
    assert K.draw(np.array([0.0, 2.0, 0.0]), 1.0, 0.999999) == 1
    assert K.draw(np.array([0.0, 2.0, 0.5]), 1.0, 0.999999) == 1


@pytest.mark.parametrize("call", [lambda l, w, s: K.top_k(l, 0, s), lambda l, w, s: K.top_k(l, 4, s),
                                  lambda l, w, s: K.keep_top_p(l, w, 0.0, s),
                                  lambda l, w, s: K.keep_top_p(l, w.astype(np.float32), 1.0, s),
                                  lambda l, w, s: K.keep_top_p(l, w, 1.0, s[:2]),
                                  lambda l, w, s: K.draw(w, 1.0, 1.0), lambda l, w, s: K.draw(w, 0.0, 0.5)])
def test_the_sampling_kernels_refuse_bad_arguments(call):
    with pytest.raises(ValueError):
        call(np.zeros(3, np.float32), np.ones(3), np.empty(3, np.int32))
