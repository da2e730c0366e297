"""Seeded random GPT-2 checkpoints in Hugging Face's layout, for tests, benchmarks and docs.

    path = make_checkpoint(tmp_dir, "gpt2", seed=0, variant="outliers", dtype="bfloat16")

writes a directory that `GPT2LMHeadModel.from_pretrained` (and llorch) load like a downloaded model:
config.json with HF's field names, model.safetensors with HF's tensor names and Conv1D `[in, out]` weight
layouts, and the tokenizer files vocab.json / merges.txt. The same arguments always give the same bytes.

Weights follow GPT-2's initialisation, N(0, 0.02) with the residual projections (c_proj) scaled by
1/sqrt(2 n_layer), except that biases are small and non-zero and layer-norm gains are not exactly 1, so a
forgotten bias or gain shows in a comparison. Variants make the activations look like a trained GPT-2:

- "outliers": a few residual-stream dimensions carry activations in the hundreds (trained GPT-2 has such
  dimensions): large, same-signed wte/wpe columns plus attention and MLP output biases on those dimensions
  that grow the stream block by block. wte and wpe are 20x larger, so the ordinary dimensions are about
  half a unit and the outliers some hundreds of times larger (not tens of thousands, which FP32 could not
  follow). The layer-norm gains are rescaled so that every normalised activation stays O(1): the stream's
  variance is almost all the outliers', so the ordinary dimensions get large gains -- which also amplifies
  any rounding in the layer norms' mean and variance. The outlier columns of wte give every logit a large
  common offset, as trained GPT-2's logits have.
- "big_ln": layer-norm gains drawn from U(0.5, 4) and biases from N(0, 0.5), so normalised activations and
  the GELU inputs reach well beyond the unit range.

A random model's greedy text repeats one or two ids with small top-1 margins, so greedy comparisons need a
trained one: `python -m llorch.testing train DIR` (train_checkpoint, torch and transformers imported only
there) trains TRAINED_SHAPE on the running Python's own standard-library sources, seeded.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from .checkpoint import block_shapes, write_safetensors
from .config import GPT2Config
from .tokenizer import EOT_TOKEN

_DATA = os.path.join(os.path.dirname(__file__), "data")


SHAPES: dict[str, GPT2Config] = {
    "tiny": GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128),
    "gpt2": GPT2Config(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": GPT2Config(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": GPT2Config(n_layer=48, n_embd=1600, n_head=25),
    "distilgpt2": GPT2Config(n_layer=6, n_embd=768, n_head=12),
    # head_dim 20 (not a multiple of 16) and a width that is not a multiple of 64: exercises SIMD tails
    "odd": GPT2Config(n_layer=3, n_embd=120, n_head=6, n_positions=128),
    # head_dim 80, as in gpt2-large
    "head80": GPT2Config(n_layer=2, n_embd=160, n_head=2, n_positions=128),
}
VARIANTS = ("normal", "outliers", "big_ln")
DTYPES = ("float32", "float16", "bfloat16")
LM_HEAD_MODES = ("absent", "present")

_OUTLIER_PAIRS = 2
_OUTLIER_EMBED_SCALE = 20.0


def make_checkpoint(directory: str | os.PathLike, shape: str | GPT2Config = "tiny", *, seed: int = 0,
                    variant: str = "normal", dtype: str = "float32", prefix: bool = False,
                    lm_head: str = "absent") -> str:
    """Write a random GPT-2 checkpoint directory in Hugging Face's layout; returns its path.

    shape: a name from SHAPES or a GPT2Config. variant: "normal", "outliers" or "big_ln".
    dtype: how the weights are stored ("float32", "float16", "bfloat16"); they are drawn in float32 first,
    so the variants of one seed hold the same weights up to rounding. prefix: name the tensors
    "transformer.wte.weight" etc. as GPT2LMHeadModel saves them, instead of "wte.weight" as the hub's gpt2
    does. lm_head: "absent" (tied to wte, as on the hub) or "present" (an explicit `lm_head.weight` equal to wte).
    """
    dims = SHAPES[shape] if isinstance(shape, str) else shape
    if variant not in VARIANTS or dtype not in DTYPES or lm_head not in LM_HEAD_MODES:
        raise ValueError(f"variant must be one of {VARIANTS}, dtype one of {DTYPES}, lm_head one of {LM_HEAD_MODES}")
    if dims.n_embd % dims.n_head:
        raise ValueError(f"n_embd {dims.n_embd} is not a multiple of n_head {dims.n_head}")

    weights = random_weights(dims, seed=seed, variant=variant)
    if lm_head == "present":
        weights["lm_head.weight"] = weights["wte.weight"]
    if prefix:
        weights = {("transformer." + k if k != "lm_head.weight" else k): v for k, v in weights.items()}

    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), weights, dtype)
    _write_config_and_tokenizer(directory, dims)
    return os.fspath(directory)


def _write_config_and_tokenizer(directory: str | os.PathLike, dims: GPT2Config) -> None:
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config(dims), f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.copyfile(os.path.join(_DATA, "encoder.json"), os.path.join(directory, "vocab.json"))
    shutil.copyfile(os.path.join(_DATA, "vocab.bpe"), os.path.join(directory, "merges.txt"))


def hf_config(dims: GPT2Config) -> dict:
    """config.json as Hugging Face's GPT2Config writes it (n_ctx too: GGUF converters read it)."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "n_layer": dims.n_layer, "n_embd": dims.n_embd, "n_head": dims.n_head, "n_inner": None,
        "n_positions": dims.n_positions, "n_ctx": dims.n_positions, "vocab_size": dims.vocab_size,
        "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "initializer_range": 0.02,
        "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "tie_word_embeddings": True,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1, "use_cache": True,
    }


