"""A checkpoint's weights as the model holds them (packed), cached on disk so a later load maps them.

Preparing the weights at load (model.py: the four matrices of each block repacked, wte copied) writes
every byte into fresh memory, and on a VM that hands freed memory back to its host, faulting that memory
in again took 0.2-0.9 s for 124M. A later load instead maps this file and populates its pages from the
page cache in one call (~5 ms for 124M when cached); decode measured as fast from it.

The file is a safetensors file of float32 tensors under HF's names, the four matrices of each block
flattened in the packed layout. Where: $LLORCH_CACHE_DIR, else $XDG_CACHE_HOME/llorch, else
~/.cache/llorch; LLORCH_CACHE_DIR=off turns it off. A file's name is a hash of what it was made from
(each weight file's real path, size, inode, modification and change times, config.json's bytes, the packing
layout's fingerprint), so a changed checkpoint or a changed layout gets a new file; only a file rewritten in place to the same size within
one tick of the file system's clock could go unnoticed. The name starts with a hash of the files' paths
alone: writing a checkpoint's new cache file removes the one of its earlier version, so the cache holds
one file per checkpoint location. Files are written under a temporary name
and renamed; a cache that cannot be written only means the next load prepares the weights again.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable

import numpy as np

from . import _kernels as K
from .checkpoint import SafetensorsFile, write_safetensors
from .config import CheckpointError
from .weights import Progress

# A probe weight [C, OC] spanning two full panels and a narrower last one: any change to the packing
# (panel width, order within a panel, the ragged tail) moves some of its values.
_PROBE_SHAPE = (3, 2 * K.PANEL + 5)


def layout_fingerprint(pack: Callable[[np.ndarray, np.ndarray], None]) -> str:
    """A hash of what pack(packed, weight) makes of a fixed probe weight, and of its dtype: the cache key's
    part that changes whenever the packed layout does, with no version to bump by hand. (Which tensors are
    packed shows in their shapes, flat when packed, which read() checks.)"""
    weight = np.arange(np.prod(_PROBE_SHAPE), dtype=np.float32).reshape(_PROBE_SHAPE)
    packed = np.empty(weight.size, dtype=np.float32)
    pack(packed, weight)
    return hashlib.sha256(f"{packed.dtype.str} {packed.shape}\n".encode() + packed.tobytes()).hexdigest()[:16]


@functools.cache
def _layout() -> str:
    return layout_fingerprint(K.pack_linear)


def cache_dir() -> str | None:
    """The cache directory from the environment, or None when caching is off."""
    chosen = os.environ.get("LLORCH_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else chosen
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llorch")


def cache_file(config_path: str, weight_files: list[str]) -> str | None:
    """The cache file for this checkpoint (it may not exist yet), or None when caching is off."""
    directory = cache_dir()
    if directory is None:
        return None
    place = hashlib.sha256("\n".join(os.path.realpath(p) for p in [config_path, *weight_files]).encode())
    state = hashlib.sha256(f"llorch prepared weights, layout {_layout()}\n".encode())
    try:
        with open(config_path, "rb") as f:
            state.update(f.read())
        for path in weight_files:
            st = os.stat(path)
            state.update(f"\n{os.path.realpath(path)} {st.st_size} {st.st_ino} {st.st_mtime_ns} {st.st_ctime_ns}".encode())
    except OSError:   # the load itself reports a missing or unreadable file
        return None
    return os.path.join(directory, f"{place.hexdigest()[:16]}-{state.hexdigest()[:16]}.safetensors")


def read(path: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """The cached tensors, mapped read-only with their pages populated; None when the file is missing or does
    not hold exactly these float32 tensors (it is then rewritten by the load that prepares them)."""
    if not os.path.exists(path):
        return None
    try:
        cached = SafetensorsFile(path, populate=True)
    except CheckpointError:
        return None
    if cached.header.keys() != shapes.keys() or any(
            entry["dtype"] != "F32" or tuple(entry["shape"]) != shapes[name] for name, entry in cached.header.items()):
        return None
    return {name: cached.tensor(name) for name in shapes}


def write(path: str, tensors: dict[str, np.ndarray], progress: Progress | None = None) -> None:
    """Store tensors at path, best effort: any OS error (read-only directory, full disk) leaves no file.
    progress, if given, hears of each tensor written (stage "caching the prepared weights")."""
    total = sum(t.nbytes for t in tensors.values())
    written = None if progress is None else lambda done: progress("caching the prepared weights", done, total)
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, suffix=".partial")
    except OSError:
        return
    try:
        os.close(fd)
        write_safetensors(temporary, tensors, written=written)
        os.replace(temporary, path)
    except OSError:
        _remove(temporary)
        return
    # Earlier versions of the same checkpoint (same place, other state) will never be read again.
    place, name = os.path.basename(path).split("-")[0], os.path.basename(path)
    for other in os.listdir(directory):
        if other.startswith(place + "-") and other.endswith(".safetensors") and other != name:
            _remove(os.path.join(directory, other))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
