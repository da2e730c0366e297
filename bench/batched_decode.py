"""In-process batched decode: aggregate tok/s of B sequences decoded together against one (issue 17 item 4).

    python bench/batched_decode.py [--model DIR] [--batches 8,16] [--steps 24] [--rounds 3]

Each round, for B = 1 and then each of --batches: B caches each prefilled with the same 32-token prompt,
one untimed `decode_batch` step, then --steps timed steps of B rows; the rate is B * steps / seconds.
Rounds print B's rate and its ratio to B = 1's of the same round. Threads: llorch's default (auto).
Issue 17's targets: B = 8 >= 7x and B = 16 >= 10x B = 1's aggregate.

Without --model it uses bench/batching.py's seeded random checkpoint at GPT-2 124M's shape.
"""

from __future__ import annotations

import argparse
import time

import llorch
from batching import default_model

PROMPT = list(range(1000, 1032))


def rate(model: llorch.GPT2, batch: int, steps: int) -> float:
    caches = [model.new_cache() for _ in range(batch)]
    for cache in caches:
        model.forward(PROMPT, cache, logits="last")
    model.decode_batch([5] * batch, caches)
    started = time.perf_counter()
    for _ in range(steps):
        model.decode_batch([5] * batch, caches)
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: batching.py's random 124M-shape one)")
    parser.add_argument("--batches", default="8,16", help="batch sizes compared with 1 (default: 8,16)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = llorch.load(args.model or default_model())
    batches = [int(b) for b in args.batches.split(",")]
    for _ in range(args.rounds):
        one = rate(model, 1, args.steps)
        line = [f"B1 {one:.1f}"]
        for batch in batches:
            aggregate = rate(model, batch, args.steps)
            line.append(f"B{batch} {aggregate:.1f} ({aggregate / one:.2f}x)")
        print(" ".join(line), flush=True)


if __name__ == "__main__":
    main()
