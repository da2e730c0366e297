"""Per-kernel speed at GPT-2 124M shapes: GB/s (weight streaming) and GFLOP/s, medians.

    python bench/kernels.py                      # the installed llorch._kernels, 2 threads
    python bench/kernels.py --vs OTHER.so        # also other builds of _kernels (repeatable), interleaved
    python bench/kernels.py --only linear_packed --simd avx2 --threads 1 --cpu --rounds 7
    python bench/kernels.py --rounds 1 --seconds 0.01           # a quick smoke run (numbers meaningless)

Decode shapes (T = 1, 2, 4) cycle through 12 layers' worth of distinct weight matrices (more than the L3),
so each call reads its weights from memory as a real decode step does; GB/s counts the weight bytes once.
Prefill shapes (T = 128, 512) report GFLOP/s (2 T C OC per linear) on one weight (in cache), packed once
into panels as the model holds it. With --vs, the builds run
alternately, so machine load drifts hit all alike: compare ratios, not absolute numbers. On a loaded
machine, --threads 1 --cpu (this thread's CPU time) is steadier; 2-thread wall times then need the
machine to itself (e.g. a real-time priority for the few seconds of the run).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import numpy as np

C, NH, V, NL, MAXT = 768, 12, 50257, 12, 1024


def load_kernels(path: str | None, tag: str):
    if path is None:
        from llorch import _kernels
        return _kernels
    spec = importlib.util.spec_from_file_location(f"{tag}._kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases(rng):
    """(name, unit, amount per call, make(K) -> zero-argument callable) for each benchmarked call."""
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    out = []
    for name, c, oc in (("qkv", C, 3 * C), ("attn_proj", C, C), ("fc", C, 4 * C), ("mlp_proj", 4 * C, C)):
        ws = [r(c, oc) * 0.02 for _ in range(NL)]
        b = r(oc)

        def packed(K, ws=ws):   # the model's layout: weights packed once into column panels
            if not hasattr(K, "pack_linear"):
                return None
            ps = [np.empty(w.size, np.float32) for w in ws]
            for p, w in zip(ps, ws):
                K.pack_linear(p, w)
            return ps
        for T in (1, 2, 4, 128, 512):
            x, o = r(T, c), np.empty((T, oc), np.float32)

            def make(K, b=b, x=x, o=o, T=T, packed=packed):
                ps = packed(K)
                if ps is None:
                    return None
                it = iter(range(1 << 62))
                return lambda: K.linear_packed(o, x, ps[next(it) % NL if T < 8 else 0], b)
            out.append((f"linear_packed {name} T={T}", "GB/s" if T < 8 else "GFLOP/s",
                        c * oc * 4 if T < 8 else 2 * T * c * oc, make))
    wte_t = np.ascontiguousarray((r(V, C) * 0.02).T)   # the tied lm_head's weight [C, V], as the model packs it
    for T in (1, 4, 8, 16):
        x, o = r(T, C), np.empty((T, V), np.float32)

        def make(K, x=x, o=o):
            p = np.empty(wte_t.size, np.float32)
            K.pack_linear(p, wte_t)
            return lambda: K.linear_packed(o, x, p, None)
        out.append((f"lm_head T={T}", "GB/s", V * C * 4, make))
    for T in (1, 128, 512):
        x = r(T, 4 * C)
        o = np.empty_like(x)
        out.append((f"gelu T={T} x 3072", "Gelem/s", x.size, lambda K, x=x, o=o: lambda: K.gelu(o, x)))
    for T, start in ((1, 64), (1, 511), (128, 0), (512, 0)):
        S = start + T
        qkv = r(T, 3 * C)
        kc, vc = r(NH, MAXT, C // NH), r(NH, MAXT, C // NH)
        y = np.empty((T, C), np.float32)
        flops = 4 * NH * (C // NH) * (T * start + T * (T + 1) // 2)   # q.k and p.v over the causal pairs

        def make(K, y=y, qkv=qkv, kc=kc, vc=vc, start=start):
            if not hasattr(K, "attention_scratch_floats"):   # a build from before caller-owned scratch
                return None
            scratch = np.empty(K.attention_scratch_floats(MAXT), np.float32)
            return lambda: K.attention(y, qkv, kc, vc, start, scratch)
        out.append((f"attention T={T} start={start}", "GFLOP/s", flops, make))
    x = r(512, C)
    w, b = r(C) + 1, r(C)
    o = np.empty_like(x)
    out.append(("layernorm T=512", "GB/s", 2 * x.nbytes, lambda K: lambda: K.layernorm(o, x, w, b, 1e-5)))
    out.append(("residual T=512", "GB/s", 3 * x.nbytes, lambda K: lambda: K.residual(o, o, x)))
    return out


def timed(fn, seconds: float, clock=time.perf_counter) -> float:
    """Median seconds per call of a batch sized to take ~`seconds`."""
    fn()
    t0, n = clock(), 0
    while clock() - t0 < seconds / 5 or n < 1:
        fn()
        n += 1
    per = (clock() - t0) / n
    reps = max(1, int(seconds / 5 / per))
    samples = []
    for _ in range(5):
        t0 = clock()
        for _ in range(reps):
            fn()
        samples.append((clock() - t0) / reps)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vs", action="append", default=[],
                    help="path of another _kernels .so to compare with (interleaved; may be repeated)")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--simd", default="auto")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--seconds", type=float, default=0.1, help="time per measurement")
    ap.add_argument("--cpu", action="store_true",
                    help="count this thread's CPU time, not wall time (with --threads 1: robust to a loaded machine)")
    args = ap.parse_args()

    builds = {"this": load_kernels(None, "this")}
    for i, path in enumerate(args.vs):
        builds[f"vs{i + 1}" if len(args.vs) > 1 else "vs"] = load_kernels(path, f"vs{i}")
    for K in builds.values():
        K.set_num_threads(args.threads)
        K.select_simd(args.simd)
    print(f"threads {args.threads}, simd {next(iter(builds.values())).simd_selected()}", file=sys.stderr)
    header = f"{'case':42s} {'unit':>8s} " + " ".join(f"{n:>9s}" for n in builds)
    print(header + ("   ratio" if len(builds) == 2 else ""))
    for name, unit, amount, make in cases(np.random.default_rng(0)):
        if args.only not in name:
            continue
        fns = {n: make(K) for n, K in builds.items()}
        fns = {n: f for n, f in fns.items() if f is not None}   # a build without this kernel
        if not fns:
            continue
        times = {n: [] for n in fns}
        for _ in range(args.rounds):
            for n, fn in fns.items():
                times[n].append(timed(fn, args.seconds, time.thread_time if args.cpu else time.perf_counter))
        rate = {n: amount / statistics.median(t) / 1e9 for n, t in times.items() if t}
        line = f"{name:42s} {unit:>8s} " + " ".join(f"{rate[n]:9.2f}" if n in rate else f"{'-':>9s}"
                                                    for n in builds)
        if len(rate) == 2:
            line += f"   {rate['this'] / rate['vs']:5.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
