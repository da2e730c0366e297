"""What llorch's console scripts (llorch-run, llorch-cpud) share: exit codes and one-line errors."""

from __future__ import annotations

import argparse

EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 2, 1, 130   # 130 = 128 + SIGINT, as shells report Ctrl-C


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, `PROG: error: ...`, exit 2: for bad options and every other bad input."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")
