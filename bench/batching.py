"""Continuous batching through llorch-cpud: aggregate tok/s of N concurrent greedy jobs vs one job alone.

    python bench/batching.py [--model DIR] [--jobs 8] [--tokens 64] [--repeats 3] [--threads N]

Starts the daemon on a free 127.0.0.1 port with --max-batch = --jobs, then alternates a single job and a
burst of --jobs concurrent jobs (alternating spreads the drift of a shared machine over both), each job
greedy with a distinct prompt. A run's aggregate rate is its tokens (from the `end` events) over the wall
time from the first request to the last `end`, so prefill, scheduling and HTTP are all counted. The client
reads every stream from one thread (sse_client.py), so that it takes little of the daemon's cores. During the
batched runs /health is polled every HEALTH_POLL_S, to show the event loop answering while the model runs
(spec 14: 100 ms). Polling every 20 ms, as this bench once did, cost 8 jobs 6 % of their rate: an
orchestrator asks every few seconds.

The summary gives the ratio of the medians and the median of each repeat's ratio: a repeat's two runs are
seconds apart, so the latter is the steadier on a host whose bandwidth drifts.

Without --model it uses a seeded random checkpoint at GPT-2 124M's shape, made once in
/tmp/llorch-bench-gpt2 (the weights' values do not change the speed). Targets: issue 8, ratio >= 4; issue
16, 8 jobs >= 5.5 and 16 jobs >= 7. The daemon runs with --draft none, so that the ratio measures batching
alone (bench/speculative.py --daemon measures drafts).
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import httpx

from sse_client import stream_jobs

DEFAULT_MODEL_DIR = "/tmp/llorch-bench-gpt2"
HEALTH_POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aggregate_rate(url: str | list[str], jobs: int, tokens: int, tag: str, health_latencies: list[float]) -> float:
    """Tokens per second of `jobs` concurrent jobs, from the first request to the last end event; given several
    URLs, the jobs go round-robin over them. The streams are read by sse_client's one-thread load generator
    (a thread per stream would take a third of a core from the daemon). Meanwhile /health is polled (on the
    first URL), and how long each answer took is appended to health_latencies."""
    urls = [url] if isinstance(url, str) else url
    done = threading.Event()

    def poll_health() -> None:
        # http.client, not httpx: an httpx.Client costs ~20 ms of CPU to make (its TLS context), and a poll
        # ~1.7 ms, taken from the daemon's cores at the start of every run
        connection = http.client.HTTPConnection(urllib.parse.urlsplit(urls[0]).netloc, timeout=60.0)
        try:
            while not done.wait(HEALTH_POLL_S):
                asked = time.perf_counter()
                connection.request("GET", "/health")
                connection.getresponse().read()
                health_latencies.append(time.perf_counter() - asked)
        finally:
            connection.close()

    requests = [(urls[i % len(urls)], {"job_id": f"{tag}-{i}", "max_tokens": tokens, "temperature": 0,
                                       "prompt": f"Benchmark job {i} of {jobs}: the weather today is"})
                for i in range(jobs)]
    poller = threading.Thread(target=poll_health)
    poller.start()
    started = time.perf_counter()
    try:
        results = stream_jobs(requests)
    finally:
        done.set()
        poller.join()
    return sum(result["end"]["tokens_out"] for result in results) / (time.perf_counter() - started)


def start_daemon(model: str, jobs: int, threads: int | None, log, options: tuple[str, ...] = ()
                 ) -> tuple[subprocess.Popen, str]:
    """llorch-cpud on a free 127.0.0.1 port with --max-batch jobs (and further options), once it is ready."""
    port = free_port()
    command = [sys.executable, "-m", "llorch.server", "--model", model, "--port", str(port),
               "--max-batch", str(jobs), "--max-queue", str(jobs), *options]
    if threads:
        command += ["--threads", str(threads)]
    daemon = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and daemon.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1.0).json()["model_loaded"]:
                return daemon, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    daemon.kill()
    raise RuntimeError(f"llorch-cpud did not become ready; see {log.name}")


def default_model() -> str:
    """The seeded random 124M-shape checkpoint in DEFAULT_MODEL_DIR, made on first use."""
    if not os.path.exists(os.path.join(DEFAULT_MODEL_DIR, "model.safetensors")):
        from llorch.testing import make_checkpoint
        print(f"making a random 124M-shape checkpoint in {DEFAULT_MODEL_DIR} ...", file=sys.stderr)
        make_checkpoint(DEFAULT_MODEL_DIR, "gpt2", seed=0)
    return DEFAULT_MODEL_DIR


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help=f"checkpoint (default: a random 124M-shape one in {DEFAULT_MODEL_DIR})")
    parser.add_argument("--jobs", type=int, default=8, help="concurrent jobs of the batched runs (default: 8)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per job (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="single/batched run pairs (default: 3)")
    parser.add_argument("--threads", type=int, help="the daemon's kernel threads (default: its own default)")
    args = parser.parse_args()

    model = args.model or default_model()

    with tempfile.NamedTemporaryFile("w", prefix="llorch-cpud-", suffix=".log", delete=False) as log:
        # plain decoding on both sides of the ratio: a lone greedy job would otherwise draft (spec 14, 12a)
        daemon, url = start_daemon(model, args.jobs, args.threads, log, ("--draft", "none"))
        try:
            aggregate_rate(url, 1, 4, "warm-up", [])
            single, batched, health = [], [], []
            for repeat in range(args.repeats):
                single.append(aggregate_rate(url, 1, args.tokens, f"single-{repeat}", []))
                batched.append(aggregate_rate(url, args.jobs, args.tokens, f"batched-{repeat}", health))
                print(f"repeat {repeat + 1}: 1 job {single[-1]:7.2f} tok/s, {args.jobs} jobs "
                      f"{batched[-1]:7.2f} tok/s aggregate, ratio {batched[-1] / single[-1]:.2f}", flush=True)
        finally:
            daemon.terminate()
            daemon.wait(60)

    one, many = statistics.median(single), statistics.median(batched)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nmodel {model}, {args.tokens} tokens per job, {os.cpu_count()} cores, load average {load}")
    paired = statistics.median(b / s for s, b in zip(single, batched))
    print(f"median of {args.repeats}: 1 job {one:.2f} tok/s; {args.jobs} concurrent jobs {many:.2f} tok/s "
          f"aggregate; ratio {many / one:.2f}; median of the repeats' ratios {paired:.2f}")
    health.sort()
    print(f"/health during the batched runs: median {health[len(health) // 2] * 1e3:.1f} ms, "
          f"90th percentile {health[len(health) * 9 // 10] * 1e3:.1f} ms, slowest {health[-1] * 1e3:.1f} ms "
          f"({len(health)} polls)")
    print(f"daemon log: {log.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
