"""GPT-2 written from the spec with tinygrad Tensor ops (CPU device, float32), as a traced reference.

Weights come from tinygrad's own safetensors loader (bf16 is widened by bit shifts: clang cannot compile
tinygrad's bf16 cast for this CPU target). The forward spells every step out in elementary Tensor ops --
layer norm, the tanh GELU, the masked softmax -- rather than calling tinygrad's fused helpers.

The KV cache is one preallocated [NH, n_positions, HS] tensor per layer for keys and one for values; the
only other state is the number of cached positions. Everything that depends on start_pos (which rows of
wpe, where this pass's keys go, which keys each query may see) enters as data -- index and mask tensors --
not as shapes, so tinygrad compiles one set of kernels per prompt length and reuses them for every decode
step: attention always runs over all n_positions cache rows, the rows past S masked to -inf, and the trace
reports the first S.
"""

from __future__ import annotations

import math
import os

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.nn.state import safe_load

from .shared import pass_end, read_config

DEVICE = "CPU"  # every tensor is created on, or moved to, the CPU device explicitly


def _load_float32(tensor: Tensor) -> Tensor:
    if tensor.dtype == dtypes.bfloat16:  # bf16 is the upper half of a float32
        widened = tensor.bitcast(dtypes.uint16).to(DEVICE).cast(dtypes.uint32).lshift(16).bitcast(dtypes.float32)
    else:
        widened = tensor.to(DEVICE).cast(dtypes.float32)
    return widened.contiguous().realize()


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    centred = x - x.mean(axis=-1, keepdim=True)
    variance = (centred * centred).mean(axis=-1, keepdim=True)
    return centred / (variance + eps).sqrt() * weight + bias


def _gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + (math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)).tanh())


class TinygradGPT2:
    def __init__(self, checkpoint_dir: str) -> None:
        self.n_layer, self.n_head, self.n_embd, self.n_positions, self.eps = read_config(checkpoint_dir)
        stored = safe_load(os.path.join(checkpoint_dir, "model.safetensors"))
        self.w = {name.removeprefix("transformer."): _load_float32(t) for name, t in stored.items()}
        self.reset()

    def reset(self) -> None:
        shape = (self.n_head, self.n_positions, self.n_embd // self.n_head)
        self.k_cache = [Tensor.zeros(*shape, device=DEVICE).contiguous().realize() for _ in range(self.n_layer)]
        self.v_cache = [Tensor.zeros(*shape, device=DEVICE).contiguous().realize() for _ in range(self.n_layer)]
        self.n_cached = 0

    def forward(self, token_ids, start_pos: int = 0, tracer=None) -> np.ndarray:
        tokens = np.asarray(token_ids, dtype=np.int32)
        T, S = len(tokens), pass_end(start_pos, len(tokens), self.n_cached, self.n_positions)
        if tracer is not None:
            tracer.start_forward(start_pos, T)

        def record(name: str, layer: int | None, value: Tensor) -> Tensor:
            value = value.realize()
            if tracer is not None:
                tracer.record(name, layer, value.numpy())
            return value

        w, C, NH, maxT = self.w, self.n_embd, self.n_head, self.n_positions
        HS = C // NH
        positions = np.arange(start_pos, S)
        # where this pass's k, v go: cache row start_pos + t takes row t; the other rows keep their values
        written = np.arange(maxT)[:, None] == positions[None, :]                              # [maxT, T]
        place = Tensor(written.astype(np.float32), device=DEVICE)
        keep = Tensor(~written.any(axis=1, keepdims=True), device=DEVICE)                   # [maxT, 1]
        # query t (at position start_pos + t) sees cache rows 0 .. start_pos + t
        visible = Tensor(np.arange(maxT)[None, :] <= positions[:, None], device=DEVICE)     # [T, maxT]

        x = record("embed", None, w["wte.weight"][Tensor(tokens, device=DEVICE)]
                   + w["wpe.weight"][Tensor(positions.astype(np.int32), device=DEVICE)])
        for layer in range(self.n_layer):
            p = f"h.{layer}."
            h = record("ln_1", layer, _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], self.eps))
            qkv = record("attn.qkv", layer, h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"])
            q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(T, NH, HS).permute(1, 0, 2) for i in range(3))
            self.k_cache[layer] = keep.where(self.k_cache[layer], place @ k).realize()
            self.v_cache[layer] = keep.where(self.v_cache[layer], place @ v).realize()
            keys, values = self.k_cache[layer], self.v_cache[layer]
            if tracer is not None:
                tracer.record("attn.k_cache", layer, keys.numpy()[:, :S])
                tracer.record("attn.v_cache", layer, values.numpy()[:, :S])
            scores = visible.where(q @ keys.permute(0, 2, 1) / math.sqrt(HS), -math.inf).realize()
            exp = (scores - scores.max(axis=-1, keepdim=True)).exp()
            probs = (exp / exp.sum(axis=-1, keepdim=True)).realize()
            if tracer is not None:
                tracer.record("attn.scores", layer, scores.numpy()[:, :, :S])
                tracer.record("attn.probs", layer, probs.numpy()[:, :, :S])
            y = record("attn.y", layer, (probs @ values).permute(1, 0, 2).reshape(T, C))
            proj = record("attn.proj", layer, y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"])
            x = record("res_1", layer, x + proj)
            h = record("ln_2", layer, _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], self.eps))
            fc = record("mlp.fc", layer, h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
            activated = record("mlp.gelu", layer, _gelu_tanh(fc))
            mlp_out = record("mlp.proj", layer, activated @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"])
            x = record("block_out", layer, x + mlp_out)
        self.n_cached = S

        h = record("ln_f", None, _layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], self.eps))
        logits = (h @ w["wte.weight"].T).numpy()
        if tracer is not None:
            tracer.record("logits", None, logits[-1:])
            tracer.record("next_token", None, np.array([np.argmax(logits[-1])], dtype=np.int64))
        return logits
