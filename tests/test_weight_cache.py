"""llorch.weight_cache: a later load maps the prepared weights the first one wrote, and never stale ones."""

from __future__ import annotations

import os

import numpy as np
import pytest

import llorch
import llorch.weights
from llorch import _kernels as K
from llorch import weight_cache
from llorch.testing import make_checkpoint

PROMPT = [15496, 11, 314, 1101, 257]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("LLORCH_CACHE_DIR", str(directory))
    return directory


def cached_files(directory) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def logits(model) -> np.ndarray:
    return model.forward(PROMPT, model.new_cache(), logits="all")


def test_a_second_load_maps_the_cache_and_computes_the_same_bits(checkpoint, cache_dir):
    path = checkpoint("odd")
    first = llorch.load(path)
    assert llorch.weights.mapped_file(first.weights.wte) is None         # prepared in this process's memory
    assert [f.endswith(".safetensors") for f in cached_files(cache_dir)] == [True]
    second = llorch.load(path)
    assert llorch.weights.mapped_file(second.weights.wte) is not None    # mapped from the cache file
    np.testing.assert_array_equal(logits(second), logits(first))
    assert len(cached_files(cache_dir)) == 1


def test_a_rewritten_checkpoint_is_never_served_from_the_cache(tmp_path, cache_dir):
    path = make_checkpoint(tmp_path / "model", "tiny", seed=1)
    before = logits(llorch.load(path))
    make_checkpoint(tmp_path / "model", "tiny", seed=2)      # same names, shapes and size; new values
    after = llorch.load(path)
    assert llorch.weights.mapped_file(after.weights.wte) is None
    assert not np.array_equal(logits(after), before)
    np.testing.assert_array_equal(logits(llorch.load(path)), logits(after))
    assert len(cached_files(cache_dir)) == 1      # the earlier version's file is gone


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong shapes"])
def test_a_damaged_cache_file_is_replaced(tmp_path, cache_dir, damage):
    path = make_checkpoint(tmp_path / "model", "tiny", seed=3)
    want = logits(llorch.load(path))
    [name] = cached_files(cache_dir)
    cached = cache_dir / name
    if damage == "truncate":
        os.truncate(cached, cached.stat().st_size // 2)
    elif damage == "garbage":
        cached.write_bytes(b"\xff" * 64)
    else:   # a well-formed file of other tensors: another model's cache under this name
        llorch.load(make_checkpoint(tmp_path / "other", "odd", seed=3))
        [other] = [f for f in cached_files(cache_dir) if f != name]
        os.replace(cache_dir / other, cached)
    reloaded = llorch.load(path)
    assert llorch.weights.mapped_file(reloaded.weights.wte) is None       # prepared again ...
    np.testing.assert_array_equal(logits(reloaded), want)
    assert llorch.weights.mapped_file(llorch.load(path).weights.wte) is not None   # ... and cached again


def test_caching_off_writes_nothing(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LLORCH_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = llorch.load(checkpoint("tiny"))
    assert llorch.weights.mapped_file(model.weights.wte) is None
    assert os.listdir(tmp_path) == []


def test_an_unwritable_cache_directory_only_means_no_cache(checkpoint, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("LLORCH_CACHE_DIR", str(blocked / "cache"))
    want = logits(llorch.load(checkpoint("tiny")))
    np.testing.assert_array_equal(logits(llorch.load(checkpoint("tiny"))), want)
    assert blocked.read_text() == "not a directory"


def panels_in_numpy(width: int):
    """A packing function of the panel layout (spec: llorch.h) written in numpy, for any panel width."""
    def pack(packed, weight):
        packed[:] = np.concatenate([weight[:, p:p + width].ravel() for p in range(0, weight.shape[1], width)])
    return pack


def test_the_cache_key_follows_the_packing_layout():
    """The key's layout part is a fingerprint of what the packing makes, not a version to bump: the kernel
    and a numpy copy of its layout agree, another panel width or no packing at all gives another key."""
    ours = weight_cache.layout_fingerprint(K.pack_linear)
    assert weight_cache.layout_fingerprint(panels_in_numpy(K.PANEL)) == ours
    others = {weight_cache.layout_fingerprint(pack) for pack in (
        panels_in_numpy(K.PANEL // 2), panels_in_numpy(2 * K.PANEL), lambda packed, w: np.copyto(packed, w.ravel()))}
    assert len(others) == 3 and ours not in others


def test_the_first_load_reports_each_tensor_prepared_and_cached(checkpoint, cache_dir):
    path = checkpoint("odd")
    reports: list[tuple[str, int, int]] = []
    model = llorch.load(path, progress=lambda stage, done, total: reports.append((stage, done, total)))
    n_tensors, nbytes = len(model.weights.tensors()), model.weight_bytes
    for stage in ("preparing the weights", "caching the prepared weights"):
        done = [d for s, d, total in reports if s == stage and total == nbytes]
        assert len(done) == n_tensors and done == sorted(done) and done[-1] == nbytes, stage
    assert [stage for stage, _, _ in reports] == sorted(stage for stage, _, _ in reports)[::-1]   # preparing first
    reports.clear()
    np.testing.assert_array_equal(logits(llorch.load(path, progress=reports.append)), logits(model))
    assert reports == []   # a load from the cache is quick: nothing to report
