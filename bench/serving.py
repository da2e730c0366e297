"""Serving over real HTTP: llorch-cpud under a schedule of short and long prompts, TTFT and inter-token gaps.

    python bench/serving.py [--model DIR] [--threads N] [--step-tokens S] [--llama-cpp GGUF]

Three scenarios, each on a freshly started daemon on 127.0.0.1 (stopped by its pid afterwards):
  stall   a stream of 160 tokens runs; once it has 10, 4 prompts of ~1,000 tokens arrive at once. Reports the
          stream's largest inter-token gap and the aggregate tok/s, at --step-tokens and with a budget of
          1,024 (one whole prompt per step: prefill as one uninterruptible pass per prompt, as before
          chunking). Targets: largest gap <= 0.3 s, aggregate no lower than with the whole-prompt budget.
  repeat  a ~900-token prompt (1 token out) three times: cold TTFT, then TTFT with its prefix cached.
          Target: warm <= 15 % of cold.
  mix     16 requests arriving every 0.25 s: short prompts (~20 tokens, 32 out) and long ones (~600
          tokens, 16 out), half of the long ones sharing a ~400-token preamble. TTFT and inter-token gaps
          (p50, p99, max), throughput, and prefix-cache hits (from the daemon's job lines).
With --llama-cpp GGUF, the mix also runs against llama-cpp-python's server (`python -m llama_cpp.server`)
on the same weights, if it can be started (bench/setup.sh installs llama-cpp-python; bench/convert.py
writes the GGUF); otherwise the reason is printed. Timings on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import httpx

from batching import default_model, free_port, start_daemon
from sse_client import stream_jobs

import llorch

enc = llorch.tokenizer()


def text_of(n_tokens: int, tag: str) -> str:
    """A prompt of about n_tokens tokens, starting with tag (so that different tags share no prefix)."""
    words = [f"{tag}:"] + [f"w{i % 97}" for i in range(n_tokens)]
    ids = enc.encode(" ".join(words))[:n_tokens]
    return enc.decode(ids)


def stream_job(url: str, job_id: str, prompt: str, max_tokens: int, on_token=None) -> dict:
    """POST /execute and read its SSE stream (sse_client): the send time, every token's arrival time
    (perf_counter) and text; on_token(n) as the n-th token arrives."""
    body = {"job_id": job_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return stream_jobs([(url, body)], on_token=on_token and (lambda _, n: on_token(n)))[0]


def openai_stream_job(url: str, prompt: str, max_tokens: int) -> dict:
    """The same through /v1/completions with stream=true (llama.cpp's server speaks only OpenAI)."""
    body = {"model": "gpt2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent, arrivals = time.perf_counter(), []
    with httpx.Client(timeout=900.0) as client, client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals}


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]
    return f"p50 {pick(0.5) * 1e3:7.1f} ms, p99 {pick(0.99) * 1e3:7.1f} ms, max {values[-1] * 1e3:7.1f} ms"


def gaps(result: dict) -> list[float]:
    arrivals = result["arrivals"]
    return [b - a for a, b in zip(arrivals, arrivals[1:])]


def ttft(result: dict) -> float:
    return result["arrivals"][0] - result["sent"]


class Daemon:
    """llorch-cpud with the given options, its log in a temporary file; stopped by its pid on exit."""

    def __init__(self, model: str, threads: int | None, *options: str) -> None:
        self.log = tempfile.NamedTemporaryFile("w", prefix="llorch-serving-", suffix=".log", delete=False)
        # a queue as long as the mix, which arrives faster than a loaded machine serves it; no drafting, so
        # that the figures measure scheduling (the random checkpoint's greedy text repeats: drafts would win)
        self.process, self.url = start_daemon(model, 8, threads, self.log,
                                              ("--max-queue", "64", "--draft", "none", *options))

    def cached_tokens(self) -> tuple[int, int]:
        """(prompt tokens, of which from the prefix cache) over the jobs logged so far."""
        with open(self.log.name) as log:
            found = re.findall(r"(\d+) prompt tokens \((\d+) from the prefix cache\)", log.read())
        return sum(int(n) for n, _ in found), sum(int(c) for _, c in found)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def stall(model: str, threads: int | None, step_tokens: int) -> dict:
    with Daemon(model, threads, "--step-tokens", str(step_tokens)) as daemon, \
            concurrent.futures.ThreadPoolExecutor(5) as pool:
        stream_job(daemon.url, "warm-up", "Hello", 2)
        ten = concurrent.futures.Future()
        started = time.perf_counter()
        running = pool.submit(stream_job, daemon.url, "stream", text_of(20, "stream"), 160,
                              lambda n: n == 10 and ten.set_result(None))
        ten.result(600)
        longs = [pool.submit(stream_job, daemon.url, f"long-{i}", text_of(1000, f"long {i}"), 16) for i in range(4)]
        results = [running.result()] + [f.result() for f in longs]
    wall = max(r["arrivals"][-1] for r in results) - started
    return {"max_gap": max(gaps(results[0])), "tok_s": sum(len(r["arrivals"]) for r in results) / wall,
            "long_ttft": [ttft(r) for r in results[1:]]}


