"""GPT-2: token + position embedding -> n_layer pre-LN blocks -> ln_f -> lm_head tied to wte.

Every op runs in a C kernel (llorch._kernels); this file only decides the order, owns the buffers and
the KV cache, and reports each validation checkpoint to an optional tracer (names: llorch.trace).

Several sequences can share a pass (decode_batch): their rows are stacked through every matrix and
only the attention runs per sequence, each over its own KVCache.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from . import _kernels as K
from . import weight_cache
from .checkpoint import expected_shapes, load_weights, resolve_weight_files
from .config import GPT2Config
from .tokenizer import EOT_TOKEN


# Rows per pass of a long prompt. A pass's activations grow with its rows (~17 MB for 512 rows at 124M);
# passes of 256 rows keep the peak resident size down at ~1 % of prefill speed (each pass reads every
# weight once more). A row's result is the same in any pass: it attends to the cache up to its position.
PREFILL_ROWS = 256


class ContextError(ValueError):
    """A request that does not fit the model's context window (n_positions)."""


# Block field -> HF tensor name within block i ("h.{i}." + name). The four matrices are kept packed.
_BLOCK_TENSORS = {
    "ln_1_w": "ln_1.weight", "ln_1_b": "ln_1.bias",
    "c_attn_w": "attn.c_attn.weight", "c_attn_b": "attn.c_attn.bias",
    "attn_proj_w": "attn.c_proj.weight", "attn_proj_b": "attn.c_proj.bias",
    "ln_2_w": "ln_2.weight", "ln_2_b": "ln_2.bias",
    "c_fc_w": "mlp.c_fc.weight", "c_fc_b": "mlp.c_fc.bias",
    "mlp_proj_w": "mlp.c_proj.weight", "mlp_proj_b": "mlp.c_proj.bias",
}
_PACKED_FIELDS = ("c_attn_w", "attn_proj_w", "c_fc_w", "mlp_proj_w")


@dataclass(frozen=True)
class Block:
    """One transformer block's weights. The four matrices, HF Conv1D [in, out], are repacked at load into
    the column panels of K.linear_packed (flat, same size): each thread then streams contiguous memory."""
    ln_1_w: np.ndarray
    ln_1_b: np.ndarray
    c_attn_w: np.ndarray   # [C, 3C] packed
    c_attn_b: np.ndarray
    attn_proj_w: np.ndarray  # [C, C] packed
    attn_proj_b: np.ndarray
    ln_2_w: np.ndarray
    ln_2_b: np.ndarray
    c_fc_w: np.ndarray     # [C, 4C] packed
    c_fc_b: np.ndarray
    mlp_proj_w: np.ndarray  # [4C, C] packed
    mlp_proj_b: np.ndarray

    @classmethod
    def from_weights(cls, w: dict[str, np.ndarray], i: int, prepared: bool) -> "Block":
        """Block i from a checkpoint's tensors, or from prepared ones (matrices already packed)."""
        return cls(**{field: w[f"h.{i}.{name}"] if prepared or field not in _PACKED_FIELDS
                      else _packed(w[f"h.{i}.{name}"]) for field, name in _BLOCK_TENSORS.items()})

    def tensors(self, i: int) -> dict[str, np.ndarray]:
        """This block's weights under their HF names as block i, the matrices packed."""
        return {f"h.{i}.{name}": getattr(self, field) for field, name in _BLOCK_TENSORS.items()}


def prepared_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """The tensors GPT2.prepared_weights() returns: the checkpoint's, with each block's matrices flat."""
    packed = tuple(_BLOCK_TENSORS[field] for field in _PACKED_FIELDS)
    return {name: (int(np.prod(shape)),) if name.startswith("h.") and name.endswith(packed) else shape
            for name, shape in expected_shapes(config).items()}


def _packed(weight: np.ndarray) -> np.ndarray:
    """weight [C, OC] repacked for K.linear_packed; the copy replaces the original (_release_mapped)."""
    packed = np.empty(weight.size, dtype=np.float32)
    K.pack_linear(packed, weight)
    _release_mapped(weight)
    return packed


