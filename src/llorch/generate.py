"""Generation: a Session per sequence, fed one logits row per new token.

A Session owns everything of one generated sequence but the forward pass: its KV cache, its sampler, the
stop rules (max tokens, eos, stop strings) and the text, decoded incrementally so a chunk never ends inside
a UTF-8 character or shows the start of a stop string. Whoever drives the model -- `run` below for one
sequence (the library's `generate`, llorch-run), the daemon's scheduler for many at once -- runs the prompt
through `model.forward(prompt, session.cache, logits="last")`, hands the row to `session.take`, and runs
each further token through `model.decode_batch` until a Step carries a stop reason.

Only the last position's logits are computed (the lm_head is the largest matrix: computing it for every
prompt position would be wasted), and a Step is returned as soon as its token is sampled, so a caller can
stream it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .sampling import Sampler
from .stream import StopStrings, StreamDecoder
from .tokenizer import EOT_TOKEN, tokenizer

if TYPE_CHECKING:
    from .model import GPT2
    from .trace import Tracer


class StopReason(Enum):
    """Why a generation that ran to completion stopped. The values are llorch-run's (--json), the names
    the worker contract's (spec 14)."""
    MAX_TOKENS = "max_tokens"
    EOS = "eos"
    STOP_SEQUENCE = "stop"


@dataclass(frozen=True)
class Step:
    """What one new token released: its id, the text it completes (possibly ""), and the stop reason when it
    is the last token."""
    token: int
    text: str
    stop_reason: StopReason | None


class Session:
    """One sequence being generated. Construction checks the request (model.check_request) and makes its
    cache; `take` then turns each logits row into a Step until one has a stop reason.

    Every token counts towards max_new_tokens and is kept in `tokens`, eos and the token that completes a
    stop string included; neither releases text of its own. The final Step also releases the text held
    back (an unfinished character as U+FFFD, the start of a stop string that did not complete)."""

    def __init__(self, model: GPT2, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler, *,
                 eos_token_id: int | None = EOT_TOKEN, stop: Sequence[str] = ()) -> None:
        model.check_request(prompt_ids, max_new_tokens)
        self._stops = StopStrings(stop)
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens, self.sampler, self.eos_token_id = max_new_tokens, sampler, eos_token_id
        self.cache = model.new_cache()
        self.tokens: list[int] = []
        self._seen = list(prompt_ids)   # prompt and output: what the repetition penalty reads
        self.stop_reason: StopReason | None = None
        self.first_token_at = self.last_token_at = 0.0   # perf_counter() when they were sampled
        self._decoder = StreamDecoder(tokenizer())

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._stops.text

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the generation, if one did."""
        return self._stops.matched

    def take(self, logits: np.ndarray) -> Step:
        """The next token from this sequence's logits row [V] and what it releases. Raises
        FloatingPointError on non-finite logits, ValueError if the sampler fails."""
        if self.stop_reason is not None:
            raise RuntimeError(f"the generation has stopped ({self.stop_reason.value})")
        if not np.isfinite(logits).all():
            raise FloatingPointError("the model produced non-finite logits")
        token = self.sampler(logits, self._seen)
        self.last_token_at = time.perf_counter()
        if not self.tokens:
            self.first_token_at = self.last_token_at
        self.tokens.append(token)
        self._seen.append(token)
        if token == self.eos_token_id:
            text, self.stop_reason = "", StopReason.EOS
        else:
            text = self._stops.push(self._decoder.push(token))
            if self._stops.stopped:
                self.stop_reason = StopReason.STOP_SEQUENCE
            elif len(self.tokens) == self.max_new_tokens:
                self.stop_reason = StopReason.MAX_TOKENS
        if self.stop_reason is not None:
            text += self.flush()
        return Step(token, text, self.stop_reason)

    def flush(self) -> str:
        """The text held back, released: at the end, or when the caller gives up early (Ctrl-C)."""
        return self._stops.push(self._decoder.flush()) + self._stops.flush()


def run(model: GPT2, session: Session, tracer: Tracer | None = None) -> Iterator[Step]:
    """Drive one session alone: the prompt pass, then one decode pass per token, each Step yielded as soon as
    it is sampled, up to the one with a stop reason. A tracer sees every pass."""
    logits = model.forward(session.prompt_ids, session.cache, logits="last", tracer=tracer)
    while True:
        step = session.take(logits[0])
        yield step
        if step.stop_reason is not None:
            return
        logits = model.decode_batch([step.token], [session.cache], tracer=tracer)


def generate(model: GPT2, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler | None = None, *,
             eos_token_id: int | None = EOT_TOKEN, tracer: Tracer | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens ids after prompt_ids (greedy unless a sampler is given); stop after
    eos_token_id unless it is None.

    Raises before any work if the request does not fit (model.check_request)."""
    session = Session(model, prompt_ids, max_new_tokens, sampler or Sampler(), eos_token_id=eos_token_id)
    return (step.token for step in run(model, session, tracer))
