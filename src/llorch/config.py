"""GPT2Config: the shape of a GPT-2 model, read from a Hugging Face `config.json` and checked."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


class CheckpointError(ValueError):
    """A model directory or file that llorch cannot use; the message says what is wrong and where."""


# The activations HF GPT-2 configs name for the tanh-approximation GELU that GPT-2 was trained with.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CheckpointError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise CheckpointError(f"config: n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        eps = self.layer_norm_epsilon
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise CheckpointError(f"config: layer_norm_epsilon must be a number in (0, 1), got {eps!r}")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GPT2Config":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except PermissionError:
            raise CheckpointError(f"{path}: permission denied") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        missing = [k for k in ("n_layer", "n_embd", "n_head") if k not in raw]
        if missing:
            raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
        activation = raw.get("activation_function", "gelu_new")
        if activation not in TANH_GELU_NAMES:
            raise CheckpointError(f"{path}: activation_function {activation!r} is not GPT-2's tanh GELU "
                                  f"({', '.join(TANH_GELU_NAMES)})")
        return cls(n_layer=raw["n_layer"], n_embd=raw["n_embd"], n_head=raw["n_head"],
                   n_positions=raw.get("n_positions", raw.get("n_ctx", 1024)),
                   vocab_size=raw.get("vocab_size", 50257),
                   layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5))
