"""One adapter per engine, all with the same calls on token ids (no tokenizer in the timed path):

    engine = ENGINES[name](files, threads)     # load the model; threads None: the engine's own default
    engine.prefill(ids)          -> last-position logits [V] of a pass from an empty cache
    engine.generate(ids, n)      -> (n greedy token ids, perf_counter() at which each was ready)
    engine.generate(ids, n, sampled=True)      the same with temperature TEMPERATURE and top-p TOP_P, by the
                                               engine's own sampler (ONNX Runtime has none: numpy, as its
                                               users write it)
    engine.threads()             -> the threads it computes with, as the engine reports them

generate never stops early (no EOS stop) and starts from an empty cache each call; its first timestamp
gives the TTFT, the spacing of the rest the decode rate. Heavy imports happen in the constructors, so a
cold-start process pays for exactly one engine's. missing(name) says why an engine cannot run here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time

import numpy as np

from convert import ModelFiles

TEMPERATURE, TOP_P, SEED = 0.8, 0.95, 0   # sampled decode: no top-k, no min-p, no repetition penalty

# (import name, distribution) each engine needs
REQUIRES = {
    "llorch": [("llorch", "llorch")],
    "hf": [("torch", "torch"), ("transformers", "transformers")],
    "llamacpp": [("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")],
    "ort": [("onnxruntime", "onnxruntime"), ("onnx", "onnx"), ("torch", "torch"), ("transformers", "transformers")],
}


def missing(name: str) -> str | None:
    """None if the engine's packages are importable, else the reason it is skipped."""
    absent = [dist for module, dist in REQUIRES[name] if importlib.util.find_spec(module) is None]
    if not absent:
        return None
    hint = "run bench/setup.sh" if name != "llorch" else "pip install ."
    return f"not installed: {', '.join(absent)} ({hint})"


def versions(name: str) -> str:
    return ", ".join(f"{dist} {importlib.metadata.version(dist)}" for _, dist in REQUIRES[name])


class Llorch:
    title = "llorch"

    def __init__(self, files: ModelFiles, threads: int | None) -> None:
        import llorch
        self.llorch = llorch
        if threads:
            llorch.set_num_threads(threads)
        self.model = llorch.load(files.checkpoint)

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.model.forward(ids, self.model.new_cache(), logits="last")[0]

    def generate(self, ids: list[int], n: int, sampled: bool = False) -> tuple[list[int], list[float]]:
        sampler = self.llorch.Sampler(temperature=TEMPERATURE, top_p=TOP_P, seed=SEED) if sampled else None
        tokens, times = [], []
        for token in self.llorch.generate(self.model, ids, n, sampler, eos_token_id=None):
            times.append(time.perf_counter())
            tokens.append(int(token))
        return tokens, times

    def threads(self) -> str:
        info = self.llorch.build_info()
        return f"{info['threads_mode']}: {info['threads']}"


class HF:
    title = "HF transformers (torch, sdpa)"
    ATTENTION = "sdpa"        # torch's scaled_dot_product_attention; transformers' default

    def __init__(self, files: ModelFiles, threads: int | None) -> None:
        import torch
        from transformers import GPT2LMHeadModel
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = GPT2LMHeadModel.from_pretrained(files.checkpoint, dtype=torch.float32,
                                                     attn_implementation=self.ATTENTION).eval()

    def prefill(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].numpy()

    def generate(self, ids: list[int], n: int, sampled: bool = False) -> tuple[list[int], list[float]]:
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            """Notes when each new token is handed out (generate passes the prompt first)."""

            def __init__(self) -> None:
                self.tokens, self.times, self.prompt_seen = [], [], False

            def put(self, value) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                self.times.append(time.perf_counter())
                self.tokens.append(int(value.reshape(-1)[0]))

            def end(self) -> None:
                pass

        clock = Clock()
        x = self.torch.tensor([ids])
        # top_k=0: generate's default top-k of 50 off, as the other engines sample
        sampling = dict(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0) if sampled else \
            dict(do_sample=False)
        self.torch.manual_seed(SEED)
        with self.torch.inference_mode():
            self.model.generate(x, attention_mask=self.torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=self.model.config.eos_token_id, streamer=clock, **sampling)
        return clock.tokens, clock.times

    def threads(self) -> str:
        return f"torch: {self.torch.get_num_threads()}"


