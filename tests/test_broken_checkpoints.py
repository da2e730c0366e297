"""A corpus of broken checkpoints: each is refused with a CheckpointError whose message names the problem.

Each case starts from a good tiny checkpoint and breaks one thing: the safetensors bytes, its header,
the tensors, or config.json. Extra tensors the model does not use only warn.
"""

import json
import os
import shutil
import struct
import warnings

import numpy as np
import pytest

import llorch
import llorch.checkpoint
from test_cli import run_cli
from test_model import logits_of


@pytest.fixture(scope="module")
def good(checkpoint):
    return checkpoint("tiny")


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path, header, data):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(directory, change):
    path = os.path.join(directory, "model.safetensors")
    header, data = read_safetensors(path)
    change(header)
    write_safetensors(path, header, data)


def edit_tensor(directory, name, change):
    """Overwrite the F32 bytes of one tensor in place with change(array)."""
    path = os.path.join(directory, "model.safetensors")
    header, data = read_safetensors(path)
    begin, end = header[name]["data_offsets"]
    values = np.frombuffer(data[begin:end], dtype=np.float32).copy()
    change(values)
    write_safetensors(path, header, data[:begin] + values.tobytes() + data[end:])


def put_tensor(directory, name, values, dtype="F32"):
    """Add (or replace) tensor `name`, its bytes appended after the existing data."""
    path = os.path.join(directory, "model.safetensors")
    header, data = read_safetensors(path)
    header[name] = {"dtype": dtype, "shape": list(values.shape), "data_offsets": [len(data), len(data) + values.nbytes]}
    write_safetensors(path, header, data + values.tobytes())


def edit_config(directory, change):
    path = os.path.join(directory, "config.json")
    config = json.load(open(path))
    change(config)
    json.dump(config, open(path, "w"))


def write_bytes(directory, name, content):
    with open(os.path.join(directory, name), "wb") as f:
        f.write(content)


def truncate_weights(directory, keep):
    path = os.path.join(directory, "model.safetensors")
    content = open(path, "rb").read()
    write_bytes(directory, "model.safetensors", content[:keep if keep >= 0 else len(content) + keep])


def set_entry(name, **fields):
    return lambda header: header[name].update(fields)


def overlap(header):
    a, b = header["h.0.ln_1.weight"], header["h.0.ln_1.bias"]
    b["data_offsets"] = a["data_offsets"]


def remove(*names):
    def change(d):
        for n in names:
            d.pop(n)
    return change


BROKEN = {
    # the safetensors container
    "truncated data": (lambda d: truncate_weights(d, -1000), "out of range"),
    "shorter than its header length field": (lambda d: truncate_weights(d, 5), "truncated"),
    "header length beyond the file": (lambda d: truncate_weights(d, 40), "exceeds the file size"),
    "header not JSON": (lambda d: write_bytes(d, "model.safetensors", struct.pack("<Q", 4) + b"{nope"),
                        "not JSON"),
    "header not an object": (lambda d: write_bytes(d, "model.safetensors", struct.pack("<Q", 2) + b"[]"),
                             "not a JSON object"),
    "entry without offsets": (lambda d: edit_header(d, lambda h: h["wte.weight"].pop("data_offsets")),
                              "lacks dtype/shape/data_offsets"),
    "offsets out of range": (lambda d: edit_header(d, set_entry("ln_f.bias", data_offsets=[0, 10 ** 12])),
                             "out of range"),
    "overlapping tensors": (lambda d: edit_header(d, overlap), "overlap"),
    "byte count not matching shape": (lambda d: edit_header(d, set_entry("ln_f.bias", shape=[3])),
                                      "do not match shape"),
    "unknown dtype": (lambda d: edit_header(d, set_entry("ln_f.bias", dtype="F99")), "unknown dtype"),
    "float64 weights": (lambda d: put_tensor(d, "h.0.ln_1.bias", np.zeros(64), "F64"), "dtype F64"),
    "int8 weights": (lambda d: put_tensor(d, "ln_f.bias", np.zeros(64, np.int8), "I8"), "dtype I8"),
    "negative shape": (lambda d: edit_header(d, set_entry("ln_f.bias", shape=[-64])), "malformed shape"),
    # the tensors against config.json
    "missing tensor": (lambda d: edit_header(d, remove("h.1.mlp.c_fc.weight")), "missing tensor"),
    "shape inconsistent with config": (lambda d: edit_config(d, lambda c: c.update(n_positions=256)),
                                       "has shape"),
    "NaN in weights": (lambda d: edit_tensor(d, "h.0.attn.c_attn.weight", lambda v: v.__setitem__(7, np.nan)),
                       "NaN or Inf"),
    "Inf in weights": (lambda d: edit_tensor(d, "wpe.weight", lambda v: v.__setitem__(0, np.inf)),
                       "NaN or Inf"),
    # config.json
    "config missing": (lambda d: os.remove(os.path.join(d, "config.json")), "config.json not found"),
    "config not JSON": (lambda d: write_bytes(d, "config.json", b"{'n_layer': 2"), "not valid JSON"),
    "config missing fields": (lambda d: edit_config(d, remove("n_head", "n_embd")), "missing field"),
    "n_head not dividing n_embd": (lambda d: edit_config(d, lambda c: c.update(n_head=5)), "must divide"),
    "zero layers": (lambda d: edit_config(d, lambda c: c.update(n_layer=0)), "n_layer must be a positive"),
    "n_positions 0": (lambda d: edit_config(d, lambda c: c.update(n_positions=0)), "n_positions must be"),
    "width as a string": (lambda d: edit_config(d, lambda c: c.update(n_embd="64")), "n_embd must be"),
    "not GPT-2's GELU": (lambda d: edit_config(d, lambda c: c.update(activation_function="relu")),
                         "activation_function 'relu' is not supported"),
    "MLP not 4 * n_embd wide": (lambda d: edit_config(d, lambda c: c.update(n_inner=100)),
                                "n_inner 100 is not supported"),
    "attention scores not scaled": (lambda d: edit_config(d, lambda c: c.update(scale_attn_weights=False)),
                                    "scale_attn_weights False is not supported"),
    # one tensor under two of its names
    "wte under two names, different": (lambda d: put_tensor(d, "transformer.wte.weight",
                                                            np.ones((50257, 64), np.float32)),
                                       "'wte.weight' and 'transformer.wte.weight' are the same GPT-2 tensor "
                                       "with different contents"),
    # the directory
    "no weights": (lambda d: os.remove(os.path.join(d, "model.safetensors")), "no model.safetensors"),
    "only a PyTorch .bin": (lambda d: os.rename(os.path.join(d, "model.safetensors"),
                                                os.path.join(d, "pytorch_model.bin")), "convert it to safetensors"),
}


