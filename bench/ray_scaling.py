"""llorch on Ray Serve: aggregate tok/s of 1 against 2 replicas (1 kernel thread each), N concurrent streams.

    python bench/ray_scaling.py [--model DIR] [--jobs 8] [--tokens 64] [--repeats 3] [--rounds 2]

Starts a local Ray with 2 CPUs and Serve on a free 127.0.0.1 port, then per round deploys the application
(llorch.ray) with 1 replica and measures, then with 2 and measures; each replica has 1 thread and 1 CPU.
A measurement is bench/batching.py's: --jobs concurrent greedy /execute streams, their tokens over the wall
time from the first request to the last `end`, while /health is polled every 0.1 s. Drafting is off
(`draft: none`) everywhere: a replica with 4 streams would draft and one with 8 would not, so the ratio
would measure speculative decoding rather than replicas. Issue 18's target: 2 replicas >= 1.7x one.

The same round then measures the reference without Ray: the same streams against one llorch-cpud of 1
thread, then split over two of 1 thread each (started once, idle while Ray measures; the application is
deleted while they do). Its ratio is what 2 replicas could reach if Ray cost nothing: each replica decodes
half the streams, and a decode step of 4 rows costs far more than half one of 8 (the weights are read once
per step either way).

What the Ray ratio pays for, on a 2-core machine: Serve's proxy, the ingress replica (each request and
each token passes through both), Ray's own daemons and this client (the streams and the /health polls:
each poll is a request through the proxy, the ingress and a replica) run on the same 2 cores as the
replicas. With 1 replica they take the spare core; with 2 they take time from the replicas. On a real
cluster the clients are elsewhere and each node's proxy serves its share of the traffic.

Without --model it uses bench/batching.py's seeded random checkpoint at GPT-2 124M's shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import ray
from ray import serve

import llorch.ray as llorch_ray
from batching import DEFAULT_MODEL_DIR, aggregate_rate, free_port, start_daemon


def measure(url: str, replicas: int, args: argparse.Namespace, round_no: int) -> list[float]:
    options = llorch_ray.Options.from_args({"model": args.model, "replicas": replicas, "threads": 1, "num_cpus": 1,
                                            "max_batch": args.jobs, "max_queue": args.jobs, "draft": "none"})
    serve.run(llorch_ray.build_app(options), name=llorch_ray.APP_NAME, route_prefix="/")
    aggregate_rate(url, args.jobs, 4, f"warm-up-{round_no}-{replicas}", [])   # every replica's first job
    rates = [aggregate_rate(url, args.jobs, args.tokens, f"r{round_no}-{replicas}-{i}", []) for i in range(args.repeats)]
    print(f"round {round_no + 1}, {replicas} replica(s): " + ", ".join(f"{r:.2f}" for r in rates) + " tok/s",
          flush=True)
    return rates


def measure_without_ray(urls: list[str], args: argparse.Namespace, round_no: int) -> list[float]:
    """The same measurement against llorch-cpud workers directly, the streams split over them."""
    rates = [aggregate_rate(urls, args.jobs, args.tokens, f"d{round_no}-{len(urls)}-{i}", [])
             for i in range(args.repeats)]
    print(f"round {round_no + 1}, {len(urls)} llorch-cpud: " + ", ".join(f"{r:.2f}" for r in rates) + " tok/s",
          flush=True)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR, help="checkpoint (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=8, help="concurrent streams (default: 8)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per deployment (default: 3)")
    parser.add_argument("--rounds", type=int, default=2, help="1-then-2-replica deployments (default: 2)")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.model, "model.safetensors")):
        from llorch.testing import make_checkpoint
        print(f"making a random 124M-shape checkpoint in {args.model} ...", file=sys.stderr)
        make_checkpoint(args.model, "gpt2", seed=0)

    load_before = os.getloadavg()
    daemons = []
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.NamedTemporaryFile("w", prefix="llorch-cpud-", suffix=".log", delete=False) as log:
            for _ in range(2):
                daemons.append(start_daemon(args.model, args.jobs, 1, log, ("--draft", "none")))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        aggregate_rate([url for _, url in daemons], args.jobs, 4, "warm-up", [])
        rates: dict[int, list[float]] = {1: [], 2: []}
        direct: dict[int, list[float]] = {1: [], 2: []}
        for round_no in range(args.rounds):
            for replicas in (1, 2):
                rates[replicas] += measure(f"http://127.0.0.1:{port}", replicas, args, round_no)
            serve.delete(llorch_ray.APP_NAME)   # no replica idles beside the workers
            for workers in (1, 2):
                direct[workers] += measure_without_ray([url for _, url in daemons[:workers]], args, round_no)
    finally:
        ray.shutdown()
        for daemon, _ in daemons:
            daemon.terminate()
            daemon.wait(60)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    alone, split = statistics.median(direct[1]), statistics.median(direct[2])
    load = lambda averages: " ".join(f"{x:.2f}" for x in averages)
    print(f"\nmodel {args.model}, {args.jobs} streams of {args.tokens} tokens, {os.cpu_count()} cores, "
          f"load average before {load(load_before)}, after {load(os.getloadavg())}")
    print(f"median of {len(rates[1])}: 1 replica {one:.2f} tok/s, 2 replicas {two:.2f} tok/s aggregate; "
          f"ratio {two / one:.2f} (target >= 1.7)")
    print(f"without Ray: 1 llorch-cpud {alone:.2f} tok/s, 2 llorch-cpud {split:.2f} tok/s; ratio {split / alone:.2f} "
          f"(the ceiling of the ratio above); 1 replica = {one / alone:.2f}x 1 llorch-cpud")
    return 0


if __name__ == "__main__":
    sys.exit(main())
