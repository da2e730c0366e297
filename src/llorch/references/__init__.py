"""Independent GPT-2 references, for the test suite and for `llorch-validate` (none uses llorch's model).

Each is a class built from a Hugging Face GPT-2 checkpoint directory, with its own KV cache and the
llorch.trace protocol: `forward(token_ids, start_pos=0, tracer=None) -> logits [T, V]` and `reset()`.
Each imports its framework only when built (`build`), so `import llorch` never pulls in torch or tinygrad.

    numpy64.NumpyGPT2      float64 numpy, written from the spec: the oracle; mistakes can be injected
    hf.HFGPT2              Hugging Face transformers' GPT2LMHeadModel, traced with forward hooks
    tinygrad_ref.TinygradGPT2   tinygrad Tensor ops (CPU), written from the spec

The three share no math: each reads the checkpoint and computes the forward its own way.
"""

import importlib

REFERENCES = ("numpy64", "hf", "tinygrad")
# what a reference needs beyond llorch's own dependencies, and how to get it
FRAMEWORKS = {"numpy64": (), "hf": ("torch", "transformers"), "tinygrad": ("tinygrad",)}
INSTALL = {"hf": "pip install 'llorch[validate]'", "tinygrad": "pip install tinygrad"}

# The harness's input: a prompt pass of T = 8 (so a missing causal mask shows), then three teacher-forced
# decode steps (so a cache that forgets the past shows).
PROMPT_IDS = (15496, 11, 314, 1101, 257, 3303, 2746, 11)  # "Hello, I'm a language model,"
DECODE_IDS = (290, 314, 716)                                # " and I am"


class MissingFramework(ModuleNotFoundError):
    """A reference's framework (torch, transformers, tinygrad) is not installed; the message says how to get it."""


def require(name: str) -> None:
    """Import the frameworks reference `name` needs; MissingFramework (one line with the pip command) if one is
    missing, ValueError for an unknown name."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; expected one of {', '.join(REFERENCES)}")
    for framework in FRAMEWORKS[name]:
        try:
            importlib.import_module(framework)
        except ModuleNotFoundError:
            raise MissingFramework(f"the {name} reference needs {framework}, which is not installed: "
                                   f"{INSTALL[name]}", name=framework) from None


def build(name: str, checkpoint_dir: str, **options):
    """The reference `name` (one of REFERENCES) for a checkpoint; imports only that one's framework."""
    require(name)
    if name == "numpy64":
        from .numpy64 import NumpyGPT2 as reference
    elif name == "hf":
        from .hf import HFGPT2 as reference
    else:
        from .tinygrad_ref import TinygradGPT2 as reference
    return reference(checkpoint_dir, **options)
