"""llorch.config.CONFIG_FIELDS against transformers: every GPT2Config field is honoured, refused or irrelevant.

The checkpoints here are made by transformers itself (GPT2LMHeadModel(GPT2Config(..., field=value)) and
save_pretrained), so an option that changes the tensors (n_inner, add_cross_attention, untied lm_head) has
them. Each field gets non-default probe values:
  honoured:   accepted values give HF's logits (within the parity tolerance) and HF's greedy tokens;
              any other value is refused;
  refused:    a non-default value raises one-line CheckpointError naming the field and the value;
  irrelevant: all of them at once load, give bitwise the logits of the default checkpoint, and HF's.
The table must know every field of GPT2Config().to_dict() and every config attribute modeling_gpt2.py reads,
so a field a new transformers adds fails here until it is classified.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from transformers.models.gpt2 import modeling_gpt2

import llorch
from llorch.config import CONFIG_FIELDS
from llorch.references.hf import hf_greedy, load_hf
from test_model import logits_of

torch.set_num_threads(2)
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)
PROMPT = llorch.tokenizer().encode("Hello, I'm a language model,")
N_GREEDY = 16

# Non-default values of each field; which of them load is the table's business, proven below.
PROBES: dict[str, list] = {
    "n_layer": [3], "n_embd": [96], "n_head": [2], "n_positions": [64], "vocab_size": [50304],
    "layer_norm_epsilon": [1e-3],
    "n_inner": [256, 100],
    "activation_function": ["gelu_pytorch_tanh", "gelu_fast", "gelu", "relu"],
    "reorder_and_upcast_attn": [True],
    "scale_attn_weights": [False],
    "scale_attn_by_inverse_layer_idx": [True],
    "add_cross_attention": [True],
    "tie_word_embeddings": [False],
    "eos_token_id": [0, None],
    "is_encoder_decoder": [True],
    "model_type": ["gpt_neo"],
    "bos_token_id": [0], "pad_token_id": [0],
    "embd_pdrop": [0.5], "attn_pdrop": [0.5], "resid_pdrop": [0.5],
    "initializer_range": [1.0], "use_cache": [False], "_attn_implementation": ["sdpa"], "dtype": ["float16"],
    "chunk_size_feed_forward": [4], "output_hidden_states": [True], "output_attentions": [True],
    "return_dict": [False], "architectures": [["GPT2Model"]], "transformers_version": ["4.0.0"],
    "_name_or_path": ["somewhere"], "id2label": [{"0": "A", "1": "B", "2": "C"}],
    "label2id": [{"A": 0, "B": 1, "C": 2}], "num_labels": [3], "problem_type": ["regression"],
    "classifier_dropout": [0.5], "hidden_dropout": [0.5], "summary_type": ["last"],
    "summary_use_proj": [False], "summary_activation": ["tanh"], "summary_proj_to_labels": [False],
    "summary_first_dropout": [0.5], "summary_last_dropout": [0.5],
}
# Fields whose value changes the tensors transformers makes: the probe's checkpoint is built with it.
SHAPING = {"n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "n_inner", "add_cross_attention",
           "tie_word_embeddings"}


def hf_fields() -> set[str]:
    """GPT2Config's fields and the config attributes the GPT-2 model code reads (HF's aliases resolved)."""
    aliases = transformers.GPT2Config.attribute_map
    read = set(re.findall(r"config\.(\w+)", inspect.getsource(modeling_gpt2)))
    return set(transformers.GPT2Config().to_dict()) | {aliases.get(name, name) for name in read}


def hf_checkpoint(directory, **fields) -> str:
    """A tiny GPT-2 made and saved by transformers; SHAPING fields go to its constructor, the others are
    written into its config.json (where both llorch and from_pretrained read them). HF's initialisation
    zeroes the biases and sets the layer norms to 1, so every parameter gets seeded noise on top."""
    shaping = {k: v for k, v in fields.items() if k in SHAPING}
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**(TINY | shaping)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(directory)
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config | fields, f)
    return os.fspath(directory)


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("hf-default"))


def assert_matches_hf(path: str, greedy: bool = True) -> np.ndarray:
    ours = logits_of(llorch.load(path), PROMPT)
    hf = load_hf(path)
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT]), return_dict=True).logits[0].numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()
    if greedy:
        ids = list(llorch.generate(llorch.load(path), PROMPT, N_GREEDY))
        assert ids == hf_greedy(hf, PROMPT, N_GREEDY, llorch.EOT_TOKEN)
    return ours


def test_the_table_knows_every_field_transformers_has():
    unknown = hf_fields() - CONFIG_FIELDS.keys()
    assert not unknown, f"classify these GPT2Config fields in llorch.config.CONFIG_FIELDS: {sorted(unknown)}"
    assert PROBES.keys() == CONFIG_FIELDS.keys()
    assert {f.status for f in CONFIG_FIELDS.values()} == {"honoured", "refused", "irrelevant"}


def test_every_default_value_loads(tmp_path, default_checkpoint):
    """config.json holding every GPT2Config field at its default, as transformers writes it."""
    directory = shutil.copytree(default_checkpoint, tmp_path / "model")
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(transformers.GPT2Config(**TINY).to_dict(), f)
    assert_matches_hf(str(directory))


CASES = [(name, value) for name, values in PROBES.items() for value in values
         if CONFIG_FIELDS[name].status != "irrelevant"]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v}" for n, v in CASES])
def test_an_honoured_value_matches_hf_and_any_other_is_refused(tmp_path, name, value):
    path = hf_checkpoint(tmp_path / "model", **{name: value})
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        accepted = CONFIG_FIELDS[name].allows(value, json.load(f))
    if accepted:
        assert CONFIG_FIELDS[name].status == "honoured"
        assert_matches_hf(path, greedy=name != "vocab_size")   # padded vocabularies: issue 14, item 2
        return
    with pytest.raises(llorch.CheckpointError) as refused:
        llorch.load(path)
    message = str(refused.value)
    assert f"{name} {value!r}" in message and "\n" not in message


IRRELEVANT = {name: PROBES[name][0] for name, field in CONFIG_FIELDS.items() if field.status == "irrelevant"}
ALONE = {"_attn_implementation": "HF refuses sdpa together with output_attentions",
         "return_dict": "transformers 5's own GPT2LMHeadModel.forward fails with return_dict=False"}
GROUPS = {"together": sorted(IRRELEVANT.keys() - ALONE.keys())} | {name: [name] for name in ALONE}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_irrelevant_fields_change_nothing_in_llorch_or_hf(tmp_path, default_checkpoint, group):
    path = hf_checkpoint(tmp_path / "model", **{name: IRRELEVANT[name] for name in GROUPS[group]})
    if group == "return_dict":
        ours = logits_of(llorch.load(path), PROMPT)
    else:
        ours = assert_matches_hf(path)
    np.testing.assert_array_equal(ours, logits_of(llorch.load(default_checkpoint), PROMPT))


def test_the_refused_options_do_change_hf_output(tmp_path, default_checkpoint):
    """The refusals are not idle: each refused option that keeps the tensors changes HF's logits."""
    with torch.no_grad():
        default = load_hf(default_checkpoint)(torch.tensor([PROMPT]), return_dict=True).logits
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            changed = load_hf(hf_checkpoint(tmp_path / name, **{name: PROBES[name][0]}))
            assert not torch.allclose(changed(torch.tensor([PROMPT])).logits, default, atol=1e-3), name


def test_the_n_inner_refusal_names_the_configs_width(tmp_path):
    path = hf_checkpoint(tmp_path / "model", n_inner=100)
    with pytest.raises(llorch.CheckpointError, match=r"n_inner 100 is not supported: .*4 \* n_embd"):
        llorch.load(path)
