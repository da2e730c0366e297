"""llorch against HF transformers, llama.cpp and ONNX Runtime on one seeded random GPT-2, in one run.

    python bench/run.py                          # gpt2 (124M), every engine, 5 interleaved rounds
    python bench/run.py --model gpt2-medium --repeats 7
    python bench/run.py --engines llorch,ort --quick

Each engine runs in its own worker process (bench/worker.py) with the same thread count. First every engine's
logits and greedy tokens are checked against HF and llorch on the same prompt (this proves the GGUF and
ONNX conversions). Then, every round, in an order rotated by one each round: the machine's sgemm and read
bandwidth (bench/ceilings.py), and for each engine a 16-token prompt + 128 new tokens (TTFT, decode tok/s),
the same sampled (temperature 0.8, top-p 0.95, each engine's own sampler), prefills of 128 and 512 tokens,
and a fresh process (cold start, peak RSS).

Then the contention scenario: the engines are loaded again, each with its own default thread count, as its
users get it (llorch: auto), and every round, with a Python busy loop pinned to the last core, each engine
(in rotated order) decodes and prefills 128 tokens; the threads each used are recorded. Medians over the
rounds go to a table on stdout, bench/results/<date>-<model>.json (+ latest.json) and a chart (latest.png);
see bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import numpy as np  # noqa: E402

import report  # noqa: E402
from ceilings import TokenCost, blas_env  # noqa: E402
from convert import ModelFiles  # noqa: E402
from engines import ENGINES, missing, prompt, versions  # noqa: E402

WORKER = os.path.join(BENCH, "worker.py")
REFERENCES = ("hf", "llorch")     # every engine's logits and greedy tokens are compared with these
LOGIT_TOL = 1e-3                  # max |logit difference| / max |reference logit| for a conversion to pass
# Pause before each unit of a round. Thread pools spin for a while after their last call (OpenBLAS after the
# ceiling measurement, ORT, OpenMP); timed without a pause, the next engine shared the cores with them: llorch's
# TTFT right after the machine measurement was 47-56 ms in 4 rounds, 35 ms in the round where it came first.
SETTLE_S = 1.0
BUSY_CORE = (os.cpu_count() or 1) - 1   # the contention scenario's busy core
BUSY_PREFILL = 128                       # the prompt length prefilled there


@dataclass(frozen=True)
class Settings:
    model: str
    seed: int
    repeats: int
    prompt: int           # prompt tokens for TTFT and decode
    new: int              # new tokens generated for the decode rate
    prefill: tuple        # prompt lengths timed as prefills
    parity_new: int       # greedy tokens compared between engines
    threads: int
    workdir: str

    def args(self, threads: int | None) -> list[str]:
        return ["--model", self.model, "--seed", str(self.seed), "--workdir", self.workdir,
                "--threads", str(threads or "default")]


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LLORCH_NUM_THREADS")


def worker_env(engine: str, threads: int | None) -> dict[str, str]:
    """The environment of a worker: the thread variables set to threads, or (None) unset, as a user's are."""
    env = blas_env() if engine == "machine" else dict(os.environ)
    for var in THREAD_VARS:
        env.pop(var, None)
        if threads and var != "LLORCH_NUM_THREADS":
            env[var] = str(threads)
    return env


class Worker:
    """A bench/worker.py process serving one engine with `threads` threads (None: the engine's default);
    call() sends a request and waits for the reply."""

    def __init__(self, engine: str, s: Settings, log, threads: int | None) -> None:
        self.engine = engine
        self.proc = subprocess.Popen([sys.executable, WORKER, "serve", engine, *s.args(threads)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     env=worker_env(engine, threads))
        self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker exited (code {self.proc.wait()}); see its log")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def call(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def compaction_stalls() -> int | None:
    """How many times the kernel has compacted memory on an allocation's behalf (/proc/vmstat compact_stall),
    e.g. to find transparent huge pages on a fragmented machine; None where that is not known."""
    try:
        with open("/proc/vmstat") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("compact_stall ")), None)
    except OSError:
        return None


def cold_start(engine: str, s: Settings, log) -> tuple[float, int, int | None]:
    """(seconds from starting a fresh process to its first token, that process's peak RSS in bytes, the
    memory compactions while it ran)."""
    stalls = compaction_stalls()
    cmd = [sys.executable, WORKER, "cold", engine, *s.args(s.threads), "--prompt", str(s.prompt), "--new", str(s.new),
           "--prefill", str(max(s.prefill))]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=log, env=worker_env(engine, s.threads))
    replies = [json.loads(line) for line in proc.stdout]
    proc.wait()
    got = {k: v for r in replies for k, v in r.items()}
    if "error" in got or proc.returncode:
        raise RuntimeError(got.get("error", f"cold-start process exited with code {proc.returncode}"))
    after = compaction_stalls()
    return got["ready"] - t0, got["vmhwm"], None if stalls is None or after is None else after - stalls


