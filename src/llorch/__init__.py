"""llorch: GPT-2 inference in FP32 on the CPU.

    model = llorch.load("path/to/gpt2")          # a HF GPT-2 directory or .safetensors file
    enc = llorch.tokenizer()
    for token in llorch.generate(model, enc.encode("Hello."), max_new_tokens=16):
        print(enc.decode([token]), end="")
"""

from .version import __version__
from .config import CheckpointError, GPT2Config
from .generate import Session, StopReason, generate
from .model import GPT2, ContextError, KVCache, load
from .runtime import build_info, configure_from_env, select_simd, set_num_threads
from .sampling import Sampler
from .tokenizer import EOT_TOKEN, tokenizer

configure_from_env()

__all__ = ["GPT2", "GPT2Config", "CheckpointError", "ContextError", "EOT_TOKEN", "KVCache", "Sampler", "Session",
           "StopReason", "build_info", "generate", "load", "select_simd", "set_num_threads", "tokenizer"]
