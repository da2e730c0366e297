"""Exact speculative decoding (draft="lookup") against plain greedy: decode tok/s and acceptance rate.

    python bench/speculative.py --model DIR [--tokens 64] [--repeats 3] [--threads N] [--daemon [--streams N]]

For each prompt, plain greedy and lookup drafting run alternately (alternating spreads the drift of a shared
machine over both), `--repeats` times; a run's decode rate is (tokens - 1) over the time from the first
token to the last, as llorch-run reports it. The tokens of the two runs must be identical.

In process (the default), the acceptance rate is the drafted tokens that were taken over all drafted tokens,
counted by wrapping the model (every pass yields one token that no draft predicted: accepted = tokens -
passes). With --daemon, the runs are greedy streams through two llorch-cpud daemons on 127.0.0.1, started
with --draft lookup and --draft none (token arrival times as the client sees them; the streams' texts must
be identical): one at a time, or --streams concurrent ones of each prompt (the daemon drafts only while at
most 4 jobs decode), and the acceptance rate comes from the drafting daemon's /metrics.

Copy-heavy prompts edit or repeat code, or answer from a passage; the others have nothing to copy.
Issue 17's targets: >= 1.8x on copy-heavy prompts, >= 0.95x on the rest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile

import httpx
from prometheus_client.parser import text_string_to_metric_families

from batching import start_daemon
from serving import stream_job

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
    # the test model's greedy text after these repeats itself least: most drafts miss
    "none: phrase": "The quick brown fox",
    "none: markup": "<html><body>",
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


def library_rates(args, prompts: dict[str, list[int]]) -> dict[str, tuple]:
    """{prompt name: ({None: rates, "lookup": rates}, drafted, accepted)} of in-process runs."""
    if args.threads:
        llorch.set_num_threads(args.threads)
    model, results = CountingModel(llorch.load(args.model)), {}
    for name, prompt_ids in prompts.items():
        rates: dict[str | None, list[float]] = {None: [], "lookup": []}
        model.passes = model.drafted = accepted = 0
        for repeat in range(args.repeats):
            tokens = {}
            for draft in ([None, "lookup"] if repeat % 2 == 0 else ["lookup", None]):
                passes = model.passes
                tokens[draft], rate = timed(model, prompt_ids, args.tokens, draft)
                rates[draft].append(rate)
                if draft:
                    accepted += len(tokens[draft]) - (model.passes - passes)
            if tokens[None] != tokens["lookup"]:
                raise SystemExit(f"{name}: lookup drafting changed the tokens")
        results[name] = rates, model.drafted, accepted
    return results


def streamed(url: str, job_id: str, prompt_ids: list[int], tokens: int, streams: int) -> tuple[list, float]:
    """(each stream's token texts, their mean decode tok/s as the client sees it) of `streams` concurrent
    greedy /execute streams of the prompt."""
    prompt = llorch.tokenizer().decode(prompt_ids)
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda i: stream_job(url, f"{job_id}-{i}", prompt, tokens), range(streams)))
    rates = [(len(r["arrivals"]) - 1) / (r["arrivals"][-1] - r["arrivals"][0]) for r in results]
    return [r["texts"] for r in results], statistics.mean(rates)


def draft_counts(url: str) -> tuple[float, float]:
    """(drafted, accepted) tokens so far, from the daemon's /metrics."""
    samples = {s.name: s.value for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
               for s in family.samples}
    return (samples["llorch:spec_decode_num_draft_tokens_total"],
            samples["llorch:spec_decode_num_accepted_tokens_total"])


def daemon_rates(args, prompts: dict[str, list[int]]) -> dict[str, tuple]:
    """As library_rates, through two llorch-cpud daemons, one drafting and one not."""
    daemons, results = {}, {}
    with tempfile.NamedTemporaryFile("w", prefix="llorch-speculative-", suffix=".log", delete=False) as log:
        try:
            for draft in (None, "lookup"):
                daemons[draft] = start_daemon(args.model, args.streams, args.threads, log, ("--draft", draft or "none"))
            urls = {draft: url for draft, (_, url) in daemons.items()}
            for name, prompt_ids in prompts.items():
                rates: dict[str | None, list[float]] = {None: [], "lookup": []}
                before = draft_counts(urls["lookup"])
                for repeat in range(args.repeats):
                    texts = {}
                    for draft in ([None, "lookup"] if repeat % 2 == 0 else ["lookup", None]):
                        texts[draft], rate = streamed(urls[draft], f"{name}-{repeat}", prompt_ids, args.tokens,
                                                      args.streams)
                        rates[draft].append(rate)
                    if texts[None] != texts["lookup"]:
                        raise SystemExit(f"{name}: lookup drafting changed the text")
                after = draft_counts(urls["lookup"])
                results[name] = rates, after[0] - before[0], after[1] - before[1]
        finally:
            for process, _ in daemons.values():
                process.terminate()
                process.wait(60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--daemon", action="store_true", help="through llorch-cpud over HTTP, not in process")
    parser.add_argument("--streams", type=int, default=1, help="with --daemon: concurrent streams of each "
                        "prompt, their mean tok/s reported (default: 1)")
    args = parser.parse_args()
    encoding = llorch.tokenizer()
    prompts = {name: encoding.encode(text) for name, text in PROMPTS.items()}
    results = (daemon_rates if args.daemon else library_rates)(args, prompts)
    where = f"llorch-cpud, {args.streams} concurrent stream(s), tok/s per stream" if args.daemon else \
        f"in process, threads {llorch.build_info()['max_threads']}"
    print(f"model {args.model}, {args.tokens} tokens, medians of {args.repeats}, {where}")
    print(f"{'prompt':30} {'greedy tok/s':>13} {'lookup tok/s':>13} {'ratio':>6} {'accepted':>9}")
    for name, (rates, drafted, accepted) in results.items():
        plain, lookup = statistics.median(rates[None]), statistics.median(rates["lookup"])
        acceptance = f"{accepted / drafted:.0%}" if drafted else "-"
        print(f"{name:30} {plain:13.1f} {lookup:13.1f} {lookup / plain:5.2f}x {acceptance:>9}")


if __name__ == "__main__":
    main()
