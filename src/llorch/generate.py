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
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .logits import LogitsProcessor, TopLogprobs, score
from .sampling import Sampler
from .stream import StopStrings, StreamDecoder
from .tokenizer import EOT_TOKEN, tokenizer

if TYPE_CHECKING:
    from .model import GPT2, KVCache
    from .trace import Tracer


class NonFiniteError(FloatingPointError):
    """The model's logits went non-finite: its activations overflowed (finite but huge weights, or an input
    they were never meant for). A fault of the checkpoint, not of llorch; the message names the position."""


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
    logprob: float | None = None                      # log p of token, when the Session computes log-probs
    top_logprobs: TopLogprobs = ()                    # the most likely (id, log p), most likely first


class Session:
    """One sequence being generated. Construction checks the request (model.check_request) and makes its
    cache; `take` then turns each logits row into a Step until one has a stop reason.

    Every token counts towards max_new_tokens and is kept in `tokens`, eos and the token that completes a
    stop string included; neither releases text of its own. The final Step also releases the text held
    back (an unfinished character as U+FFFD, the start of a stop string that did not complete).

    A processor (llorch.logits) changes each row before the sampler sees it. With logprobs=N (0 or more),
    each Step also carries the token's log-prob and the N most likely tokens', from the processed row.
    cache: a KV cache to reuse (its length is reset; what it held is never read), else a new one."""

    def __init__(self, model: GPT2, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler, *,
                 eos_token_id: int | None = EOT_TOKEN, stop: Sequence[str] = (),
                 processor: LogitsProcessor | None = None, logprobs: int | None = None,
                 cache: KVCache | None = None) -> None:
        model.check_request(prompt_ids, max_new_tokens)
        self.processor, self.logprobs = processor, logprobs
        self._stops = StopStrings(stop)
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens, self.sampler, self.eos_token_id = max_new_tokens, sampler, eos_token_id
        self.cache = model.new_cache() if cache is None else cache   # a given cache's old rows are never read
        self.cache.length = 0
        self.tokens: list[int] = []
        self.stop_reason: StopReason | None = None
        self.first_token_at = self.last_token_at = 0.0   # perf_counter() when they were sampled
        self._decoder = StreamDecoder(tokenizer())
        # ids past the tokenizer's (a vocabulary padded to 50304, as nanoGPT and llm.c train) have no text:
        # they are never chosen, as if their logits were -inf
        self._n_vocab = tokenizer().n_vocab

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._stops.text

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the generation, if one did."""
        return self._stops.matched

    @property
    def position(self) -> int:
        """The sequence position whose logits the next take() reads: the last token's so far."""
        return len(self.prompt_ids) + len(self.tokens) - 1

    def take(self, logits: np.ndarray) -> Step:
        """The next token from this sequence's logits row [V] and what it releases. Raises NonFiniteError
        on non-finite logits, ValueError if the sampler fails."""
        if self.stop_reason is not None:
            raise RuntimeError(f"the generation has stopped ({self.stop_reason.value})")
        logits = logits[:self._n_vocab]
        if not np.isfinite(logits).all():
            raise NonFiniteError(f"non-finite logits at position {self.position}: the model's activations "
                                 "overflowed")
        if self.processor is not None:
            logits = self.processor(logits, self.prompt_ids, self.tokens)
        token = self.sampler(logits)
        logprob, top = score(logits, token, self.logprobs) if self.logprobs is not None else (None, ())
        self.last_token_at = time.perf_counter()
        if not self.tokens:
            self.first_token_at = self.last_token_at
        self.tokens.append(token)
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
        return Step(token, text, self.stop_reason, logprob, top)

    def score_prompt(self, logits: np.ndarray, top_n: int) -> list[tuple[float, TopLogprobs]]:
        """Each prompt token's log-prob after the first, and the top_n most likely there, from the prompt's
        logits rows [len(prompt_ids), V] (the model's own, before any processor), over the same ids as take."""
        return [score(row[:self._n_vocab], token, top_n) for row, token in zip(logits, self.prompt_ids[1:])]

    def flush(self) -> str:
        """The text held back, released: at the end, or when the caller gives up early (Ctrl-C)."""
        return self._stops.push(self._decoder.flush()) + self._stops.flush()


# Lookup drafting (spec 11): the longest of these n-grams ending the sequence that occurred before proposes
# the tokens that followed its latest occurrence. Shorter n-grams guess too often to pay for their passes.
DRAFT_NGRAMS = (3, 2)
DRAFT_TOKENS_FIRST, DRAFT_TOKENS_MAX = 4, 16
DRAFTS = ("lookup",)
DRAFT_CHOICES = (*DRAFTS, "none")   # what --draft takes (llorch-cpud, llorch-serve): a drafter, or none


def lookup_draft(sequence: np.ndarray, limit: int) -> list[int]:
    """limit tokens copied from after the latest earlier occurrence of the sequence's last n tokens (int32
    ids [S], n in DRAFT_NGRAMS, longest first); [] when none occurred. A copy that reaches the end of the
    sequence goes on with what it copied, as the repetition it found would (a loop of period 2 drafts
    a b a b ...)."""
    S = len(sequence)
    for n in DRAFT_NGRAMS:
        if S <= n or limit < 1:
            continue
        same = sequence[:S - n] == sequence[S - n]   # windows starting at 0 .. S - n - 1, compared token by token
        for k in range(1, n):
            same &= sequence[k:S - n + k] == sequence[S - n + k]
        matches = np.flatnonzero(same)
        if matches.size:
            return np.resize(sequence[matches[-1] + n:], limit).tolist()   # np.resize repeats cyclically
    return []


