"""Choosing the next token from the last position's logits.

temperature 0 is greedy argmax (the reference path, computed by the C kernel). Otherwise the logits are
cut to the top_k most likely tokens (0 or None: no cut; every token tied with the k-th stays, as in HF
transformers), turned into probabilities at the temperature, cut to the smallest set whose probability
reaches top_p (the order HF applies them), then to the tokens at least min_p times as likely as the most
likely one, and one token is drawn with a seeded numpy Generator, so the same seed gives the same tokens.

Nothing sorts the whole vocabulary: top-k is a partial selection, and top-p and the draw walk the tokens
most likely first through a sorted prefix that grows only while the mass they need is not reached.

Penalties and biases that change the logits before this (the daemon's repetition penalty, OpenAI's options)
are llorch.logits's.
"""

from __future__ import annotations


import numpy as np

from . import _kernels as K


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, *, min_p: float | None = None) -> None:
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and (int(top_k) != top_k or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if min_p is not None and not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k or None, top_p
        self.min_p = min_p or None
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token id from logits [V] (float32)."""
        if self.temperature == 0:
            return K.argmax(logits)
        ids, kept = None, logits           # ids None: kept is the whole vocabulary
        if self.top_k is not None and self.top_k < len(kept):
            kth = np.partition(kept, len(kept) - self.top_k)[len(kept) - self.top_k]
            ids = np.flatnonzero(kept >= kth)
            kept = kept[ids]
        # the max subtracted before dividing: every exponent is <= 0, so a tiny temperature gives -inf
        # (weight 0), never NaN
        weights = kept.astype(np.float64)
        weights -= weights.max()
        with np.errstate(over="ignore"):
            weights /= self.temperature
        np.exp(weights, out=weights)       # the most likely token weighs exactly 1
        if self.top_p is not None and self.top_p < 1:
            survivors = most_likely_prefix(kept, weights, self.top_p * weights.sum(), side="left")
            ids, kept, weights = survivors if ids is None else ids[survivors], kept[survivors], weights[survivors]
        if self.min_p is not None:
            survivors = np.flatnonzero(weights >= self.min_p)
            ids, kept, weights = survivors if ids is None else ids[survivors], kept[survivors], weights[survivors]
        # one uniform draw u: the first token, most likely first, whose cumulative probability exceeds u
        drawn = most_likely_prefix(kept, weights, self.rng.random() * weights.sum(), side="right")[-1]
        return int(drawn if ids is None else ids[drawn])


def most_likely_prefix(logits: np.ndarray, weights: np.ndarray, mass: float, side: str) -> np.ndarray:
    """Indices into logits [n], most likely first (ties: lower index first), of the shortest prefix whose
    weights sum to at least mass (side="left") or to more than mass (side="right"); all indices with a
    non-zero weight if rounding keeps the sum short of mass.

    Only a candidate prefix is sorted: the 64 most likely, then 16 times more until the mass is reached."""
    n, size = len(logits), 64
    while True:
        if size < n:
            threshold = np.partition(logits, n - size)[n - size]
            candidates = np.flatnonzero(logits >= threshold)   # ties with the threshold too: no id is skipped
        else:
            candidates = np.arange(n)
        candidates = candidates[np.argsort(-logits[candidates], kind="stable")]
        end = int(np.searchsorted(np.cumsum(weights[candidates]), mass, side=side)) + 1
        if end <= len(candidates):
            return candidates[:end]
        if size >= n:
            return candidates[:np.count_nonzero(weights)]      # weights are sorted too: zeros come last
        size *= 16
