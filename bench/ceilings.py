"""What the machine allows: the work one token costs, and what this machine can do per second.

Two roofs, each measured on this machine in the same run as the engines (bench/run.py interleaves them):

- decode is bound by memory: one decoded token reads every weight once, so
  decode ceiling (tok/s) = read bandwidth / weight bytes read per token;
- prefill is bound by arithmetic: a prompt token costs the FLOPs of the model's matrices, so
  prefill ceiling (tok/s) = sgemm FLOP/s / FLOPs per prompt token.

An engine's fraction of a ceiling is its measured rate divided by that ceiling.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from llorch.config import GPT2Config

BANDWIDTH_ARRAY_BYTES = 1 << 30      # far beyond any cache: every byte comes from DRAM
SGEMM_ROWS = 512                     # the prompt length of the larger prefill measurement


@dataclass(frozen=True)
class TokenCost:
    """Work per token of a GPT-2 shape, FP32 (4 bytes per weight), tied lm_head."""
    shape: GPT2Config

    @property
    def params(self) -> int:
        C, L, V, P = self.shape.n_embd, self.shape.n_layer, self.shape.vocab_size, self.shape.n_positions
        per_layer = 12 * C * C + 13 * C      # c_attn, attn.c_proj, c_fc, mlp.c_proj + biases, 2 layer norms
        return V * C + P * C + L * per_layer + 2 * C

    @property
    def weight_bytes(self) -> int:
        return 4 * self.params

    @property
    def decode_bytes(self) -> int:
        """Weight bytes read for one decoded token: everything but wpe, of which only one row is read
        (wte is read whole by the tied lm_head). The KV cache reads (< 2 % at these lengths) are left out."""
        return 4 * (self.params - self.shape.n_positions * self.shape.n_embd)

    def prefill_flops(self, T: int) -> float:
        """FLOPs per prompt token of a T-token prefill from an empty cache, last-position logits only:
        the layers' matrices (2 x 12 C^2 per layer), the causal attention (q.k and p.v over T(T+1)/2
        pairs per head), and one lm_head row shared by the T tokens."""
        C, L, V = self.shape.n_embd, self.shape.n_layer, self.shape.vocab_size
        matrices = 2 * 12 * C * C * L
        attention = 4 * C * L * (T + 1) / 2
        return matrices + attention + 2 * V * C / T


class Machine:
    """The two measurements behind the ceilings. Keeps its 1 GiB array between calls, so each round
    of bench/run.py measures again (bandwidth drifts on shared VMs) without allocating again."""

    def __init__(self, shape: GPT2Config, threads: int) -> None:
        from threadpoolctl import threadpool_limits
        self.threads = threads
        self._limits = threadpool_limits(threads)        # held for the life of the process
        rng = np.random.default_rng(0)
        C = shape.n_embd
        # the four matrices of a layer at T = SGEMM_ROWS: c_attn, attn.c_proj, c_fc, mlp.c_proj
        self._gemms = [(rng.standard_normal((SGEMM_ROWS, k), dtype=np.float32),
                        rng.standard_normal((k, n), dtype=np.float32))
                       for k, n in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C))]
        self._array = np.arange(BANDWIDTH_ARRAY_BYTES // 4, dtype=np.float32)   # no two pages alike
        self._parts = np.array_split(self._array, threads)
        self._pool = ThreadPoolExecutor(threads)

    def sgemm_gflops(self, reps: int = 20) -> float:
        """numpy (OpenBLAS) float32 matmul with `threads` threads on the layer shapes at T = 512:
        total FLOPs over the sum of each shape's best time."""
        flops = seconds = 0.0
        for a, b in self._gemms:
            out = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
            flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            seconds += _best(lambda: np.matmul(a, b, out=out), reps)
        return flops / seconds / 1e9

    def read_gbps(self, reps: int = 5) -> dict[str, float]:
        """Read bandwidth over a 1 GiB array split between `threads` threads (numpy releases the GIL
        inside these loops): numpy sum, and BLAS sdot of each part with itself (one read per element)."""
        nbytes = self._array.nbytes
        kernels = {"sum": np.sum, "dot": lambda p: np.dot(p, p)}
        return {name: nbytes / _best(lambda f=f: list(self._pool.map(f, self._parts)), reps) / 1e9
                for name, f in kernels.items()}

    def measure(self) -> dict[str, float]:
        reads = self.read_gbps()
        return {"sgemm_gflops": self.sgemm_gflops(), "read_gbps": max(reads.values()),
                **{f"read_{k}_gbps": v for k, v in reads.items()}}


def blas_info() -> list[dict]:
    """Which BLAS numpy runs here and how (threadpoolctl): library, version, kernel architecture, threads."""
    from threadpoolctl import threadpool_info
    keep = ("internal_api", "version", "architecture", "num_threads")
    return [{k: i.get(k) for k in keep} for i in threadpool_info() if i.get("user_api") == "blas"]


def blas_env() -> dict[str, str]:
    """The environment for the sgemm measurement: this one without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE.

    Some VMs set both (together) so that old OpenBLAS builds pick a safe kernel; a current numpy then
    runs a slower one. They are dropped together, for the measuring process only; blas_info() records
    which kernel OpenBLAS then chose."""
    return {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}


def _best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
