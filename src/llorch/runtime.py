"""Threads and SIMD path for the kernels, and the facts of this build (`llorch.build_info()`)."""

from __future__ import annotations

import os
import warnings

from . import _kernels
from .version import __version__


def set_num_threads(n: int) -> None:
    """Threads for every kernel from now on (OpenMP). Results do not depend on it, only speed."""
    _kernels.set_num_threads(n)


def select_simd(name: str) -> None:
    """Kernel SIMD path: "auto" (the best this CPU runs), "baseline", "avx2" or "avx512"."""
    _kernels.select_simd(name)


def configure_from_env() -> None:
    """Apply LLORCH_NUM_THREADS (over OMP_NUM_THREADS, which OpenMP reads itself) and LLORCH_SIMD.

    Runs at import, so a bad value is a warning naming the variable, not an exception; `--threads`
    on the command line is applied later and wins."""
    threads = os.environ.get("LLORCH_NUM_THREADS")
    if threads:
        try:
            set_num_threads(int(threads))
        except ValueError:
            warnings.warn(f"LLORCH_NUM_THREADS={threads!r} ignored: expected a positive integer", stacklevel=2)
    simd = os.environ.get("LLORCH_SIMD")
    if simd:
        try:
            select_simd(simd)
        except ValueError as e:
            warnings.warn(f"LLORCH_SIMD={simd!r} ignored: {e}", stacklevel=2)


def build_info() -> dict:
    """Compiler, OpenMP, threads and SIMD paths of the compiled kernels."""
    openmp = _kernels.openmp_version()
    return {
        "version": __version__,
        "compiler": _kernels.compiler(),
        "openmp": bool(openmp),
        "openmp_version": openmp,
        "max_threads": _kernels.max_threads(),
        "simd_compiled": _kernels.simd_compiled().split(),
        "simd_supported": _kernels.simd_supported().split(),
        "simd_selected": _kernels.simd_selected(),
    }
