"""Generated text as it is produced: whole UTF-8 characters only, and nothing past a stop string.

GPT-2's byte-level BPE splits many characters across tokens ("😀" is [47249, 222]: b"\\xf0\\x9f\\x98", then
b"\\x80"), so decoding each token on its own prints broken characters. StreamDecoder keeps the bytes of an
unfinished character until the token that completes it arrives (spec 02). StopStrings keeps back text that
may be the start of a stop string until the following text decides it (spec 12).

    decoder, stops = StreamDecoder(encoding), StopStrings(["\\n\\n"])
    for token in tokens:
        print(stops.push(decoder.push(token)), end="")
        if stops.stopped:
            break
    print(stops.push(decoder.flush()) + stops.flush(), end="")
"""

from __future__ import annotations

import codecs
from typing import Sequence

import tiktoken


class StreamDecoder:
    """Token ids in, text chunks out. The chunks, joined, equal `encoding.decode(ids)`, and none holds part
    of a character."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encoding = encoding
        # errors="replace" as in tiktoken's decode: invalid bytes become U+FFFD in both alike
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text this token completes ("" while a character is unfinished)."""
        if not 0 <= token < self._encoding.n_vocab:
            raise ValueError(f"token id {token} out of range [0, {self._encoding.n_vocab})")
        return self._utf8.decode(self._encoding.decode_single_token_bytes(token))

    def flush(self) -> str:
        """At the end of the stream: U+FFFD for an unfinished character, else ""."""
        return self._utf8.decode(b"", final=True)


class StopStrings:
    """Text chunks in, the text before the first stop string out, released as soon as it cannot be the
    beginning of one. `text` is everything released; `matched` is the stop string found, if any."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.check(stop)
        self._stop = tuple(stop)
        self._held = ""
        self.text = ""
        self.matched: str | None = None   # the stop string found (the first listed of those found earliest)

    @staticmethod
    def check(stop: Sequence[str]) -> None:
        """ValueError unless every stop string is non-empty."""
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, chunk: str) -> str:
        """The text that can be shown now."""
        if self.stopped:
            return ""
        self._held += chunk
        found = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if found:
            cut = min(found)
            self.matched = next(s for s in self._stop if self._held.startswith(s, cut))
            return self._release(cut)
        return self._release(len(self._held) - self._stop_prefix_length())

    def flush(self) -> str:
        """At the end of the stream: the held text, since no stop string can complete any more."""
        return "" if self.stopped else self._release(len(self._held))

    def _release(self, end: int) -> str:
        piece, self._held = self._held[:end], ("" if self.stopped else self._held[end:])
        self.text += piece
        return piece

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the held text that a stop string begins with."""
        held = self._held
        return max((n for s in self._stop for n in range(1, min(len(s) - 1, len(held)) + 1)
                    if held.endswith(s[:n])), default=0)
