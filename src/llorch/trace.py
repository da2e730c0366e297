"""Validation checkpoints: their names, and a tracer that writes them to a directory.

The checkpoint table in docs/specs/13-tracing-and-checkpoints.md lists the same names in the same order
(tests/test_checkpoint_table.py keeps the two equal). Every implementation -- llorch's model and each
reference in llorch.references -- reports the same names with the same shapes, so two trace directories
can be laid side by side by `llorch-compare`.

Shapes use T = tokens in this forward pass, S = start_pos + T (cached positions after the write),
C = n_embd, NH = n_head, HS = C / NH, V = vocab_size. No batch dimension: llorch traces one sequence.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from .model import GPT2


@dataclass(frozen=True)
class Checkpoint:
    name: str
    per_layer: bool
    shape: str      # template over T, S, C, 3C, 4C, NH, HS, V, 1
    atol: float     # pass iff max|ours - ref| <= atol + rtol * max|ref|  (inf entries must match exactly)
    rtol: float


# The table, in the order of computation. Tolerances are for FP32 against the float64 oracle and between
# two FP32 implementations; they are relative to the tensor's own scale so outlier dimensions do not hide errors.
# rtol 5e-5: honest FP32 (HF, tinygrad, llorch) stays within 6e-6 x max|ref| of the float64 oracle on the
# tiny, odd, 124M and 355M shapes, with and without outlier dimensions, while the exact-erf GELU in place of
# the tanh one is off by 1e-4 (tiny) to 4e-4 (124M) x max|ref| at mlp.gelu.
CHECKPOINTS: tuple[Checkpoint, ...] = (
    Checkpoint("embed", False, "T,C", 1e-6, 1e-5),           # wte[token] + wpe[start_pos + t]
    Checkpoint("ln_1", True, "T,C", 1e-6, 5e-5),
    Checkpoint("attn.qkv", True, "T,3C", 1e-6, 5e-5),        # c_attn output: q | k | v along the last axis
    Checkpoint("attn.k_cache", True, "NH,S,HS", 1e-6, 5e-5),  # the layer's key cache after this pass's write
    Checkpoint("attn.v_cache", True, "NH,S,HS", 1e-6, 5e-5),
    Checkpoint("attn.scores", True, "NH,T,S", 1e-6, 5e-5),   # q.k^T / sqrt(HS); masked (future) entries are -inf
    Checkpoint("attn.probs", True, "NH,T,S", 1e-6, 5e-5),    # softmax of scores; masked entries are exactly 0
    Checkpoint("attn.y", True, "T,C", 1e-6, 5e-5),           # heads merged, before c_proj
    Checkpoint("attn.proj", True, "T,C", 1e-6, 5e-5),        # after c_proj
    Checkpoint("res_1", True, "T,C", 1e-6, 5e-5),            # x + attn.proj
    Checkpoint("ln_2", True, "T,C", 1e-6, 5e-5),
    Checkpoint("mlp.fc", True, "T,4C", 1e-6, 5e-5),
    Checkpoint("mlp.gelu", True, "T,4C", 1e-6, 5e-5),        # tanh-approximation GELU
    Checkpoint("mlp.proj", True, "T,C", 1e-6, 5e-5),
    Checkpoint("block_out", True, "T,C", 1e-6, 5e-5),        # res_1 + mlp.proj
    Checkpoint("ln_f", False, "T,C", 1e-6, 5e-5),
    Checkpoint("logits", False, "1,V", 1e-6, 5e-5),          # the last position's logits only
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
        raise ValueError(f"checkpoint {name!r} {'needs a' if name in PER_LAYER else 'takes no'} layer")
    return f"s{step}.{name}" if layer is None else f"s{step}.h{layer}.{name}"


_KEY_PATTERN = re.compile(r"s(\d+)\.(?:h(\d+)\.)?(.+)")


def parse_key(key: str) -> tuple[str, int | None, int]:
    """The inverse of checkpoint_key: 's2.h11.attn.probs' -> ('attn.probs', 11, 2). ValueError if not a key."""
    match = _KEY_PATTERN.fullmatch(key)
    if match is None:
        raise ValueError(f"not a checkpoint key: {key!r}")
    step, layer, name = match.groups()
    layer = None if layer is None else int(layer)
    checkpoint_key(name, layer, int(step))  # validates the name/layer pair
    return name, layer, int(step)


_TABLE_INDEX = {name: i for i, name in enumerate(CHECKPOINT_NAMES)}
_FIRST_PER_LAYER = min(_TABLE_INDEX[name] for name in PER_LAYER)


def key_order(key: str) -> tuple:
    """Sort key putting checkpoints in the order a forward pass computes them: step, layer, table order."""
    name, layer, step = parse_key(key)
    index = _TABLE_INDEX[name]
    if layer is None:  # embed comes before the blocks; ln_f, logits, next_token after them
        layer = -1 if index < _FIRST_PER_LAYER else math.inf
    return step, layer, index


def forward_order(n_layer: int) -> list[tuple[str, int | None]]:
    """Every (name, layer) one forward pass records, in the order it records them."""
    before = [(c.name, None) for c in CHECKPOINTS[:_FIRST_PER_LAYER]]
    blocks = [(c.name, layer) for layer in range(n_layer) for c in CHECKPOINTS if c.per_layer]
    after = [(c.name, None) for c in CHECKPOINTS[_FIRST_PER_LAYER:] if not c.per_layer]
    return before + blocks + after


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
        self.start_pos = self.n_tokens = 0  # of the current pass
        self.records: list[TraceRecord] = []

    def start_forward(self, start_pos: int, n_tokens: int) -> None:
        self.step += 1
        self.start_pos, self.n_tokens = start_pos, n_tokens

    def key(self, name: str, layer: int | None) -> str:
        """The key of a checkpoint of the current pass (validates the name/layer pair)."""
        if self.step < 0:
            raise RuntimeError(f"tracer.record({name!r}, ...) before any tracer.start_forward(start_pos, T)")
        return checkpoint_key(name, layer, self.step)

    def record(self, name: str, layer: int | None, value: np.ndarray) -> None:
        self.key(name, layer)
        self.records.append(TraceRecord(name, layer, self.step, np.array(value, copy=True)))

    def get(self, name: str, layer: int | None = None, step: int = 0) -> np.ndarray:
        for r in self.records:
            if r.name == name and r.layer == layer and r.step == step:
                return r.value
        raise KeyError(checkpoint_key(name, layer, step))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every record by its key ('s0.h1.ln_2'), as a trace directory would hold them."""
        return {checkpoint_key(r.name, r.layer, r.step): r.value for r in self.records}