@pytest.fixture(params=sorted(BROKEN))
def broken(request, good, tmp_path):
    """(directory, expected message) of one broken copy of the good checkpoint."""
    breaks, message = BROKEN[request.param]
    directory = str(tmp_path / "model")
    shutil.copytree(good, directory)
    breaks(directory)
    return directory, message


def test_broken_checkpoint_is_refused_with_a_clear_message(broken):
    directory, message = broken
    with pytest.raises(llorch.CheckpointError) as refused:
        llorch.load(directory)
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_llorch_run_exits_2_on_a_broken_checkpoint(broken):
    directory, message = broken
    code, out, err = run_cli("-m", directory, "-p", "Hello", "-n", "2")
    assert code == 2 and out == ""
    assert err.startswith("llorch-run: error:") and message in err and err.count("\n") == 1


def test_untied_lm_head_is_named(good, tmp_path):
    directory = str(tmp_path / "model")
    shutil.copytree(good, directory)
    header, _ = read_safetensors(os.path.join(directory, "model.safetensors"))
    wte_shape = header["wte.weight"]["shape"]
    put_tensor(directory, "lm_head.weight", np.ones(wte_shape, np.float32))
    with pytest.raises(llorch.CheckpointError, match="lm_head.weight differs from wte.weight"):
        llorch.load(directory)


def test_a_tensor_under_two_names_with_the_same_bytes_loads(good, tmp_path):
    """Either copy gives the same model, so nothing is ambiguous."""
    directory = str(tmp_path / "model")
    shutil.copytree(good, directory)
    header, data = read_safetensors(os.path.join(directory, "model.safetensors"))
    begin, end = header["h.1.attn.c_proj.weight"]["data_offsets"]
    put_tensor(directory, "transformer.h.1.attn.c_proj.weight",
               np.frombuffer(data[begin:end], np.float32).reshape(header["h.1.attn.c_proj.weight"]["shape"]))
    prompt = [15496, 11, 314]
    np.testing.assert_array_equal(logits_of(llorch.load(directory), prompt), logits_of(llorch.load(good), prompt))


def test_a_tensor_under_two_names_in_two_shards_is_refused(good, tmp_path):
    directory = str(tmp_path / "model")
    shutil.copytree(good, directory)
    os.rename(os.path.join(directory, "model.safetensors"), os.path.join(directory, "a.safetensors"))
    header = {"transformer.ln_f.bias": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}
    write_safetensors(os.path.join(directory, "b.safetensors"), header, np.full(64, 0.5, np.float32).tobytes())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"ln_f.bias": "a.safetensors", "transformer.ln_f.bias": "b.safetensors"}}, f)
    with pytest.raises(llorch.CheckpointError, match="a.safetensors and .*b.safetensors: tensors 'ln_f.bias' "
                                                     "and 'transformer.ln_f.bias'"):
        llorch.load(directory)


def test_unknown_extra_tensors_warn_but_load(good, tmp_path):
    directory = str(tmp_path / "model")
    shutil.copytree(good, directory)
    put_tensor(directory, "extra.adapter", np.ones(8, np.float32))
    with pytest.warns(UserWarning, match="extra.adapter"):
        llorch.load(directory)


def test_hf_causal_mask_buffers_are_ignored_silently(good, tmp_path):
    directory = str(tmp_path / "model")
    shutil.copytree(good, directory)
    put_tensor(directory, "h.0.attn.bias", np.tril(np.ones((1, 1, 128, 128), np.float32)))
    put_tensor(directory, "h.0.attn.masked_bias", np.array(-1e4, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llorch.load(directory)


def test_permission_denied_is_reported(good, monkeypatch):
    # root ignores file modes, so deny the open itself
    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(llorch.checkpoint, "open", deny, raising=False)
    with pytest.raises(llorch.CheckpointError, match="permission denied"):
        llorch.load(good)


def test_the_corpus_has_at_least_twenty_cases():
    assert len(BROKEN) >= 20
