"""The generation loop: the prompt through forward (passes of up to PREFILL_ROWS), then one decode pass per new token.

Each pass returns only the last position's logits (the lm_head is the largest matrix: computing it for
every prompt position would be wasted), the sampler picks a token, and the token is yielded at once so a
caller can stream it.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from .model import GPT2, ContextError
from .sampling import Sampler


def generate(model: GPT2, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler,
             eos_token_id: int | None = None, tracer=None) -> Iterator[int]:
    """Yield up to max_new_tokens ids after prompt_ids; stop after eos_token_id when it is given.

    Raises before any work if the prompt is empty or prompt + new tokens exceed the context."""
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    n_prompt, context = len(prompt_ids), model.config.n_positions
    if n_prompt == 0:
        raise ValueError("the prompt is empty: at least one token is needed")
    if n_prompt + max_new_tokens > context:
        raise ContextError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                           f"context of {context} tokens")
    ids = model._check_ids(prompt_ids, 0, model.cache)
    return _decode_loop(model, ids, max_new_tokens, sampler, eos_token_id, tracer)


def _decode_loop(model, ids, max_new_tokens, sampler, eos_token_id, tracer) -> Iterator[int]:
    cache = model.cache
    logits = model.forward(ids, 0, tracer=tracer, logits="last", cache=cache)
    pos = ids.size
    for produced in range(1, max_new_tokens + 1):
        token = sampler(logits[-1])
        yield token
        if token == eos_token_id or produced == max_new_tokens:
            return
        logits = model._run([(model._check_ids([token], pos, cache), pos, cache)], tracer, all_logits=False)
        pos += 1
