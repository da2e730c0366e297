"""GPT-2: token + position embedding -> n_layer pre-LN blocks -> ln_f -> lm_head tied to wte.

Every op runs in a C kernel (llorch._kernels); this file decides their order, owns the activation buffers
and the KV caches, and reports each validation checkpoint to a tracer (names: llorch.trace). The weights
come prepared from llorch.weights.

A sequence is named by its KVCache: forward(ids, cache) runs a prompt (or any tokens) of one sequence, and
decode_batch(tokens, caches) one new token of each of several, their rows stacked through every matrix and
only the attention run per sequence.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import Container, NamedTuple, Sequence

import numpy as np

from . import _kernels as K
from . import weight_cache
from .checkpoint import load_weights, resolve_weight_files
from .config import GPT2Config
from .runtime import threads_for_pass
from .trace import NULL_TRACER, Tracer
from .weights import Block, Progress, Weights, prepared_shapes


# Rows per pass of a long prompt. A pass's activations grow with its rows (~17 MB for 512 rows at 124M);
# passes of 256 rows keep the peak resident size down at ~1 % of prefill speed (each pass reads every
# weight once more). A row's result is the same in any pass: it attends to the cache up to its position.
PREFILL_ROWS = 256


class ContextError(ValueError):
    """A request that does not fit the model's context window (n_positions)."""


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


# One pass's sequences: (int32 token ids, start_pos, cache) each, their rows stacked in that order.
Segments = list[tuple[np.ndarray, int, KVCache]]


class Activations(NamedTuple):
    """One pass's buffers, [T, ...] for its T stacked rows."""
    x: np.ndarray      # [T, C] the residual stream
    ln: np.ndarray     # [T, C] a layer norm's output
    qkv: np.ndarray    # [T, 3C]
    y: np.ndarray      # [T, C] attention output, heads merged
    proj: np.ndarray   # [T, C] a projection back to the stream
    fc: np.ndarray     # [T, 4C] the MLP's hidden layer


