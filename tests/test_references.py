"""The three independent references agree with each other before any of them judges llorch.

Each reference (llorch.references: float64 numpy oracle, HF transformers with hooks, tinygrad) runs the
prompt pass and three teacher-forced decode steps on seeded checkpoints, and every pair must pass
llorch-compare's check at every checkpoint with the table's tolerances. The traces must also follow the
table by themselves: every checkpoint once per pass, in order, in the table's shapes, masked attention
entries as the spec says.
"""

from __future__ import annotations

import numpy as np
import pytest

from llorch.compare import compare_traces, format_table
from llorch.testing import SHAPES
from llorch.trace import Tracer, expected_shape, forward_order, run_trace, structural_problems
from llorch.references import DECODE_IDS, PROMPT_IDS, REFERENCES, build

# (shape, variant): small, GPT-2 124M, an odd shape (head_dim 20, width 120), and trained-like outliers
CASES = [("tiny", "normal"), ("gpt2", "normal"), ("odd", "normal"), ("tiny", "outliers")]
PAIRS = [("hf", "numpy64"), ("tinygrad", "numpy64"), ("tinygrad", "hf")]  # (A, reference B)


def _failures(rows) -> str:
    return format_table([r for r in rows if not r.passed])


@pytest.mark.parametrize("shape,variant", CASES)
@pytest.mark.parametrize("a,b", PAIRS)
def test_references_agree_at_every_checkpoint(reference_trace, shape, variant, a, b):
    rows = compare_traces(reference_trace(a, shape, variant), reference_trace(b, shape, variant))
    passes = 1 + len(DECODE_IDS)
    assert len(rows) == passes * len(forward_order(SHAPES[shape].n_layer))
    assert all(r.passed for r in rows), _failures(rows)


@pytest.mark.parametrize("shape,variant", CASES)
@pytest.mark.parametrize("reference", REFERENCES)
def test_trace_follows_the_structural_rules(reference_trace, shape, variant, reference):
    """-inf and 0 exactly at the future keys, probabilities summing to 1, caches of S positions."""
    assert structural_problems(reference_trace(reference, shape, variant).arrays()) == []


class PassLog(Tracer):
    """A Tracer that also keeps each pass's start_forward arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[tuple[int, int]] = []

    def start_forward(self, start_pos: int, n_tokens: int) -> None:
        super().start_forward(start_pos, n_tokens)
        self.passes.append((start_pos, n_tokens))


@pytest.mark.parametrize("reference", REFERENCES)
def test_each_pass_records_the_table_in_order_and_shape(checkpoint, reference):
    dims = SHAPES["odd"]
    tracer = PassLog()
    run_trace(build(reference, checkpoint("odd")), PROMPT_IDS, DECODE_IDS, tracer)

    T = len(PROMPT_IDS)
    assert tracer.passes == [(0, T)] + [(T + i, 1) for i in range(len(DECODE_IDS))]
    for step, (start_pos, n_tokens) in enumerate(tracer.passes):
        records = [r for r in tracer.records if r.step == step]
        assert [(r.name, r.layer) for r in records] == forward_order(dims.n_layer)
        for r in records:
            shape = expected_shape(r.name, T=n_tokens, start_pos=start_pos, n_embd=dims.n_embd,
                                   n_head=dims.n_head, vocab_size=dims.vocab_size)
            assert r.value.shape == shape, (step, r.name, r.layer)
        logits = tracer.get("logits", step=step)
        assert tracer.get("next_token", step=step).dtype == np.int64
        assert tracer.get("next_token", step=step)[0] == np.argmax(logits[0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("a", ["hf", "tinygrad"])
def test_references_agree_on_half_precision_storage(reference_trace, dtype, a):
    """Each reference widens fp16 / bf16 weights its own way; they must still meet the oracle."""
    storage = {"dtype": dtype}
    rows = compare_traces(reference_trace(a, storage=storage), reference_trace("numpy64", storage=storage))
    assert all(r.passed for r in rows), _failures(rows)


@pytest.mark.parametrize("reference", REFERENCES)
def test_prefixed_names_and_explicit_lm_head_give_the_same_trace(reference_trace, reference):
    """`transformer.`-prefixed tensor names and an lm_head.weight equal to wte hold the same model."""
    plain = reference_trace(reference).arrays()
    variant = reference_trace(reference, storage={"prefix": True, "lm_head": "present"}).arrays()
    assert plain.keys() == variant.keys()
    for key in plain:
        np.testing.assert_array_equal(variant[key], plain[key], err_msg=key)
