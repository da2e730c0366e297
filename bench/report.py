"""From per-round samples to medians, fractions of the ceilings and llorch-vs-best-peer ratios; then the
table (stdout, markdown), the JSON and the chart.

Fractions and ratios are taken within each round (the engine against the ceilings measured in the same
round, llorch against the best peer of the same round) and their median is reported: on a shared VM
absolute numbers drift by 10 % or more over a run, ratios within a round much less.
"""

from __future__ import annotations

import json
import os
import statistics

from ceilings import TokenCost

GB = 1e9


def metrics(prefill: list[int], busy_prefill: int = 128) -> list[tuple[str, str, bool]]:
    """(key, label, higher is better) of every per-engine metric, in table order; busy_: the contention
    scenario's, with one core busy and each engine at its default threads."""
    return [("decode_tok_s", "decode tok/s", True),
            ("sampled_decode_tok_s", "sampled decode tok/s", True),
            *[(f"prefill_{T}_tok_s", f"prefill@{T} tok/s", True) for T in prefill],
            ("ttft_ms", "TTFT ms", False), ("cold_start_s", "cold start s", False),
            ("peak_rss_bytes", "peak RSS GB", False),
            ("busy_decode_tok_s", "decode tok/s, 1 core busy", True),
            (f"busy_prefill_{busy_prefill}_tok_s", f"prefill@{busy_prefill} tok/s, 1 core busy", True)]


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "samples": values} if values else {"n": 0}


def summarise(*, model: str, cost: TokenCost, settings: dict, status: dict, titles: dict, versions: dict,
              parity: dict, engine_samples: dict, machine_samples: list, machine: dict, load: dict,
              contention: dict) -> dict:
    prefill = list(settings["prefill"])
    keys = metrics(prefill, contention["prefill"])

    def ceilings(m: dict) -> dict:
        return {"decode_tok_s": m["read_gbps"] * GB / cost.decode_bytes,
                **{f"prefill_{T}_tok_s": m["sgemm_gflops"] * GB / cost.prefill_flops(T) for T in prefill}}

    roofs = {r: ceilings(m) for r, m in enumerate(machine_samples) if m}

    def fractions(sample: dict) -> dict:
        out = {"peak_rss_of_weights": sample["peak_rss_bytes"] / cost.weight_bytes} if "peak_rss_bytes" in sample else {}
        roof = roofs.get(sample["round"])
        if roof:
            out.update({f"{k}_of_ceiling": sample[k] / roof[k] for k in roof if k in sample})
        return out

    engines = {}
    for name, st in status.items():
        samples = [{**s, **fractions(s)} for s in engine_samples.get(name, [])]
        frac_keys = sorted({k for s in samples for k in s if k.endswith(("_of_ceiling", "_of_weights"))})
        engines[name] = {
            "title": titles[name], "status": st, "versions": versions.get(name), "parity": parity.get(name),
            "metrics": {k: stats([s[k] for s in samples if k in s]) for k, _, _ in keys},
            "fractions": {k: stats([s[k] for s in samples if k in s]) for k in frac_keys},
            "samples": samples}

    vs_peers = {}
    if "llorch" in engines:
        peers = [n for n in engines if n != "llorch"]
        by_round = {n: {s["round"]: s for s in engines[n]["samples"]} for n in engines}
        for k, _, higher in keys:
            ratios, best_by_round = [], []
            for r, mine in by_round["llorch"].items():
                values = {p: by_round[p][r][k] for p in peers if k in by_round[p].get(r, {})}
                if values and k in mine:
                    best = (max if higher else min)(values, key=values.get)
                    ratios.append(mine[k] / values[best])
                    best_by_round.append(best)
            if ratios:
                vs_peers[k] = {**stats(ratios), "higher_is_better": higher, "best_peer_by_round": best_by_round}

    machine_keys = sorted({k for m in machine_samples if m for k in m})
    return {
        "model": model, "settings": settings, "load": load,
        "cost": {"params": cost.params, "weight_bytes": cost.weight_bytes,
                 "decode_bytes_per_token": cost.decode_bytes,
                 "prefill_flops_per_token": {str(T): cost.prefill_flops(T) for T in prefill}},
        "machine": {**machine,
                    "measured": {k: stats([m[k] for m in machine_samples if m]) for k in machine_keys},
                    "ceilings": {k: stats([c[k] for c in roofs.values()]) for k in ceilings(machine_samples[0])}
                    if roofs else {}},
        "engines": engines, "llorch_vs_best_peer": vs_peers, "contention": contention}


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}" if v < 10 else f"{v:.1f}"


