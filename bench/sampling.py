"""The cost of sampling one token: llorch's Sampler against a full sort and HF's warpers (issue 17 item 2).

    python bench/sampling.py [--model DIR] [--calls 200] [--rounds 5]

Rows (50,257 logits each):
- "flat": the last-position logits of a real forward pass of --model (default: bench/batching.py's seeded
  random checkpoint at GPT-2 124M's shape). A random model's rows are nearly flat: top-p 0.95 keeps most of
  the vocabulary, the worst case for anything that walks the tokens most likely first.
- "peaked": a seeded normal row (sigma 3) with one token 30 above the rest, as a trained model's often is.
For each option set, three samplers draw --calls tokens per round on each row:
- llorch: `llorch.Sampler`;
- sort: the same steps written with one full `np.argsort` of the row and `Generator.choice`;
- hf: transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`,
  then `torch.softmax` and `torch.multinomial` (what `generate(do_sample=True)` runs per token).
The median over rounds of the mean ms per call is printed, with llorch's ratio to the faster of the others.
Issue 17's target: <= 0.3 ms a token for every option, with the same distributions (tests/test_sampling.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import llorch
from batching import default_model

OPTIONS = [dict(temperature=0.8), dict(temperature=0.8, top_k=40), dict(temperature=0.8, top_p=0.95),
           dict(temperature=0.8, min_p=0.05), dict(temperature=1.0, top_k=100, top_p=0.9, min_p=0.01)]


def sort_sampler(temperature, top_k=None, top_p=None, min_p=None, seed=0):
    """Spec 10's steps with one full sort of the row."""
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        order = np.argsort(-logits, kind="stable")
        if top_k:
            order = order[logits[order] >= logits[order[top_k - 1]]]
        probs = np.exp((logits[order].astype(np.float64) - logits[order[0]]) / temperature)
        probs /= probs.sum()
        if top_p:
            keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        if min_p:
            keep = probs >= min_p * probs[0]
            order, probs = order[keep], probs[keep] / probs[keep].sum()
        return int(order[rng.choice(len(order), p=probs)])
    return sample


def hf_sampler(temperature, top_k=None, top_p=None, min_p=None, seed=0):
    """transformers' warpers in generate()'s order, then softmax and multinomial."""
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p else []
    warpers += [MinPLogitsWarper(min_p)] if min_p else []
    generator = torch.Generator().manual_seed(seed)

    def sample(logits: np.ndarray) -> int:
        scores = torch.from_numpy(logits)[None]
        for warper in warpers:
            scores = warper(None, scores)
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
    return sample


def ms_per_call(sample, row: np.ndarray, calls: int) -> float:
    sample(row)
    started = time.perf_counter()
    for _ in range(calls):
        sample(row)
    return (time.perf_counter() - started) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint for the flat row (default: batching.py's random 124M-shape one)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = llorch.load(args.model or default_model())
    flat = model.forward(llorch.tokenizer().encode("The quick brown fox jumps over"), model.new_cache())[-1].copy()
    peaked = np.random.default_rng(0).normal(0, 3, flat.shape[0]).astype(np.float32)
    peaked[123] += 30
    print(f"{'options':<52} {'row':<7} {'llorch ms':>9} {'sort ms':>8} {'hf ms':>7} {'best other / llorch':>20}")
    for options in OPTIONS:
        for name, row in (("flat", flat), ("peaked", peaked)):
            samplers = {"llorch": llorch.Sampler(**options, seed=0), "sort": sort_sampler(**options),
                        "hf": hf_sampler(**options)}
            times = {key: [] for key in samplers}
            for _ in range(args.rounds):
                for key, sample in samplers.items():
                    times[key].append(ms_per_call(sample, row, args.calls))
            median = {key: statistics.median(values) for key, values in times.items()}
            label = ", ".join(f"{k}={v}" for k, v in options.items())
            print(f"{label:<52} {name:<7} {median['llorch']:>9.3f} {median['sort']:>8.3f} {median['hf']:>7.3f} "
                  f"{min(median['sort'], median['hf']) / median['llorch']:>19.1f}x", flush=True)


if __name__ == "__main__":
    main()
