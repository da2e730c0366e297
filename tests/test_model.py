"""llorch's model against HF transformers end to end: greedy generation, logits, loading variants, errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import llorch
from llorch.testing import TRAINED_PROMPTS
from llorch.trace import CHECKPOINTS, Tracer, expected_shape
from llorch.references.hf import hf_greedy, load_hf

torch.set_num_threads(2)
enc = llorch.tokenizer()
PROMPTS = ["Hello.", "Hello, I'm a language model,", "The quick brown fox", "In 1905, Einstein",
           "def fibonacci(n):\n    "]


def logits_of(model, ids, **options):
    """forward over ids as a new sequence."""
    return model.forward(ids, model.new_cache(), **options)


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("shape", ["gpt2", "gpt2-medium"])
def test_greedy_generation_equals_hf(checkpoint, shape):
    path = checkpoint(shape)
    model, hf = llorch.load(path), load_hf(path)
    for prompt in PROMPTS:
        ids = enc.encode(prompt)
        ours = list(llorch.generate(model, ids, 64))
        assert ours == hf_greedy(hf, ids, 64, llorch.EOT_TOKEN), prompt


@pytest.mark.parametrize("shape", ["tiny", "gpt2", "distilgpt2", "odd", "head80"])
def test_all_logits_match_hf(checkpoint, shape):
    path = checkpoint(shape)
    ids = enc.encode("Hello, I'm a language model, not a")
    ours, ref = logits_of(llorch.load(path), ids), hf_logits(load_hf(path), ids)
    assert ours.shape == ref.shape == (len(ids), 50257)
    assert np.abs(ours - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_kv_cache_decoding_equals_recomputing(checkpoint):
    model = llorch.load(checkpoint("gpt2"))
    ids = enc.encode("Hello, I'm a language model,")
    generated = list(llorch.generate(model, ids, 8))
    full = ids + generated
    recomputed = logits_of(model, full)                  # every position at once, from scratch
    cache = model.new_cache()
    incremental = [model.forward(ids, cache)]
    for token in generated:                              # each pass continues at the cache's length
        incremental.append(model.forward([token], cache))
    assert cache.length == len(full)
    incremental = np.concatenate(incremental)
    assert incremental.shape == recomputed.shape
    assert np.abs(incremental - recomputed).max() <= 1e-5 * np.abs(recomputed).max()


def test_last_logits_is_the_last_row_of_all(checkpoint):
    model = llorch.load(checkpoint("tiny"))
    ids = enc.encode("Hello there")
    all_rows = logits_of(model, ids, logits="all")
    last = logits_of(model, ids, logits="last")
    assert last.shape == (1, 50257)
    np.testing.assert_array_equal(last[0], all_rows[-1])


def test_a_long_prompt_in_several_passes_is_bitwise_one_pass(checkpoint, monkeypatch):
    """forward runs a prompt longer than PREFILL_ROWS in several passes; a traced forward is one pass."""
    model = llorch.load(checkpoint("tiny"))
    monkeypatch.setattr(llorch.model, "PREFILL_ROWS", 16)   # tiny's context is 128 positions
    ids = np.random.default_rng(0).integers(0, 50257, 2 * 16 + 5)
    passes = logits_of(model, ids, logits="all")
    one_pass = logits_of(model, ids, logits="all", tracer=Tracer())
    assert passes.shape == (ids.size, 50257)
    np.testing.assert_array_equal(passes, one_pass)
    np.testing.assert_array_equal(logits_of(model, ids, logits="last")[0], one_pass[-1])


def test_trace_reports_every_checkpoint_with_the_table_shapes(checkpoint):
    model = llorch.load(checkpoint("odd"))
    cfg = model.config
    tracer = Tracer()
    prompt = enc.encode("Hello.")
    list(llorch.generate(model, prompt, 3, tracer=tracer))
    names_per_step = [c.name for c in CHECKPOINTS if not c.per_layer and c.name == "embed"]
    names_per_step += [c.name for c in CHECKPOINTS if c.per_layer] * cfg.n_layer
    names_per_step += [c.name for c in CHECKPOINTS if not c.per_layer and c.name != "embed"]
    for step in range(3):
        records = [r for r in tracer.records if r.step == step]
        assert [r.name for r in records] == names_per_step
        T, start_pos = (len(prompt), 0) if step == 0 else (1, len(prompt) + step - 1)
        for r in records:
            want = expected_shape(r.name, T=T, start_pos=start_pos, n_embd=cfg.n_embd, n_head=cfg.n_head,
                                  vocab_size=cfg.vocab_size)
            assert r.value.shape == want, (r.name, r.layer, step)


@pytest.mark.parametrize("options", [dict(prefix=True), dict(lm_head="present"), dict(dtype="float16"),
                                     dict(dtype="bfloat16"), dict(variant="outliers"), dict(variant="big_ln")])
def test_checkpoint_variants_load_like_hf(checkpoint, options):
    path = checkpoint("tiny", **options)
    ids = enc.encode("Hello, I'm a language model,")
    ours, ref = logits_of(llorch.load(path), ids), hf_logits(load_hf(path), ids)
    assert np.abs(ours - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_load_a_safetensors_file_beside_its_config(checkpoint):
    path = checkpoint("tiny")
    ids = enc.encode("Hi")
    np.testing.assert_array_equal(logits_of(llorch.load(os.path.join(path, "model.safetensors")), ids),
                                  logits_of(llorch.load(path), ids))


def test_context_is_never_silently_truncated(checkpoint):
    model = llorch.load(checkpoint("tiny"))          # 128 positions
    message = re.escape("prompt of 100 tokens + 29 new tokens exceeds the context of 128 positions")
    with pytest.raises(llorch.ContextError, match=message):
        model.check_request([1] * 100, 29)
    with pytest.raises(llorch.ContextError, match=message):
        llorch.generate(model, [1] * 100, 29)   # refused at the call, before any pass
    assert len(list(llorch.generate(model, [1] * 100, 28))) == 28
    with pytest.raises(llorch.ContextError):
        logits_of(model, [1] * 129)
    with pytest.raises(ValueError, match="start_pos 5"):
        logits_of(model, [1], start_pos=5)      # nothing cached yet: positions 0..4 would be garbage
    for bad in ([], [50257], [-1], [[1, 2]], [1.5]):
        with pytest.raises(ValueError):
            logits_of(model, bad)
    for prompt, n in (([], 4), ([1], 0), ([50257], 4)):
        with pytest.raises(ValueError):
            model.check_request(prompt, n)


def test_bad_checkpoints_are_refused_with_a_message(checkpoint, tmp_path):
    good = checkpoint("tiny")
    with pytest.raises(llorch.CheckpointError, match="no such file"):
        llorch.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(llorch.CheckpointError, match="no model.safetensors"):
        llorch.load(tmp_path / "empty")
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    os.symlink(os.path.join(good, "model.safetensors"), bad_config / "model.safetensors")
    config = json.load(open(os.path.join(good, "config.json")))
    json.dump({**config, "n_embd": 96, "n_head": 4}, open(bad_config / "config.json", "w"))
    with pytest.raises(llorch.CheckpointError, match="has shape"):
        llorch.load(bad_config)
    json.dump({**config, "n_head": 5}, open(bad_config / "config.json", "w"))
    with pytest.raises(llorch.CheckpointError, match="must divide"):
        llorch.load(bad_config)


def test_loading_124m_costs_little_more_than_the_weights(checkpoint, tmp_path):
    """Peak RSS ~ weight bytes, whether the weights are prepared (packed, released from the checkpoint's
    mapping as they go, then written to the cache) or mapped from the cache by the next load."""
    path = checkpoint("gpt2")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) pytest parent.
    script = ("import re, llorch, llorch.weights as W; m = llorch.load(%r); list(llorch.generate(m, [15496, 13], 8)); "
              "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
              "print(m.weight_bytes, int(peak) * 1024, int(W.mapped_file(m.weights.wte) is not None))" % path)
    env = {**os.environ, "LLORCH_CACHE_DIR": str(tmp_path)}
    for from_cache in (0, 1):
        weight_bytes, peak_rss, mapped = map(int, subprocess.check_output([sys.executable, "-c", script], env=env).split())
        assert (weight_bytes, mapped) == (124439808 * 4, from_cache)
        assert peak_rss <= 1.15 * weight_bytes, f"peak RSS {peak_rss / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB"


def test_batched_decoding_is_bitwise_what_each_sequence_gets_alone(checkpoint):
    model = llorch.load(checkpoint("odd"))
    caches, tokens, alone = [], [], []
    for prompt in PROMPTS[:4]:                  # different lengths: each sequence at its own position
        ids, cache = enc.encode(prompt), model.new_cache()
        token = int(np.argmax(model.forward(ids, cache, logits="last")))
        alone.append(model.forward([token], cache, logits="last"))
        cache.length = len(ids)                 # rewind that decode step, to redo it batched
        caches.append(cache)
        tokens.append(token)
    np.testing.assert_array_equal(model.decode_batch(tokens, caches), np.concatenate(alone))
    with pytest.raises(ValueError, match="a trace follows one sequence"):
        model.decode_batch(tokens, caches, tracer=Tracer())


def test_a_traced_decode_step_computes_the_bits_of_an_untraced_one(checkpoint):
    model = llorch.load(checkpoint("odd"))
    ids, traced, untraced = enc.encode("Hello, I'm a language model,"), model.new_cache(), model.new_cache()
    token = int(np.argmax(model.forward(ids, untraced, logits="last")))
    model.forward(ids, traced, logits="last", tracer=Tracer())
    np.testing.assert_array_equal(model.decode_batch([token], [traced], tracer=Tracer()),
                                  model.decode_batch([token], [untraced]))


def test_the_trained_model_greedy_equals_hf_and_is_varied(trained_checkpoint):
    """Greedy text of a trained model: many distinct ids with clear top-1 margins, unlike a random model's."""
    model, hf = llorch.load(trained_checkpoint), load_hf(trained_checkpoint)
    for prompt in TRAINED_PROMPTS:
        ids = enc.encode(prompt)
        ours = list(llorch.generate(model, ids, 64))
        assert len(set(ours)) >= 20, (prompt, enc.decode(ours))
        assert ours == hf_greedy(hf, ids, 64, llorch.EOT_TOKEN), prompt
        ids += ours
        logits, ref = model.forward(ids, model.new_cache()), hf_logits(hf, ids)
        assert np.abs(logits - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_a_mixed_pass_is_bitwise_the_separate_passes(checkpoint):
    """forward_batch stacks decode rows with prompt chunks split anywhere: each segment's last row, and the
    cache it leaves, are bitwise what its sequence gets alone."""
    model = llorch.load(checkpoint("odd"))
    long_ids = enc.encode(" ".join(PROMPTS) * 3)
    decoding = []                               # (cache, next token, its logits alone)
    for prompt in PROMPTS[:2]:
        ids, cache = enc.encode(prompt), model.new_cache()
        token = int(np.argmax(model.forward(ids, cache, logits="last")))
        alone = model.forward([token], cache, logits="last")
        cache.length = len(ids)
        decoding.append((cache, token, alone))
    cold = model.forward(long_ids, model.new_cache(), logits="last")
    chunked, cut = model.new_cache(), 7         # a chunk that ends anywhere, then the rest beside decode rows
    first = model.forward_batch([([d[1]], d[0]) for d in decoding[:1]] + [(long_ids[:cut], chunked)])
    np.testing.assert_array_equal(first[0], decoding[0][2][0])
    decoding[0][0].length -= 1                  # redo that decode step in the next pass
    mixed = model.forward_batch([([d[1]], d[0]) for d in decoding] + [(long_ids[cut:], chunked)])
    np.testing.assert_array_equal(mixed, np.concatenate([d[2] for d in decoding] + [cold]))
    single = model.new_cache()
    model.forward(long_ids, single)
    S = len(long_ids)
    np.testing.assert_array_equal(chunked.k[:, :, :S], single.k[:, :, :S])
    with pytest.raises(ValueError, match="same cache"):
        model.forward_batch([([1], chunked), ([2], chunked)])


def test_a_mixed_pass_gives_every_row_of_the_segments_asked_for(checkpoint):
    """forward_batch(all_logits=...): a drafting sequence's verify rows beside another's decode row and a
    prompt chunk are bitwise the one-token passes and the chunk's last row alone."""
    model = llorch.load(checkpoint("odd"))
    prompt, drafts, other = enc.encode(PROMPTS[0]), enc.encode(" the same words again"), enc.encode(PROMPTS[1])
    verifying, decoding, alone, other_alone = (model.new_cache() for _ in range(4))
    for cache, ids in ((verifying, prompt), (alone, prompt), (decoding, other), (other_alone, other)):
        model.forward(ids, cache, logits="last")
    one_by_one = np.concatenate([model.decode_batch([token], [alone]) for token in drafts])
    decode_row = model.decode_batch([7], [other_alone])
    chunk_last = model.forward(prompt[:9], model.new_cache(), logits="last")
    rows = model.forward_batch([(drafts, verifying), ([7], decoding), (prompt[:9], model.new_cache())],
                               all_logits={0, 1})
    np.testing.assert_array_equal(rows, np.concatenate([one_by_one, decode_row, chunk_last]))
    assert verifying.length == len(prompt) + len(drafts)
