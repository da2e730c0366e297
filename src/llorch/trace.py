"""Validation checkpoints: their names, and a tracer that writes them to a directory.

The checkpoint table in docs/specs/13-tracing-and-checkpoints.md lists the same names in the same order
(tests/test_checkpoint_table.py keeps the two equal). Every implementation -- llorch's model and each
reference in tests/reference/ -- reports the same names with the same shapes, so two trace directories
can be laid side by side by `llorch-compare`.

Shapes use T = tokens in this forward pass, S = start_pos + T (cached positions after the write),
C = n_embd, NH = n_head, HS = C / NH, V = vocab_size. No batch dimension: llorch traces one sequence.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

@dataclass(frozen=True)
class Checkpoint:
    name: str
    per_layer: bool
    shape: str      # template over T, S, C, 3C, 4C, NH, HS, V, 1
    atol: float     # pass iff max|ours - ref| <= atol + rtol * max|ref|  (inf entries must match exactly)
    rtol: float


# The table, in the order of computation. Tolerances are for FP32 against the float64 oracle and between
# two FP32 implementations; they are relative to the tensor's own scale so outlier dimensions do not hide errors.
CHECKPOINTS: tuple[Checkpoint, ...] = (
    Checkpoint("embed", False, "T,C", 1e-6, 1e-5),           # wte[token] + wpe[start_pos + t]
    Checkpoint("ln_1", True, "T,C", 1e-5, 1e-4),
    Checkpoint("attn.qkv", True, "T,3C", 1e-5, 1e-4),        # c_attn output: q | k | v along the last axis
    Checkpoint("attn.k_cache", True, "NH,S,HS", 1e-5, 1e-4),  # the layer's key cache after this pass's write
    Checkpoint("attn.v_cache", True, "NH,S,HS", 1e-5, 1e-4),
    Checkpoint("attn.scores", True, "NH,T,S", 1e-5, 1e-4),   # q.k^T / sqrt(HS); masked (future) entries are -inf
    Checkpoint("attn.probs", True, "NH,T,S", 1e-5, 1e-4),    # softmax of scores; masked entries are exactly 0
    Checkpoint("attn.y", True, "T,C", 1e-5, 1e-4),           # heads merged, before c_proj
    Checkpoint("attn.proj", True, "T,C", 1e-5, 1e-4),        # after c_proj
    Checkpoint("res_1", True, "T,C", 1e-5, 1e-4),            # x + attn.proj
    Checkpoint("ln_2", True, "T,C", 1e-5, 1e-4),
    Checkpoint("mlp.fc", True, "T,4C", 1e-5, 1e-4),
    Checkpoint("mlp.gelu", True, "T,4C", 1e-5, 1e-4),        # tanh-approximation GELU
    Checkpoint("mlp.proj", True, "T,C", 1e-5, 1e-4),
    Checkpoint("block_out", True, "T,C", 1e-5, 1e-4),        # res_1 + mlp.proj
    Checkpoint("ln_f", False, "T,C", 1e-5, 1e-4),
    Checkpoint("logits", False, "1,V", 1e-5, 1e-4),          # the last position's logits only
    Checkpoint("next_token", False, "1", 0.0, 0.0),          # argmax of logits, int64: exact
)

BY_NAME: dict[str, Checkpoint] = {c.name: c for c in CHECKPOINTS}
CHECKPOINT_NAMES: tuple[str, ...] = tuple(BY_NAME)
PER_LAYER: frozenset[str] = frozenset(c.name for c in CHECKPOINTS if c.per_layer)


def checkpoint_key(name: str, layer: int | None, step: int) -> str:
    """The file stem of one recorded checkpoint: 's0.embed', 's2.h11.attn.probs'."""
    if name not in CHECKPOINT_NAMES:
        raise ValueError(f"unknown checkpoint {name!r}")
    if (layer is not None) != (name in PER_LAYER):
        raise ValueError(f"checkpoint {name!r} {'needs' if name in PER_LAYER else 'takes no'} a layer")
    return f"s{step}.{name}" if layer is None else f"s{step}.h{layer}.{name}"


def expected_shape(name: str, *, T: int, start_pos: int, n_embd: int, n_head: int, vocab_size: int) -> tuple:
    """The shape the table promises for checkpoint `name` in a pass of T tokens at start_pos."""
    sizes = {"T": T, "S": start_pos + T, "C": n_embd, "3C": 3 * n_embd, "4C": 4 * n_embd,
             "NH": n_head, "HS": n_embd // n_head, "V": vocab_size, "1": 1}
    return tuple(sizes[d] for d in BY_NAME[name].shape.split(","))


@dataclass
class TraceRecord:
    name: str
    layer: int | None
    step: int
    value: np.ndarray


class Tracer:
    """Base tracer: a forward pass calls start_forward once, then record at every checkpoint.

    The step counts forward passes: the prompt pass is step 0, each decode step adds one.
    Subclasses decide what to keep; this one keeps copies in memory (`records`).
    """

    def __init__(self) -> None:
        self.step = -1
        self.records: list[TraceRecord] = []

    def start_forward(self, start_pos: int, n_tokens: int) -> None:
        self.step += 1

    def record(self, name: str, layer: int | None, value: np.ndarray) -> None:
        checkpoint_key(name, layer, max(self.step, 0))  # validates the name/layer pair
        self.records.append(TraceRecord(name, layer, self.step, np.array(value, copy=True)))

    def get(self, name: str, layer: int | None = None, step: int = 0) -> np.ndarray:
        for r in self.records:
            if r.name == name and r.layer == layer and r.step == step:
                return r.value
        raise KeyError(checkpoint_key(name, layer, step))


def summary_line(name: str, layer: int | None, step: int, value: np.ndarray) -> dict:
    """The trace.jsonl row for one checkpoint: readable by eye, identical in form for every implementation."""
    flat = np.asarray(value).reshape(-1)
    finite = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    stats = finite.astype(np.float64) if finite.size else np.zeros(1)
    return {
        "key": checkpoint_key(name, layer, step), "name": name, "layer": layer, "step": step,
        "shape": list(np.shape(value)), "dtype": str(np.asarray(value).dtype),
        "min": float(stats.min()), "max": float(stats.max()),
        "mean": float(stats.mean()), "std": float(stats.std()),
        "first": [float(v) for v in flat[:8]],
    }


class DirectoryTracer(Tracer):
    """Writes DIR/<key>.npy for every checkpoint and one JSON line per checkpoint to DIR/trace.jsonl."""

    def __init__(self, directory: str | os.PathLike) -> None:
        super().__init__()
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._jsonl = open(os.path.join(self.directory, "trace.jsonl"), "w", encoding="utf-8")

    def record(self, name: str, layer: int | None, value: np.ndarray) -> None:
        key = checkpoint_key(name, layer, self.step)
        np.save(os.path.join(self.directory, key + ".npy"), np.asarray(value))
        self._jsonl.write(json.dumps(summary_line(name, layer, self.step, value)) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._jsonl.close()

    def __enter__(self) -> "DirectoryTracer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
