"""llorch-compare: lay two trace directories side by side, checkpoint by checkpoint.

    llorch-compare OURS REFERENCE [--atol X] [--rtol Y] [--only PATTERN] [--json] [--plot FILE.png]

For every key present in either directory (a key on one side only fails): the shapes first (a mismatch
fails and the values are not compared), the kind (integer ids against floats fail), then the largest
absolute difference, the relative difference max|a-b| / max|b| (B is the reference, so relative to the
reference tensor's own scale), the index of the worst element, and pass or fail against the checkpoint's
tolerance from llorch.trace: max|a-b| <= atol + rtol * max|b|. Infinite entries (the -inf of masked
attention scores) must match exactly; any NaN fails. Exit status: 0 when every checkpoint passes, 1 when
any fails, 2 for bad usage.

The same comparison is available to tests without files: compare_traces(tracer_a, tracer_b).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from .trace import BY_NAME, CHECKPOINT_NAMES, Tracer, json_number, key_order, parse_key

PASS, FAIL, SHAPE_MISMATCH, KIND_MISMATCH = "pass", "FAIL", "SHAPE MISMATCH", "KIND MISMATCH"
MISSING_A, MISSING_B, UNKNOWN = "missing in A", "missing in B", "unknown checkpoint"


@dataclass
class Row:
    key: str
    status: str                          # PASS, FAIL, SHAPE_MISMATCH, KIND_MISMATCH, MISSING_A/B or UNKNOWN
    shape_a: tuple | None = None
    shape_b: tuple | None = None
    max_abs: float | None = None         # max |a - b|; inf where an infinity is unmatched, nan where NaN shows
    max_rel: float | None = None         # max_abs / max|b| over b's finite entries
    worst_index: tuple | None = None     # where max_abs is (the first unmatched inf or NaN, if any)
    tolerance: float | None = None       # atol + rtol * max|b|

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def error_ratio(self) -> float:
        """max_abs / tolerance: above 1 fails. inf for rows whose values could not be compared."""
        if self.max_abs is None or math.isnan(self.max_abs):
            return math.inf
        if self.max_abs == 0:
            return 0.0
        return self.max_abs / self.tolerance if self.tolerance else math.inf


def compare_arrays(key: str, a: np.ndarray, b: np.ndarray, *, atol: float | None = None,
                   rtol: float | None = None) -> Row:
    """One checkpoint: `a` against the reference `b`, with the table's tolerance unless atol/rtol are given."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return Row(key, SHAPE_MISMATCH, a.shape, b.shape)
    if (a.dtype.kind == "f") != (b.dtype.kind == "f"):  # integer ids against floats; float widths may differ
        return Row(key, KIND_MISMATCH, a.shape, b.shape)
    checkpoint = BY_NAME[parse_key(key)[0]]
    atol = checkpoint.atol if atol is None else atol
    rtol = checkpoint.rtol if rtol is None else rtol
    a, b = a.astype(np.float64), b.astype(np.float64)

    finite_b = b[np.isfinite(b)]
    scale = float(np.abs(finite_b).max()) if finite_b.size else 0.0
    row = Row(key, PASS, a.shape, b.shape, tolerance=atol + rtol * scale)
    nan = np.isnan(a) | np.isnan(b)
    unmatched_inf = (np.isinf(a) | np.isinf(b)) & (a != b)
    if nan.any() or unmatched_inf.any():
        row.max_abs = math.nan if nan.any() else math.inf
        row.worst_index = _index(np.flatnonzero(nan | unmatched_inf)[0], a.shape)
    else:
        with np.errstate(invalid="ignore"):  # inf - inf: matched infinities, which differ by nothing
            diff = np.where(np.isinf(b), 0.0, np.abs(a - b))
        worst = int(np.argmax(diff)) if diff.size else None
        row.max_abs = 0.0 if worst is None else float(diff.flat[worst])
        row.worst_index = () if worst is None else _index(worst, a.shape)
    if row.max_abs == 0:
        row.max_rel = 0.0
    else:
        row.max_rel = row.max_abs / scale if scale else math.inf
    if not row.max_abs <= row.tolerance:  # also false for NaN
        row.status = FAIL
    return row