def check_draft(draft: str | None, sampler: Sampler, traced: bool = False) -> None:
    """ValueError unless draft is None, or a known drafter for a greedy sampler and an untraced run."""
    if draft is None:
        return
    if draft not in DRAFTS:
        raise ValueError(f"draft must be one of {', '.join(DRAFTS)} or None, got {draft!r}")
    if sampler.temperature != 0:
        raise ValueError(f'draft="{draft}" needs greedy decoding (temperature 0)')
    if traced:
        raise ValueError("a traced run cannot draft: a trace follows one token a pass")


class LookupDrafter:
    """Exact speculative decoding of one greedy Session (spec 11, requirement 8), for whoever runs its passes:
    `run` below, or the daemon's scheduler, which stacks the pass with other jobs' rows.

    `draft()` proposes the tokens to run after the session's last one (lookup_draft, at most k of them, never
    past max_new_tokens); the caller runs them in one pass, [last token] + drafts at the cache's length, and
    hands all its rows to `take`, which feeds them to the session while each yields the next drafted token,
    rewinds the cache to the positions taken and adapts k. Each row is bitwise the logits a one-token pass
    would give (the kernels compute a row independently of the others), so the tokens are plain greedy's."""

    def __init__(self, session: Session) -> None:
        self.session, self.limit = session, DRAFT_TOKENS_FIRST
        self.drafted: list[int] = []     # drafted[i]: the token row i must yield for row i + 1 to count

    def draft(self, most: int = DRAFT_TOKENS_MAX) -> list[int]:
        """Up to min(k, most) tokens for the next pass to verify; [] when nothing matched or most is 0."""
        session = self.session
        # drafts end one token before the last that may be needed: no pass beyond the request's context
        room = session.max_new_tokens - len(session.tokens) - 1
        limit = min(self.limit, room, most)
        self.drafted = []
        if limit > 0:
            self.drafted = lookup_draft(np.array(session.prompt_ids + session.tokens, dtype=np.int32), limit)
        return self.drafted

    def take(self, rows: np.ndarray, take: Callable[[np.ndarray], Step | None]) -> Iterator[Step]:
        """take(row) for the pass's rows [1 + len(drafted), V] in order, each Step yielded, until one stops
        the session (or take fails: None) or yields a token other than the one drafted next."""
        taken = 0
        for row in rows:
            step = take(row)
            if step is None:
                return
            yield step
            taken += 1
            if step.stop_reason is not None:
                return
            if taken == len(rows) or step.token != self.drafted[taken - 1]:
                break
        self.session.cache.length -= len(rows) - taken     # forget the positions of the drafts after the miss
        if self.drafted:                                   # more when every draft was right, fewer when not
            self.limit = min(self.limit + 2, DRAFT_TOKENS_MAX) if taken == len(rows) else max(1, taken - 1)


def run(model: GPT2, session: Session, tracer: Tracer | None = None, *, draft: str | None = None) -> Iterator[Step]:
    """Drive one session alone: the prompt pass, then one decode pass per token, each Step yielded as soon as
    it is sampled, up to the one with a stop reason. A tracer sees every pass; a NonFiniteError then names the
    first checkpoint that went non-finite.

    draft="lookup" (greedy only, no tracer) is exact speculative decoding (LookupDrafter): tokens proposed
    by lookup_draft ride along in the pass of the last sampled token, one row each, and every row is taken
    while the token it yields is the one drafted next; the rejected rows' cache positions are simply
    overwritten later (the cache's length is rewound)."""
    check_draft(draft, session.sampler, traced=tracer is not None)
    drafter = LookupDrafter(session)
    rows = model.forward(session.prompt_ids, session.cache, logits="last", tracer=tracer)
    while True:
        yield from drafter.take(rows, lambda row: _take(session, row, tracer))
        if session.stop_reason is not None:
            return
        token = session.tokens[-1]
        if drafted := drafter.draft(DRAFT_TOKENS_MAX if draft else 0):
            rows = model.forward([token] + drafted, session.cache, logits="all")
        else:
            rows = model.decode_batch([token], [session.cache], tracer=tracer)


def _take(session: Session, row: np.ndarray, tracer: Tracer | None) -> Step:
    """session.take(row); a NonFiniteError names the first non-finite checkpoint when a tracer saw one."""
    try:
        return session.take(row)
    except NonFiniteError as e:
        if tracer is None or tracer.first_non_finite is None:
            raise
        raise NonFiniteError(f"{e}; the first non-finite checkpoint is {tracer.first_non_finite}") from None


def generate(model: GPT2, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler | None = None, *,
             eos_token_id: int | None = EOT_TOKEN, tracer: Tracer | None = None,
             draft: str | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens ids after prompt_ids (greedy unless a sampler is given); stop after
    eos_token_id unless it is None. draft="lookup" speeds greedy decoding up where the text repeats itself
    (the prompt's or its own), with the same tokens (see run).

    Raises before any work if the request does not fit (model.check_request) or the draft is refused."""
    sampler = sampler or Sampler()
    check_draft(draft, sampler, traced=tracer is not None)
    session = Session(model, prompt_ids, max_new_tokens, sampler, eos_token_id=eos_token_id)
    return (step.token for step in run(model, session, tracer, draft=draft))