def _cell(key: str, m: dict, frac: dict) -> str:
    if not m.get("n"):
        return "–"
    v = m["median"]
    if key == "peak_rss_bytes":
        return f"{v / GB:.2f} ({frac['peak_rss_of_weights']['median']:.2f}× weights)"
    text = _fmt(v)
    of = frac.get(f"{key}_of_ceiling")
    return f"{text} ({100 * of['median']:.0f} %)" if of and of.get("n") else text


def table(results: dict) -> str:
    prefill, contention = results["settings"]["prefill"], results["contention"]
    keys = metrics(prefill, contention["prefill"])
    lines = ["| engine | " + " | ".join(label for _, label, _ in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for name, e in results["engines"].items():
        if e["metrics"][keys[0][0]].get("n"):
            cells = [_cell(k, e["metrics"][k], e["fractions"]) for k, _, _ in keys]
            lines.append(f"| {e['title']} | " + " | ".join(cells) + " |")
    roof = results["machine"]["ceilings"]
    if roof:
        cells = [f"{roof[k]['median']:,.0f}" if k in roof else "" for k, _, _ in keys]
        lines.append("| *ceiling (this machine, this run)* | " + " | ".join(cells) + " |")
    vs = results["llorch_vs_best_peer"]
    if vs:
        cells = [f"{vs[k]['median']:.2f}× {'↑' if vs[k]['higher_is_better'] else '↓'}" if k in vs else ""
                 for k, _, _ in keys]
        lines.append("| *llorch ÷ best peer (↑/↓: higher/lower is better)* | " + " | ".join(cells) + " |")

    s, m, load, cost = results["settings"], results["machine"], results["load"], results["cost"]
    meas = m["measured"]
    notes = ["", f"{results['model']}: {cost['params'] / 1e6:.1f} M parameters, {cost['weight_bytes'] / GB:.3f} GB "
             f"FP32; {s['threads']} threads per engine; medians of {s['repeats']} interleaved rounds; "
             f"decode = {s['prompt']}-token prompt + {s['new']} new tokens; TTFT with the {s['prompt']}-token prompt."]
    if meas:
        blas = m["blas"][0] if isinstance(m["blas"], list) and m["blas"] else {}
        notes.append(
            f"Ceilings: sgemm {meas['sgemm_gflops']['median']:.0f} GFLOP/s ({blas.get('internal_api', '?')} "
            f"{blas.get('version', '')} {blas.get('architecture', '')} kernel), read bandwidth "
            f"{meas['read_gbps']['median']:.1f} GB/s (sum {meas['read_sum_gbps']['median']:.1f}, "
            f"dot {meas['read_dot_gbps']['median']:.1f}); {cost['decode_bytes_per_token'] / 1e6:.0f} MB read per "
            f"decoded token, " + ", ".join(f"{v / 1e6:.0f} MFLOP per token @{T}"
                                           for T, v in cost["prefill_flops_per_token"].items()) + ".")
    notes.append("(%) = fraction of the ceiling measured in the same round (decode: read bandwidth; "
                 "prefill: sgemm); RSS × weights = peak RSS / FP32 weight bytes.")
    notes.append(f"Sampled decode: temperature 0.8, top-p 0.95, each engine's own sampler (ONNX Runtime: numpy). "
                 f"1 core busy: a Python busy loop pinned to core {contention['busy_core']}, each engine loaded "
                 f"again with its default threads: "
                 + "; ".join(f"{name} {used}" for name, used in contention["threads_used"].items()) + ".")
    over = [f"{name} {k.removesuffix('_of_ceiling')}" for name, e in results["engines"].items()
            for k, f in e["fractions"].items() if k.endswith("_of_ceiling") and f.get("n") and f["median"] > 1]
    if over:
        notes.append(f"Above 100 % ({', '.join(over)}): the engine's matrix code beat OpenBLAS on these shapes, "
                     f"or other load slowed that round's sgemm more than the engine (OpenBLAS splits it statically "
                     f"between its 2 threads and waits for the slower); see the per-round samples in the JSON.")
    stalls = {name: [x.get("compaction_stalls") for x in e["samples"]] for name, e in results["engines"].items()
              if e.get("samples")}
    if any(v is not None for counts in stalls.values() for v in counts):
        notes.append("Memory compactions by the kernel while each cold-start process ran, per round (huge pages "
                     "on a fragmented machine; they slow a cold start): "
                     + "; ".join(f"{name} {counts}" for name, counts in stalls.items()) + ".")
    notes.append(f"Load average (1 min): {load['before'][0]:.2f} before, "
                 f"{', '.join(f'{x:.2f}' for x in load['rounds'])} at each round, {load['after'][0]:.2f} after "
                 f"({m['cores']} cores).")
    for name, e in results["engines"].items():
        if e["status"] != "ok":
            notes.append(f"{e['title']}: {e['status']}")
        for ref, p in (e["parity"] or {}).items():
            notes.append(f"parity {name} vs {ref}: max |Δlogit| {p['max_abs_logit_diff']:.2e} "
                         f"({p['relative']:.1e} of max |logit|; prompts of {' and '.join(map(str, p['prompt_lengths']))}"
                         f" tokens), greedy tokens equal {p['greedy_tokens_equal']}/{p['of']} "
                         f"({p['distinct_tokens']} distinct) -> {'ok' if p['ok'] else 'MISMATCH'}")
    return "\n".join(lines + notes)


def save(results: dict, out_dir: str, date: str) -> list[str]:
    """<date>-<model>.json and .png, and the same as latest.json / latest.png."""
    os.makedirs(out_dir, exist_ok=True)
    results = {**results, "date": date}
    stem = os.path.join(out_dir, f"{date}-{results['model']}")
    paths = []
    for base in (stem, os.path.join(out_dir, "latest")):
        with open(base + ".json", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        chart(results, base + ".png")
        paths += [base + ".json", base + ".png"]
    return paths


def chart(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = metrics(results["settings"]["prefill"], results["contention"]["prefill"])
    ran = {n: e for n, e in results["engines"].items() if e["metrics"][keys[0][0]].get("n")}
    roof = results["machine"]["ceilings"]
    rows = -(-len(keys) // 3)
    fig, axes = plt.subplots(rows, 3, figsize=(14, 3.75 * rows))
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, (key, label, higher) in zip(axes.flat, keys):
        scale = 1 / GB if key == "peak_rss_bytes" else 1
        names = [n for n in ran if ran[n]["metrics"][key].get("n")]
        med = [ran[n]["metrics"][key]["median"] * scale for n in names]
        lo = [m - ran[n]["metrics"][key]["min"] * scale for n, m in zip(names, med)]
        hi = [ran[n]["metrics"][key]["max"] * scale - m for n, m in zip(names, med)]
        colors = ["tab:red" if n == "llorch" else "tab:gray" for n in names]
        ax.bar(names, med, yerr=[lo, hi], color=colors, capsize=4)
        for i, v in enumerate(med):
            ax.annotate(_fmt(v), (i, v), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        if key in roof:
            ax.axhline(roof[key]["median"], ls="--", color="tab:blue", lw=1)
            ax.annotate(f"ceiling {roof[key]['median']:,.0f}", (0.02, roof[key]["median"]),
                        xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="tab:blue",
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        if key == "peak_rss_bytes":
            w = results["cost"]["weight_bytes"] / GB
            ax.axhline(w, ls=":", color="tab:green", lw=1)
            ax.annotate(f"FP32 weights {w:.2f}", (0.02, w), xycoords=("axes fraction", "data"), va="bottom",
                        fontsize=8, color="tab:green")
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    load = results["load"]
    fig.suptitle(f"{results['model']} FP32, {results['settings']['threads']} threads, medians of "
                 f"{results['settings']['repeats']} interleaved rounds (bars: min–max), {results.get('date', '')}, "
                 f"load {load['before'][0]:.1f}→{load['after'][0]:.1f} on {results['machine']['cores']} cores",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
