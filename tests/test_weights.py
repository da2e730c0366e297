"""llorch.weights: a checkpoint's tensors prepared for the forward pass (matrices and wte packed, pages released)."""

import numpy as np
import pytest

from llorch import _kernels as K
from llorch.checkpoint import BLOCK_TENSORS, SafetensorsFile, expected_shapes, load_weights, resolve_weight_files
from llorch.config import GPT2Config
from llorch.weights import PACKED, Block, Weights, attribute, mapped_file, pack_wte, prepared_shapes


def checkpoint_tensors(path: str) -> tuple[GPT2Config, dict[str, np.ndarray]]:
    config_path, files = resolve_weight_files(path)
    config = GPT2Config.from_json(config_path)
    return config, load_weights(files, config)


@pytest.fixture(scope="module")
def prepared(checkpoint):
    """(config, a fresh read of the checkpoint, Weights prepared from another read of it)."""
    path = checkpoint("odd")
    config, original = checkpoint_tensors(path)
    return config, original, Weights.prepare(checkpoint_tensors(path)[1], config)


def test_the_packed_matrices_compute_what_the_checkpoints_do(prepared):
    config, original, weights = prepared
    rng = np.random.default_rng(0)
    for i, block in enumerate(weights.blocks):
        for name in PACKED:
            matrix, bias = original[f"h.{i}.{name}"], original[f"h.{i}.{name.replace('weight', 'bias')}"]
            C, OC = matrix.shape
            expected = np.empty(matrix.size, np.float32)
            K.pack_linear(expected, matrix)
            np.testing.assert_array_equal(getattr(block, attribute(name)), expected, err_msg=f"h.{i}.{name}")
            x, out = rng.standard_normal((3, C), dtype=np.float32), np.empty((3, OC), np.float32)
            K.linear_packed(out, x, getattr(block, attribute(name)), bias)
            np.testing.assert_allclose(out, x.astype(np.float64) @ matrix + bias, rtol=1e-5, atol=1e-5)


def test_wte_is_packed_as_the_lm_head_and_everything_else_kept_as_read(prepared):
    config, original, weights = prepared
    tensors = weights.tensors()
    assert {name: t.shape for name, t in tensors.items()} == prepared_shapes(config)
    assert tensors.keys() == expected_shapes(config).keys()
    for name, value in tensors.items():
        if not name.endswith(PACKED) and name != "wte.weight":
            np.testing.assert_array_equal(value, original[name], err_msg=name)
    wte = original["wte.weight"]
    assert mapped_file(wte) is not None                       # a float32 checkpoint is read in place
    np.testing.assert_array_equal(weights.wte, pack_wte(wte))
    assert mapped_file(weights.wte) is None                   # the lm_head's matrix is this process's own
    x = np.random.default_rng(1).standard_normal((2, config.n_embd), dtype=np.float32)
    logits = np.empty((2, config.vocab_size), np.float32)
    K.linear_packed(logits, x, weights.wte, None)
    np.testing.assert_allclose(logits, x.astype(np.float64) @ wte.T, rtol=1e-5, atol=1e-5)
    assert weights.nbytes == sum(t.nbytes for t in original.values())


def test_releasing_the_mapped_pages_loses_no_data(checkpoint):
    """Preparing drops the checkpoint's pages from this process; reading the views again finds the file."""
    path = checkpoint("odd")
    config, views = checkpoint_tensors(path)
    copies = {name: np.array(view) for name, view in views.items()}
    Weights.prepare(views, config)
    for name, view in views.items():
        np.testing.assert_array_equal(view, copies[name], err_msg=name)


def test_prepared_tensors_make_the_same_weights_again(prepared):
    config, _, weights = prepared
    again = Weights.from_prepared(weights.tensors(), config)
    assert all(a is b for a, b in zip(again.tensors().values(), weights.tensors().values()))


def test_a_block_has_one_attribute_per_block_tensor(prepared):
    config, original, weights = prepared
    assert set(Block.__slots__) == {attribute(name) for name in BLOCK_TENSORS}
    assert attribute("attn.c_attn.weight") == "attn_c_attn_weight"
    assert weights.blocks[1].ln_2_bias is weights.tensors()["h.1.ln_2.bias"]
    np.testing.assert_array_equal(weights.blocks[1].ln_2_bias, original["h.1.ln_2.bias"])
