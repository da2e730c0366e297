"""llorch's forward pass against each reference, checkpoint by checkpoint (docs/specs/13).

For every checkpoint of the table, in every pass (the prompt pass and three teacher-forced decode
steps): the shape first, then the values within the table's tolerance. A failure prints the rows that
failed, earliest first: where llorch and the reference part.
"""

import pytest

import llorch
import llorch.testing
from llorch.compare import compare_traces, format_table
from llorch.trace import OneSequence, Tracer, forward_order, run_trace
from llorch.references import DECODE_IDS, PROMPT_IDS, REFERENCES, build

CASES = [("tiny", "normal"), ("gpt2", "normal"), ("gpt2-medium", "normal"), ("distilgpt2", "normal"),
         ("odd", "normal"), ("head80", "normal"), ("tiny", "outliers"), ("gpt2", "outliers"),
         ("odd", "big_ln")]


@pytest.fixture(scope="module")
def llorch_trace(checkpoint):
    """llorch_trace(shape, variant) -> (Tracer of PROMPT_IDS then DECODE_IDS, n_layer), made once."""
    traces = {}

    def trace(shape, variant):
        if (shape, variant) not in traces:
            model, tracer = llorch.load(checkpoint(shape, variant=variant)), Tracer()
            run_trace(OneSequence(model), PROMPT_IDS, DECODE_IDS, tracer)
            traces[shape, variant] = tracer, model.config.n_layer
        return traces[shape, variant]
    return trace


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("shape, variant", CASES)
def test_every_checkpoint_matches_the_reference(llorch_trace, reference_trace, shape, variant, reference):
    ours, n_layer = llorch_trace(shape, variant)
    rows = compare_traces(ours, reference_trace(reference, shape, variant))
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n" + format_table(failed[:12])
    assert len(rows) == (1 + len(DECODE_IDS)) * len(forward_order(n_layer))   # every checkpoint, every pass


@pytest.mark.parametrize("reference", REFERENCES)
def test_the_trained_model_matches_the_reference(trained_checkpoint, reference):
    """A trained model's activations (peaked attention, confident logits) rather than a random one's."""
    ours, theirs = Tracer(), Tracer()
    run_trace(OneSequence(llorch.load(trained_checkpoint)), PROMPT_IDS, DECODE_IDS, ours)
    run_trace(build(reference, trained_checkpoint), PROMPT_IDS, DECODE_IDS, theirs)
    rows = compare_traces(ours, theirs)
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n" + format_table(failed[:12])
    assert len(rows) == (1 + len(DECODE_IDS)) * len(forward_order(llorch.testing.TRAINED_SHAPE.n_layer))
