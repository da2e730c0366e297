"""Read GPT-2 weights from a Hugging Face checkpoint: safetensors, memory-mapped, names mapped, checked.

A safetensors file is an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}} and then the raw tensor bytes. float32 tensors
become read-only numpy views of the mapped file (no copy: the tied lm_head reads wte in place);
float16 and bfloat16 tensors are upcast to float32 copies.

HF stores GPT-2's linear layers as Conv1D with weight [in, out] (y = x @ W + b): that is the layout the
linear kernel expects, so no weight is transposed here.

The reader is our own rather than the safetensors package's: its numpy loader copies every tensor, while
these views of one mapping cost no memory until the model repacks them and let it release the mapped pages
as it goes (llorch.weights); and every way a file can be broken gets a message naming the file and tensor.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings

import numpy as np

from .config import CheckpointError, GPT2Config

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 is widened by hand
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Buffers some HF exports carry besides the weights (the causal mask); llorch computes the mask itself.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# Each block's tensors: the HF name within block i ("h.{i}." + name) -> its shape in multiples of n_embd,
# in the order HF saves them. The model's Block, expected_shapes and llorch.testing all read this one table.
BLOCK_TENSORS: dict[str, tuple[int, ...]] = {
    "ln_1.weight": (1,), "ln_1.bias": (1,),
    "attn.c_attn.weight": (1, 3), "attn.c_attn.bias": (3,),
    "attn.c_proj.weight": (1, 1), "attn.c_proj.bias": (1,),
    "ln_2.weight": (1,), "ln_2.bias": (1,),
    "mlp.c_fc.weight": (1, 4), "mlp.c_fc.bias": (4,),
    "mlp.c_proj.weight": (4, 1), "mlp.c_proj.bias": (1,),
}


def block_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """BLOCK_TENSORS with the shapes in numbers: {"attn.c_attn.weight": (C, 3C), ...}."""
    return {name: tuple(m * cfg.n_embd for m in multiples) for name, multiples in BLOCK_TENSORS.items()}


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 checkpoint must hold, by HF name (without the `transformer.` prefix)."""
    C, V, P = cfg.n_embd, cfg.vocab_size, cfg.n_positions
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C)}
    for i in range(cfg.n_layer):
        shapes.update({f"h.{i}.{name}": shape for name, shape in block_shapes(cfg).items()})
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