class Workspace:
    """Activation buffers, grown (at least doubling) to the largest pass seen and then reused, so a decode
    step allocates no activations (only the logits it returns) even as the attended length grows."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)   # not np.prod: 2 us a call, ~20 calls a pass
        flat = self._flat.get(name)
        if flat is None or flat.size < size:
            grown = max(size, 2 * flat.size) if flat is not None else size
            flat = self._flat[name] = np.empty(grown, dtype=np.float32)
        return flat[:size].reshape(shape)

    def activations(self, T: int, C: int) -> Activations:
        return Activations(*(self.get(name, (T, width)) for name, width in
                             zip(Activations._fields, (C, C, 3 * C, C, C, 4 * C))))


class GPT2:
    def __init__(self, config: GPT2Config, weights: Weights, name: str = "gpt2") -> None:
        self.config = config
        self.weights = weights
        self.name = name
        self.weight_bytes = weights.nbytes   # asked for by every /health and every job's end
        self._ws = Workspace()

    def new_cache(self) -> KVCache:
        """An empty cache: a new sequence, for forward and decode_batch."""
        return KVCache(self.config)

    def check_request(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        """Refuse, before any work, a generation that could not run to max_new_tokens: ValueError for an
        empty prompt, a non-positive count or ids outside the vocabulary, ContextError when prompt + new
        tokens exceed the context (never truncated)."""
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        n_prompt, context = len(prompt_ids), self.config.n_positions
        if n_prompt == 0:
            raise ValueError("the prompt is empty: at least one token is needed")
        if n_prompt + max_new_tokens > context:
            raise ContextError(f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the context "
                               f"of {context} positions")
        self._checked_ids(prompt_ids, 0, 0)

    def forward(self, token_ids: Sequence[int] | np.ndarray, cache: KVCache, *, start_pos: int | None = None,
                logits: str = "all", tracer: Tracer | None = None) -> np.ndarray:
        """Run T tokens of cache's sequence at positions start_pos.. (default: the cache's length, continuing
        it; a smaller start_pos rewinds). Returns logits [T, V] ("all") or [1, V] ("last"), a new array.

        Runs passes of at most PREFILL_ROWS rows; with a tracer, one pass."""
        if logits not in ("all", "last"):
            raise ValueError(f'logits must be "all" or "last", got {logits!r}')
        start_pos = cache.length if start_pos is None else start_pos
        ids, all_logits = self._checked_ids(token_ids, start_pos, cache.length), logits == "all"
        if tracer is not None:
            return self._run([(ids, start_pos, cache)], tracer, [all_logits])
        parts = []
        for first in range(0, ids.size, PREFILL_ROWS):
            part = self._run([(ids[first:first + PREFILL_ROWS], start_pos + first, cache)], NULL_TRACER, [all_logits])
            if all_logits or first + PREFILL_ROWS >= ids.size:
                parts.append(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def decode_batch(self, tokens: Sequence[int], caches: Sequence[KVCache],
                     tracer: Tracer | None = None) -> np.ndarray:
        """One new token for each of several sequences at once, each at its cache's next position.

        The rows go through every matrix together (one weight read serves the whole batch); only the
        attention is per sequence. Returns logits [B, V]; each row is bitwise what the sequence would
        get alone, since every kernel computes a row independently of the others. A trace follows one
        sequence: a tracer needs exactly one cache."""
        if len(tokens) != len(caches) or not tokens:
            raise ValueError("decode_batch needs one token per cache, at least one")
        if tracer is not None and len(caches) != 1:
            raise ValueError(f"a trace follows one sequence: decode_batch got a tracer and {len(caches)} caches")
        return self._run(self._continuing([[t] for t in tokens], caches), NULL_TRACER if tracer is None else tracer,
                         [False] * len(tokens))

    def forward_batch(self, segments: Sequence[tuple[Sequence[int], KVCache]], *,
                      all_logits: Container[int] = ()) -> np.ndarray:
        """One stacked pass over several sequences, each continuing its cache with any number of tokens: a
        scheduler's step mixes the new tokens of the decoding sequences (one each, or one and its drafts)
        with chunks of prompts.

        Returns, stacked in the segments' order, the logits of every row of the segments whose index is in
        all_logits and of the last row of the others; every row is bitwise what its sequence would get alone
        (rows meet only in the matrices, which compute each row on its own)."""
        if not segments:
            raise ValueError("forward_batch needs at least one segment")
        if len({id(cache) for _, cache in segments}) != len(segments):
            raise ValueError("forward_batch got the same cache in two segments")
        return self._run(self._continuing([ids for ids, _ in segments], [c for _, c in segments]), NULL_TRACER,
                         [i in all_logits for i in range(len(segments))])

    def _continuing(self, token_ids: Sequence, caches: Sequence[KVCache]) -> Segments:
        """Checked segments, each continuing its cache from its length."""
        return [(self._checked_ids(ids, c.length, c.length), c.length, c) for ids, c in zip(token_ids, caches)]

    def _checked_ids(self, token_ids, start_pos: int, cached: int) -> np.ndarray:
        """token_ids as int32, after checking them and that start_pos is in [0, cached] and within the context."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError("token_ids must be a non-empty 1-D sequence of integers")
        V, P = self.config.vocab_size, self.config.n_positions
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"token ids must be in [0, {V}), got {ids.min()}..{ids.max()}")
        if not 0 <= start_pos <= cached:
            raise ValueError(f"start_pos {start_pos} must be in [0, {cached}] (positions cached so far)")
        if start_pos + ids.size > P:
            raise ContextError(f"{start_pos + ids.size} positions exceed the context of {P} tokens")
        return ids.astype(np.int32)

    def _run(self, segments: Segments, tracer, all_logits: Sequence[bool]) -> np.ndarray:
        """The forward pass over checked segments, their rows stacked.

        Returns logits for every row of each segment whose all_logits is true and for the last row of the
        others, in a new array. A tracer (not NULL_TRACER) comes with one segment only."""
        threads_for_pass()   # the thread count, on this thread: fixed, or auto's choice (llorch.runtime)
        cfg, w = self.config, self.weights
        T = sum(ids.size for ids, _, _ in segments)
        rows = []                            # each segment's rows in the stacked activations
        for ids, _, _ in segments:
            first = rows[-1].stop if rows else 0
            rows.append(slice(first, first + ids.size))
        a = self._ws.activations(T, cfg.n_embd)
        tracer.start_forward(segments[0][1], T)

        for (ids, start_pos, _), r in zip(segments, rows):
            K.embed(a.x[r], ids, w.wte, w.wpe, start_pos)
        tracer.record("embed", None, a.x)
        for i, block in enumerate(w.blocks):
            self._block(i, block, a, segments, rows, tracer)
        for ids, start_pos, cache in segments:
            cache.length = start_pos + ids.size

        K.layernorm(a.ln, a.x, w.ln_f_w, w.ln_f_b, cfg.layer_norm_epsilon)
        tracer.record("ln_f", None, a.ln)
        picked = [i for r, every in zip(rows, all_logits) for i in (range(r.start, r.stop) if every else (r.stop - 1,))]
        if len(picked) == T:
            last = a.ln
        elif len(picked) == 1:
            last = a.ln[picked[0]:picked[0] + 1]
        else:
            last = np.take(a.ln, picked, axis=0, out=self._ws.get("last", (len(picked), cfg.n_embd)))
        out = np.empty((last.shape[0], cfg.vocab_size), np.float32)   # the caller's: written once, never copied
        K.linear_packed(out, last, w.wte, None)   # the lm_head, tied: wte packed as its [C, V] weight
        tracer.record("logits", None, out[-1:])
        if tracer is not NULL_TRACER:
            tracer.record("next_token", None, np.array([K.argmax(out[-1])], dtype=np.int64))
        return out

    def _block(self, i: int, b: Block, a: Activations, segments: Segments, rows: list[slice], tracer) -> None:
        """Block i on the residual stream a.x, in place: x += attn(ln_1(x)); x += mlp(ln_2(x))."""
        eps = self.config.layer_norm_epsilon
        K.layernorm(a.ln, a.x, b.ln_1_weight, b.ln_1_bias, eps)
        tracer.record("ln_1", i, a.ln)
        self._attention(i, b, a, segments, rows, tracer)
        K.linear_packed(a.proj, a.y, b.attn_c_proj_weight, b.attn_c_proj_bias)
        tracer.record("attn.proj", i, a.proj)
        K.residual(a.x, a.x, a.proj)
        tracer.record("res_1", i, a.x)
        K.layernorm(a.ln, a.x, b.ln_2_weight, b.ln_2_bias, eps)
        tracer.record("ln_2", i, a.ln)
        K.linear_packed(a.fc, a.ln, b.mlp_c_fc_weight, b.mlp_c_fc_bias)
        tracer.record("mlp.fc", i, a.fc)
        K.gelu(a.fc, a.fc)
        tracer.record("mlp.gelu", i, a.fc)
        K.linear_packed(a.proj, a.fc, b.mlp_c_proj_weight, b.mlp_c_proj_bias)
        tracer.record("mlp.proj", i, a.proj)
        K.residual(a.x, a.x, a.proj)
        tracer.record("block_out", i, a.x)

    def _attention(self, i: int, b: Block, a: Activations, segments: Segments, rows: list[slice], tracer) -> None:
        """Causal self-attention of layer i: a.ln -> a.y (heads merged, before c_proj), writing this pass's
        keys and values into each segment's cache at its positions."""
        K.linear_packed(a.qkv, a.ln, b.attn_c_attn_weight, b.attn_c_attn_bias)
        tracer.record("attn.qkv", i, a.qkv)
        scores = probs = None
        if tracer is not NULL_TRACER:   # scores and softmax weights are checkpoints, kept only for a tracer
            ((ids, start_pos, _),) = segments
            scores = self._ws.get("scores", (self.config.n_head, ids.size, start_pos + ids.size))
            probs = self._ws.get("probs", scores.shape)
        scratch = self._ws.get("attention_scratch", (K.attention_scratch_floats(self.config.n_positions),))
        for run, r in _by_kind(segments, rows):
            if run[0][0].size == 1:
                # a decode step's rows, one new row per sequence (traced or not): their kv_write and attention
                # in one call, the same kernel whatever else shares the pass
                K.decode_attention(a.y[r], a.qkv[r], [c.k[i] for _, _, c in run], [c.v[i] for _, _, c in run],
                                   [start_pos for _, start_pos, _ in run], scratch, scores, probs)
            else:
                ((ids, start_pos, cache),) = run
                K.kv_write(cache.k[i], cache.v[i], a.qkv[r], start_pos)
                K.attention(a.y[r], a.qkv[r], cache.k[i], cache.v[i], start_pos, scratch, scores, probs)
        ids, start_pos, cache = segments[0]   # a tracer's one sequence
        S = start_pos + ids.size
        tracer.record("attn.k_cache", i, cache.k[i, :, :S])
        tracer.record("attn.v_cache", i, cache.v[i, :, :S])
        tracer.record("attn.scores", i, scores)
        tracer.record("attn.probs", i, probs)
        tracer.record("attn.y", i, a.y)