def _index(flat: int, shape: tuple) -> tuple:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def compare_mappings(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, atol: float | None = None,
                     rtol: float | None = None, only: str | None = None) -> list[Row]:
    """Every key of either side (those matching the regular expression `only`), in forward-pass order."""
    keys = [k for k in set(a) | set(b) if only is None or re.search(only, k)]
    known = sorted((k for k in keys if _is_key(k)), key=key_order)
    rows = [Row(k, UNKNOWN) for k in sorted(set(keys) - set(known))]
    for key in known:
        if key not in a:
            rows.append(Row(key, MISSING_A, shape_b=np.shape(b[key])))
        elif key not in b:
            rows.append(Row(key, MISSING_B, shape_a=np.shape(a[key])))
        else:
            rows.append(compare_arrays(key, a[key], b[key], atol=atol, rtol=rtol))
    return rows


def _is_key(key: str) -> bool:
    try:
        parse_key(key)
    except ValueError:
        return False
    return True


def compare_traces(a: Tracer, b: Tracer, **options) -> list[Row]:
    """compare_mappings over two in-memory tracers (b is the reference)."""
    return compare_mappings(a.arrays(), b.arrays(), **options)


def load_trace_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every DIR/<key>.npy of a trace directory, memory-mapped."""
    paths = glob.glob(os.path.join(glob.escape(os.fspath(directory)), "*.npy"))
    return {os.path.basename(p)[: -len(".npy")]: np.load(p, mmap_mode="r") for p in paths}


def first_failure(rows: list[Row]) -> Row | None:
    """The earliest checkpoint that fails: where two implementations part."""
    return next((r for r in rows if not r.passed), None)


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _shape(shape: tuple | None) -> str:
    return "-" if shape is None else "[" + ",".join(map(str, shape)) + "]"


def _grouped_by_name(row: Row) -> tuple:
    name, layer, step = parse_key(row.key)
    return CHECKPOINT_NAMES.index(name), step, -1 if layer is None else layer


def format_table(rows: list[Row]) -> str:
    """The human-readable report: failures first, in forward order (the first one is where A and B part),
    then the passes grouped by checkpoint name; a summary line last."""
    failures = [r for r in rows if not r.passed]
    passes = sorted((r for r in rows if r.passed), key=_grouped_by_name)
    header = ("checkpoint", "shape", "max|a-b|", "rel", "worst at", "allowed", "result")
    lines = [header]
    for r in failures + passes:
        shape = _shape(r.shape_a) if r.shape_a == r.shape_b else f"{_shape(r.shape_a)} vs {_shape(r.shape_b)}"
        worst = "-" if r.worst_index is None else "(" + ",".join(map(str, r.worst_index)) + ")"
        lines.append((r.key, shape, _number(r.max_abs), _number(r.max_rel), worst, _number(r.tolerance), r.status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    summary = f"{len(rows)} checkpoints: {len(passes)} pass, {len(failures)} fail"
    if failures:
        summary += f"; first failure: {failures[0].key} ({failures[0].status})"
    return "\n".join(text + [summary])


def _json_or_none(x: float | None) -> float | str | None:
    return None if x is None else json_number(x)


def rows_to_json(rows: list[Row]) -> str:
    first = first_failure(rows)
    report = {
        "passed": first is None,
        "first_failure": None if first is None else first.key,
        "rows": [dict(asdict(r), passed=r.passed, max_abs=_json_or_none(r.max_abs),
                      max_rel=_json_or_none(r.max_rel)) for r in rows],
    }
    return json.dumps(report, indent=1)


def plot_rows(rows: list[Row], path: str) -> None:
    """Error over tolerance for each checkpoint kind across the layers, one panel per step (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step: dict[int, list[tuple[str, int | None, float]]] = {}
    for r in rows:
        if r.status == UNKNOWN:
            continue
        name, layer, step = parse_key(r.key)
        by_step.setdefault(step, []).append((name, layer, r.error_ratio))
    steps = sorted(by_step)
    columns = min(len(steps), 4)
    n_rows = math.ceil(len(steps) / columns)
    figure, axes = plt.subplots(n_rows, columns, squeeze=False, sharey=True, layout="constrained",
                                figsize=(4.5 * columns + 1.5, 3.8 * n_rows))
    ceiling = 1e3  # unmatched shapes, infinities and NaN are drawn at the top
    colours = plt.get_cmap("tab20")
    for panel, step in zip(axes.flat, steps):
        points = by_step[step]
        n_layer = 1 + max((layer for _, layer, _ in points if layer is not None), default=-1)
        for name in dict.fromkeys(name for name, _, _ in points):
            mine = [(layer, ratio) for n, layer, ratio in points if n == name]
            if mine[0][0] is None:  # embed left of layer 0; ln_f, logits, next_token right of the last
                xs = [-1 if name == "embed" else n_layer for _ in mine]
            else:
                xs = [layer for layer, _ in mine]
            ys = [min(max(ratio, 1e-4), ceiling) for _, ratio in mine]
            index = CHECKPOINT_NAMES.index(name)  # one colour and marker per kind, the same in every panel
            panel.plot(xs, ys, marker="os^vD"[index % 5], markersize=3, color=colours(index), label=name)
        panel.axhline(1.0, color="red", linestyle="--", linewidth=1)
        panel.set_yscale("log")
        panel.set_title(f"step {step}")
        panel.set_xlabel("layer (-1: embed, last: ln_f / logits)")
    for panel in axes.flat[len(steps):]:
        panel.set_visible(False)
    for panel in axes[:, 0]:
        panel.set_ylabel("max|a-b| / tolerance (red: fail above)")
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    figure.savefig(path, dpi=110)
    plt.close(figure)


class _UsageParser(argparse.ArgumentParser):
    def error(self, message: str):
        """Usage errors as one line on stderr, exit status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    summary, _usage, rule = __doc__.split("\n\n")[:3]
    parser = _UsageParser(prog="llorch-compare", description=f"{summary}\n\n{rule}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", metavar="A", help="trace directory under test (e.g. llorch's)")
    parser.add_argument("b", metavar="B", help="reference trace directory")
    parser.add_argument("--atol", type=float, help="absolute tolerance for every checkpoint (default: the table's)")
    parser.add_argument("--rtol", type=float, help="relative tolerance, times max|b| (default: the table's)")
    parser.add_argument("--only", metavar="PATTERN", help="compare only keys matching this regular expression, "
                        "e.g. 'attn' or '^s0\\.h11\\.'")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of the table")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw error / tolerance across layers and steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for directory in (args.a, args.b):
        if not os.path.isdir(directory):
            parser.error(f"{directory}: not a directory")
    traces = [load_trace_dir(args.a), load_trace_dir(args.b)]
    for directory, trace in zip((args.a, args.b), traces):
        if not trace:
            parser.error(f"{directory}: no checkpoints (*.npy) in it")
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as e:
            parser.error(f"--only {args.only!r}: {e}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'llorch[plot]'")

    rows = compare_mappings(*traces, atol=args.atol, rtol=args.rtol, only=args.only)
    if not rows:
        parser.error(f"no checkpoint matches --only {args.only!r}")
    try:
        print(rows_to_json(rows) if args.json else format_table(rows), flush=True)
    except BrokenPipeError:  # piped into head: the rest of the report is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.plot:
        plot_rows(rows, args.plot)
    return 0 if first_failure(rows) is None else 1


if __name__ == "__main__":
    sys.exit(main())
