"""Choosing the next token from the last position's logits.

temperature 0 is greedy argmax (the reference path, computed by the C kernel). Otherwise the logits are
divided by the temperature, cut to the top_k most likely tokens (0 or None: no cut), then to the smallest set whose
probability reaches top_p (the order HF transformers applies them), and one token is drawn with a seeded
numpy Generator, so the same seed gives the same tokens.
"""

from __future__ import annotations

import numpy as np

from . import _kernels as K


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> None:
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and (int(top_k) != top_k or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k or None, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token id from logits [V] (float32)."""
        if self.temperature == 0:
            return K.argmax(logits)
        scaled = logits.astype(np.float64) / self.temperature
        candidates = np.argsort(-scaled, kind="stable")   # most likely first; ties keep id order
        if self.top_k is not None:
            candidates = candidates[: self.top_k]
        probs = np.exp(scaled[candidates] - scaled[candidates[0]])
        probs /= probs.sum()
        if self.top_p is not None:
            # keep tokens while the mass before them is below top_p: the first always stays
            keep = np.searchsorted(np.cumsum(probs), self.top_p, side="left") + 1
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self.rng.choice(len(candidates), p=probs)])