def _by_kind(segments: Segments, rows: list[slice]):
    """The segments in runs, each with its rows: consecutive one-row segments together, a longer one alone."""
    start = 0
    while start < len(segments):
        end = start + 1
        if segments[start][0].size == 1:
            while end < len(segments) and segments[end][0].size == 1:
                end += 1
        yield segments[start:end], slice(rows[start].start, rows[end - 1].stop)
        start = end


def load(path: str | os.PathLike, *, progress: Progress | None = None) -> GPT2:
    """A GPT-2 from a Hugging Face directory (config.json + model.safetensors) or a .safetensors file
    with its config.json beside it. Raises CheckpointError with a message naming what is wrong.

    The prepared weights are cached on disk (llorch.weight_cache): a later load of the same files maps
    them instead of preparing them again. progress(stage, done_bytes, total_bytes), if given, is called
    after each tensor prepared and each tensor cached (what takes seconds on a first load); a load from the
    cache does not call it."""
    path = os.fspath(path)
    config_path, files = resolve_weight_files(path)
    config = GPT2Config.from_json(config_path)
    name = os.path.basename(os.path.normpath(os.path.dirname(config_path))) or path
    cached = weight_cache.cache_file(config_path, files)
    prepared = weight_cache.read(cached, prepared_shapes(config)) if cached else None
    if prepared is not None:
        return GPT2(config, Weights.from_prepared(prepared, config), name=name)
    weights = Weights.prepare(load_weights(files, config), config, progress)
    if cached:
        weight_cache.write(cached, weights.tensors(), progress)
    return GPT2(config, weights, name=name)
