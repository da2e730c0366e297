"""Hugging Face transformers' GPT2LMHeadModel (torch, float32, CPU, eager attention) as a traced reference.

The model is HF's own, loaded with `from_pretrained` from the checkpoint directory; its KV cache is a
DynamicCache that we keep between calls. Nothing of the forward is re-implemented except the attention
scores. Where each checkpoint comes from (module paths relative to `transformer.`; batch dim dropped):

    hooked (forward hooks: the module's output, or its first input where noted)
        embed          drop              (eval-mode dropout: identity on wte[ids] + wpe[positions])
        ln_1, ln_2     h.{i}.ln_1, h.{i}.ln_2
        attn.qkv       h.{i}.attn.c_attn
        attn.probs     h.{i}.attn, second output (eager attention returns its softmax weights)
        attn.y         h.{i}.attn.c_proj, input
        attn.proj      h.{i}.attn.c_proj
        res_1          h.{i}.ln_2, input
        mlp.fc         h.{i}.mlp.c_fc
        mlp.gelu       h.{i}.mlp.act  (NewGELUActivation, "gelu_new")
        mlp.proj       h.{i}.mlp.c_proj
        block_out      h.{i}
        ln_f           ln_f
        logits         lm_head (last row); next_token is its argmax
    read from HF's cache after the pass
        attn.k_cache, attn.v_cache   DynamicCache.layers[i].keys / .values, [NH, S, HS]
    recomputed (hooks cannot see them: eager attention adds the mask inside one function)
        attn.scores    q (from the hooked attn.qkv) @ cached keys^T * HS**-0.5, as HF's eager attention
                       computes it, with future keys set to -inf (HF adds the dtype's minimum instead)

Written against transformers 5 (the cache argument is `cache`, cache layers are `DynamicCache.layers`).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from ..trace import forward_order
from .shared import pass_end


def load_hf(checkpoint_dir: str) -> GPT2LMHeadModel:
    """HF's GPT-2 from a checkpoint directory: float32, eager attention, eval mode."""
    hf_logging.disable_progress_bar()
    return GPT2LMHeadModel.from_pretrained(checkpoint_dir, attn_implementation="eager", dtype=torch.float32).eval()


def hf_greedy(model: GPT2LMHeadModel, ids: list[int], n: int, eos_token_id: int) -> list[int]:
    """`generate(do_sample=False)`: up to n new ids after ids, stopping after eos_token_id."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos_token_id,
                             pad_token_id=eos_token_id, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


class HFGPT2:
    def __init__(self, checkpoint_dir: str) -> None:
        self.model = load_hf(checkpoint_dir)
        self.config = self.model.config
        self._captured: dict[tuple[str, int | None], torch.Tensor] = {}
        self._hook_modules()
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.config)

    def _hook_modules(self) -> None:
        def capture(module: torch.nn.Module, name: str, layer: int | None, take=lambda args, out: out) -> None:
            def hook(_module, args, output):
                self._captured[name, layer] = take(args, output)[0].detach().clone()  # [0]: the batch of one
            module.register_forward_hook(hook)

        first_input = lambda args, out: args[0]  # noqa: E731
        transformer = self.model.transformer
        capture(transformer.drop, "embed", None)
        for i, block in enumerate(transformer.h):
            capture(block.ln_1, "ln_1", i)
            capture(block.attn.c_attn, "attn.qkv", i)
            capture(block.attn, "attn.probs", i, take=lambda args, out: out[1])
            capture(block.attn.c_proj, "attn.y", i, take=first_input)
            capture(block.attn.c_proj, "attn.proj", i)
            capture(block.ln_2, "res_1", i, take=first_input)
            capture(block.ln_2, "ln_2", i)
            capture(block.mlp.c_fc, "mlp.fc", i)
            capture(block.mlp.act, "mlp.gelu", i)
            capture(block.mlp.c_proj, "mlp.proj", i)
            capture(block, "block_out", i)
        capture(transformer.ln_f, "ln_f", None)

    def forward(self, token_ids, start_pos: int = 0, tracer=None) -> np.ndarray:
        n_cached = self.cache.get_seq_length()
        pass_end(start_pos, len(token_ids), n_cached, self.config.n_positions)
        if start_pos < n_cached:
            self.cache.crop(start_pos - n_cached)  # a negative count: drop that many positions
        self._captured.clear()
        with torch.no_grad():
            input_ids = torch.tensor([list(token_ids)], dtype=torch.long)
            logits = self.model(input_ids, cache=self.cache, use_cache=True).logits[0]
        if tracer is not None:
            self._record(tracer, start_pos, len(input_ids[0]), logits)
        return logits.numpy()

    def _record(self, tracer, start_pos: int, T: int, logits: torch.Tensor) -> None:
        """Hand the captured and recomputed checkpoints to the tracer in the table's order."""
        for layer in range(self.config.n_layer):
            keys = self.cache.layers[layer].keys[0]
            self._captured["attn.k_cache", layer] = keys
            self._captured["attn.v_cache", layer] = self.cache.layers[layer].values[0]
            self._captured["attn.scores", layer] = self._scores(self._captured["attn.qkv", layer], keys, start_pos)
        self._captured["logits", None] = logits[-1:]
        self._captured["next_token", None] = torch.argmax(logits[-1]).reshape(1)

        tracer.start_forward(start_pos, T)
        for name, layer in forward_order(self.config.n_layer):
            tracer.record(name, layer, self._captured[name, layer].numpy())

    def _scores(self, qkv: torch.Tensor, keys: torch.Tensor, start_pos: int) -> torch.Tensor:
        T, S = qkv.shape[0], keys.shape[1]
        n_head, head_size = keys.shape[0], keys.shape[2]
        q = qkv[:, : n_head * head_size].reshape(T, n_head, head_size).transpose(0, 1)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * head_size**-0.5
        future = torch.arange(S)[None, :] > start_pos + torch.arange(T)[:, None]
        return scores.masked_fill(future, float("-inf"))
