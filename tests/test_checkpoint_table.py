"""The checkpoint table in docs/specs/13-tracing-and-checkpoints.md is the same table as llorch.trace.CHECKPOINTS.

The markdown table is parsed, so neither the doc nor the code can drift alone:
  (a) names, order, per-layer flags, shape templates and tolerances equal CHECKPOINTS;
  (b) the concrete GPT-2 124M shapes written in the table equal llorch.trace.expected_shape(...);
  (c) docs/specs/ holds no code fences, and its README indexes every spec;
  (d) the HF reference (llorch.references.hf), run with hooks on a seeded random 124M-shape checkpoint for the
      prompt pass ("Hello." = [15496, 13], T=2) and one decode step (T=1, start_pos 2), records exactly the
      table's concrete shapes, in table order, with the masked attention entries the table promises.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from llorch.trace import CHECKPOINTS, Tracer, expected_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "docs", "specs")
TABLE_DOC = os.path.join(SPECS, "13-tracing-and-checkpoints.md")
TABLE_HEADING = "## The checkpoint table"

# GPT-2 124M, and the two passes the table's concrete columns describe.
GPT2_124M = dict(n_embd=768, n_head=12, vocab_size=50257)
N_LAYER_124M = 12
HELLO = [15496, 13]  # "Hello."
PASSES = {"prompt": dict(T=2, start_pos=0), "decode": dict(T=1, start_pos=2)}

# Spec files the code and the docs refer to by name.
REQUIRED_SPECS = ("00-build-and-kernel-abi.md", "13-tracing-and-checkpoints.md")


# ---------------------------------------------------------------------------------------------------------
# Parsing the table


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _unquote(cell: str) -> str:
    return cell.strip().strip("`").strip()


def _shape(cell: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\[\s*\d+(\s*,\s*\d+)*\s*\]", cell):
        raise ValueError(f"not a concrete shape like [2, 768]: {cell!r}")
    return tuple(int(d) for d in re.findall(r"\d+", cell))


def parse_checkpoint_table(path: str = TABLE_DOC) -> list[dict]:
    """The rows of the first markdown table after the '## The checkpoint table' heading, as dicts."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == TABLE_HEADING)
    except StopIteration:
        raise AssertionError(f"{path}: no line {TABLE_HEADING!r}") from None
    table = []
    for line in lines[start + 1:]:
        if line.lstrip().startswith("|"):
            table.append(line)
        elif table:
            break
    assert len(table) >= 3, f"{path}: no markdown table after {TABLE_HEADING!r}"
    header = [h.lower() for h in _cells(table[0])]
    assert all(re.fullmatch(r":?-+:?", c) for c in _cells(table[1])), "second table line must be the separator"

    def column(prefix: str) -> int:
        matches = [i for i, h in enumerate(header) if h.startswith(prefix)]
        assert len(matches) == 1, f"expected one column starting with {prefix!r} in {header}"
        return matches[0]

    col = {key: column(prefix) for key, prefix in [
        ("name", "name"), ("per_layer", "per layer"), ("shape", "shape"), ("prompt", "prompt"),
        ("decode", "decode"), ("atol", "atol"), ("rtol", "rtol")]}
    rows = []
    for line in table[2:]:
        cells = _cells(line)
        assert len(cells) == len(header), f"row has {len(cells)} cells, header {len(header)}: {line}"
        per_layer = cells[col["per_layer"]].lower()
        assert per_layer in ("yes", "no"), f"per layer must be yes/no: {line}"
        rows.append({
            "name": _unquote(cells[col["name"]]),
            "per_layer": per_layer == "yes",
            "shape": _unquote(cells[col["shape"]]),
            "prompt": _shape(cells[col["prompt"]]),
            "decode": _shape(cells[col["decode"]]),
            "atol": float(cells[col["atol"]]),
            "rtol": float(cells[col["rtol"]]),
        })
    return rows


@pytest.fixture(scope="module")
def table() -> list[dict]:
    return parse_checkpoint_table()


# ---------------------------------------------------------------------------------------------------------
# (a) the table equals CHECKPOINTS


def test_table_names_and_order_equal_code(table):
    assert [r["name"] for r in table] == [c.name for c in CHECKPOINTS]


def test_table_per_layer_shapes_and_tolerances_equal_code(table):
    for row, c in zip(table, CHECKPOINTS, strict=True):
        assert (row["name"], row["per_layer"], row["shape"]) == (c.name, c.per_layer, c.shape), c.name
        assert (row["atol"], row["rtol"]) == (c.atol, c.rtol), f"{c.name}: tolerances differ from trace.py"


# ---------------------------------------------------------------------------------------------------------
# (b) the concrete 124M shapes equal expected_shape


@pytest.mark.parametrize("which", sorted(PASSES))
def test_table_concrete_shapes_equal_expected_shape(table, which):
    for row in table:
        want = expected_shape(row["name"], **PASSES[which], **GPT2_124M)
        assert row[which] == want, f"{row['name']} ({which}): table says {row[which]}, trace.py gives {want}"


# ---------------------------------------------------------------------------------------------------------
# (c) the specs are prose and tables only; the index covers them