class LlamaCpp:
    title = "llama.cpp (llama-cpp-python, F32 GGUF)"
    BATCH = 512               # a 512-token prompt goes through in one batch

    def __init__(self, files: ModelFiles, threads: int | None) -> None:
        import llama_cpp
        from llama_cpp import Llama
        self.get_logits = llama_cpp.llama_get_logits_ith
        self.llm = Llama(model_path=files.gguf, n_ctx=files.shape.n_positions, n_batch=self.BATCH,
                         n_ubatch=self.BATCH, n_threads=threads, n_threads_batch=threads, seed=SEED, verbose=False)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()      # llama-cpp-python would otherwise reuse the cached prompt
        self.llm.eval(ids)    # keeps no logits itself unless logits_all: read the last row from the context
        return np.ctypeslib.as_array(self.get_logits(self.llm.ctx, -1), shape=(self.llm.n_vocab(),)).copy()

    def generate(self, ids: list[int], n: int, sampled: bool = False) -> tuple[list[int], list[float]]:
        self.llm.reset()
        # temp 0: greedy; top_k 0 and min_p 0: off (its defaults are 40 and 0.05)
        sampling = dict(temp=TEMPERATURE, top_p=TOP_P, top_k=0, min_p=0.0) if sampled else dict(temp=0.0)
        tokens, times = [], []
        for token in self.llm.generate(ids, repeat_penalty=1.0, reset=True, **sampling):
            times.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == n:
                break
        return tokens, times

    def threads(self) -> str:
        return f"decode {self.llm.n_threads}, batch {self.llm.n_threads_batch}"


class Ort:
    title = "ONNX Runtime (torch-exported, with past)"

    def __init__(self, files: ModelFiles, threads: int | None) -> None:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0   # 0: ORT's default, one per physical core
        self.intra_op_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(files.onnx, options, providers=["CPUExecutionProvider"])
        s = files.shape
        self.n_past = 2 * s.n_layer
        self.empty = np.zeros((1, s.n_head, 0, s.n_embd // s.n_head), dtype=np.float32)

    def _step(self, ids, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64)}
        feeds.update((f"past_{i}", p) for i, p in enumerate(past))
        logits, *present = self.session.run(None, feeds)
        return logits[0], present

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self._step(ids, [self.empty] * self.n_past)[0]

    def generate(self, ids: list[int], n: int, sampled: bool = False) -> tuple[list[int], list[float]]:
        rng = np.random.default_rng(SEED)
        tokens, times = [], []
        logits, past = self._step(ids, [self.empty] * self.n_past)
        while True:
            tokens.append(top_p_sample(logits, rng) if sampled else int(np.argmax(logits)))
            times.append(time.perf_counter())
            if len(tokens) == n:
                return tokens, times
            logits, past = self._step([tokens[-1]], past)

    def threads(self) -> str:
        return f"intra-op {self.intra_op_threads or 'default (physical cores)'}"


def top_p_sample(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Temperature then top-p (nucleus) sampling in numpy, as an ONNX Runtime user writes it: the smallest
    set of most probable tokens whose probability reaches TOP_P, renormalised."""
    z = logits.astype(np.float64) / TEMPERATURE
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[:int(np.searchsorted(np.cumsum(p[order]), TOP_P)) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


ENGINES = {"llorch": Llorch, "hf": HF, "llamacpp": LlamaCpp, "ort": Ort}


def prompt(n: int, seed: int = 0, vocab: int = 50256) -> list[int]:
    """n token ids drawn with a fixed seed, none of them <|endoftext|> (id 50256)."""
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()
