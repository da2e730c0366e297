"""GPT-2's byte-level BPE (tiktoken's "gpt2" encoding), built offline from the bundled files."""

from __future__ import annotations

import functools
import os

import tiktoken
from tiktoken.load import load_tiktoken_bpe

EOT_TOKEN = 50256
_DATA = os.path.join(os.path.dirname(__file__), "data")
# GPT-2's pre-tokenizer split, as in OpenAI's encoder.py and tiktoken's gpt2 definition.
_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def tokenizer() -> tiktoken.Encoding:
    """tiktoken's gpt2 encoding (50257 ids, <|endoftext|> = 50256) from the files shipped in the package."""
    ranks = load_tiktoken_bpe(os.path.join(_DATA, "gpt2.tiktoken"))
    return tiktoken.Encoding(name="gpt2", pat_str=_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=50257)