def random_weights(dims: GPT2Config, *, seed: int = 0, variant: str = "normal") -> dict[str, np.ndarray]:
    """float32 weights under Hugging Face's names (no prefix), in the order GPT2LMHeadModel saves them."""
    rng = np.random.default_rng(seed)
    C, L = dims.n_embd, dims.n_layer

    def normal(shape: tuple, std: float) -> np.ndarray:
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        return values

    def layer_norm(name: str) -> np.ndarray:   # name: a gain ("...weight") or a bias
        if variant == "big_ln":
            return rng.uniform(0.5, 4.0, C).astype(np.float32) if name.endswith("weight") else normal((C,), 0.5)
        return 1 + normal((C,), 0.1) if name.endswith("weight") else normal((C,), 0.02)

    proj_std = 0.02 / np.sqrt(2 * L)  # GPT-2's scaled init of the layers that write to the residual stream

    def block_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.startswith("ln_"):
            return layer_norm(name)
        if name.endswith("bias"):
            return normal(shape, 0.01)
        return normal(shape, proj_std if name.endswith("c_proj.weight") else 0.02)

    weights = {"wte.weight": normal((dims.vocab_size, C), 0.02), "wpe.weight": normal((dims.n_positions, C), 0.01)}
    for i in range(L):
        weights |= {f"h.{i}.{name}": block_tensor(name, shape) for name, shape in block_shapes(dims).items()}
    weights |= {name: layer_norm(name) for name in ("ln_f.weight", "ln_f.bias")}
    if variant == "outliers":
        _add_outlier_dims(weights, dims, rng)
    return weights


