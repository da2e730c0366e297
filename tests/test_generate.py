"""llorch.generate.Session: what each token releases and why a generation stops, fed chosen logits rows."""

import numpy as np
import pytest

import llorch
from llorch.generate import NonFiniteError, Session, Step, StopReason, lookup_draft, run
from llorch.sampling import Sampler
from llorch.trace import Tracer

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
        with pytest.raises(NonFiniteError, match="non-finite logits at position 0"):
            session.take(logits)
    assert session.tokens == []
    with pytest.raises(llorch.ContextError, match="exceeds the context of 128 positions"):
        Session(model, [1] * 100, 29, Sampler())
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        Session(model, [1], 4, Sampler(), stop=[""])


def test_ids_past_the_tokenizer_of_a_padded_vocabulary_are_never_chosen(padded_checkpoint):
    padded = llorch.load(padded_checkpoint)
    assert padded.config.vocab_size == 50304
    prompt = enc.encode("Hello world")
    logits = padded.forward(prompt, padded.new_cache(), logits="last")[0]
    assert logits[enc.n_vocab:].min() > logits[:enc.n_vocab].max()   # unmasked, a padding id would win
    for sampler in (Sampler(), Sampler(temperature=1.0, seed=0)):
        tokens = list(llorch.generate(padded, prompt, 8, sampler))
        assert len(tokens) == 8 and max(tokens) < enc.n_vocab


def test_prompt_logprobs_of_a_padded_vocabulary_are_over_the_tokenizers_ids(padded_checkpoint):
    padded = llorch.load(padded_checkpoint)
    prompt = enc.encode("Hello world, again")
    session = Session(padded, prompt, 1, Sampler(), logprobs=2)
    rows = padded.forward(prompt, session.cache, logits="all")
    scored = session.score_prompt(rows, 2)
    assert len(scored) == len(prompt) - 1
    for row, token, (logprob, top) in zip(rows, prompt[1:], scored):
        real = row[:enc.n_vocab].astype(np.float64)
        expected = real[token] - real.max() - np.log(np.exp(real - real.max()).sum())
        assert logprob == pytest.approx(expected, abs=1e-9)
        assert len(top) == 2 and all(t < enc.n_vocab for t, _ in top)   # padding ids, though larger, are not there
    # the completion's log-prob is over the same ids
    step = session.take(rows[-1])
    real = rows[-1][:enc.n_vocab].astype(np.float64)
    assert step.logprob == pytest.approx(real[step.token] - real.max() - np.log(np.exp(real - real.max()).sum()),
                                         abs=1e-9)


def test_overflowing_activations_raise_naming_the_position_and_the_checkpoint(overflowing_checkpoint):
    overflowing = llorch.load(overflowing_checkpoint)
    prompt = [464, 3139, 286]
    for sampler in (Sampler(), Sampler(temperature=0.8, seed=1)):   # greedy and sampled alike
        with pytest.raises(NonFiniteError, match="^non-finite logits at position 2: .*overflowed$"):
            list(llorch.generate(overflowing, prompt, 4, sampler))
    tracer = Tracer()
    with pytest.raises(NonFiniteError, match="position 2: .*first non-finite checkpoint is s0.h0.mlp.proj$"):
        list(run(overflowing, Session(overflowing, prompt, 4, Sampler()), tracer))
    assert np.isfinite(tracer.get("mlp.gelu", 0)).all() and not np.isfinite(tracer.get("mlp.proj", 0)).all()


# --- lookup drafting: exact speculative decoding ---------------------------------------------------------

class CountingModel:
    """A model that counts its passes, to show drafts were verified (the tokens must not tell)."""

    def __init__(self, model):
        self.model, self.passes = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        self.passes += 1
        return self.model.forward(*args, **kwargs)

    def decode_batch(self, *args, **kwargs):
        self.passes += 1
        return self.model.decode_batch(*args, **kwargs)