def json_number(x: float) -> float | str:
    """x, or "inf", "-inf", "nan" for the values strict JSON (jq, JavaScript) cannot hold."""
    return x if math.isfinite(x) else str(x)


def summary_line(name: str, layer: int | None, step: int, value: np.ndarray, *, start_pos: int, T: int) -> dict:
    """The trace.jsonl row for one checkpoint: readable by eye, identical in form for every implementation."""
    flat = np.asarray(value).reshape(-1)
    finite = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    stats = finite.astype(np.float64) if finite.size else np.zeros(1)
    return {
        "key": checkpoint_key(name, layer, step), "name": name, "layer": layer, "step": step,
        "start_pos": start_pos, "T": T, "shape": list(np.shape(value)), "dtype": str(np.asarray(value).dtype),
        "min": float(stats.min()), "max": float(stats.max()),
        "mean": float(stats.mean()), "std": float(stats.std()),
        "first": [json_number(float(v)) for v in flat[:8]],
    }


class DirectoryTracer(Tracer):
    """Writes DIR/<key>.npy for every checkpoint and one JSON line per checkpoint to DIR/trace.jsonl."""

    def __init__(self, directory: str | os.PathLike) -> None:
        super().__init__()
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._jsonl = open(os.path.join(self.directory, "trace.jsonl"), "w", encoding="utf-8")

    def record(self, name: str, layer: int | None, value: np.ndarray) -> None:
        np.save(os.path.join(self.directory, self.key(name, layer) + ".npy"), np.asarray(value))
        line = summary_line(name, layer, self.step, value, start_pos=self.start_pos, T=self.n_tokens)
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()  # a crashed run still leaves a readable prefix

    def close(self) -> None:
        self._jsonl.close()

    def __enter__(self) -> "DirectoryTracer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def structural_problems(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The rules every trace obeys whatever the implementation (spec 13), as one message per violation.

    `arrays` is a whole trace by key (Tracer.arrays() or a loaded trace directory) whose steps are the
    consecutive passes of one sequence, so each step's start_pos is the tokens of the steps before it:
    attn.scores is -inf exactly at the future keys (j > start_pos + t) and finite elsewhere, attn.probs is
    exactly 0 there and its rows sum to 1 within 1e-6, and the caches hold S = start_pos + T positions.
    """
    by_step: dict[int, dict[tuple[str, int | None], np.ndarray]] = {}
    for key, value in arrays.items():
        name, layer, step = parse_key(key)
        by_step.setdefault(step, {})[name, layer] = np.asarray(value)
    problems, start_pos = [], 0
    for step in sorted(by_step):
        checkpoints = by_step[step]
        if ("embed", None) not in checkpoints:
            return problems + [f"step {step}: no embed checkpoint, so T and start_pos are unknown"]
        T = checkpoints["embed", None].shape[0]
        S = start_pos + T
        future = np.arange(S)[None, :] > start_pos + np.arange(T)[:, None]
        for (name, layer), value in checkpoints.items():
            key = checkpoint_key(name, layer, step)
            if name in ("attn.k_cache", "attn.v_cache") and (value.ndim != 3 or value.shape[1] != S):
                problems.append(f"{key}: shape {value.shape} does not hold S = {S} positions")
            elif name in ("attn.scores", "attn.probs") and value.shape[-2:] != (T, S):
                problems.append(f"{key}: shape {value.shape} does not end in (T, S) = ({T}, {S})")
            elif name == "attn.scores":
                if not np.all(value[..., future] == -np.inf):
                    problems.append(f"{key}: a future key (j > start_pos + t) is not -inf")
                if not np.all(np.isfinite(value[..., ~future])):
                    problems.append(f"{key}: a visible key is not finite")
            elif name == "attn.probs":
                if not np.all(value[..., future] == 0):
                    problems.append(f"{key}: a future key (j > start_pos + t) has probability other than 0")
                if not np.allclose(value.sum(axis=-1, dtype=np.float64), 1.0, rtol=0, atol=1e-6):
                    problems.append(f"{key}: a row does not sum to 1 within 1e-6")
        start_pos = S
    return problems


class NullTracer:
    """The tracer of an untraced pass: it keeps nothing, so the forward pass reports every checkpoint alike."""

    def start_forward(self, start_pos: int, n_tokens: int) -> None:
        pass

    def record(self, name: str, layer: int | None, value: np.ndarray) -> None:
        pass


NULL_TRACER = NullTracer()


class TraceableModel(Protocol):
    """What run_trace drives: every reference in llorch.references, and llorch's GPT2 through OneSequence."""

    def forward(self, token_ids: Sequence[int], start_pos: int = 0, tracer: Tracer | None = None) -> np.ndarray:
        """Logits [T, V] for token_ids at positions start_pos.. (cache positions beyond start_pos are rewritten)."""

    def reset(self) -> None:
        """Forget the KV cache."""