def _add_outlier_dims(weights: dict[str, np.ndarray], dims: GPT2Config, rng: np.random.Generator) -> None:
    """A few residual dimensions at ~40 after the embedding, growing by ~70 per block (trained GPT-2 shows
    such dimensions). They come in pairs of opposite sign and equal size, so they leave the stream's mean
    alone (a mean in the tens would shift every ordinary dimension in the layer norms' centring). Every
    layer norm's gains are rescaled for the stream it normalises, so its output stays O(1) in every
    dimension and the blocks keep computing on unit-size inputs instead of going quiet."""
    # the ordinary dims at about half a unit: the layer norms' rounding on them grows with the outliers' size
    # over theirs, and an honest FP32 forward must stay within the tolerances
    weights["wte.weight"] *= _OUTLIER_EMBED_SCALE
    weights["wpe.weight"] *= _OUTLIER_EMBED_SCALE
    outliers = np.sort(rng.choice(dims.n_embd, 2 * _OUTLIER_PAIRS, replace=False))
    signs = np.tile(np.array([1.0, -1.0], dtype=np.float32), _OUTLIER_PAIRS)

    def grow(name: str, low: float, high: float) -> np.ndarray:  # the same step in every row
        step = signs * np.repeat(rng.uniform(low, high, _OUTLIER_PAIRS).astype(np.float32), 2)
        weights[name][..., outliers] += step
        return step

    stream = grow("wte.weight", 20, 40) + grow("wpe.weight", 5, 15)
    for i in range(dims.n_layer):
        h = f"h.{i}."
        _rescale_layer_norm(weights[h + "ln_1.weight"], outliers, stream, rng)
        stream += grow(h + "attn.c_proj.bias", 2, 10)
        _rescale_layer_norm(weights[h + "ln_2.weight"], outliers, stream, rng)
        stream += grow(h + "mlp.c_proj.bias", 40, 80)
    _rescale_layer_norm(weights["ln_f.weight"], outliers, stream, rng)


def _rescale_layer_norm(gain: np.ndarray, outliers: np.ndarray, outlier_values: np.ndarray,
                        rng: np.random.Generator) -> None:
    """Scale a layer norm's gains so that both the ordinary dims (about the embedding's size) and the outlier
    dims leave it at about unit size, as the stream's variance is almost all the outliers'."""
    normal_std = _OUTLIER_EMBED_SCALE * np.hypot(0.02, 0.01)  # wte's and wpe's std: the embedding's
    n_embd = gain.size
    stream_std = np.sqrt((np.sum(outlier_values**2) + (n_embd - outliers.size) * normal_std**2) / n_embd)
    ordinary = np.ones(n_embd, dtype=bool)
    ordinary[outliers] = False
    gain[ordinary] *= stream_std / normal_std
    gain[outliers] = rng.uniform(1, 3, outliers.size) * stream_std / np.abs(outlier_values)


# The trained test model: small enough to train in minutes on two cores, trained enough that greedy text is
# varied (a random model repeats one or two ids) and that its top-1 logit stands clear of the runner-up.
TRAINED_SHAPE = GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=256)
TRAINED_STEPS = 400
TRAINED_BATCH = (16, 128)   # sequences per step, tokens per sequence
TRAINED_CORPUS_BYTES = 150_000
TRAINED_PROMPTS = ("import os\n", "class Decimal")   # greedy gives >= 20 distinct ids in 64 tokens on these


def stdlib_corpus(max_bytes: int = TRAINED_CORPUS_BYTES) -> list[str]:
    """The running Python's top-level standard-library modules (Lib/*.py), by name, up to max_bytes: a text
    corpus every machine has; the same Python version gives the same files in the same order."""
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    paths, total = [], 0
    for name in sorted(n for n in os.listdir(stdlib) if n.endswith(".py")):
        path = os.path.join(stdlib, name)
        if total >= max_bytes:
            break
        paths.append(path)
        total += os.path.getsize(path)
    return paths