@pytest.mark.parametrize("shape", ["tiny", "odd"])
def test_verify_pass_rows_are_bitwise_one_token_passes(checkpoint, shape):
    # the premise of exact drafting: row i of a multi-row pass at the cache's length is what the i-th
    # one-token decode pass gives, so the verified tokens are greedy's
    model = llorch.load(checkpoint(shape))
    ids = np.random.default_rng(2).integers(0, enc.n_vocab, 30).tolist()
    one_by_one, together = model.new_cache(), model.new_cache()
    model.forward(ids[:18], one_by_one, logits="last")
    model.forward(ids[:18], together, logits="last")
    rows = [model.decode_batch([token], [one_by_one])[0] for token in ids[18:]]
    assert np.array_equal(np.stack(rows), model.forward(ids[18:], together, logits="all"))


def test_lookup_draft_continues_the_latest_occurrence_of_the_longest_ngram():
    sequence = np.array([5, 1, 2, 9, 7, 1, 2, 3, 4, 8, 1, 2, 3], dtype=np.int32)
    assert lookup_draft(sequence, 3) == [4, 8, 1]              # "1 2 3" occurred at 5..7
    assert lookup_draft(sequence[:-1], 2) == [3, 4]            # "1 2": the latest earlier occurrence
    assert lookup_draft(np.array([1, 2, 1, 2], dtype=np.int32), 5) == [1, 2, 1, 2, 1]   # the loop goes on
    assert lookup_draft(np.array([7, 7, 7], dtype=np.int32), 3) == [7, 7, 7]
    assert lookup_draft(np.array([4, 5, 6, 7], dtype=np.int32), 4) == []
    assert lookup_draft(sequence, 0) == []


@pytest.mark.parametrize("shape", ["tiny", "odd", "head80"])
def test_lookup_draft_gives_bitwise_the_plain_greedy_tokens(checkpoint, shape):
    model = CountingModel(llorch.load(checkpoint(shape)))
    rng = np.random.default_rng(1)
    passes = tokens = 0
    for n in range(12):
        phrase = rng.integers(0, enc.n_vocab, rng.integers(2, 10)).tolist()
        prompt = (phrase * 8)[: rng.integers(6, 70)] + rng.integers(0, enc.n_vocab, n % 3).tolist()
        plain = list(llorch.generate(model.model, prompt, 48, eos_token_id=None))
        model.passes = 0
        assert list(llorch.generate(model, prompt, 48, eos_token_id=None, draft="lookup")) == plain
        passes, tokens = passes + model.passes, tokens + len(plain)
    assert passes < 0.7 * tokens   # drafts were accepted: the equality above was put to the test


def test_lookup_draft_stops_like_plain_greedy_at_eos_stop_strings_and_the_context(model):
    prompt = enc.encode("a b c a b c a b c a b")
    plain = list(llorch.generate(model, prompt, 20))
    eos = plain[7]        # a token that comes out mid-way: it must stop both runs at the same place
    for options in [dict(eos_token_id=eos), dict(eos_token_id=None)]:
        assert list(llorch.generate(model, prompt, 20, draft="lookup", **options)) == \
            list(llorch.generate(model, prompt, 20, **options))
    stop = enc.decode(plain[3:5])
    runs = [Session(model, prompt, 20, Sampler(), stop=[stop]) for _ in range(2)]
    texts = [[step.text for step in run(model, s, draft=d)] for s, d in zip(runs, [None, "lookup"])]
    assert texts[0] == texts[1] and runs[0].tokens == runs[1].tokens
    long_prompt = (prompt * 20)[: model.config.n_positions - 9]       # the last token fills the context
    assert list(llorch.generate(model, long_prompt, 9, eos_token_id=None, draft="lookup")) == \
        list(llorch.generate(model, long_prompt, 9, eos_token_id=None))


@pytest.mark.parametrize("options, message", [(dict(draft="model"), "draft must be one of lookup"),
                                              (dict(draft="lookup", sampler=Sampler(0.8)), "needs greedy decoding")])
def test_lookup_draft_refusals(model, options, message):
    with pytest.raises(ValueError, match=message):
        llorch.generate(model, [1, 2], 4, **options)
