"""What llorch's console scripts share: exit codes, one-line errors, argument types."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .tokenizer import tokenizer

EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 2, 1, 130   # 130 = 128 + SIGINT, as shells report Ctrl-C


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, `PROG: error: ...`, exit 2: for bad options and every other bad input."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return number
    return parse


def thread_count(value: str) -> int | str:
    """An argparse type for --threads: "auto" or an integer >= 1."""
    if value == "auto":
        return value
    try:
        return int_at_least(1)(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1 or "auto", got {value!r}') from None


def token_ids(value: str) -> list[int]:
    """--prompt-ids: comma-separated ids of GPT-2's vocabulary."""
    vocab = tokenizer().n_vocab
    ids = []
    for item in value.split(","):
        try:
            ids.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a token id (expected e.g. 464,3139)") from None
        if not 0 <= ids[-1] < vocab:
            raise argparse.ArgumentTypeError(f"token id {ids[-1]} is outside GPT-2's vocabulary [0, {vocab})")
    return ids


def internal_error(prog: str, error: Exception) -> int:
    """One line on stderr and EXIT_INTERNAL_ERROR; with LLORCH_DEBUG=1 the error is raised again, traceback and all."""
    if os.environ.get("LLORCH_DEBUG") == "1":
        raise error
    sys.stderr.write(f"{prog}: internal error: {type(error).__name__}: {error} (LLORCH_DEBUG=1 shows the traceback)\n")
    return EXIT_INTERNAL_ERROR