class OneSequence:
    """llorch's GPT2 over a KV cache of its own, as a TraceableModel: llorch's forward takes the cache as
    an argument, the references keep theirs inside."""

    def __init__(self, model: "GPT2") -> None:
        self.model = model
        self.cache = model.new_cache()

    def forward(self, token_ids: Sequence[int], start_pos: int = 0, tracer: Tracer | None = None) -> np.ndarray:
        return self.model.forward(token_ids, self.cache, start_pos=start_pos, tracer=tracer)

    def reset(self) -> None:
        self.cache = self.model.new_cache()


def run_trace(model: TraceableModel, prompt_ids: Sequence[int], decode_ids: Sequence[int] = (),
              tracer: Tracer | None = None) -> list[np.ndarray]:
    """The prompt pass (step 0), then one teacher-forced single-token pass per decode id (steps 1, 2, ...).

    Feeding given decode ids rather than each pass's argmax keeps two implementations on identical inputs
    even where their argmaxes differ. Returns each pass's last-row logits [V].
    """
    model.reset()
    last_logits = [model.forward(list(prompt_ids), start_pos=0, tracer=tracer)[-1]]
    for position, token in enumerate(decode_ids, start=len(prompt_ids)):
        last_logits.append(model.forward([token], start_pos=position, tracer=tracer)[-1])
    return last_logits