def check_parity(workers: dict[str, Worker], s: Settings) -> dict:
    """Every engine against each running reference engine: the last-position logits after the decode prompt
    and after the longest prefill (all positions up to it pass through the attention and wpe), and the
    first parity_new greedy tokens of the decode prompt."""
    lengths = (s.prompt, max(s.prefill))
    logits, tokens = {}, {}
    for name, w in workers.items():
        for T in lengths:
            path = os.path.join(s.workdir, f"parity-{s.model}-{name}-{T}.npy")
            w.call(op="logits", ids=prompt(T), path=path)
            logits[name, T] = np.load(path)
        tokens[name] = w.call(op="generate", ids=prompt(s.prompt), n=s.parity_new)["tokens"]
    out = {}
    for name in workers:
        for ref in (r for r in REFERENCES if r in workers and r != name and name not in out.get(r, {})):
            diff = max(float(np.max(np.abs(logits[name, T] - logits[ref, T]))) for T in lengths)
            scale = max(float(np.max(np.abs(logits[ref, T]))) for T in lengths)
            same = next((i for i, (a, b) in enumerate(zip(tokens[name], tokens[ref])) if a != b), s.parity_new)
            out.setdefault(name, {})[ref] = {
                "prompt_lengths": lengths, "max_abs_logit_diff": diff, "relative": diff / scale,
                "greedy_tokens_equal": same, "of": s.parity_new, "distinct_tokens": len(set(tokens[ref])),
                "ok": diff / scale <= LOGIT_TOL and same == s.parity_new}
    return out


def one_round(name: str, w: Worker, s: Settings, log) -> dict:
    """One sample of every metric of one engine."""
    t = w.call(op="generate", ids=prompt(s.prompt), n=s.new)["elapsed"]
    sample = {"ttft_ms": 1e3 * t[0], "decode_tok_s": decode_rate(t)}
    sample["sampled_decode_tok_s"] = decode_rate(w.call(op="generate", ids=prompt(s.prompt), n=s.new,
                                                        sampled=True)["elapsed"])
    for T in s.prefill:
        sample[f"prefill_{T}_tok_s"] = T / w.call(op="prefill", ids=prompt(T))["seconds"]
    sample["cold_start_s"], sample["peak_rss_bytes"], sample["compaction_stalls"] = cold_start(name, s, log)
    return sample


def decode_rate(elapsed: list[float]) -> float:
    """Tokens per second after the first (which carries the prompt pass)."""
    return (len(elapsed) - 1) / (elapsed[-1] - elapsed[0])


def busy_round(w: Worker, s: Settings) -> dict:
    """One sample of the contention metrics of one engine (a core is kept busy meanwhile)."""
    T = BUSY_PREFILL
    return {"busy_decode_tok_s": decode_rate(w.call(op="generate", ids=prompt(s.prompt), n=s.new)["elapsed"]),
            f"busy_prefill_{T}_tok_s": T / w.call(op="prefill", ids=prompt(T))["seconds"]}


def busy_loop() -> subprocess.Popen:
    """Another process keeping the last core busy: a Python loop pinned there."""
    return subprocess.Popen(["taskset", "-c", str(BUSY_CORE), sys.executable, "-c", "while True: pass"])


