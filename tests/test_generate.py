"""llorch.generate.Session: what each token releases and why a generation stops, fed chosen logits rows."""

import numpy as np
import pytest

import llorch
from llorch.generate import Session, Step, StopReason
from llorch.sampling import Sampler

enc = llorch.tokenizer()
EMOJI = [47249, 222]            # "\N{GRINNING FACE}", split inside the character
HELLO_WORLD = [15496, 995]      # "Hello", " world"


@pytest.fixture(scope="module")
def model(checkpoint):
    return llorch.load(checkpoint("tiny"))


def row(token: int) -> np.ndarray:
    """Logits whose greedy choice is token."""
    logits = np.zeros(enc.n_vocab, dtype=np.float32)
    logits[token] = 1.0
    return logits


def fed(session: Session, tokens: list[int]) -> list[Step]:
    return [session.take(row(token)) for token in tokens]


def test_max_tokens_ends_on_the_last_token(model):
    session = Session(model, [1, 2], 2, Sampler())
    assert fed(session, HELLO_WORLD) == [Step(15496, "Hello", None), Step(995, " world", StopReason.MAX_TOKENS)]
    assert (session.tokens, session.text, session.stop_reason) == (HELLO_WORLD, "Hello world", StopReason.MAX_TOKENS)
    with pytest.raises(RuntimeError, match="has stopped"):
        session.take(row(1))


def test_eos_is_a_token_without_text_unless_disabled(model):
    session = Session(model, [1], 5, Sampler())
    assert fed(session, [15496, llorch.EOT_TOKEN]) == [Step(15496, "Hello", None),
                                                       Step(llorch.EOT_TOKEN, "", StopReason.EOS)]
    ignoring = Session(model, [1], 2, Sampler(), eos_token_id=None)
    assert fed(ignoring, [llorch.EOT_TOKEN, 15496])[-1] == Step(15496, "Hello", StopReason.MAX_TOKENS)
    assert ignoring.text == "<|endoftext|>Hello"


def test_a_split_character_waits_for_its_end_or_is_replaced_at_the_end(model):
    assert [step.text for step in fed(Session(model, [1], 2, Sampler()), EMOJI)] == ["", "\N{GRINNING FACE}"]
    assert fed(Session(model, [1], 1, Sampler()), EMOJI[:1]) == [
        Step(EMOJI[0], "\N{REPLACEMENT CHARACTER}", StopReason.MAX_TOKENS)]


def test_a_stop_string_across_tokens_ends_the_text_before_it(model):
    session = Session(model, [1], 10, Sampler(), stop=["lo w", "never"])
    steps = fed(session, HELLO_WORLD)
    assert [step.text for step in steps] == ["Hel", ""]          # "lo" was held: it may begin "lo w"
    assert steps[-1].stop_reason == StopReason.STOP_SEQUENCE and session.stop_sequence == "lo w"
    held = Session(model, [1], 10, Sampler(), stop=["lo w"])
    assert fed(held, HELLO_WORLD[:1])[0].text == "Hel" and held.flush() == "lo"   # given up early


def test_bad_logits_and_bad_requests_are_refused(model):
    session = Session(model, [1], 4, Sampler())
    for bad in (np.nan, np.inf):
        logits = row(5)
        logits[7] = bad
        with pytest.raises(FloatingPointError, match="non-finite logits"):
            session.take(logits)
    assert session.tokens == []
    with pytest.raises(llorch.ContextError, match="exceeds the context of 128 positions"):
        Session(model, [1] * 100, 29, Sampler())
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        Session(model, [1], 4, Sampler(), stop=[""])