def train_checkpoint(directory: str | os.PathLike, *, steps: int = TRAINED_STEPS, seed: int = 0,
                     corpus_bytes: int = TRAINED_CORPUS_BYTES, log=print) -> dict:
    """Train TRAINED_SHAPE on stdlib_corpus(corpus_bytes) with GPT-2's tokenizer (each line's indentation
    stripped) and write it in HF's layout, F16.

    Needs torch and transformers (the test extra); the model is HF's own GPT2LMHeadModel, so the tensor
    names and layouts are the ones `from_pretrained` writes. Seeded: the same Python, torch and thread count
    give the same weights. The loss is taken over the ids that occur in the corpus only (some 4,000 of the
    50,257), which makes the output layer cheap; the other rows of wte keep their initial values, far
    below the trained ids' logits. The corpus is small and seen a few times over: the model half-memorises
    it, which is what makes its greedy text varied after minutes of training. Returns {"steps", "loss" (the mean of the last 50 steps),
    "seconds", "parameters", "files", "tokens"}.
    """
    import math
    import time

    import torch
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    from .tokenizer import tokenizer

    torch.manual_seed(seed)
    files = stdlib_corpus(corpus_bytes)
    enc = tokenizer()
    ids: list[int] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            # Indentation stripped: GPT-2's tokenizer spends one token per indenting space (half of the
            # stdlib's tokens), which a short training learns first and greedy decoding then repeats forever.
            text = "\n".join(line.lstrip() for line in f.read().splitlines())
        ids += enc.encode_ordinary(text) + [EOT_TOKEN]
    data = torch.tensor(ids, dtype=torch.long)
    seen, targets_in_seen = torch.unique(data, return_inverse=True)

    dims = TRAINED_SHAPE
    config = HFConfig(**{k: v for k, v in hf_config(dims).items() if k not in ("architectures", "model_type")})
    config.embd_pdrop = config.attn_pdrop = config.resid_pdrop = 0.0
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=8e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)   # then a cosine decay to a tenth
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.55 + 0.45 * math.cos(math.pi * min(1.0, step / steps))))
    batch, length = TRAINED_BATCH
    starts_rng = torch.Generator().manual_seed(seed)
    wte = model.transformer.wte.weight
    began, losses = time.monotonic(), []
    for step in range(steps):
        starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=starts_rng)
        window = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
        target = torch.stack([targets_in_seen[s + 1:s + length + 1] for s in starts.tolist()])
        hidden = model.transformer(window[:, :-1]).last_hidden_state
        logits = hidden @ wte[seen].T
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, seen.numel()), target.reshape(-1))
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}/{steps}: loss {losses[-1]:.3f} ({time.monotonic() - began:.0f} s)")

    weights = {name.removeprefix("transformer."): tensor.detach().numpy()
               for name, tensor in model.state_dict().items()
               if name != "lm_head.weight" and not name.endswith(".attn.bias")}
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), weights, "float16")
    _write_config_and_tokenizer(directory, dims)
    return {"steps": steps, "loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": time.monotonic() - began,
            "parameters": sum(p.numel() for p in model.parameters()), "files": len(files), "tokens": len(ids)}


def main(argv: list[str] | None = None) -> int:
    """python -m llorch.testing SHAPE DIRECTORY [--seed N] [--variant V] [--dtype D]: write a checkpoint.
    python -m llorch.testing train DIRECTORY [--steps N] [--seed N]: train the test model (torch)."""
    import argparse
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        parser = argparse.ArgumentParser(prog="python -m llorch.testing train",
                                         description="Train the small test GPT-2 on the standard library's "
                                                     "sources and write it in Hugging Face's layout (F16).")
        parser.add_argument("directory")
        parser.add_argument("--steps", type=int, default=TRAINED_STEPS)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--corpus-bytes", type=int, default=TRAINED_CORPUS_BYTES)
        args = parser.parse_args(argv[1:])
        summary = train_checkpoint(args.directory, steps=args.steps, seed=args.seed, corpus_bytes=args.corpus_bytes,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps(summary))
        return 0
    parser = argparse.ArgumentParser(prog="python -m llorch.testing",
                                     description="Write a seeded random GPT-2 checkpoint in Hugging Face's "
                                                 "layout (for machines without the real weights), or "
                                                 "`train DIRECTORY` the small test model.")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=VARIANTS, default="normal")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    path = make_checkpoint(args.directory, args.shape, seed=args.seed, variant=args.variant, dtype=args.dtype)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
