"""Choosing the next token from the last position's logits.

temperature 0 is greedy argmax (the reference path, computed by the C kernel). Otherwise the logits are
divided by the temperature, cut to the top_k most likely tokens (0 or None: no cut), then to the smallest set whose
probability reaches top_p (the order HF transformers applies them), then to the tokens at least min_p times as
likely as the most likely one, and one token is drawn with a seeded numpy Generator, so the same seed gives the
same tokens.

A repetition penalty (the daemon's option, spec 10 step 1) first makes every token already in the sequence
less likely, greedy or sampled: its logit is divided by the penalty when positive, multiplied when negative.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import _kernels as K


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, *, min_p: float | None = None, repetition_penalty: float = 1.0) -> None:
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        if top_k is not None and (int(top_k) != top_k or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if min_p is not None and not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        if not (np.isfinite(repetition_penalty) and repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")
        self.temperature, self.top_k, self.top_p = temperature, top_k or None, top_p
        self.min_p, self.repetition_penalty = min_p or None, repetition_penalty
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, previous_ids: Sequence[int] = ()) -> int:
        """The next token id from logits [V] (float32); previous_ids (prompt and output so far) are only
        read by the repetition penalty."""
        if self.repetition_penalty != 1 and len(previous_ids):
            logits = penalize_repetitions(logits, previous_ids, self.repetition_penalty)
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
        if self.min_p is not None:
            # probs are in descending order, so the survivors are a prefix; the first always stays
            keep = np.count_nonzero(probs >= self.min_p * probs[0])
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self.rng.choice(len(candidates), p=probs)])


def penalize_repetitions(logits: np.ndarray, previous_ids: Sequence[int], penalty: float) -> np.ndarray:
    """A copy of logits [V] in which each distinct previous id's logit is divided by penalty if positive and
    multiplied by it otherwise (CTRL's rule, as HF's RepetitionPenaltyLogitsProcessor applies it)."""
    penalized = logits.copy()
    ids = np.unique(np.asarray(previous_ids, dtype=np.int64))
    seen = penalized[ids]
    penalized[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return penalized
