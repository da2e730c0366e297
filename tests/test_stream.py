"""llorch.stream: whole UTF-8 characters only (StreamDecoder), nothing past a stop string (StopStrings)."""

import numpy as np
import pytest

import llorch
from llorch.stream import StopStrings, StreamDecoder

enc = llorch.tokenizer()
EMOJI = "\N{GRINNING FACE}"   # GPT-2 tokens [47249, 222]: the first ends inside the character
NI_HAO = "\u4f60\u597d"       # tokens [19526, 254, 25001, 121]: each character split in two


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("tokens, pieces", [
    ([47249, 222], ["", EMOJI]),
    ([19526, 254, 25001, 121], ["", NI_HAO[0], "", NI_HAO[1]]),
])
def test_stream_decoder_holds_split_characters_until_complete(tokens, pieces):
    decoder = StreamDecoder(enc)
    assert [decoder.push(t) for t in tokens] == pieces
    assert decoder.flush() == ""


def test_stream_decoder_replaces_an_unfinished_character_at_the_end():
    decoder = StreamDecoder(enc)
    assert decoder.push(47249) == "" and decoder.flush() == "\N{REPLACEMENT CHARACTER}"


def test_stream_decoder_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"token id 70000 out of range \[0, 50257\)"):
        StreamDecoder(enc).push(70000)


def test_stream_decoder_chunks_join_to_decode_on_random_tokens():
    """Random runs of byte-fragment tokens: invalid sequences become U+FFFD exactly as decode() makes them."""
    rng = np.random.default_rng(0)
    fragments = [t for t in range(enc.n_vocab - 1) if not is_utf8(enc.decode_single_token_bytes(t))]
    for _ in range(200):
        tokens = rng.choice(fragments + list(range(256)) + [47249, 222, 19526, 254], 12).tolist()
        decoder = StreamDecoder(enc)
        chunks = [decoder.push(t) for t in tokens] + [decoder.flush()]
        assert "".join(chunks) == enc.decode(tokens)


def test_stop_strings_cut_before_a_stop_string_across_chunks():
    stops = StopStrings(["ld, an"])
    # "ld" of " world" waits (it may begin the stop string) and is dropped once the stop string completes
    chunks = ["Hello", " world", ",", " and", " goodbye"]
    assert [stops.push(chunk) for chunk in chunks] == ["Hello", " wor", "", "", ""]
    assert stops.stopped and stops.flush() == "" and stops.text == "Hello wor"


def test_stop_strings_release_held_text_at_the_end():
    stops = StopStrings(["lo!", "xyz"])
    assert stops.push("Hel") == "He"   # "l" may begin "lo!"
    assert stops.push("lo") == "l"     # "llo" cannot, "lo" may
    assert stops.flush() == "lo" and not stops.stopped and stops.text == "Hello"


def test_stop_strings_cut_at_the_earliest_match():
    stops = StopStrings(["b", "abc"])
    assert stops.push("xabc") == "x" and stops.text == "x" and stops.matched == "abc"
    tied = StopStrings(["ab", "a"])   # both begin at the cut: the first listed is the one reported
    assert tied.push("xab") == "x" and tied.matched == "ab"
