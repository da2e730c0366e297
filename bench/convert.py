"""The peers' model files, written from the same Hugging Face checkpoint directory that llorch and HF load.

- write_gguf: an F32 GGUF for llama.cpp, written with the `gguf` package's GGUFWriter as llama.cpp's
  convert_hf_to_gguf.py writes GPT-2 (that script is not on PyPI): architecture "gpt2", its tensor names
  from gguf's own name map, the Conv1D [in, out] weights transposed to [out, in], no output.weight (llama.cpp
  ties it to token_embd), and the GPT-2 BPE tokenizer from vocab.json + merges.txt.
- export_onnx: GPT-2 with past key values for ONNX Runtime, exported by torch.onnx (torch.export) from
  transformers' GPT2LMHeadModel: inputs input_ids [1, T] and past_{2i} / past_{2i+1} (keys / values of layer
  i, [1, NH, P, HS], P = 0 for a prefill); outputs the last position's logits [1, V] and present_* [1, NH, P+T, HS].

Each writes to a temporary name and renames when complete, so an interrupted run never leaves a file
that looks finished. bench/run.py checks both against HF on the same prompt before timing anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np

from llorch.config import GPT2Config
from llorch.testing import SHAPES, make_checkpoint

ONNX_OPSET = 18
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class ModelFiles:
    """Where one benchmark model's files live under the work directory (made once, then reused: the same
    model name and seed always give the same checkpoint bytes)."""
    workdir: str
    model: str
    seed: int = 0

    @property
    def shape(self) -> GPT2Config:
        return SHAPES[self.model]

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.workdir, f"{self.model}-seed{self.seed}")

    @property
    def gguf(self) -> str:
        return self.checkpoint + ".f32.gguf"

    @property
    def onnx(self) -> str:
        return os.path.join(self.checkpoint + "-onnx", ONNX_FILE)

    def ensure(self, engine: str) -> None:
        """Write whatever this engine loads and is not there yet (the checkpoint first: all derive from it)."""
        if not os.path.exists(self.checkpoint):
            tmp = self.checkpoint + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            make_checkpoint(tmp, self.model, seed=self.seed)
            os.replace(tmp, self.checkpoint)
        if engine == "llamacpp" and not os.path.exists(self.gguf):
            write_gguf(self.checkpoint, self.gguf)
        if engine == "ort" and not os.path.exists(self.onnx):
            export_onnx(self.checkpoint, os.path.dirname(self.onnx))


def write_gguf(checkpoint: str, out_path: str) -> str:
    import gguf
    from safetensors.numpy import load_file

    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    L, C = cfg["n_layer"], cfg["n_embd"]
    tmp = out_path + ".partial"
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    w.add_name(os.path.basename(os.path.normpath(checkpoint)))
    w.add_block_count(L)
    # transformers 5 no longer writes n_ctx; it is n_positions
    w.add_context_length(cfg.get("n_ctx") or cfg["n_positions"])
    w.add_embedding_length(C)
    w.add_feed_forward_length(cfg.get("n_inner") or 4 * C)
    w.add_head_count(cfg["n_head"])
    w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_gpt2_tokenizer(w, checkpoint, cfg["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, L)
    for name, tensor in load_file(os.path.join(checkpoint, "model.safetensors")).items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue                           # tied to wte / causal-mask buffers of old checkpoints
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{name}: no GGUF name for this GPT-2 tensor")
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            tensor = tensor.T                  # HF Conv1D [in, out] -> [out, in] as nn.Linear
        w.add_tensor(gguf_name, np.ascontiguousarray(tensor, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out_path)
    return out_path


def _add_gpt2_tokenizer(w, checkpoint: str, vocab_size: int) -> None:
    """GPT-2's byte-level BPE as convert_hf_to_gguf.py writes it: model "gpt2", pre-tokenizer "gpt-2",
    the tokens in id order (<|endoftext|> a control token), the merges and bos/eos from config.json."""
    import gguf

    with open(os.path.join(checkpoint, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        if tok is None:
            types.append(gguf.TokenType.UNUSED)
        elif tok.startswith("<|") and tok.endswith("|>"):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError(f"{checkpoint}: no merges.txt (GPT-2's BPE merges are needed for the GGUF tokenizer)")
    special.add_to_gguf(w)


def export_onnx(checkpoint: str, out_dir: str) -> str:
    """Writes out_dir/model.onnx (+ model.onnx.data, the weights); returns the model path."""
    import torch
    from transformers import DynamicCache, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    cfg = hf.config
    L, NH, HS = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head

    class WithPast(torch.nn.Module):
        """GPT-2 over a cache given as plain tensors; last-position logits only (logits_to_keep=1)."""

        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, past):
            cache = DynamicCache(config=cfg)
            for i in range(L):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.hf(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return out.logits[:, -1, :], presents

    ids = torch.zeros((1, 5), dtype=torch.long)
    past = [torch.zeros((1, NH, 3, HS)) for _ in range(2 * L)]
    T = torch.export.Dim("T", min=1, max=cfg.n_positions)
    P = torch.export.Dim("P", min=0, max=cfg.n_positions)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):   # its progress lines: not the table's stdout
        program = torch.onnx.export(
            WithPast().eval(), (ids, past), dynamo=True, opset_version=ONNX_OPSET,
            dynamic_shapes=({1: T}, [{2: P}] * (2 * L)),
            input_names=["input_ids"] + [f"past_{i}" for i in range(2 * L)],
            output_names=["logits"] + [f"present_{i}" for i in range(2 * L)])
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    program.save(os.path.join(tmp, ONNX_FILE), external_data=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return os.path.join(out_dir, ONNX_FILE)
