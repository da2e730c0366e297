"""One engine (or the machine's ceilings) in its own process, driven by bench/run.py.

    python bench/worker.py serve ENGINE --model gpt2 --workdir DIR --threads 2|default
        loads ENGINE once (--threads default: with the engine's own default thread count), then answers one
        JSON request per stdin line with one JSON line on stdout:
        {"op": "generate", "ids": [...], "n": 128}  -> {"tokens": [...], "elapsed": [s after the call, per token]}
            ("sampled": true: temperature 0.8, top-p 0.95, the engine's sampler)
        {"op": "threads"}                           -> {"threads": "what the engine computes with"}
        {"op": "prefill", "ids": [...]}             -> {"seconds": ...}
        {"op": "logits", "ids": [...], "path": P}   -> {} and the last-position logits saved to P (.npy)
        {"op": "measure"}                           -> the machine's sgemm and read bandwidth (ENGINE "machine")
    python bench/worker.py cold ENGINE --model gpt2 --workdir DIR --threads 2 --prompt 16 --new 128 --prefill 512
        a fresh process: prints {"ready": time.monotonic()} once the first token of the --prompt prompt is
        ready (the parent noted time.monotonic() before starting it: the difference is the cold start), then
        runs a whole workload (generation, a long prefill) and prints {"vmhwm": bytes}, this process's peak
        resident set (VmHWM: unlike ru_maxrss it does not carry over the parent's peak through exec).

Engines run in separate processes so their thread pools never compete and each one's memory is its own.
Anything a library prints goes to stderr: stdout carries only the replies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def vmhwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _replies():
    """A line writer on the real stdout; fd 1 itself now points at stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
    return reply


def _open(args):
    from convert import ModelFiles
    files = ModelFiles(args.workdir, args.model, args.seed)
    if args.engine == "machine":
        from ceilings import Machine
        return Machine(files.shape, args.threads)
    from engines import ENGINES
    return ENGINES[args.engine](files, args.threads)


def serve(args, reply) -> None:
    import numpy as np
    engine = _open(args)
    reply({"ok": True})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            op = req["op"]
            if op == "generate":
                t0 = time.perf_counter()
                tokens, times = engine.generate(req["ids"], req["n"], sampled=req.get("sampled", False))
                reply({"tokens": tokens, "elapsed": [t - t0 for t in times]})
            elif op == "prefill":
                t0 = time.perf_counter()
                engine.prefill(req["ids"])
                reply({"seconds": time.perf_counter() - t0})
            elif op == "logits":
                np.save(req["path"], np.asarray(engine.prefill(req["ids"]), dtype=np.float32))
                reply({})
            elif op == "threads":
                reply({"threads": engine.threads()})
            elif op == "measure":
                reply(engine.measure())
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as e:  # the driver reports it and drops the engine
            reply({"error": f"{type(e).__name__}: {e}"})


def cold(args, reply) -> None:
    from engines import prompt
    engine = _open(args)
    engine.generate(prompt(args.prompt), 1)
    reply({"ready": time.monotonic()})
    engine.generate(prompt(args.prompt), args.new)
    engine.prefill(prompt(args.prefill))
    reply({"vmhwm": vmhwm_bytes()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("serve", "cold"))
    ap.add_argument("engine")
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--threads", type=lambda v: None if v == "default" else int(v), default=2)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    args = ap.parse_args()
    reply = _replies()
    try:
        (serve if args.mode == "serve" else cold)(args, reply)
    except Exception as e:
        reply({"error": f"{type(e).__name__}: {e}"})
        raise


if __name__ == "__main__":
    main()