def _copied(weight: np.ndarray) -> np.ndarray:
    """weight in this process's own memory, replacing the mapped original (_release_mapped); a weight that
    is already a copy (fp16/bf16 checkpoints) is kept. For wte, which lm_head.c streams whole at every
    token: from anonymous memory (huge pages where the kernel gives them) decode measured 62 -> 78 tok/s
    against reading it from the file mapping's 4 KiB pages."""
    if _mapping(weight) is None:
        return weight
    own = np.empty_like(weight)
    rows = max(1, (8 << 20) // max(1, weight[0].nbytes))   # 8 MiB at a time: the peak stays one chunk over
    for r in range(0, weight.shape[0], rows):
        np.copyto(own[r:r + rows], weight[r:r + rows])
        _release_mapped(weight[r:r + rows])
    return own


def _mapping(weight: np.ndarray) -> mmap.mmap | None:
    """The memory-mapped checkpoint file weight is a view of, if any."""
    owner = weight
    while owner is not None and not isinstance(owner, mmap.mmap):
        owner = owner.obj if isinstance(owner, memoryview) else getattr(owner, "base", None)
    return owner


def _release_mapped(weight: np.ndarray) -> None:
    """When weight is a view of the memory-mapped checkpoint, drop its pages from this process (the page
    cache keeps them): a copy that replaces it then adds nothing to the resident size."""
    owner = _mapping(weight)
    if owner is not None:
        page = mmap.PAGESIZE
        offset = weight.ctypes.data - np.frombuffer(owner, dtype=np.uint8).ctypes.data
        begin, end = -(-offset // page) * page, (offset + weight.nbytes) // page * page  # whole pages only
        if end > begin:
            owner.madvise(mmap.MADV_DONTNEED, begin, end - begin)


class Workspace:
    """Activation buffers, grown (at least doubling) to the largest pass seen and then reused, so a decode
    step allocates nothing even as the attended length grows."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        flat = self._flat.get(name)
        if flat is None or flat.size < size:
            grown = max(size, 2 * flat.size) if flat is not None else size
            flat = self._flat[name] = np.empty(grown, dtype=np.float32)
        return flat[:size].reshape(shape)


def _resident_when_written(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed float32 array in an anonymous mapping of 4 KiB pages, each resident only once written.

    The KV cache covers the whole context, but a short generation should only pay for the positions it
    fills; numpy's own large allocations ask for transparent huge pages, which would fault in 2 MiB at
    every first write and make most of the cache resident at once."""
    nbytes = int(np.prod(shape)) * 4
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.float32).reshape(shape)


class KVCache:
    """Keys and values of one sequence at every layer and position: k, v [n_layer, NH, n_positions, HS].

    Besides the arrays its only state is `length`, the number of positions filled: a pass at start_pos
    writes positions start_pos.. and reads 0..start_pos + T - 1, so rewinding is just a smaller start_pos."""

    def __init__(self, config: GPT2Config) -> None:
        shape = (config.n_layer, config.n_head, config.n_positions, config.head_size)
        self.k = _resident_when_written(shape)
        self.v = _resident_when_written(shape)
        self.length = 0


class GPT2:
    def __init__(self, config: GPT2Config, weights: dict[str, np.ndarray], name: str = "gpt2",
                 prepared: bool = False) -> None:
        """weights: a checkpoint's tensors by HF name, or (prepared) those of prepared_weights()."""
        self.config = config
        self.name = name
        self.wte = weights["wte.weight"] if prepared else _copied(weights["wte.weight"])  # [V, C], also the lm_head
        self.wpe = weights["wpe.weight"]   # [n_positions, C]
        self.blocks = [Block.from_weights(weights, i, prepared) for i in range(config.n_layer)]
        self.ln_f_w, self.ln_f_b = weights["ln_f.weight"], weights["ln_f.bias"]
        self.cache = KVCache(config)       # the sequence of forward() and generate()
        self._ws = Workspace()

    @property
    def weight_bytes(self) -> int:
        arrays = [self.wte, self.wpe, self.ln_f_w, self.ln_f_b]
        arrays += [a for b in self.blocks for a in vars(b).values()]
        return sum(a.nbytes for a in arrays)

    def prepared_weights(self) -> dict[str, np.ndarray]:
        """Every weight as this model holds it, by HF name (what llorch.weight_cache stores)."""
        tensors = {"wte.weight": self.wte, "wpe.weight": self.wpe}
        for i, block in enumerate(self.blocks):
            tensors.update(block.tensors(i))
        tensors.update({"ln_f.weight": self.ln_f_w, "ln_f.bias": self.ln_f_b})
        return tensors

    def new_cache(self) -> KVCache:
        """An empty cache for another sequence (forward(..., cache=) and decode_batch)."""
        return KVCache(self.config)

    def reset(self) -> None:
        """Forget the cached sequence; the next forward must start at position 0."""
        self.cache.length = 0

    def forward(self, token_ids: Sequence[int] | np.ndarray, start_pos: int = 0, tracer=None,
                logits: str = "all", cache: KVCache | None = None) -> np.ndarray:
        """Run T tokens at positions start_pos.., continuing the cache; logits [T, V] ("all") or [1, V] ("last")."""
        if logits not in ("all", "last"):
            raise ValueError(f'logits must be "all" or "last", got {logits!r}')
        cache, all_logits = cache or self.cache, logits == "all"
        ids = self._check_ids(token_ids, start_pos, cache)
        if tracer:   # a trace follows one pass
            return self._run([(ids, start_pos, cache)], tracer, all_logits).copy()
        parts = []
        for first in range(0, ids.size, PREFILL_ROWS):
            part = self._run([(ids[first:first + PREFILL_ROWS], start_pos + first, cache)], None, all_logits)
            if all_logits or first + PREFILL_ROWS >= ids.size:
                parts.append(part.copy())
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def decode_batch(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> np.ndarray:
        """One new token for each of several sequences at once, each at its cache's next position.

        The rows go through every matrix together (one weight read serves the whole batch); only the
        attention is per sequence. Returns logits [B, V]; each row is bitwise what the sequence would
        get alone, since every kernel computes a row independently of the others."""
        if len(tokens) != len(caches) or not tokens:
            raise ValueError("decode_batch needs one token per cache, at least one")
        segments = [(self._check_ids([t], c.length, c), c.length, c) for t, c in zip(tokens, caches)]
        return self._run(segments, None, all_logits=False).copy()

    def generate(self, token_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | None = EOT_TOKEN, tracer=None) -> Iterator[int]:
        """Yield new token ids one by one, stopping after <|endoftext|> unless eos_token_id is None
        (see llorch.generate.generate)."""
        from .generate import generate
        from .sampling import Sampler
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        return generate(self, token_ids, max_new_tokens, sampler, eos_token_id=eos_token_id, tracer=tracer)

    def _check_ids(self, token_ids, start_pos: int, cache: KVCache) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError("token_ids must be a non-empty 1-D sequence of integers")
        V, P = self.config.vocab_size, self.config.n_positions
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"token ids must be in [0, {V}), got {ids.min()}..{ids.max()}")
        if not 0 <= start_pos <= cache.length:
            raise ValueError(f"start_pos {start_pos} must be in [0, {cache.length}] (positions cached so far)")
        if start_pos + ids.size > P:
            raise ContextError(f"{start_pos + ids.size} positions exceed the context of {P} tokens")
        return ids.astype(np.int32)

    def _run(self, segments: list[tuple[np.ndarray, int, KVCache]], tracer, all_logits: bool) -> np.ndarray:
        """The forward pass over checked segments (int32 ids, start_pos, cache), their rows stacked.

        Returns logits for every row, or for each segment's last row; a workspace view, valid until the
        next call. A tracer sees one segment only (a trace is of one sequence)."""
        cfg, ws = self.config, self._ws
        T, C, NH = sum(ids.size for ids, _, _ in segments), cfg.n_embd, cfg.n_head
        rows = []                            # each segment's rows in the stacked activations
        for ids, _, _ in segments:
            first = rows[-1].stop if rows else 0
            rows.append(slice(first, first + ids.size))
        eps = cfg.layer_norm_epsilon
        x = ws.get("x", (T, C))              # the residual stream
        ln = ws.get("ln", (T, C))
        qkv = ws.get("qkv", (T, 3 * C))
        y = ws.get("y", (T, C))
        proj = ws.get("proj", (T, C))
        fc = ws.get("fc", (T, 4 * C))
        scratch = ws.get("attention_scratch", (K.attention_scratch_floats(cfg.n_positions),))
        trace = tracer.record if tracer else None
        if tracer:
            assert len(segments) == 1, "a trace follows one sequence"
            tracer.start_forward(segments[0][1], T)

        # Decode steps (one new token per sequence, untraced) run every sequence's attention in one call.
        one_row_each = tracer is None and T == len(segments)
        caches = [cache for _, _, cache in segments]
        positions = [start_pos for _, start_pos, _ in segments]
        for (ids, start_pos, _), r in zip(segments, rows):
            K.embed(x[r], ids, self.wte, self.wpe, start_pos)
        if trace: trace("embed", None, x)
        for i, b in enumerate(self.blocks):
            K.layernorm(ln, x, b.ln_1_w, b.ln_1_b, eps)
            if trace: trace("ln_1", i, ln)
            K.linear_packed(qkv, ln, b.c_attn_w, b.c_attn_b)
            if trace: trace("attn.qkv", i, qkv)
            if one_row_each:
                K.decode_attention(y, qkv, [c.k[i] for c in caches], [c.v[i] for c in caches], positions, scratch)
            else:
                for (ids, start_pos, cache), r in zip(segments, rows):
                    S = start_pos + ids.size
                    # softmax weights and scores are checkpoints, kept only for a tracer
                    probs = ws.get("probs", (NH, ids.size, S)) if tracer else None
                    scores = ws.get("scores", (NH, ids.size, S)) if tracer else None
                    K.kv_write(cache.k[i], cache.v[i], qkv[r], start_pos)
                    if trace: trace("attn.k_cache", i, cache.k[i, :, :S]); trace("attn.v_cache", i, cache.v[i, :, :S])
                    K.attention(y[r], qkv[r], cache.k[i], cache.v[i], start_pos, scratch, scores, probs)
                    if trace: trace("attn.scores", i, scores); trace("attn.probs", i, probs); trace("attn.y", i, y)
            K.linear_packed(proj, y, b.attn_proj_w, b.attn_proj_b)
            if trace: trace("attn.proj", i, proj)
            K.residual(x, x, proj)
            if trace: trace("res_1", i, x)
            K.layernorm(ln, x, b.ln_2_w, b.ln_2_b, eps)
            if trace: trace("ln_2", i, ln)
            K.linear_packed(fc, ln, b.c_fc_w, b.c_fc_b)
            if trace: trace("mlp.fc", i, fc)
            K.gelu(fc, fc)
            if trace: trace("mlp.gelu", i, fc)
            K.linear_packed(proj, fc, b.mlp_proj_w, b.mlp_proj_b)
            if trace: trace("mlp.proj", i, proj)
            K.residual(x, x, proj)
            if trace: trace("block_out", i, x)
        for (ids, start_pos, cache) in segments:
            cache.length = start_pos + ids.size

        K.layernorm(ln, x, self.ln_f_w, self.ln_f_b, eps)
        if trace: trace("ln_f", None, ln)
        if all_logits:
            last = ln
        elif len(segments) == 1:
            last = ln[T - 1:]
        else:
            last = np.take(ln, [r.stop - 1 for r in rows], axis=0, out=ws.get("last", (len(rows), C)))
        out = ws.get("logits", (last.shape[0], cfg.vocab_size))
        K.lm_head(out, last, self.wte)
        if trace:
            trace("logits", None, out[-1:])
            trace("next_token", None, np.array([K.argmax(out[-1])], dtype=np.int64))
        return out


def load(path: str | os.PathLike) -> GPT2:
    """A GPT-2 from a Hugging Face directory (config.json + model.safetensors) or a .safetensors file
    with its config.json beside it. Raises CheckpointError with a message naming what is wrong.

    The prepared weights are cached on disk (llorch.weight_cache): a later load of the same files maps
    them instead of preparing them again."""
    path = os.fspath(path)
    config_path, files = resolve_weight_files(path)
    config = GPT2Config.from_json(config_path)
    name = os.path.basename(os.path.normpath(os.path.dirname(config_path))) or path
    cached = weight_cache.cache_file(config_path, files)
    prepared = weight_cache.read(cached, prepared_shapes(config)) if cached else None
    if prepared is not None:
        return GPT2(config, prepared, name=name, prepared=True)
    model = GPT2(config, load_weights(files, config), name=name)
    if cached:
        weight_cache.write(cached, model.prepared_weights())
    return model
