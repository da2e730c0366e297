"""The weights as the forward pass holds them, prepared once at load from a checkpoint's tensors.

Each block's four matrices, HF Conv1D [in, out], are repacked into the column panels of K.linear_packed
(flat, same size): each thread then streams contiguous memory. So is wte, as the tied lm_head's [C, V]
weight (wte transposed): the lm_head is then the same GEMM as every other matrix, whose register tile shares
each weight read among a decode batch's rows, and K.embed reads a token's row as a column of it. Every copy
releases the mapped pages it replaces as it goes, so preparing costs little more than the weights' size at
its peak.

Prepared weights are what llorch.weight_cache stores: `Weights.tensors()` under HF names, the packed
matrices flat (`prepared_shapes`), and `Weights.from_prepared` takes them back without preparing again.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import _kernels as K
from .checkpoint import BLOCK_TENSORS, expected_shapes
from .config import GPT2Config

PACKED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# progress(stage, done, total): how far a load is, in bytes, called after each tensor (llorch.load's argument)
Progress = Callable[[str, int, int], None]


def attribute(name: str) -> str:
    """A block tensor's attribute on Block: its HF name with dots as underscores (attn_c_attn_weight)."""
    return name.replace(".", "_")


class Block:
    """One transformer block's weights, an attribute per BLOCK_TENSORS entry (attribute() names them)."""
    __slots__ = tuple(attribute(name) for name in BLOCK_TENSORS)

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        """tensors: by HF name within the block, the four matrices packed."""
        for name in BLOCK_TENSORS:
            setattr(self, attribute(name), tensors[name])

    def tensors(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, attribute(name)) for name in BLOCK_TENSORS}


@dataclass(frozen=True)
class Weights:
    wte: np.ndarray        # [V * C]: wte^T [C, V] packed (the lm_head's weight; K.embed reads its columns)
    wpe: np.ndarray        # [n_positions, C]
    blocks: list[Block]
    ln_f_w: np.ndarray
    ln_f_b: np.ndarray

    @classmethod
    def prepare(cls, checkpoint: dict[str, np.ndarray], config: GPT2Config,
                progress: Progress | None = None) -> "Weights":
        """From a checkpoint's tensors by HF name (llorch.checkpoint.load_weights): matrices packed, wte too.
        progress, if given, hears of each tensor prepared (stage "preparing the weights")."""
        total, done = sum(checkpoint[name].nbytes for name in expected_shapes(config)), 0

        def prepared(name: str) -> np.ndarray:
            nonlocal done
            weight = checkpoint[name]
            if name == "wte.weight":
                weight = pack_wte(weight)
            elif name.startswith("h.") and name.endswith(PACKED):
                weight = _packed(weight)
            done += weight.nbytes
            if progress is not None:
                progress("preparing the weights", done, total)
            return weight

        wte = prepared("wte.weight")
        blocks = [Block({name: prepared(f"h.{i}.{name}") for name in BLOCK_TENSORS}) for i in range(config.n_layer)]
        return cls(wte, prepared("wpe.weight"), blocks, prepared("ln_f.weight"), prepared("ln_f.bias"))

    @classmethod
    def from_prepared(cls, tensors: dict[str, np.ndarray], config: GPT2Config) -> "Weights":
        """From what tensors() returned (a weight cache file), as they are."""
        blocks = [Block({name: tensors[f"h.{i}.{name}"] for name in BLOCK_TENSORS}) for i in range(config.n_layer)]
        return cls(tensors["wte.weight"], tensors["wpe.weight"], blocks, tensors["ln_f.weight"], tensors["ln_f.bias"])

    def tensors(self) -> dict[str, np.ndarray]:
        """Every weight as prepared, by HF name (the shapes of prepared_shapes)."""
        tensors = {"wte.weight": self.wte, "wpe.weight": self.wpe}
        for i, block in enumerate(self.blocks):
            tensors.update({f"h.{i}.{name}": value for name, value in block.tensors().items()})
        tensors.update({"ln_f.weight": self.ln_f_w, "ln_f.bias": self.ln_f_b})
        return tensors

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors().values())


def prepared_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """The shapes of Weights.tensors(): the checkpoint's, with wte and each block's four matrices flat."""
    return {name: (int(np.prod(shape)),) if name == "wte.weight" or (name.startswith("h.") and name.endswith(PACKED))
            else shape for name, shape in expected_shapes(config).items()}


def mapped_file(weight: np.ndarray) -> mmap.mmap | None:
    """The memory-mapped file weight is a view of, if any."""
    owner = weight
    while owner is not None and not isinstance(owner, mmap.mmap):
        owner = owner.obj if isinstance(owner, memoryview) else getattr(owner, "base", None)
    return owner


def _packed(weight: np.ndarray) -> np.ndarray:
    """weight [C, OC] repacked for K.linear_packed; the copy replaces the original (_release_mapped)."""
    packed = np.empty(weight.size, dtype=np.float32)
    K.pack_linear(packed, weight)
    _release_mapped(weight)
    return packed


def pack_wte(wte: np.ndarray) -> np.ndarray:
    """wte [V, C] as the tied lm_head's weight: its transpose [C, V] packed by K.pack_linear, a few MiB of
    rows at a time (each mapped part released as it goes, _release_mapped). Panels are contiguous and in
    column order, so whole panels of columns pack on their own into their place: rows [r, r + n) of wte, n a
    multiple of K.PANEL but for the last part, are the floats [r C, (r + n) C) of the packed whole."""
    V, C = wte.shape
    packed = np.empty(wte.size, dtype=np.float32)
    rows = K.PANEL * max(1, (8 << 20) // max(1, K.PANEL * wte[0].nbytes))
    for r in range(0, V, rows):
        part = wte[r:r + rows]
        K.pack_linear(packed[r * C:(r + part.shape[0]) * C], np.ascontiguousarray(part.T))
        _release_mapped(part)
    return packed


def _release_mapped(weight: np.ndarray) -> None:
    """When weight is a view of the memory-mapped checkpoint, drop its pages from this process (the page
    cache keeps them): a copy that replaces it then adds nothing to the resident size."""
    owner = mapped_file(weight)
    if owner is not None:
        page = mmap.PAGESIZE
        offset = weight.ctypes.data - np.frombuffer(owner, dtype=np.uint8).ctypes.data
        begin, end = -(-offset // page) * page, (offset + weight.nbytes) // page * page  # whole pages only
        if end > begin:
            owner.madvise(mmap.MADV_DONTNEED, begin, end - begin)