def contention(names: list[str], s: Settings, log, engine_samples: dict, status: dict) -> dict[str, str]:
    """The contention rounds: each engine loaded with its default thread count decodes and prefills with
    BUSY_CORE kept busy; their samples join engine_samples' rounds. Returns the threads each engine used."""
    workers = {}
    for name in names:
        try:
            say(f"{name}: loading with its default threads")
            workers[name] = Worker(name, s, log, threads=None)
        except Exception as e:
            status[name] = f"{status[name]}; contention skipped: could not load: {e}"
    threads = {}
    try:
        for r in range(s.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            say(f"contention round {r + 1}/{s.repeats}, core {BUSY_CORE} busy: {' -> '.join(order)}")
            loop = busy_loop()
            try:
                for name in [n for n in order if n in workers]:
                    time.sleep(SETTLE_S)   # llorch's auto samples the load meanwhile, as any waiting process would
                    try:
                        if r == 0:
                            warm_up(workers[name], s)
                        sample = busy_round(workers[name], s)
                        threads[name] = workers[name].call(op="threads")["threads"]
                    except Exception as e:
                        status[name] = f"{status[name]}; contention failed in round {r + 1}: {e}"
                        say(f"{name}: {status[name]}")
                        workers.pop(name).proc.kill()
                        continue
                    round_sample = next((x for x in engine_samples[name] if x["round"] == r), None)
                    if round_sample is None:
                        engine_samples[name].append({**sample, "round": r})
                    else:
                        round_sample.update(sample)
            finally:
                loop.kill()
                loop.wait()
    finally:
        for w in workers.values():
            w.close()
    return threads


def warm_up(w: Worker, s: Settings) -> None:
    w.call(op="generate", ids=prompt(s.prompt), n=min(8, s.new))
    w.call(op="generate", ids=prompt(s.prompt), n=min(8, s.new), sampled=True)
    for T in s.prefill:
        w.call(op="prefill", ids=prompt(T))


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2", choices=("gpt2", "gpt2-medium"))
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians are reported)")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {','.join(ENGINES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="of the random checkpoint")
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds of 32 new tokens, results under bench/results/quick/ (for development)")
    ap.add_argument("--workdir", default=os.path.join(BENCH, ".cache"),
                    help="checkpoints, GGUF and ONNX files, worker logs (made once, reused)")
    args = ap.parse_args()
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    s = Settings(model=args.model, seed=args.seed, repeats=2 if args.quick else args.repeats, prompt=16,
                 new=32 if args.quick else 128, prefill=(128, 512), parity_new=32, threads=args.threads,
                 workdir=os.path.abspath(args.workdir))
    os.makedirs(s.workdir, exist_ok=True)
    files = ModelFiles(s.workdir, s.model, s.seed)
    log = open(os.path.join(s.workdir, f"workers-{s.model}.log"), "a")
    load_before = os.getloadavg()
    facts = machine_facts(s.threads)      # before anything runs: the llorch source that is measured

    status, workers = {}, {}
    for name in names:
        reason = missing(name)
        if reason:
            status[name] = f"skipped: {reason}"
            continue
        try:
            say(f"{name}: preparing its model file(s)")
            files.ensure(name)
        except Exception as e:
            status[name] = f"skipped: could not write its model file: {type(e).__name__}: {e}"
            continue
        try:
            say(f"{name}: loading")
            workers[name] = Worker(name, s, log, s.threads)
            status[name] = "ok"
        except Exception as e:
            status[name] = f"skipped: could not load: {e}"
    for name, st in status.items():
        if st != "ok":
            say(f"{name}: {st}")
    machine = Worker("machine", s, log, s.threads)

    say("checking logits and greedy tokens against " + " and ".join(r for r in REFERENCES if r in workers))
    parity = check_parity(workers, s)
    for name, w in workers.items():
        warm_up(w, s)

    units = ["machine", *workers]
    engine_samples = {name: [] for name in workers}
    machine_samples, loads = [], []
    for r in range(s.repeats):
        order = units[r % len(units):] + units[:r % len(units)]
        say(f"round {r + 1}/{s.repeats}: {' -> '.join(order)}  (load {os.getloadavg()[0]:.2f})")
        loads.append(os.getloadavg()[0])
        round_machine, round_engines = None, {}
        for name in order:
            time.sleep(SETTLE_S)
            if name == "machine":
                round_machine = machine.call(op="measure")
            elif name in workers and status[name] == "ok":
                try:
                    round_engines[name] = one_round(name, workers[name], s, log)
                except Exception as e:
                    status[name] = f"failed in round {r + 1}: {e}"
                    say(f"{name}: {status[name]}")
        machine_samples.append(round_machine)
        for name, sample in round_engines.items():
            engine_samples[name].append({**sample, "round": r})
    for w in [*workers.values(), machine]:
        w.close()
    running = [name for name in workers if status[name] == "ok"]
    threads_used = contention(running, s, log, engine_samples, status)

    results = report.summarise(
        model=s.model, cost=TokenCost(files.shape), settings=asdict(s), status=status,
        titles={n: ENGINES[n].title for n in names},
        versions={n: versions(n) for n in names if not status[n].startswith("skipped")},
        parity=parity, engine_samples=engine_samples, machine_samples=machine_samples,
        machine=facts, load={"before": load_before, "rounds": loads, "after": os.getloadavg()},
        contention={"busy_core": BUSY_CORE, "prefill": BUSY_PREFILL, "threads_used": threads_used})
    print(report.table(results))
    out_dir = os.path.join(BENCH, "results", "quick") if args.quick else os.path.join(BENCH, "results")
    paths = report.save(results, out_dir, datetime.date.today().isoformat())
    say("wrote " + ", ".join(paths))


def machine_facts(threads: int) -> dict:
    """CPU, cores, the BLAS behind the sgemm ceiling (asked in the measuring process's environment) and
    the llorch source measured (commit, and any uncommitted changes to it)."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    blas = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                           "from ceilings import blas_info; print(json.dumps(blas_info()))", BENCH],
                          capture_output=True, text=True, env=worker_env("machine", threads))
    root = os.path.dirname(BENCH)
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512f": "avx512f" in flags, "threads": threads,
            "llorch_commit": git("rev-parse", "--short", "HEAD"),
            "llorch_uncommitted": git("status", "--porcelain", "--", "src", "csrc", "setup.py").splitlines(),
            "blas": json.loads(blas.stdout) if blas.returncode == 0 else blas.stderr.strip()[-300:],
            "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}}


if __name__ == "__main__":
    main()
