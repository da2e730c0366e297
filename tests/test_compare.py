"""llorch-compare: the comparison rule, its report, and proof that it catches the original attempt's mistakes.

The negative controls inject each mistake of the project's first attempt into a copy of the float64 oracle
and compare it against the unmodified HF reference: the first failing row must be the checkpoint where
the mistake happens, and a wrong cache shape must be reported as a shape mismatch, not as a value diff.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from llorch.compare import (FAIL, KIND_MISMATCH, MISSING_A, MISSING_B, PASS, SHAPE_MISMATCH, UNKNOWN,
                            compare_arrays, compare_mappings, compare_traces, first_failure, format_table, main)
from llorch.trace import DirectoryTracer, run_trace
from llorch.references import DECODE_IDS, PROMPT_IDS, build

# ---------------------------------------------------------------------------------------------------------
# Negative controls: the original attempt's mistakes, each injected into a copy of the oracle

MISTAKES = [
    pytest.param({"causal_mask": False}, "s0.h0.attn.scores", FAIL, id="no-causal-mask"),
    pytest.param({"gelu": "erf"}, "s0.h0.mlp.gelu", FAIL, id="erf-gelu"),
    pytest.param({"transpose_conv1d": True}, "s0.h0.attn.proj", FAIL, id="transposed-conv1d-c_proj"),
    # the prompt pass is right (S = T); the first decode step's cache holds 1 position instead of 9
    pytest.param({"kv_cache": "current_pass"}, "s1.h0.attn.k_cache", SHAPE_MISMATCH, id="cache-of-this-pass-only"),
    pytest.param({"cache_layout": "S,NH,HS"}, "s0.h0.attn.k_cache", SHAPE_MISMATCH, id="cache-position-major"),
]


@pytest.mark.parametrize("shape", ["tiny", "odd"])
@pytest.mark.parametrize("mistake,where,status", MISTAKES)
def test_compare_catches_the_mistake_where_it_happens(reference_trace, shape, mistake, where, status):
    rows = compare_traces(reference_trace("numpy64", shape, **mistake), reference_trace("hf", shape))
    first = first_failure(rows)
    assert first is not None, "the mistake went unnoticed"
    assert (first.key, first.status) == (where, status), format_table(rows)
    if status == SHAPE_MISMATCH:
        assert first.max_abs is None and first.max_rel is None  # values of mismatched shapes are not compared


def test_a_position_major_cache_fails_only_at_the_cache_checkpoints(reference_trace):
    """Only the reported layout is wrong, so every other checkpoint still passes."""
    rows = compare_traces(reference_trace("numpy64", cache_layout="S,NH,HS"), reference_trace("hf"))
    failing = {r.key.rsplit(".", 1)[-1] for r in rows if not r.passed}
    assert failing == {"k_cache", "v_cache"}
    assert all(r.status == SHAPE_MISMATCH for r in rows if not r.passed)


# ---------------------------------------------------------------------------------------------------------
# The comparison rule, one array pair at a time

def test_identical_arrays_pass_with_zero_error():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    row = compare_arrays("s0.embed", x, x)
    assert (row.status, row.max_abs, row.max_rel) == (PASS, 0.0, 0.0)


def test_float32_against_float64_is_compared_in_float64():
    b = np.array([[1.0, 2.0, 3.0]])
    row = compare_arrays("s0.ln_f", b.astype(np.float32), b + 1e-9)
    assert row.passed and row.max_abs == pytest.approx(1e-9, rel=1e-3)


def test_the_worst_element_and_the_tolerance_are_reported():
    b = np.ones((2, 3, 4))
    a = b.copy()
    a[1, 2, 3] += 0.25
    row = compare_arrays("s0.h0.attn.probs", a, b, atol=0.1, rtol=0.1)
    assert row.status == FAIL
    assert row.worst_index == (1, 2, 3)
    assert row.max_abs == pytest.approx(0.25) and row.max_rel == pytest.approx(0.25)
    assert row.tolerance == pytest.approx(0.2)  # atol + rtol * max|b|


def test_tolerance_boundary_is_inclusive():
    b = np.array([4.0])
    assert compare_arrays("s0.logits", b + 0.5, b, atol=0.5, rtol=0.0).passed
    assert not compare_arrays("s0.logits", b + 0.5 + 1e-9, b, atol=0.5, rtol=0.0).passed


def test_table_tolerance_is_scaled_by_the_reference_maximum():
    b = np.array([[1000.0, 0.5]])  # an outlier dimension sets the scale
    row = compare_arrays("s0.h0.res_1", b + [[0.0, 0.01]], b)
    assert row.passed and row.tolerance == pytest.approx(1e-6 + 5e-5 * 1000)


def test_matching_infinities_pass_and_are_not_counted_as_errors():
    b = np.array([[0.5, -np.inf], [0.25, 0.75]])
    a = b + np.array([[1e-9, 0.0], [0.0, 0.0]])
    row = compare_arrays("s0.h0.attn.scores", a, b)
    assert row.passed and row.max_abs == pytest.approx(1e-9)


@pytest.mark.parametrize("a_value", [0.0, np.inf, -1e30])
def test_an_unmatched_infinity_fails(a_value):
    b = np.array([[0.5, -np.inf]])
    a = np.array([[0.5, a_value]])
    row = compare_arrays("s0.h0.attn.scores", a, b)
    assert row.status == FAIL and math.isinf(row.max_abs) and row.worst_index == (0, 1)


@pytest.mark.parametrize("side", ["a", "b"])
def test_nan_on_either_side_fails(side):
    clean, dirty = np.zeros((2, 2)), np.zeros((2, 2))
    dirty[1, 0] = np.nan
    a, b = (dirty, clean) if side == "a" else (clean, dirty)
    row = compare_arrays("s0.h0.ln_1", a, b, atol=1.0, rtol=1.0)
    assert row.status == FAIL and math.isnan(row.max_abs) and row.worst_index == (1, 0)


def test_shapes_are_checked_before_values_and_never_broadcast():
    logits = np.zeros((1, 5))
    row = compare_arrays("s0.logits", logits[0], logits)  # [5] against [1, 5] would broadcast
    assert (row.status, row.shape_a, row.shape_b, row.max_abs) == (SHAPE_MISMATCH, (5,), (1, 5), None)


def test_integer_ids_against_floats_fail_as_a_kind_mismatch():
    row = compare_arrays("s0.next_token", np.array([3.0]), np.array([3], dtype=np.int64))
    assert row.status == KIND_MISMATCH and not row.passed


def test_next_token_must_match_exactly():
    assert compare_arrays("s0.next_token", np.array([7]), np.array([7])).passed
    assert not compare_arrays("s0.next_token", np.array([7]), np.array([8])).passed


def test_keys_on_one_side_only_and_unknown_keys_fail():
    x = np.zeros((2, 4))
    rows = compare_mappings({"s0.embed": x, "s0.h0.ln_1": x, "s0.bogus": x}, {"s0.embed": x, "s0.ln_f": x})
    assert {r.key: r.status for r in rows} == {
        "s0.embed": PASS, "s0.h0.ln_1": MISSING_B, "s0.ln_f": MISSING_A, "s0.bogus": UNKNOWN}


def test_rows_come_in_forward_order_and_only_filters_keys():
    x = np.zeros((1, 4))
    keys = ["s1.embed", "s0.logits", "s0.h10.ln_1", "s0.h2.ln_1", "s0.embed"]
    rows = compare_mappings(dict.fromkeys(keys, x), dict.fromkeys(keys, x))
    assert [r.key for r in rows] == ["s0.embed", "s0.h2.ln_1", "s0.h10.ln_1", "s0.logits", "s1.embed"]
    assert [r.key for r in compare_mappings(dict.fromkeys(keys, x), dict.fromkeys(keys, x), only=r"\.h\d+\.")] \
        == ["s0.h2.ln_1", "s0.h10.ln_1"]


# ---------------------------------------------------------------------------------------------------------
# The command line, on trace directories

@pytest.fixture(scope="module")
def trace_dirs(tmp_path_factory, checkpoint):
    """Trace directories of tiny: the oracle, HF, and the oracle without a causal mask."""
    root = tmp_path_factory.mktemp("traces")
    for name, reference, options in [("oracle", "numpy64", {}), ("hf", "hf", {}),
                                     ("no_mask", "numpy64", {"causal_mask": False})]:
        with DirectoryTracer(root / name) as tracer:
            run_trace(build(reference, checkpoint("tiny"), **options), PROMPT_IDS, DECODE_IDS, tracer)
    return {name: str(root / name) for name in ("oracle", "hf", "no_mask")}


def test_cli_prints_a_table_and_exits_0_when_all_pass(trace_dirs, capsys):
    assert main([trace_dirs["hf"], trace_dirs["oracle"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["checkpoint", "shape", "max|a-b|", "rel", "worst", "at", "allowed", "result"]
    assert lines[-1] == "128 checkpoints: 128 pass, 0 fail"  # 4 passes x (14 x 2 layers + 4)
    assert lines[1].split()[0] == "s0.embed" and lines[1].split()[-1] == "pass"


def test_cli_lists_failures_first_and_exits_1(trace_dirs, capsys):
    assert main([trace_dirs["no_mask"], trace_dirs["oracle"]]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "s0.h0.attn.scores" and lines[1].endswith("FAIL")
    assert "first failure: s0.h0.attn.scores (FAIL)" in lines[-1]


def test_cli_json_report(trace_dirs, capsys):
    assert main([trace_dirs["no_mask"], trace_dirs["oracle"], "--json", "--only", "attn.scores"]) == 1
    report = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)  # strict JSON: no Infinity
    assert report["passed"] is False and report["first_failure"] == "s0.h0.attn.scores"
    assert {r["key"].rsplit(".", 2)[-2:] == ["attn", "scores"] for r in report["rows"]} == {True}
    first = report["rows"][0]
    assert (first["status"], first["max_abs"], first["passed"]) == ("FAIL", "inf", False)


def test_cli_tolerance_overrides(trace_dirs, capsys):
    assert main([trace_dirs["hf"], trace_dirs["oracle"], "--atol", "0", "--rtol", "0", "--only", "logits"]) == 1
    assert main([trace_dirs["hf"], trace_dirs["oracle"], "--atol", "1", "--only", "logits"]) == 0


def test_cli_plot(trace_dirs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "errors.png"
    assert main([trace_dirs["no_mask"], trace_dirs["oracle"], "--plot", str(plot)]) == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_is_a_usage_error(trace_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main([trace_dirs["hf"], trace_dirs["oracle"], "--plot", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("arguments,message", [
    (["/no/such/dir", "{oracle}"], "/no/such/dir: not a directory"),
    (["{empty}", "{oracle}"], "no checkpoints (*.npy)"),
    (["{hf}", "{oracle}", "--only", "nothing-matches"], "no checkpoint matches"),
    (["{hf}", "{oracle}", "--only", "("], "--only '('"),
    (["{hf}"], "the following arguments are required"),
])
def test_cli_usage_errors_exit_2_with_one_line(trace_dirs, tmp_path, arguments, message):
    """Run as a program: one line on stderr, no traceback, exit status 2."""
    argv = [a.format(empty=tmp_path, **trace_dirs) for a in arguments]
    done = subprocess.run([sys.executable, "-m", "llorch.compare", *argv], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert done.stdout == ""
