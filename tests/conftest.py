"""Session-wide fixtures of the validation harness: seeded checkpoints and reference traces, each made once.

    def test_something(checkpoint, reference_trace, trained_checkpoint):
        path = checkpoint("gpt2", variant="outliers")            # a HF GPT-2 directory (llorch.testing)
        hf = reference_trace("hf", "gpt2", variant="outliers")   # a Tracer: PROMPT_IDS, then DECODE_IDS
        model = llorch.load(trained_checkpoint)                   # a small GPT-2 trained on Python's stdlib

Both are keyed by their arguments, so tests that ask for the same checkpoint or trace share one.
"""

from __future__ import annotations

import os

import pytest

from llorch.testing import make_checkpoint
from llorch.trace import Tracer, run_trace
from llorch.references import DECODE_IDS, PROMPT_IDS, build


# python -m llorch.testing train tests/data/trained-stdlib (see tests/data/README.md)
TRAINED_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "trained-stdlib")


@pytest.fixture(scope="session")
def trained_checkpoint() -> str:
    """A small GPT-2 trained on the standard library's sources: greedy text varied enough to compare."""
    return TRAINED_CHECKPOINT


@pytest.fixture(scope="session", autouse=True)
def weight_cache_in_a_temporary_directory(tmp_path_factory):
    """Loads during the tests (subprocesses too) cache their prepared weights here, not in ~/.cache."""
    os.environ["LLORCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("weight-cache"))


def _options_key(options: dict) -> tuple:
    return tuple(sorted(options.items()))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(shape="tiny", **make_checkpoint options) -> path; seed 0 unless given."""
    made: dict[tuple, str] = {}

    def make(shape: str = "tiny", **options) -> str:
        key = (shape, _options_key(options))
        if key not in made:
            label = "-".join([shape] + [f"{k}={v}" for k, v in sorted(options.items())])
            made[key] = make_checkpoint(tmp_path_factory.mktemp(label), shape, **options)
        return made[key]
    return make


@pytest.fixture(scope="session")
def reference_trace(checkpoint):
    """reference_trace(reference, shape="tiny", variant="normal", storage=None, **reference options) -> Tracer.

    The trace of the prompt pass (PROMPT_IDS) and one teacher-forced pass per DECODE_IDS entry. `storage`
    is a dict of further make_checkpoint options (dtype, prefix, lm_head); reference options go to the
    reference's constructor (the oracle's injectable mistakes)."""
    traces: dict[tuple, Tracer] = {}

    def trace(reference: str, shape: str = "tiny", variant: str = "normal", storage: dict | None = None,
              **options) -> Tracer:
        key = (reference, shape, variant, _options_key(storage or {}), _options_key(options))
        if key not in traces:
            model = build(reference, checkpoint(shape, variant=variant, **(storage or {})), **options)
            traces[key] = Tracer()
            run_trace(model, PROMPT_IDS, DECODE_IDS, traces[key])
        return traces[key]
    return trace
