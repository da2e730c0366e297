"""llorch.prefix_cache: blocks of cached rows keyed by prefix, copied bitwise, evicted least recently used."""

import numpy as np
import pytest

import llorch
from llorch.prefix_cache import BLOCK_TOKENS, PrefixCache


@pytest.fixture(scope="module")
def model(checkpoint):
    return llorch.load(checkpoint("tiny"))


def test_a_cached_prefix_is_copied_bitwise_and_the_rest_computed(model):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.config.vocab_size, 3 * BLOCK_TOKENS + 5).tolist()
    cold = model.new_cache()
    cold_logits = model.forward(prompt, cold, logits="last")
    cache = PrefixCache(1 << 30)
    assert cache.store(prompt, cold, 0) == 3 and cache.nbytes > 0
    warm = model.new_cache()
    assert cache.extend(prompt, warm, upto=len(prompt) - 1) == 3 * BLOCK_TOKENS
    np.testing.assert_array_equal(model.forward(prompt[warm.length:], warm, logits="last"), cold_logits)
    np.testing.assert_array_equal(warm.k[:, :, :len(prompt)], cold.k[:, :, :len(prompt)])
    other = model.new_cache()   # a prompt that differs in its second block reuses only the first
    assert cache.extend(prompt[:BLOCK_TOKENS] + [0] * 2 * BLOCK_TOKENS, other, upto=3 * BLOCK_TOKENS) == BLOCK_TOKENS
    assert cache.hit_tokens == 4 * BLOCK_TOKENS


def test_blocks_are_evicted_least_recently_used_within_the_budget(model):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, BLOCK_TOKENS).tolist() for _ in range(3)]
    caches = [model.new_cache() for _ in prompts]
    for prompt, kv in zip(prompts, caches):
        model.forward(prompt, kv)
    block_bytes = 2 * caches[0].k[:, :, :BLOCK_TOKENS].nbytes
    cache = PrefixCache(2 * block_bytes)
    cache.store(prompts[0], caches[0], 0)
    cache.store(prompts[1], caches[1], 0)
    assert cache.extend(prompts[0] + [1], model.new_cache(), upto=BLOCK_TOKENS) == BLOCK_TOKENS   # 0 is now recent
    cache.store(prompts[2], caches[2], 0)                                                       # evicts 1
    assert cache.nbytes == 2 * block_bytes
    hits = [cache.extend(p + [1], model.new_cache(), upto=BLOCK_TOKENS) for p in prompts]
    assert hits == [BLOCK_TOKENS, 0, BLOCK_TOKENS]
    with pytest.raises(ValueError, match="capacity_bytes"):
        PrefixCache(-1)