def repeat(model: str, threads: int | None, step_tokens: int) -> list[float]:
    prompt = text_of(900, "repeated")
    with Daemon(model, threads, "--step-tokens", str(step_tokens)) as daemon:
        stream_job(daemon.url, "warm-up", "Hello", 2)
        return [ttft(stream_job(daemon.url, f"repeat-{i}", prompt, 1)) for i in range(3)]


def mix_schedule() -> list[tuple[float, str, int]]:
    """(arrival s, prompt, max_tokens) of the mix: every 4th request long, every other long one with the
    shared preamble."""
    preamble = text_of(400, "preamble")
    schedule = []
    for i in range(16):
        if i % 4 == 3:
            prompt = preamble + text_of(200, f"question {i}") if i % 8 == 3 else text_of(600, f"long {i}")
            schedule.append((0.25 * i, prompt, 16))
        else:
            schedule.append((0.25 * i, text_of(20, f"short {i}"), 32))
    return schedule


def mix(url: str, run) -> dict:
    """The schedule against a server; run(url, index, prompt, max_tokens) streams one request."""
    schedule = mix_schedule()
    with concurrent.futures.ThreadPoolExecutor(len(schedule)) as pool:
        started = time.perf_counter()
        futures = []
        for i, (at, prompt, max_tokens) in enumerate(schedule):
            time.sleep(max(0.0, started + at - time.perf_counter()))
            futures.append(pool.submit(run, url, i, prompt, max_tokens))
        results = [f.result() for f in futures]
    wall = max(r["arrivals"][-1] for r in results) - started
    return {"ttft": [ttft(r) for r in results], "gaps": [g for r in results for g in gaps(r)],
            "tok_s": sum(len(r["arrivals"]) for r in results) / wall}


def start_llama_cpp(gguf: str, threads: int | None, log) -> tuple[subprocess.Popen | None, str]:
    """llama-cpp-python's server on a free port, or (None, why not)."""
    try:
        import llama_cpp.server  # noqa: F401  (only to know whether it can start)
    except ImportError as e:
        return None, f"llama_cpp.server cannot be imported ({e}); bench/setup.sh installs llama-cpp-python"
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port",
               str(port), "--n_ctx", "1024", "--cache", "true",
               # its default drops the running stream whenever another request arrives
               "--interrupt_requests", "false"]
    if threads:
        command += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/v1/models", timeout=1.0).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    return None, f"llama_cpp.server did not become ready; see {log.name}"


def print_mix(name: str, result: dict, hits: str = "") -> None:
    print(f"{name}: TTFT {percentiles(result['ttft'])}")
    print(f"{' ' * len(name)}  inter-token {percentiles(result['gaps'])}; {result['tok_s']:.1f} tok/s{hits}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint (default: batching.py's random 124M-shape one)")
    parser.add_argument("--threads", type=int, help="kernel threads of the servers (default: their own)")
    parser.add_argument("--step-tokens", type=int, default=64, help="llorch-cpud's budget (default: 64)")
    parser.add_argument("--llama-cpp", metavar="GGUF", help="also run the mix against llama-cpp-python's server")
    parser.add_argument("--scenarios", default="stall,repeat,mix", help="which to run (default: all three)")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    model = args.model or default_model()
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"model {model}, {os.cpu_count()} cores, load average {load()}", flush=True)

    for budget in (args.step_tokens, 1024) if "stall" in scenarios else ():
        r, name = stall(model, args.threads, budget), f"--step-tokens {budget}"
        print(f"stall, {name}: stream's largest gap {r['max_gap']:.3f} s, aggregate {r['tok_s']:.1f} tok/s, "
              f"long prompts' TTFT {' '.join(f'{t:.2f}' for t in r['long_ttft'])} s", flush=True)
    if "repeat" in scenarios:
        cold, *warm = repeat(model, args.threads, args.step_tokens)
        print(f"repeat: 900-token prompt TTFT cold {cold:.3f} s, cached {' '.join(f'{t:.3f}' for t in warm)} s "
              f"({max(warm) / cold:.1%} of cold)", flush=True)
    if "mix" not in scenarios:
        return 0
    with Daemon(model, args.threads, "--step-tokens", str(args.step_tokens)) as daemon:
        stream_job(daemon.url, "warm-up", "Hello", 2)
        result = mix(daemon.url, lambda url, i, prompt, n: stream_job(url, f"mix-{i}", prompt, n))
        prompt_tokens, cached = daemon.cached_tokens()
    print_mix("mix, llorch-cpud", result, f"; prefix cache {cached} of {prompt_tokens} prompt tokens")
    if args.llama_cpp:
        with tempfile.NamedTemporaryFile("w", prefix="llama-cpp-server-", suffix=".log", delete=False) as log:
            server, url = start_llama_cpp(args.llama_cpp, args.threads, log)
            if server is None:
                print(f"mix, llama.cpp: not run: {url}")
            else:
                try:
                    print_mix("mix, llama.cpp", mix(url, lambda url, i, prompt, n: openai_stream_job(url, prompt, n)))
                finally:
                    server.terminate()
                    server.wait(60)
    print(f"load average at the end {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
