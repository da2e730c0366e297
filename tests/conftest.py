"""Session-wide fixtures of the validation harness: seeded checkpoints and reference traces, each made once.

    def test_something(checkpoint, reference_trace, trained_checkpoint):
        path = checkpoint("gpt2", variant="outliers")            # a HF GPT-2 directory (llorch.testing)
        hf = reference_trace("hf", "gpt2", variant="outliers")   # a Tracer: PROMPT_IDS, then DECODE_IDS
        model = llorch.load(trained_checkpoint)                   # a small GPT-2 trained on Python's stdlib

Both are keyed by their arguments, so tests that ask for the same checkpoint or trace share one.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
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
    """Loads during the tests (subprocesses too) cache their prepared weights here, not in ~/.cache, and
    within 2 GB (gpt2-medium's and 124M's), so the suite's many checkpoints do not fill the disk."""
    os.environ["LLORCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("weight-cache"))
    os.environ["LLORCH_CACHE_MAX_GB"] = "2"


def _options_key(options: dict) -> tuple:
    return tuple(sorted(options.items()))


_CHECKPOINT_DEFAULTS = {name: p.default for name, p in inspect.signature(make_checkpoint).parameters.items()
                        if p.kind is p.KEYWORD_ONLY}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(shape="tiny", **make_checkpoint options) -> path; seed 0 unless given. Options equal to
    make_checkpoint's defaults are dropped, so checkpoint("gpt2") and checkpoint("gpt2", variant="normal")
    are one directory."""
    made: dict[tuple, str] = {}

    def make(shape: str = "tiny", **options) -> str:
        options = {k: v for k, v in options.items() if _CHECKPOINT_DEFAULTS.get(k, object()) != v}
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


def _rewritten(directory: str, change) -> str:
    """A checkpoint written by make_checkpoint, its float32 tensors passed through change(tensors) in place."""
    from safetensors.numpy import load_file, save_file
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="session")
def padded_checkpoint(tmp_path_factory):
    """The tiny shape with its vocabulary padded to 50304, as nanoGPT and llm.c train, rigged so that a
    padding id would win every argmax: ln_f's output is all ones and the padding rows of wte are 0.5 each,
    so their logits are 32 and the others' a few tenths."""
    from llorch.testing import SHAPES
    from dataclasses import replace
    directory = make_checkpoint(tmp_path_factory.mktemp("padded"), replace(SHAPES["tiny"], vocab_size=50304))

    def rig(tensors):
        tensors["ln_f.weight"][:] = 0
        tensors["ln_f.bias"][:] = 1
        tensors["wte.weight"][50257:] = 0.5
    return _rewritten(directory, rig)


@pytest.fixture(scope="session")
def overflowing_checkpoint(tmp_path_factory):
    """The tiny shape with finite weights whose activations overflow: block 0's MLP matrices scaled by 1e30
    (still far below float32's 3.4e38), so its output, and the logits after it, are not finite."""
    directory = make_checkpoint(tmp_path_factory.mktemp("overflowing"), "tiny")

    def scale(tensors):
        tensors["h.0.mlp.c_fc.weight"] *= np.float32(1e30)
        tensors["h.0.mlp.c_proj.weight"] *= np.float32(1e30)
    return _rewritten(directory, scale)
