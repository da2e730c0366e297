"""llorch.testing: the seeded checkpoints are Hugging Face GPT-2 directories, byte-for-byte reproducible."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import llorch
from llorch.testing import SHAPES, TRAINED_SHAPE, hf_config, make_checkpoint, stdlib_corpus
from test_model import logits_of

_DATA = os.path.join(os.path.dirname(llorch.__file__), "data")


def _tensors(path: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors through the safetensors library (not our writer's own idea of the format)."""
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_gpt2_family_shapes():
    family = {name: (s.n_layer, s.n_embd, s.n_head, s.n_positions) for name, s in SHAPES.items()}
    assert family["gpt2"] == (12, 768, 12, 1024)
    assert family["gpt2-medium"] == (24, 1024, 16, 1024)
    assert family["gpt2-large"] == (36, 1280, 20, 1024)
    assert family["gpt2-xl"] == (48, 1600, 25, 1024)
    assert family["distilgpt2"] == (6, 768, 12, 1024)
    assert {s.vocab_size for s in SHAPES.values()} == {50257}
    odd = SHAPES["odd"]
    assert (odd.n_embd // odd.n_head) % 16 and odd.n_embd % 64  # SIMD tails in both


def test_same_arguments_same_bytes_and_the_seed_matters(tmp_path, checkpoint):
    again = make_checkpoint(tmp_path / "again", "tiny")
    assert filecmp.cmp(os.path.join(checkpoint("tiny"), "model.safetensors"),
                       os.path.join(again, "model.safetensors"), shallow=False)
    other = make_checkpoint(tmp_path / "other", "tiny", seed=1)
    assert not filecmp.cmp(os.path.join(again, "model.safetensors"),
                           os.path.join(other, "model.safetensors"), shallow=False)


def test_config_uses_hugging_face_field_names(checkpoint):
    with open(os.path.join(checkpoint("odd"), "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    odd = SHAPES["odd"]
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (odd.n_layer, odd.n_embd, odd.n_head)
    assert config["n_positions"] == config["n_ctx"] == odd.n_positions
    assert (config["vocab_size"], config["layer_norm_epsilon"]) == (50257, 1e-5)
    assert (config["activation_function"], config["tie_word_embeddings"]) == ("gelu_new", True)
    assert config["bos_token_id"] == config["eos_token_id"] == 50256


def test_tensor_names_and_conv1d_layouts(checkpoint):
    odd = SHAPES["odd"]
    C, L = odd.n_embd, odd.n_layer
    expected = {"wte.weight": (50257, C), "wpe.weight": (odd.n_positions, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(L):
        expected |= {f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
                     f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
                     f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
                     f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
                     f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
                     f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,)}
    tensors = _tensors(checkpoint("odd"))
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    biases = [t for name, t in tensors.items() if name.endswith(".bias")]
    assert all(bool(t.abs().min() > 0) for t in biases)  # biases are small but never all zero
    assert not torch.equal(tensors["h.0.ln_1.weight"], torch.ones(C))  # nor are the gains exactly 1


def test_prefixed_names_and_an_explicit_lm_head(checkpoint):
    plain = _tensors(checkpoint("tiny"))
    prefixed = _tensors(checkpoint("tiny", prefix=True, lm_head="present"))
    assert set(prefixed) == {"transformer." + name for name in plain} | {"lm_head.weight"}
    assert torch.equal(prefixed["lm_head.weight"], plain["wte.weight"])
    assert all(torch.equal(prefixed["transformer." + name], t) for name, t in plain.items())


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_storage_rounds_to_nearest(checkpoint, dtype, torch_dtype):
    full, half = _tensors(checkpoint("tiny")), _tensors(checkpoint("tiny", dtype=dtype))
    for name, values in full.items():
        assert half[name].dtype == torch_dtype
        assert torch.equal(half[name], values.to(torch_dtype)), name  # torch's round-to-nearest-even


def test_tokenizer_files_are_the_bundled_ones(checkpoint):
    path = checkpoint("tiny")
    assert filecmp.cmp(os.path.join(path, "vocab.json"), os.path.join(_DATA, "encoder.json"), shallow=False)
    assert filecmp.cmp(os.path.join(path, "merges.txt"), os.path.join(_DATA, "vocab.bpe"), shallow=False)


def test_outliers_reach_hundreds_while_normalised_activations_stay_small(reference_trace):
    trace = reference_trace("numpy64", "tiny", "outliers")
    stream = np.abs(trace.get("block_out", layer=1))
    assert stream.max() > 100 and np.median(stream) < 1
    assert (stream.max(axis=0) > 100).sum() == 4  # two pairs of outlier dimensions
    for name, layer in [("ln_1", 0), ("ln_2", 1), ("ln_f", None)]:
        assert np.abs(trace.get(name, layer=layer)).max() < 10, name


def test_big_ln_gains_and_biases(checkpoint):
    tensors = _tensors(checkpoint("tiny", variant="big_ln"))
    gains = torch.cat([t for name, t in tensors.items() if name.endswith("ln_1.weight") or name == "ln_f.weight"])
    assert 0.5 <= float(gains.min()) and float(gains.max()) <= 4.0 and float(gains.mean()) > 2.0
    assert float(tensors["ln_f.bias"].std()) > 0.3


@pytest.mark.parametrize("arguments", [dict(variant="trained"), dict(dtype="int8"), dict(lm_head="random")])
def test_bad_arguments_are_refused(tmp_path, arguments):
    with pytest.raises(ValueError):
        make_checkpoint(tmp_path, "tiny", **arguments)


def test_the_stdlib_corpus_is_the_sorted_top_level_modules():
    corpus = stdlib_corpus(200_000)
    names = [os.path.basename(p) for p in corpus]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert corpus == stdlib_corpus(200_000)
    sizes = [os.path.getsize(p) for p in corpus]
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)     # files are added until the budget is reached


def test_training_is_reproducible_and_writes_hugging_faces_layout(tmp_path):
    """A two-step training, twice: the same bytes; HF loads it and agrees with llorch."""
    from llorch.references.hf import load_hf
    runs = [subprocess.run([sys.executable, "-m", "llorch.testing", "train", str(tmp_path / run), "--steps", "2",
                            "--corpus-bytes", "20000"], capture_output=True, text=True, check=True)
            for run in ("a", "b")]
    summary = json.loads(runs[0].stdout)
    assert summary["steps"] == 2 and summary["parameters"] > 3_000_000 and "step 1/2: loss" in runs[0].stderr
    assert filecmp.cmp(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors", shallow=False)
    tensors = _tensors(str(tmp_path / "a"))
    assert {t.dtype for t in tensors.values()} == {torch.float16} and "lm_head.weight" not in tensors
    with open(tmp_path / "a" / "config.json", encoding="utf-8") as f:
        assert json.load(f) == hf_config(TRAINED_SHAPE)
    ids = [15496, 11, 314, 1101]
    with torch.no_grad():
        ref = load_hf(str(tmp_path / "a"))(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits_of(llorch.load(str(tmp_path / "a")), ids) - ref).max() <= 1e-4


def test_the_committed_trained_model_is_the_training_commands_shape(trained_checkpoint):
    with open(os.path.join(trained_checkpoint, "config.json"), encoding="utf-8") as f:
        assert json.load(f) == hf_config(TRAINED_SHAPE)
    assert {t.dtype for t in _tensors(trained_checkpoint).values()} == {torch.float16}