class SafetensorsFile:
    """One memory-mapped safetensors file: `header` (name -> entry) and `tensor(name)`."""

    def __init__(self, path: str, populate: bool = False) -> None:
        """populate: map every page at once (one call, for a file about to be read whole)."""
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{path}: truncated (only {size} bytes, no safetensors header)")
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise CheckpointError(f"{path}: header length {header_len} exceeds the file size {size}")
                header_bytes = f.read(header_len)
                flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
                self._map = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except PermissionError:
            raise CheckpointError(f"{path}: permission denied") from None
        except IsADirectoryError:
            raise CheckpointError(f"{path}: is a directory, not a safetensors file") from None
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.data_size = size - self.data_start
        self.header = {name: self._check_entry(name, entry) for name, entry in header.items()}
        self._check_no_overlap()

    def _check_entry(self, name: str, entry: object) -> dict:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: header entry lacks dtype/shape/data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{where}: malformed shape or data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= self.data_size:
            raise CheckpointError(f"{where}: data offsets {begin}..{end} out of range "
                                  f"(the file holds {self.data_size} data bytes)")
        if end - begin != int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype]:
            raise CheckpointError(f"{where}: {end - begin} bytes do not match shape {shape} of {dtype}")
        return entry

    def _check_no_overlap(self) -> None:
        furthest_end, owner = 0, None
        for begin, end, name in sorted((e["data_offsets"][0], e["data_offsets"][1], n) for n, e in self.header.items()):
            if begin < furthest_end and begin < end:
                raise CheckpointError(f"{self.path}: tensors {owner!r} and {name!r} overlap in the file")
            if end > furthest_end:
                furthest_end, owner = end, name

    def stored_bytes(self, name: str) -> tuple[str, list[int], bytes]:
        """(dtype, shape, the raw bytes) of a tensor as the file stores it."""
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        return entry["dtype"], entry["shape"], self._map[self.data_start + begin:self.data_start + end]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32: a read-only view of the mapped file when stored as aligned F32."""
        entry = self.header[name]
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}; llorch reads F32, F16 "
                                  f"and BF16 weights")
        begin, end = entry["data_offsets"]
        offset = self.data_start + begin
        raw = np.frombuffer(self._map, dtype=_DTYPES[dtype], count=(end - begin) // _ITEMSIZE[dtype],
                            offset=offset).reshape(entry["shape"])
        if dtype == "F32":
            return raw if offset % 4 == 0 else raw.copy()
        if dtype == "F16":
            return raw.astype(np.float32)
        return (raw.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is the top half of a float32


def resolve_weight_files(path: str) -> tuple[str, list[str]]:
    """(config.json path, safetensors files) for a checkpoint directory or a .safetensors file."""
    if os.path.isdir(path):
        directory = path
        if os.path.exists(os.path.join(directory, WEIGHTS_FILE)):
            files = [os.path.join(directory, WEIGHTS_FILE)]
        elif os.path.exists(os.path.join(directory, SHARD_INDEX_FILE)):
            files = _shards(os.path.join(directory, SHARD_INDEX_FILE))
        else:
            other = [f for f in ("pytorch_model.bin", "tf_model.h5") if os.path.exists(os.path.join(directory, f))]
            hint = (f" (found {other[0]}: convert it to safetensors, e.g. with transformers' "
                    f"save_pretrained(..., safe_serialization=True))") if other else ""
            raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} in this directory{hint}")
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        directory, files = os.path.dirname(os.path.abspath(path)), [path]
    elif os.path.exists(path):
        raise CheckpointError(f"{path}: expected a model directory or a .safetensors file")
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    return os.path.join(directory, "config.json"), files


def _shards(index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: unreadable shard index ({e})") from None
    return [os.path.join(os.path.dirname(index_path), n) for n in names]


def load_weights(files: list[str], cfg: GPT2Config) -> dict[str, np.ndarray]:
    """All GPT-2 tensors by HF name without prefix, float32, shapes checked against cfg."""
    located: dict[str, tuple[SafetensorsFile, str]] = {}
    for path in files:
        st = SafetensorsFile(path)
        for stored in st.header:
            name = stored.removeprefix("transformer.")
            if name in located:
                _check_same_tensor(located[name], (st, stored))
            located[name] = (st, stored)

    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in located]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{files[0]}: missing tensor(s) {', '.join(missing[:3])}{more}")
    weights = {}
    for name, shape in expected.items():
        st, stored = located[name]
        got = tuple(st.header[stored]["shape"])
        if got != shape:
            raise CheckpointError(f"{st.path}: tensor {stored!r} has shape {list(got)}, config.json implies "
                                  f"{list(shape)}")
        weights[name] = tensor = st.tensor(stored)
        # A sum is a fast pass over the bytes (it also warms the page cache for the first token);
        # only when it is not finite is each element looked at, so huge-but-finite weights pass.
        if not np.isfinite(tensor.sum(dtype=np.float32)) and not np.isfinite(tensor).all():
            raise CheckpointError(f"{st.path}: tensor {stored!r} contains NaN or Inf values")

    if "lm_head.weight" in located:
        st, stored = located["lm_head.weight"]
        if not np.array_equal(st.tensor(stored), weights["wte.weight"]):
            raise CheckpointError(f"{st.path}: lm_head.weight differs from wte.weight; GPT-2 ties them and "
                                  f"llorch computes the logits with wte")
    unknown = sorted(n for n in located if n not in expected and n != "lm_head.weight"
                     and not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
        warnings.warn(f"{files[0]}: ignoring {len(unknown)} tensor(s) that GPT-2 does not use: "
                      f"{', '.join(unknown[:5])}", stacklevel=2)
    return weights


def _check_same_tensor(first: tuple[SafetensorsFile, str], second: tuple[SafetensorsFile, str]) -> None:
    """One tensor stored under two accepted names ("wte.weight" and "transformer.wte.weight"): refused
    unless both hold the same dtype, shape and bytes, when either gives the same model. Otherwise which
    one is meant is a guess, and HF's loader and llorch might guess differently."""
    (st_a, a), (st_b, b) = first, second
    if st_a.stored_bytes(a) != st_b.stored_bytes(b):
        where = st_a.path if st_a.path == st_b.path else f"{st_a.path} and {st_b.path}"
        raise CheckpointError(f"{where}: tensors {a!r} and {b!r} are the same GPT-2 tensor with different "
                              f"contents; keep one of them")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Write float32 arrays as a safetensors file, stored as `dtype` (bfloat16: round to nearest even).

    Written by hand rather than with safetensors.numpy because numpy has no bfloat16; the format is an
    8-byte little-endian header length, a JSON header of dtype/shape/byte offsets, then the raw bytes.
    """
    itemsize = 4 if dtype == "float32" else 2
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, values in tensors.items():
        size = values.size * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(values.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for values in tensors.values():  # one tensor at a time: gpt2-xl need not be copied whole
            f.write(_encode(np.ascontiguousarray(values, dtype=np.float32), dtype))


def _encode(values: np.ndarray, dtype: str) -> bytes | memoryview:
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        return rounded.astype("<u2").tobytes()
    if dtype == "float32":
        return memoryview(values.astype("<f4", copy=False)).cast("B")   # no copy of a float32 array
    return values.astype("<f2").tobytes()
