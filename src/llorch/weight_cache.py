"""A checkpoint's weights as the model holds them (packed), cached on disk so a later load maps them.

Preparing the weights at load (llorch.weights: the four matrices of each block and wte repacked)
writes every byte into fresh memory, which the operating system must fault in; a later load instead maps
this file and populates its pages from the page cache in one call, and decodes as fast from it.

The file is a safetensors file of float32 tensors under HF's names, the four matrices of each block and
wte flattened in the packed layout. Where: $LLORCH_CACHE_DIR, else $XDG_CACHE_HOME/llorch, else
~/.cache/llorch; LLORCH_CACHE_DIR=off turns it off. A file's name is a hash of what it was made from
(each weight file's real path, size, inode, modification and change times, config.json's bytes, the packing
layout's fingerprint), so a changed checkpoint or a changed layout gets a new file; only a file rewritten in place to the same size within
one tick of the file system's clock could go unnoticed. The name starts with a hash of the files' paths
alone: writing a checkpoint's new cache file removes the one of its earlier version, so the cache holds
one file per checkpoint location. Files are written under a temporary name
(`writer-PID-XXXX.partial`) and renamed; a cache that cannot be written only means the next load prepares
the weights again. A write that fails or is interrupted (Ctrl-C too) removes its partial file; one left by a
killed process is swept by the next write: when its writer's pid is dead, or when it has not been written
to for STALE_PARTIAL_SECONDS (its pid may have been reused, or it was written on another machine).

The cache is bounded, so that checkpoints that come and go (a directory of experiments, a test suite) never
fill the disk: before a write, the least recently used files (a read marks its file used) are removed until
the new one fits within $LLORCH_CACHE_MAX_GB (DEFAULT_MAX_GB), and no file is written that would leave
less than DISK_RESERVE_BYTES free on its file system.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from . import _kernels as K
from .checkpoint import SafetensorsFile, write_safetensors
from .config import CheckpointError
from .weights import Progress

PARTIAL_SUFFIX = ".partial"
STALE_PARTIAL_SECONDS = 3600
DEFAULT_MAX_GB = 16.0            # gpt2-xl's prepared weights (6.2 GB) and then some
DISK_RESERVE_BYTES = 2 << 30     # a cache file is worth less than the room other programs need
_CACHE_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{16}\.safetensors")   # cache_file's names

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


def max_bytes() -> int:
    """The cache's size limit: $LLORCH_CACHE_MAX_GB (decimal gigabytes, may be fractional), else DEFAULT_MAX_GB.
    A value that is not a non-negative number raises CheckpointError naming the variable."""
    text = os.environ.get("LLORCH_CACHE_MAX_GB", "").strip()
    try:
        gigabytes = float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:   # also refuses nan
        raise CheckpointError(f"LLORCH_CACHE_MAX_GB must be a number of gigabytes >= 0, not {text!r}")
    return int(gigabytes * 1e9) if gigabytes * 1e9 < sys.maxsize else sys.maxsize   # inf: no limit


def cache_file(config_path: str, weight_files: list[str]) -> str | None:
    """The cache file for this checkpoint (it may not exist yet), or None when caching is off."""
    directory = cache_dir()
    if directory is None:
        return None
    max_bytes()   # a malformed limit is said at every load, not only at the one that writes
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
    _touch(path)   # used now: the last to be evicted
    return {name: cached.tensor(name) for name in shapes}


def write(path: str, tensors: dict[str, np.ndarray], progress: Progress | None = None) -> None:
    """Store tensors at path, best effort: any OS error (read-only directory, full disk) leaves no file, and
    any other exception (KeyboardInterrupt too) leaves none before it propagates.
    progress, if given, hears of each tensor written (stage "caching the prepared weights")."""
    data_bytes = sum(t.nbytes for _, t in tensors.items())
    written = None
    if progress is not None:
        written = lambda done: progress("caching the prepared weights", done, data_bytes)   # noqa: E731
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        sweep_stale_partials(directory)
        _remove_earlier_versions(path)
        if not make_room(directory, data_bytes + 128 * len(tensors) + 8):   # the header is a few KB at most
            return
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=f"writer-{os.getpid()}-", suffix=PARTIAL_SUFFIX)
    except OSError:
        return
    try:
        os.close(fd)
        write_safetensors(temporary, tensors, written=written)
        os.replace(temporary, path)
        _touch(path)
    except OSError:
        return
    finally:
        _remove(temporary)   # gone already after the rename


def _remove_earlier_versions(path: str) -> None:
    """Remove the cache files of the same checkpoint location (same place hash, other state): they will never
    be read again."""
    directory, name = os.path.dirname(path), os.path.basename(path)
    place = name.split("-")[0]
    for other in os.listdir(directory):
        if _CACHE_NAME.fullmatch(other) and other.startswith(place + "-") and other != name:
            _remove(os.path.join(directory, other))


def make_room(directory: str, size: int) -> bool:
    """Make room for a cache file of `size` bytes: within max_bytes() in all, leaving DISK_RESERVE_BYTES free
    on the disk. Removes the least recently used cache files that must go (only files named as this module
    names them: the directory may hold others), and only if that makes room; whether there is room. A file
    still mapped by a running model frees its space only when that model is gone."""
    entries = []
    for name in os.listdir(directory):
        if not _CACHE_NAME.fullmatch(name):
            continue
        try:
            st = os.stat(os.path.join(directory, name))
        except OSError:   # removed by another writer meanwhile
            continue
        entries.append((st.st_mtime, st.st_size, name))
    total = sum(bytes_ for _, bytes_, _ in entries)
    free = shutil.disk_usage(directory).free
    limit = max_bytes()

    def fits() -> bool:
        return total + size <= limit and free - size >= DISK_RESERVE_BYTES
    evicted = []
    for _, bytes_, name in sorted(entries):   # oldest use first
        if fits():
            break
        evicted.append(name)
        total -= bytes_
        free += bytes_
    if not fits():
        return False
    for name in evicted:
        _remove(os.path.join(directory, name))
    return True


def sweep_stale_partials(directory: str) -> None:
    """Remove the partial files of writers that are gone: a dead pid, or no write for STALE_PARTIAL_SECONDS."""
    now = time.time()
    for name in os.listdir(directory):
        if not name.endswith(PARTIAL_SUFFIX):
            continue
        partial = os.path.join(directory, name)
        try:
            idle = now - os.stat(partial).st_mtime
        except OSError:   # renamed or removed by its writer meanwhile
            continue
        if idle > STALE_PARTIAL_SECONDS or not _writer_alive(name):
            _remove(partial)


def _writer_alive(partial_name: str) -> bool:
    """Whether the process named in `writer-PID-....partial` runs (on this machine); unknown names: yes."""
    parts = partial_name.split("-")
    if len(parts) < 3 or parts[0] != "writer" or not parts[1].isdigit():
        return True
    try:
        os.kill(int(parts[1]), 0)
    except PermissionError:   # another user's process
        return True
    except (ProcessLookupError, OverflowError):   # no such process; no such pid on this platform
        return False
    return True


def _touch(path: str) -> None:
    """Mark path used now, at the clock's full resolution (the file system's own stamps come from a coarse
    clock, which would tie loads a few milliseconds apart)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:   # a read-only cache still serves
        pass


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
