"""Exact speculative decoding (draft="lookup") against plain greedy: decode tok/s and acceptance rate.

    python bench/speculative.py --model DIR [--tokens 64] [--repeats 3] [--threads N]

For each prompt, plain greedy and lookup drafting run alternately in one process (alternating spreads the
drift of a shared machine over both), `--repeats` times; a run's decode rate is (tokens - 1) over the time
from the first token to the last, as llorch-run reports it. The tokens of the two runs must be identical.
The acceptance rate is the drafted tokens that were taken over all drafted tokens, counted by wrapping the
model (every pass yields one token that no draft predicted: accepted = tokens - passes).

Copy-heavy prompts edit or repeat code, or answer from a passage; the others have nothing to copy.
Issue 17's targets: >= 1.8x on copy-heavy prompts, >= 0.95x on the rest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import llorch
from llorch.generate import Session, run

CODE = '''def moving_average(values, width):
    """The mean of each window of `width` consecutive values."""
    if width < 1:
        raise ValueError("width must be at least 1")
    total = sum(values[:width])
    averages = [total / width]
    for i in range(width, len(values)):
        total += values[i] - values[i - width]
        averages.append(total / width)
    return averages
'''
PASSAGE = ("The lighthouse at Cape Verran was built in 1871 from granite quarried on the island itself. "
           "Its lamp burned colza oil until 1903, when it was converted to paraffin, and it was finally "
           "electrified in 1958. The last resident keeper, Thomas Aird, left in 1987, after which the light "
           "was operated automatically from the mainland. ")
PROMPTS = {
    "copy: repeat code": CODE + "\n# The same function again, unchanged:\n\n",
    "copy: rename in code": CODE + "\n# The same function with `values` renamed to `samples`:\n\n"
                                   "def moving_average(samples, width):\n",
    "copy: answer from a passage": PASSAGE + "\nQuestion: What happened to the lighthouse? Answer using the "
                                             "passage's own words.\nAnswer: The lighthouse at Cape Verran",
    "none: story": "Once upon a time, in a village by the sea,",
    "none: question": "What is the best way to learn a new language?",
}


class CountingModel:
    """The model, counting passes and drafted rows."""

    def __init__(self, model: llorch.GPT2) -> None:
        self.model, self.passes, self.drafted = model, 0, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, token_ids, cache, **options):
        self.passes += 1
        if cache.length:                       # a verify pass: the last token and its drafts
            self.drafted += len(token_ids) - 1
        return self.model.forward(token_ids, cache, **options)

    def decode_batch(self, tokens, caches, **options):
        self.passes += 1
        return self.model.decode_batch(tokens, caches, **options)


def timed(model: CountingModel, prompt_ids: list[int], tokens: int, draft: str | None) -> tuple[list[int], float]:
    """(tokens, decode tok/s) of one greedy run."""
    session = Session(model, prompt_ids, tokens, llorch.Sampler(), eos_token_id=None)
    for _ in run(model, session, draft=draft):
        pass
    return session.tokens, (len(session.tokens) - 1) / (session.last_token_at - session.first_token_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        llorch.set_num_threads(args.threads)
    model, encoding = CountingModel(llorch.load(args.model)), llorch.tokenizer()
    print(f"model {args.model}, {args.tokens} tokens, medians of {args.repeats}, "
          f"threads {llorch.build_info()['max_threads']}")
    print(f"{'prompt':30} {'greedy tok/s':>13} {'lookup tok/s':>13} {'ratio':>6} {'accepted':>9}")
    for name, text in PROMPTS.items():
        prompt_ids = encoding.encode(text)
        rates: dict[str | None, list[float]] = {None: [], "lookup": []}
        model.passes = model.drafted = accepted = 0
        for repeat in range(args.repeats):
            results = {}
            for draft in ([None, "lookup"] if repeat % 2 == 0 else ["lookup", None]):
                passes = model.passes
                results[draft], rate = timed(model, prompt_ids, args.tokens, draft)
                rates[draft].append(rate)
                if draft:
                    accepted += len(results[draft]) - (model.passes - passes)
            if results[None] != results["lookup"]:
                raise SystemExit(f"{name}: lookup drafting changed the tokens")
        drafted = model.drafted
        plain, lookup = statistics.median(rates[None]), statistics.median(rates["lookup"])
        acceptance = f"{accepted / drafted:.0%}" if drafted else "-"
        print(f"{name:30} {plain:13.1f} {lookup:13.1f} {lookup / plain:5.2f}x {acceptance:>9}")


if __name__ == "__main__":
    main()
