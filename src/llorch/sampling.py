"""Choosing the next token from the last position's logits.

temperature 0 is greedy argmax (the reference path, computed by the C kernel). Otherwise the logits are
cut to the top_k most likely tokens (0 or None: no cut; every token tied with the k-th stays, as in HF
transformers), turned into probabilities at the temperature, cut to the smallest set whose probability
reaches top_p (the order HF applies them), then to the tokens at least min_p times as likely as the most
likely one, and one token is drawn with a seeded numpy Generator, so the same seed gives the same tokens.

Nothing sorts the vocabulary (spec 10): the top-k and top-p cuts are found by kernels that bucket the logits
(top_k lists the ids kept, and the rest works on theirs alone; keep_top_p zeroes the weights of the ids it
cuts), and the draw walks the survivors in id order (draw): the same distribution as a walk most likely
first, for a fraction of a millisecond on any row.

Penalties and biases that change the logits before this (the daemon's repetition penalty, OpenAI's options)
are llorch.logits's.
"""

from __future__ import annotations


import numpy as np

from . import _kernels as K

_ANY_WEIGHT = np.nextafter(0.0, 1.0)   # a floor that keeps every id whose weight is not 0


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
        self._weights = np.empty(0)                              # buffers kept: fresh ones would fault
        self._kept, self._scratch = np.empty(0, np.int32), np.empty(0, np.int32)   # in their pages each token

    def __call__(self, logits: np.ndarray) -> int:
        """The next token id from logits [V] (float32, finite or -inf)."""
        if self.temperature == 0:
            return K.argmax(logits)
        if len(self._kept) != len(logits):
            self._weights, self._kept, self._scratch = (np.empty(len(logits)), np.empty(len(logits), np.int32),
                                                        np.empty(len(logits), np.int32))
        kept = None   # the ids top_k keeps (id order); then logits holds only theirs
        if self.top_k is not None and self.top_k < len(logits):
            kept = self._kept[:K.top_k(logits, self.top_k, self._kept)]
            logits = logits[kept]
        # the max subtracted before dividing: every exponent is <= 0, so a tiny temperature gives -inf
        # (weight 0), never NaN; the most likely token weighs exactly 1
        weights = self._weights[:len(logits)]
        np.copyto(weights, logits)                # exact: every float32 is a float64
        weights -= np.float64(logits.max())
        with np.errstate(over="ignore"):
            np.divide(weights, self.temperature, out=weights)
        np.exp(weights, out=weights)
        if self.top_p is not None and self.top_p < 1:
            K.keep_top_p(logits, weights, self.top_p * weights.sum(), self._scratch[:len(logits)])
        # min_p: the most likely weighs 1, so the floor is min_p itself; the least positive double when off
        drawn = K.draw(weights, self.min_p or _ANY_WEIGHT, self.rng.random())
        return drawn if kept is None else int(kept[drawn])
