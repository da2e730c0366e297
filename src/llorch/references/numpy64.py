"""GPT-2 in float64 numpy, written from the spec: the oracle every tolerance is judged against.

Reads the checkpoint directory with nothing but json and numpy (its own safetensors reader), and computes
each checkpoint of llorch.trace.CHECKPOINTS in float64:

    x = wte[tokens] + wpe[positions]                                         embed
    per block:  h = LN(x; ln_1)                                              ln_1
                q | k | v = h @ c_attn.W + c_attn.b       (Conv1D: W is [in, out])  attn.qkv
                cache[:, start_pos:S] = k, v              ([NH, S, HS])      attn.k_cache, attn.v_cache
                scores = q k^T / sqrt(HS), future keys -inf                  attn.scores
                probs = softmax(scores)                                      attn.probs
                y = probs v, heads merged                                    attn.y
                x = x + (y @ c_proj.W + c_proj.b)                            attn.proj, res_1
                x = x + c_proj(gelu_tanh(LN(x; ln_2) @ c_fc.W + c_fc.b))     ln_2, mlp.fc, mlp.gelu, mlp.proj, block_out
    LN(x; ln_f) @ wte^T, last row; its argmax                                ln_f, logits, next_token

LN is (x - mean) / sqrt(biased var + eps) * weight + bias. lm_head is tied to wte.

The mistakes of the project's first attempt can be switched on, so the tests can prove that llorch-compare
catches each one at the checkpoint where it happens: `causal_mask=False` (future keys visible),
`gelu="erf"` (the exact GELU instead of GPT-2's tanh approximation), `transpose_conv1d=True` (attn.c_proj
applied as x @ W.T, i.e. HF's Conv1D [in, out] weight read as a torch Linear's [out, in]),
`kv_cache="current_pass"` (a cache holding only this pass's keys and values: the prompt pass is right, every
decode step attends to itself alone) and `cache_layout="S,NH,HS"` (the cache reported position-major; only
what is reported changes, the attention stays right, so the comparison must call it a shape mismatch).
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from .shared import pass_end, read_config



def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float64 (F32, F16 and BF16 storage)."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        data = f.read()
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        raw = data[begin:end]
        if entry["dtype"] == "BF16":  # the upper half of a float32
            values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            values = np.frombuffer(raw, {"F32": "<f4", "F16": "<f2"}[entry["dtype"]])
        tensors[name] = values.astype(np.float64).reshape(entry["shape"])
    return tensors


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * weight + bias


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


class NumpyGPT2:
    def __init__(self, checkpoint_dir: str, *, causal_mask: bool = True, gelu: str = "tanh",
                 transpose_conv1d: bool = False, kv_cache: str = "full", cache_layout: str = "NH,S,HS") -> None:
        for option, value, allowed in [("gelu", gelu, ("tanh", "erf")), ("kv_cache", kv_cache, ("full", "current_pass")),
                                       ("cache_layout", cache_layout, ("NH,S,HS", "S,NH,HS"))]:
            if value not in allowed:
                raise ValueError(f"{option}={value!r}: expected one of {allowed}")
        self.n_layer, self.n_head, self.n_embd, self.n_positions, self.eps = read_config(checkpoint_dir)
        tensors = read_safetensors(os.path.join(checkpoint_dir, "model.safetensors"))
        self.w = {name.removeprefix("transformer."): value for name, value in tensors.items()}
        self.causal_mask, self.transpose_conv1d = causal_mask, transpose_conv1d
        self.kv_cache, self.cache_layout = kv_cache, cache_layout
        self.gelu = gelu_tanh if gelu == "tanh" else gelu_erf
        self.reset()

    def reset(self) -> None:
        head_size = self.n_embd // self.n_head
        shape = (self.n_layer, self.n_head, self.n_positions, head_size)
        self.k_cache, self.v_cache = np.zeros(shape), np.zeros(shape)
        self.n_cached = 0

    def forward(self, token_ids, start_pos: int = 0, tracer=None) -> np.ndarray:
        tokens = np.asarray(token_ids, dtype=np.int64)
        T, S = len(tokens), pass_end(start_pos, len(tokens), self.n_cached, self.n_positions)
        record = tracer.record if tracer is not None else lambda name, layer, value: None
        if tracer is not None:
            tracer.start_forward(start_pos, T)
        w, C, NH = self.w, self.n_embd, self.n_head
        HS = C // NH

        x = w["wte.weight"][tokens] + w["wpe.weight"][start_pos:S]
        record("embed", None, x)
        for layer in range(self.n_layer):
            p = f"h.{layer}."
            h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], self.eps)
            record("ln_1", layer, h)
            qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
            record("attn.qkv", layer, qkv)
            q, k, v = (part.reshape(T, NH, HS).transpose(1, 0, 2) for part in np.split(qkv, 3, axis=1))
            if self.kv_cache == "full":
                self.k_cache[layer, :, start_pos:S] = k
                self.v_cache[layer, :, start_pos:S] = v
                keys, values, first_key = self.k_cache[layer, :, :S], self.v_cache[layer, :, :S], 0
            else:  # the mistake: only this pass's keys and values
                keys, values, first_key = k, v, start_pos
            record("attn.k_cache", layer, self._reported_cache(keys))
            record("attn.v_cache", layer, self._reported_cache(values))
            scores = q @ keys.transpose(0, 2, 1) / math.sqrt(HS)
            if self.causal_mask:  # query t sits at position start_pos + t and sees keys up to there
                key_positions = first_key + np.arange(keys.shape[1])
                future = key_positions[None, :] > start_pos + np.arange(T)[:, None]
                scores[:, future] = -np.inf
            record("attn.scores", layer, scores)
            exp = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = exp / exp.sum(axis=-1, keepdims=True)
            record("attn.probs", layer, probs)
            y = (probs @ values).transpose(1, 0, 2).reshape(T, C)
            record("attn.y", layer, y)
            proj_weight = w[p + "attn.c_proj.weight"]
            proj = y @ (proj_weight.T if self.transpose_conv1d else proj_weight) + w[p + "attn.c_proj.bias"]
            record("attn.proj", layer, proj)
            x = x + proj
            record("res_1", layer, x)
            h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], self.eps)
            record("ln_2", layer, h)
            fc = h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
            record("mlp.fc", layer, fc)
            activated = self.gelu(fc)
            record("mlp.gelu", layer, activated)
            mlp_out = activated @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
            record("mlp.proj", layer, mlp_out)
            x = x + mlp_out
            record("block_out", layer, x)
        self.n_cached = S

        h = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], self.eps)
        record("ln_f", None, h)
        logits = h @ w["wte.weight"].T
        record("logits", None, logits[-1:])
        record("next_token", None, np.array([np.argmax(logits[-1])], dtype=np.int64))
        return logits

    def _reported_cache(self, cache: np.ndarray) -> np.ndarray:
        """The cached keys or values [NH, S, HS] as this instance reports them (see cache_layout)."""
        return cache.transpose(1, 0, 2) if self.cache_layout == "S,NH,HS" else cache
