"""Logits processing before sampling: what the daemon's OpenAI options change, in one place.

A Session hands each logits row [V] to its LogitsProcessor, then samples from what comes out; log-probs
(OpenAI's `logprobs`, `best_of`) are the log-softmax of that same processed row, so they describe the
distribution the token was drawn from before temperature, top-k, top-p and min-p reshape it (spec 14).

The rules, in order:
- logit_bias: a constant added to chosen token ids' logits (OpenAI: -100 bans a token, 100 forces it).
- presence and frequency penalties, over generated tokens only (OpenAI's definition):
  logit[t] -= presence_penalty * (count[t] > 0) + frequency_penalty * count[t].
- repetition_penalty, over prompt and output (CTRL's rule, penalize_repetitions).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np



class LogitsProcessor:
    def __init__(self, logit_bias: Mapping[int, float] | None = None, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repetition_penalty: float = 1.0) -> None:
        for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not (np.isfinite(repetition_penalty) and repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")
        bias = dict(logit_bias or {})
        self.bias_ids = np.array(list(bias), dtype=np.int64)
        self.bias_values = np.array(list(bias.values()), dtype=np.float32)
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.repetition_penalty = repetition_penalty

    def __call__(self, logits: np.ndarray, prompt_ids: Sequence[int], generated_ids: Sequence[int]) -> np.ndarray:
        """The processed row: logits itself when no rule changes anything, else a float32 copy."""
        if self.repetition_penalty != 1 and (len(prompt_ids) or len(generated_ids)):
            logits = penalize_repetitions(logits, [*prompt_ids, *generated_ids], self.repetition_penalty)
        if (self.presence_penalty or self.frequency_penalty) and len(generated_ids):
            ids, counts = np.unique(np.asarray(generated_ids, dtype=np.int64), return_counts=True)
            logits = logits.copy()
            logits[ids] -= np.float32(self.presence_penalty) + np.float32(self.frequency_penalty) * counts.astype(np.float32)
        if len(self.bias_ids):
            logits = logits.copy()
            logits[self.bias_ids] += self.bias_values
        return logits


TopLogprobs = tuple[tuple[int, float], ...]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p [V] of a logits row, in float64."""
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.exp(shifted).sum())


def score(logits: np.ndarray, token: int, top_n: int) -> tuple[float, TopLogprobs]:
    """log p of token under a logits row [V], and the top_n most likely (id, log p), most likely first
    (ties: lower id first)."""
    logp = log_softmax(logits)
    best = np.argpartition(-logp, top_n)[:top_n] if 0 < top_n < logp.size else np.arange(min(top_n, logp.size))
    best = sorted(best.tolist(), key=lambda t: (-logp[t], t))
    return float(logp[token]), tuple((t, float(logp[t])) for t in best)


def penalize_repetitions(logits: np.ndarray, previous_ids: Sequence[int], penalty: float) -> np.ndarray:
    """A copy of logits [V] in which each distinct previous id's logit is divided by penalty if positive and
    multiplied by it otherwise (CTRL's rule, as HF's RepetitionPenaltyLogitsProcessor applies it)."""
    penalized = logits.copy()
    ids = np.unique(np.asarray(previous_ids, dtype=np.int64))
    seen = penalized[ids]
    penalized[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return penalized
