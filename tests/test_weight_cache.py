"""llorch.weight_cache: a later load maps the prepared weights the first one wrote, and never stale ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

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


class _FailingAfterOne(dict):
    """Tensors whose second one raises as the writer reaches it: an interrupt in the middle of a write."""

    def __init__(self, tensors, error):
        super().__init__(tensors)
        self.error = error

    def values(self):
        first, *_ = super().values()
        yield first
        raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("injected"), OSError(28, "No space left")])
def test_an_interrupted_write_leaves_no_file(cache_dir, error):
    tensors = {"a": np.ones(1 << 16, np.float32), "b": np.ones(4, np.float32)}
    target = str(cache_dir / "0123456789abcdef-0123456789abcdef.safetensors")
    if isinstance(error, OSError):    # best effort: swallowed
        weight_cache.write(target, _FailingAfterOne(tensors, error))
    else:
        with pytest.raises(type(error)):
            weight_cache.write(target, _FailingAfterOne(tensors, error))
    assert cached_files(cache_dir) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_partials_are_swept_and_live_writers_kept(checkpoint, cache_dir):
    cache_dir.mkdir()
    age = weight_cache.STALE_PARTIAL_SECONDS + 60
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            partials = {
                f"writer-{dead_pid()}-dead.partial": "swept",            # its writer was killed
                f"writer-{live.pid}-live.partial": "kept",               # being written right now
                f"writer-{live.pid}-idle.partial": "swept",              # a reused pid: no write for too long
                "tmpk3j4l5.partial": "swept",                            # unnamed writer, idle too long
                "tmp0a1b2c.partial": "kept",                             # unnamed writer, just written
            }
            for name, fate in partials.items():
                (cache_dir / name).write_bytes(b"\0" * 64)
                if name.endswith(("idle.partial", "tmpk3j4l5.partial")):
                    os.utime(cache_dir / name, (time.time() - age, time.time() - age))
            llorch.load(checkpoint("tiny"))
        finally:
            live.kill()
    left = cached_files(cache_dir)
    assert sorted(n for n in left if n.endswith(".partial")) == sorted(n for n, f in partials.items() if f == "kept")
    assert sum(n.endswith(".safetensors") for n in left) == 1


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


def mapped(path: str) -> bool:
    return llorch.weights.mapped_file(llorch.load(path).weights.wte) is not None


def test_the_cache_keeps_within_its_limit_by_evicting_the_least_recently_used(tmp_path, cache_dir, monkeypatch):
    paths = [make_checkpoint(tmp_path / name, "tiny", seed=seed) for seed, name in enumerate("abc")]
    llorch.load(paths[0])
    [first] = cached_files(cache_dir)
    one_file = (cache_dir / first).stat().st_size
    monkeypatch.setenv("LLORCH_CACHE_MAX_GB", str(2.5 * one_file / 1e9))   # room for two
    llorch.load(paths[1])
    assert mapped(paths[0])                       # a read: a is now used more recently than b
    llorch.load(paths[2])                         # the third file evicts b, the least recently used
    assert len(cached_files(cache_dir)) == 2
    assert mapped(paths[0]) and mapped(paths[2])
    assert not mapped(paths[1])                   # b is prepared again (and cached, evicting a)


def test_a_checkpoint_larger_than_the_limit_is_not_cached_and_evicts_nothing(tmp_path, cache_dir, monkeypatch):
    small = make_checkpoint(tmp_path / "small", "tiny", seed=1)
    llorch.load(small)
    size = (cache_dir / cached_files(cache_dir)[0]).stat().st_size
    monkeypatch.setenv("LLORCH_CACHE_MAX_GB", str(1.5 * size / 1e9))
    large = make_checkpoint(tmp_path / "large", "odd", seed=1)   # its prepared weights exceed 1.5 tiny ones
    want = logits(llorch.load(large))
    np.testing.assert_array_equal(logits(llorch.load(large)), want)
    assert not mapped(large)
    assert mapped(small)


def test_no_cache_file_is_written_that_would_leave_the_disk_short(checkpoint, cache_dir, monkeypatch):
    llorch.load(checkpoint("odd"))
    before = cached_files(cache_dir)
    # Even with every cached file evicted, any new file would leave less than this free.
    reserve = shutil.disk_usage(cache_dir).free + sum((cache_dir / name).stat().st_size for name in before)
    monkeypatch.setattr(weight_cache, "DISK_RESERVE_BYTES", reserve)
    path = checkpoint("tiny")
    assert not mapped(path) and not mapped(path)
    assert cached_files(cache_dir) == before      # nothing evicted for a write that could not happen


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_malformed_cache_limit_is_a_clear_error(checkpoint, cache_dir, monkeypatch, value):
    monkeypatch.setenv("LLORCH_CACHE_MAX_GB", value)
    with pytest.raises(llorch.CheckpointError, match="LLORCH_CACHE_MAX_GB"):
        llorch.load(checkpoint("tiny"))


def test_eviction_removes_only_the_cache_own_files(tmp_path, cache_dir, monkeypatch):
    """LLORCH_CACHE_DIR may point at a directory holding other files, a user's checkpoint among them."""
    cache_dir.mkdir()
    foreign = cache_dir / "model.safetensors"
    foreign.write_bytes(b"\0" * 4096)
    os.utime(foreign, (0, 0))                     # older than any cache file
    first = make_checkpoint(tmp_path / "a", "tiny", seed=1)
    llorch.load(first)
    one_file = max(f.stat().st_size for f in cache_dir.iterdir())
    monkeypatch.setenv("LLORCH_CACHE_MAX_GB", str(1.5 * one_file / 1e9))   # room for one cache file
    second = make_checkpoint(tmp_path / "b", "tiny", seed=2)
    llorch.load(second)
    assert mapped(second) and not mapped(first) and foreign.read_bytes() == b"\0" * 4096


def test_an_infinite_cache_limit_means_no_limit(checkpoint, cache_dir, monkeypatch):
    monkeypatch.setenv("LLORCH_CACHE_MAX_GB", "inf")
    path = checkpoint("tiny")
    llorch.load(path)
    assert mapped(path)
