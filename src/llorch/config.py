"""GPT2Config: the shape of a GPT-2 model, read from a Hugging Face `config.json` and checked."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable


class CheckpointError(ValueError):
    """A model directory or file that llorch cannot use; the message says what is wrong and where."""


# The activations HF GPT-2 configs name for the tanh-approximation GELU that GPT-2 was trained with.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
ANY = None   # ConfigField.accepts: the table refuses no value (GPT2Config checks the sizes)


@dataclass(frozen=True)
class ConfigField:
    """How llorch treats one field of transformers' GPT2Config (or one that HF's GPT-2 code reads).

    status: "honoured" (llorch computes what HF computes for every accepted value), "refused" (only the
    default loads: llorch's forward does not compute the alternative), "irrelevant" (HF's GPT2LMHeadModel
    reads it only when training, in other heads, or for the shape of its outputs; any value loads).
    accepts: the values that load, ANY, or a test of (value, the whole config.json); a field absent from
    config.json has HF's default, which always loads."""
    status: str
    accepts: tuple | Callable[[object, dict], bool] | None
    why: str

    def allows(self, value: object, raw: dict) -> bool:
        if self.accepts is ANY:
            return True
        if callable(self.accepts):
            return self.accepts(value, raw)
        return any(type(value) is type(ok) and value == ok for ok in self.accepts)


def _mlp_width_4x(value: object, raw: dict) -> bool:
    return value is None or value == 4 * raw.get("n_embd", 0)


_DROPOUT = "dropout: the identity at inference (HF's from_pretrained returns the model in eval mode)"
_OTHER_HEADS = "read only by GPT2DoubleHeadsModel / the classification heads, not by GPT2LMHeadModel"
_OUTPUTS = "chooses which extra outputs HF returns, not the logits"

# Every field of transformers' GPT2Config, and every config attribute its modeling_gpt2.py reads
# (tests/test_config_fields.py walks both and fails on a field missing here).
CONFIG_FIELDS: dict[str, ConfigField] = {
    # the shape: checked against every tensor's shape at load
    "n_layer": ConfigField("honoured", ANY, "the number of blocks"),
    "n_embd": ConfigField("honoured", ANY, "the width of the residual stream"),
    "n_head": ConfigField("honoured", ANY, "the number of attention heads"),
    "n_positions": ConfigField("honoured", ANY, "the context length (wpe's rows)"),
    "vocab_size": ConfigField("honoured", ANY, "wte's rows: the logits' width"),
    "layer_norm_epsilon": ConfigField("honoured", ANY, "the layer norms' epsilon"),
    "n_inner": ConfigField("honoured", _mlp_width_4x,
                           "the MLP's width; llorch's MLP is GPT-2's, 4 * n_embd wide (null means that)"),
    "activation_function": ConfigField("honoured", TANH_GELU_NAMES,
                                       f"llorch's MLP computes GPT-2's tanh GELU only ({', '.join(TANH_GELU_NAMES)})"),
    "reorder_and_upcast_attn": ConfigField("honoured", (False, True),
                                           "in FP32 both orders compute the same scores (only the rounding "
                                           "order differs); HF honours it only in eager attention anyway"),
    "scale_attn_weights": ConfigField("refused", (True,),
                                      "llorch always scales the attention scores by 1/sqrt(head size)"),
    "scale_attn_by_inverse_layer_idx": ConfigField("refused", (False,),
                                                   "llorch does not scale layer i's scores by 1/(i + 1)"),
    "add_cross_attention": ConfigField("refused", (False,),
                                       "a decoder trained to attend to an encoder's output; llorch has no "
                                       "encoder"),
    "tie_word_embeddings": ConfigField("refused", (True,),
                                       "llorch computes the logits with wte (GPT-2 ties lm_head to it)"),
    "eos_token_id": ConfigField("refused", (50256,),
                                "llorch's generation stops at <|endoftext|> (50256), HF's at eos_token_id"),
    "is_encoder_decoder": ConfigField("refused", (False,), "GPT-2 is a decoder only"),
    "model_type": ConfigField("refused", ("gpt2",), "llorch runs GPT-2 only"),
    "bos_token_id": ConfigField("irrelevant", ANY,
                                "HF starts generating from it only when given no prompt; llorch needs one"),
    "pad_token_id": ConfigField("irrelevant", ANY, "pads finished rows of a batch in HF's generate; "
                                                   + _OTHER_HEADS),
    "embd_pdrop": ConfigField("irrelevant", ANY, _DROPOUT),
    "attn_pdrop": ConfigField("irrelevant", ANY, _DROPOUT),
    "resid_pdrop": ConfigField("irrelevant", ANY, _DROPOUT),
    "initializer_range": ConfigField("irrelevant", ANY, "the random initialisation before training"),
    "use_cache": ConfigField("irrelevant", ANY, "HF's KV cache changes the cost, not the result; llorch "
                                                "always keeps one"),
    "_attn_implementation": ConfigField("irrelevant", ANY,
                                        "eager, sdpa and flash attention compute the same softmax(QK^T / "
                                        "sqrt(head size)) V; llorch's tolerances are set against eager"),
    "dtype": ConfigField("irrelevant", ANY, "the dtype HF loads into; llorch computes in FP32 whatever the "
                                            "tensors are stored as"),
    "chunk_size_feed_forward": ConfigField("irrelevant", ANY, "GPT-2's code never chunks its MLP"),
    "output_hidden_states": ConfigField("irrelevant", ANY, _OUTPUTS),
    "output_attentions": ConfigField("irrelevant", ANY, _OUTPUTS),
    "return_dict": ConfigField("irrelevant", ANY, "the form of HF's outputs (a tuple or an object), not the logits"),
    "architectures": ConfigField("irrelevant", ANY, "which HF class saved the file; the tensors are checked"),
    "transformers_version": ConfigField("irrelevant", ANY, "metadata"),
    "_name_or_path": ConfigField("irrelevant", ANY, "metadata"),
    "id2label": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "label2id": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "num_labels": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "problem_type": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "classifier_dropout": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "hidden_dropout": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "summary_type": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "summary_use_proj": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "summary_activation": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "summary_proj_to_labels": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "summary_first_dropout": ConfigField("irrelevant", ANY, _OTHER_HEADS),
    "summary_last_dropout": ConfigField("irrelevant", ANY, _OTHER_HEADS),
}


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
        for name, field in CONFIG_FIELDS.items():
            if name in raw and not field.allows(raw[name], raw):
                raise CheckpointError(f"{path}: {name} {raw[name]!r} is not supported: {field.why}")
        return cls(n_layer=raw["n_layer"], n_embd=raw["n_embd"], n_head=raw["n_head"],
                   n_positions=raw.get("n_positions", raw.get("n_ctx", 1024)),
                   vocab_size=raw.get("vocab_size", 50257),
                   layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5))
