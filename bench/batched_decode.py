"""In-process batched decode: aggregate tok/s of B sequences decoded together against one (issue 17 item 4).

    python bench/batched_decode.py [--model DIR] [--batches 8,16] [--steps 24] [--rounds 3] [--interleave]
    python bench/batched_decode.py --vs OTHER.so [--vs ...] [--steps 60]   # builds compared, step by step

Each round, for B = 1 and then each of --batches: B caches each prefilled with the same 32-token prompt,
one untimed `decode_batch` step, then --steps timed steps of B rows; the rate is B * steps / seconds.
Rounds print B's rate and its ratio to B = 1's of the same round. Threads: llorch's default (auto).
With --interleave the batch sizes take turns step by step (B = 1, 8, 16, B = 1, ...) and each rate is B
over its median step time: the host's bandwidth, which drifts by 20-30 % within a minute here, then moves
every B's steps alike instead of one B's run after another's.
Issue 17's targets: B = 8 >= 7x and B = 16 >= 10x B = 1's aggregate.

Each round also prints the compute roof of that ratio. B rows cost B times one row's FLOPs (2 per weight
read, bench/ceilings.py), so no batch decodes faster than the compute ceiling, sgemm FLOP/s / FLOPs per
token: the ratio's roof is that ceiling over B = 1's rate of the round, whatever B. The faster B = 1 streams
its weights, the lower the roof. sgemm is measured once, as bench/run.py does (ceilings.Machine in a child
process, `--threads` threads).

With --vs, other builds of llorch._kernels (say, the .so of an earlier commit) take turns with the
installed one step by step, each step at the same positions (a row's bits are the same in every build),
so that the host's drifting bandwidth hits them alike: the median step time of each, and its median ratio
to the installed build's.

Without --model it uses bench/batching.py's seeded random checkpoint at GPT-2 124M's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import llorch
import llorch.model
from batching import default_model
from ceilings import TokenCost, blas_env
from kernels import load_kernels

PROMPT = list(range(1000, 1032))


def prefilled(model: llorch.GPT2, batch: int) -> list:
    """batch caches, each holding PROMPT."""
    caches = [model.new_cache() for _ in range(batch)]
    for cache in caches:
        model.forward(PROMPT, cache, logits="last")
    return caches


def rates(model: llorch.GPT2, batches: list[int], steps: int, interleave: bool) -> dict[int, float]:
    """B -> aggregate tok/s for B = 1 and each of batches: B caches each prefilled with PROMPT and one untimed
    step, then `steps` timed steps; B * steps / seconds, or with interleave, B / the median step time of
    steps taken in turns (B = 1, 8, 16, B = 1, ...)."""
    sets = {batch: prefilled(model, batch) for batch in [1, *batches]}
    for batch, caches in sets.items():
        model.decode_batch([5] * batch, caches)
    if interleave:
        times = {batch: [] for batch in sets}
        for _ in range(steps):
            for batch, caches in sets.items():
                started = time.perf_counter()
                model.decode_batch([5] * batch, caches)
                times[batch].append(time.perf_counter() - started)
        return {batch: batch / statistics.median(t) for batch, t in times.items()}
    measured = {}
    for batch, caches in sets.items():
        started = time.perf_counter()
        for _ in range(steps):
            model.decode_batch([5] * batch, caches)
        measured[batch] = batch * steps / (time.perf_counter() - started)
    return measured


def compare(model: llorch.GPT2, builds: list[str], batches: list[int], steps: int) -> None:
    """decode_batch steps of each build in turn (the installed one first), at the same positions."""
    kernels = [load_kernels(None, "installed")] + [load_kernels(path, f"vs{i}") for i, path in enumerate(builds)]
    names = ["installed"] + builds
    for batch in [1, *batches]:
        caches = prefilled(model, batch)
        times = [[] for _ in kernels]
        for step in range(steps):
            for K, seconds in zip(kernels, times):
                llorch.model.K = K
                for cache in caches:
                    cache.length = len(PROMPT) + step
                started = time.perf_counter()
                model.decode_batch([5] * batch, caches)
                seconds.append(time.perf_counter() - started)
        llorch.model.K = kernels[0]
        print(f"B{batch}: " + "  ".join(
            f"{name} {statistics.median(t) * 1e3:.2f} ms ({statistics.median(a / b for a, b in zip(t, times[0])):.3f}x)"
            for name, t in zip(names, times)), flush=True)


def sgemm_gflops(model_dir: str, threads: int) -> float:
    """ceilings.Machine's sgemm GFLOP/s at the model's layer shapes, in a child process with blas_env()."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from ceilings import Machine; "
            "from llorch.config import GPT2Config; "
            "print(Machine(GPT2Config.from_json(sys.argv[2]), int(sys.argv[3])).sgemm_gflops())")
    bench = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", code, bench, os.path.join(model_dir, "config.json"), str(threads)],
                          env=blas_env(), capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        sys.exit(f"batched_decode.py: the sgemm measurement failed ({last}); bench/setup.sh installs what it needs")
    return float(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: batching.py's random 124M-shape one)")
    parser.add_argument("--batches", default="8,16", help="batch sizes compared with 1 (default: 8,16)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="sgemm's threads for the roof (default: the CPUs this process may use)")
    parser.add_argument("--interleave", action="store_true",
                        help="the batch sizes take turns step by step; rates from median step times")
    parser.add_argument("--vs", action="append", default=[], metavar="SO",
                        help="another build of llorch._kernels to compare step by step (repeatable)")
    args = parser.parse_args()
    model_dir = args.model or default_model()
    model = llorch.load(model_dir)
    batches = [int(b) for b in args.batches.split(",")]
    if args.vs:
        compare(model, args.vs, batches, args.steps)
        return
    sgemm = sgemm_gflops(model_dir, args.threads)
    flops_per_token = TokenCost(model.config).decode_bytes / 2   # one multiply-add per 4-byte weight read
    print(f"sgemm {sgemm:.0f} GFLOP/s ({args.threads} threads): the compute ceiling is "
          f"{sgemm * 1e9 / flops_per_token:.0f} tok/s", flush=True)
    for _ in range(args.rounds):
        measured = rates(model, batches, args.steps, args.interleave)
        one = measured[1]
        line = [f"B1 {one:.1f}"]
        for batch in batches:
            line.append(f"B{batch} {measured[batch]:.1f} ({measured[batch] / one:.2f}x)")
        line.append(f"| roof {sgemm * 1e9 / flops_per_token / one:.1f}x")
        print(" ".join(line), flush=True)


if __name__ == "__main__":
    main()
