"""llorch's model against HF transformers end to end: greedy generation, logits, loading variants, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import llorch
from llorch.sampling import Sampler
from llorch.testing import TRAINED_PROMPTS
from llorch.trace import CHECKPOINTS, Tracer, expected_shape
from reference.hf import hf_greedy, load_hf

torch.set_num_threads(2)
enc = llorch.tokenizer()
PROMPTS = ["Hello.", "Hello, I'm a language model,", "The quick brown fox", "In 1905, Einstein",
           "def fibonacci(n):\n    "]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("shape", ["gpt2", "gpt2-medium"])
def test_greedy_generation_equals_hf(checkpoint, shape):
    path = checkpoint(shape)
    model, hf = llorch.load(path), load_hf(path)
    for prompt in PROMPTS:
        ids = enc.encode(prompt)
        ours = list(model.generate(ids, 64))
        assert ours == hf_greedy(hf, ids, 64, llorch.EOT_TOKEN), prompt


@pytest.mark.parametrize("shape", ["tiny", "gpt2", "distilgpt2", "odd", "head80"])
def test_all_logits_match_hf(checkpoint, shape):
    path = checkpoint(shape)
    ids = enc.encode("Hello, I'm a language model, not a")
    ours, ref = llorch.load(path).forward(ids), hf_logits(load_hf(path), ids)
    assert ours.shape == ref.shape == (len(ids), 50257)
    assert np.abs(ours - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_kv_cache_decoding_equals_recomputing(checkpoint):
    model = llorch.load(checkpoint("gpt2"))
    ids = enc.encode("Hello, I'm a language model,")
    generated = list(model.generate(ids, 8))
    full = ids + generated
    recomputed = model.forward(full)                     # every position at once, from scratch
    model.reset()
    incremental = [model.forward(ids)]
    for pos, token in enumerate(generated, start=len(ids)):
        incremental.append(model.forward([token], start_pos=pos))
    incremental = np.concatenate(incremental)
    assert incremental.shape == recomputed.shape
    assert np.abs(incremental - recomputed).max() <= 1e-5 * np.abs(recomputed).max()


def test_last_logits_is_the_last_row_of_all(checkpoint):
    model = llorch.load(checkpoint("tiny"))
    ids = enc.encode("Hello there")
    all_rows = model.forward(ids, logits="all")
    model.reset()
    last = model.forward(ids, logits="last")
    assert last.shape == (1, 50257)
    np.testing.assert_array_equal(last[0], all_rows[-1])


def test_a_long_prompt_in_several_passes_is_bitwise_one_pass(checkpoint, monkeypatch):
    """forward runs a prompt longer than PREFILL_ROWS in several passes; a traced forward is one pass."""
    model = llorch.load(checkpoint("tiny"))
    monkeypatch.setattr(llorch.model, "PREFILL_ROWS", 16)   # tiny's context is 128 positions
    ids = np.random.default_rng(0).integers(0, 50257, 2 * 16 + 5)
    passes = model.forward(ids, logits="all")
    model.reset()
    one_pass = model.forward(ids, logits="all", tracer=Tracer())
    assert passes.shape == (ids.size, 50257)
    np.testing.assert_array_equal(passes, one_pass)
    model.reset()
    np.testing.assert_array_equal(model.forward(ids, logits="last")[0], one_pass[-1])


def test_trace_reports_every_checkpoint_with_the_table_shapes(checkpoint):
    model = llorch.load(checkpoint("odd"))
    cfg = model.config
    tracer = Tracer()
    prompt = enc.encode("Hello.")
    list(model.generate(prompt, 3, tracer=tracer))
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
    ours, ref = llorch.load(path).forward(ids), hf_logits(load_hf(path), ids)
    assert np.abs(ours - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_load_a_safetensors_file_beside_its_config(checkpoint):
    path = checkpoint("tiny")
    ids = enc.encode("Hi")
    np.testing.assert_array_equal(llorch.load(os.path.join(path, "model.safetensors")).forward(ids),
                                  llorch.load(path).forward(ids))


def test_context_is_never_silently_truncated(checkpoint):
    model = llorch.load(checkpoint("tiny"))          # 128 positions
    with pytest.raises(llorch.ContextError, match="exceeds the context of 128"):
        model.generate([1] * 100, 29)
    assert len(list(model.generate([1] * 100, 28))) == 28
    with pytest.raises(llorch.ContextError):
        model.forward([1] * 129)
    model.reset()
    with pytest.raises(ValueError, match="start_pos 5"):
        model.forward([1], start_pos=5)        # nothing cached yet: positions 0..4 would be garbage
    for bad in ([], [50257], [-1], [[1, 2]], [1.5]):
        with pytest.raises(ValueError):
            model.forward(bad)


def test_sampling_is_seeded_and_respects_top_k_and_top_p(checkpoint):
    model = llorch.load(checkpoint("tiny"))
    ids = enc.encode("Hello")
    greedy = list(model.generate(ids, 12))
    sampled = list(model.generate(ids, 12, temperature=1.0, seed=7))
    assert sampled == list(model.generate(ids, 12, temperature=1.0, seed=7))
    assert sampled != list(model.generate(ids, 12, temperature=1.0, seed=8))
    assert list(model.generate(ids, 12, temperature=0.8, top_k=1, seed=3)) == greedy
    assert list(model.generate(ids, 12, temperature=0.8, top_p=1e-9, seed=3)) == greedy
    logits = model.forward(ids)[-1]
    top2 = set(np.argsort(-logits)[:2].tolist())
    sampler = Sampler(temperature=5.0, top_k=2, seed=0)
    assert {sampler(logits) for _ in range(200)} == top2


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_options_are_refused(checkpoint, kwargs):
    with pytest.raises(ValueError):
        llorch.load(checkpoint("tiny")).generate([1], 4, **kwargs)


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
    script = ("import re, llorch, llorch.model as M; m = llorch.load(%r); list(m.generate([15496, 13], 8)); "
              "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
              "print(m.weight_bytes, int(peak) * 1024, int(M._mapping(m.wte) is not None))" % path)
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
        token = int(np.argmax(model.forward(ids, cache=cache, logits="last")))
        alone.append(model.forward([token], start_pos=len(ids), cache=cache, logits="last"))
        cache.length = len(ids)                 # rewind that decode step, to redo it batched
        caches.append(cache)
        tokens.append(token)
    np.testing.assert_array_equal(model.decode_batch(tokens, caches), np.concatenate(alone))


def test_the_trained_model_greedy_equals_hf_and_is_varied(trained_checkpoint):
    """Greedy text of a trained model: many distinct ids with clear top-1 margins, unlike a random model's."""
    model, hf = llorch.load(trained_checkpoint), load_hf(trained_checkpoint)
    for prompt in TRAINED_PROMPTS:
        ids = enc.encode(prompt)
        ours = list(model.generate(ids, 64))
        assert len(set(ours)) >= 20, (prompt, enc.decode(ours))
        assert ours == hf_greedy(hf, ids, 64, llorch.EOT_TOKEN), prompt
        ids += ours
        logits, ref = llorch.load(trained_checkpoint).forward(ids, logits="all"), hf_logits(hf, ids)
        assert np.abs(logits - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