def _spec_files() -> list[str]:
    return sorted(f for f in os.listdir(SPECS) if f.endswith(".md"))


def test_specs_have_no_code_fences():
    offenders = []
    for name in _spec_files():
        with open(os.path.join(SPECS, name), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if re.match(r"\s*(```|~~~)", line):
                    offenders.append(f"{name}:{number}")
    assert not offenders, f"code fences in docs/specs/ (prose and tables only): {offenders}"


def test_specs_index_lists_every_spec():
    names = _spec_files()
    for required in REQUIRED_SPECS:
        assert required in names, f"docs/specs/{required} is referred to by name and must exist"
    specs = [n for n in names if re.fullmatch(r"\d\d-[a-z0-9-]+\.md", n)]
    assert [n[:2] for n in specs] == [f"{i:02d}" for i in range(len(specs))], f"numbering has gaps: {specs}"
    with open(os.path.join(SPECS, "README.md"), encoding="utf-8") as f:
        index = f.read()
    missing = [n for n in specs if f"({n})" not in index]
    assert not missing, f"docs/specs/README.md does not link {missing}"


# ---------------------------------------------------------------------------------------------------------
# (d) the HF reference records exactly the table's shapes


def _hf_reference_class():
    """The traced HF reference, llorch.references.hf.HFGPT2."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from llorch.references.hf import HFGPT2
    return HFGPT2


class PassTracer(Tracer):
    """A Tracer that also notes which pass ("prompt" or "decode") each record belongs to, set by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.current = None
        self.by_pass: dict[str, list] = {name: [] for name in PASSES}

    def record(self, name, layer, value) -> None:
        super().record(name, layer, value)
        self.by_pass[self.current].append(self.records[-1])


@pytest.fixture(scope="module")
def hf_trace(checkpoint) -> PassTracer:
    reference = _hf_reference_class()(checkpoint("gpt2"))
    tracer = PassTracer()
    tracer.current = "prompt"
    logits = np.asarray(reference.forward(HELLO, start_pos=0, tracer=tracer))
    assert logits.shape == (2, GPT2_124M["vocab_size"])
    tracer.current = "decode"
    reference.forward([int(np.argmax(logits[-1]))], start_pos=len(HELLO), tracer=tracer)
    return tracer


def _forward_order() -> list[tuple[str, int | None]]:
    """(name, layer) in the order a pass records them: embed, 12 x the per-layer rows, then ln_f, logits, next_token."""
    first_per_layer = next(i for i, c in enumerate(CHECKPOINTS) if c.per_layer)
    before = [(c.name, None) for c in CHECKPOINTS[:first_per_layer]]
    blocks = [(c.name, layer) for layer in range(N_LAYER_124M) for c in CHECKPOINTS if c.per_layer]
    after = [(c.name, None) for c in CHECKPOINTS[first_per_layer:] if not c.per_layer]
    return before + blocks + after


@pytest.mark.parametrize("which", sorted(PASSES))
def test_hf_reference_records_every_checkpoint_once_in_table_order(hf_trace, which):
    recorded = [(r.name, r.layer) for r in hf_trace.by_pass[which]]
    assert len(recorded) == 14 * N_LAYER_124M + 4 == len(_forward_order())
    assert recorded == _forward_order()


@pytest.mark.parametrize("which", sorted(PASSES))
def test_hf_reference_shapes_equal_table(hf_trace, table, which):
    want = {row["name"]: row[which] for row in table}
    wrong = [f"{r.name}[h{r.layer}]: {r.value.shape} != {want[r.name]}"
             for r in hf_trace.by_pass[which] if tuple(r.value.shape) != want[r.name]]
    assert not wrong, f"{which} pass: HF shapes differ from the table: {wrong[:10]}"


@pytest.mark.parametrize("which", sorted(PASSES))
def test_hf_reference_dtypes(hf_trace, which):
    for r in hf_trace.by_pass[which]:
        want = np.int64 if r.name == "next_token" else np.float32
        assert r.value.dtype == want, f"{which} {r.name}[h{r.layer}]: dtype {r.value.dtype}, expected {want}"


def test_hf_reference_masked_entries(hf_trace):
    """Prompt pass: future keys are exactly -inf in attn.scores and exactly 0 in attn.probs (pitfall (c))."""
    T, start_pos = PASSES["prompt"]["T"], PASSES["prompt"]["start_pos"]
    S = start_pos + T
    future = np.arange(S)[None, :] > start_pos + np.arange(T)[:, None]  # [T, S]
    assert future.any()
    for r in hf_trace.by_pass["prompt"]:
        if r.name == "attn.scores":
            assert np.all(np.isneginf(r.value[:, future])), f"h{r.layer}: masked scores must be -inf"
            assert np.all(np.isfinite(r.value[:, ~future])), f"h{r.layer}: visible scores must be finite"
        elif r.name == "attn.probs":
            assert np.all(r.value[:, future] == 0.0), f"h{r.layer}: masked probs must be exactly 0"
            np.testing.assert_allclose(r.value.sum(axis=-1), 1.0, atol=1e-6)
