# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The C kernels (csrc/llorch.h) for Python: argument checks, then the call without the GIL.

Every array must be a C-contiguous numpy array of the stated dtype and shape; anything else is a
ValueError naming the argument, never a read of the wrong memory. Shapes use the names of llorch.h.
"""

import operator

import numpy as np
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t
from libc.stdlib cimport qsort


# cdef extern declarations of every function of csrc/llorch.h, generated from it by setup.py.
include "_llorch_h.pxi"

cimport numpy as cnp

cnp.import_array()


# The checks below run on every kernel call (~150 per decoded token), so they read the array structs
# directly instead of going through Python attributes; the messages are built only on failure.
cdef _array(a, str name, dtype, tuple shape, bint writable=False):
    """Return `a` if it is a C-contiguous ndarray of dtype and shape (None in shape: any size; shape None:
    any shape)."""
    if not cnp.PyArray_Check(a):
        raise ValueError(f"{name}: expected a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int want_type = (cnp.NPY_FLOAT32 if dtype is np.float32 else
                          cnp.NPY_FLOAT64 if dtype is np.float64 else cnp.NPY_INT32)
    if cnp.PyArray_TYPE(arr) != want_type or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name}: expected a C-contiguous array")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name}: expected a writable array")
    if shape is None:
        return a
    cdef int ndim = cnp.PyArray_NDIM(arr), i
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(arr)
    cdef bint ok = ndim == len(shape)
    if ok:
        for i in range(ndim):
            want = shape[i]
            if want is not None and dims[i] != <cnp.npy_intp>want:
                ok = False
                break
    if not ok:
        wanted = ", ".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: expected shape ({wanted}), got {a.shape}")
    return a


cdef _distinct(out, str name, inputs):
    """Kernels that read an input while writing the output must not see the two overlap. The arrays are
    C-contiguous (checked first), so each spans [data, data + nbytes): the bounds test of
    np.may_share_memory, without its call overhead."""
    cdef char* lo = <char*>cnp.PyArray_DATA(<cnp.ndarray>out)
    cdef char* hi = lo + cnp.PyArray_NBYTES(<cnp.ndarray>out)
    cdef char* olo
    cdef char* ohi
    if lo == hi:
        return
    for other, other_name in inputs:
        if other is None:
            continue
        olo = <char*>cnp.PyArray_DATA(<cnp.ndarray>other)
        ohi = olo + cnp.PyArray_NBYTES(<cnp.ndarray>other)
        if lo < ohi and olo < hi and olo != ohi:
            raise ValueError(f"{name}: must not overlap {other_name}")


cdef _disjoint(named):
    """No two of these (array, name) pairs overlap in memory (C-contiguous arrays, as _distinct): sorted by
    address, each must start at or after the end of the one before."""
    spans = sorted((<size_t>cnp.PyArray_DATA(<cnp.ndarray>a), <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>a), name)
                   for a, name in named if cnp.PyArray_NBYTES(<cnp.ndarray>a))
    for (lo, size, name), (next_lo, _, next_name) in zip(spans, spans[1:]):
        if next_lo < lo + size:
            raise ValueError(f"{next_name}: must not overlap {name}")


cdef inline const float* _cptr(a):
    return <const float*>cnp.PyArray_DATA(<cnp.ndarray>a) if cnp.PyArray_SIZE(<cnp.ndarray>a) else NULL


cdef inline float* _ptr(a):
    return <float*>cnp.PyArray_DATA(<cnp.ndarray>a) if cnp.PyArray_SIZE(<cnp.ndarray>a) else NULL


def embed(out, tokens, wte, wpe, int start_pos):
    """out [T, C] = wte[tokens] + wpe[start_pos : start_pos + T]; tokens int32 [T]. wte as the lm_head holds
    it: pack_linear(wte^T) [C * V], V rows of C floats."""
    _array(out, "out", np.float32, (None, None), True)
    cdef int T = out.shape[0], C = out.shape[1]
    _array(wte, "wte", np.float32, (None,))
    if C == 0 or wte.shape[0] % C:
        raise ValueError(f"wte: expected V rows of C = {C} floats, got {wte.shape[0]} floats")
    cdef int V = wte.shape[0] // C
    _array(tokens, "tokens", np.int32, (T,))
    _array(wpe, "wpe", np.float32, (None, C))
    _distinct(out, "out", ((wte, "wte"), (wpe, "wpe")))
    if T and (tokens.min() < 0 or tokens.max() >= V):
        raise ValueError(f"tokens: ids must be in [0, {V}), got {tokens.min()}..{tokens.max()}")
    if start_pos < 0 or start_pos > wpe.shape[0] - T:   # not start_pos + T: that overflows an int near 2**31
        raise ValueError(f"positions {start_pos}..{<long long>start_pos + T - 1} exceed the context of {wpe.shape[0]}")
    cdef const int32_t[::1] tok = tokens
    cdef float* o = _ptr(out)
    cdef const float* e = _cptr(wte)
    cdef const float* p = _cptr(wpe)
    cdef const int32_t* tp = &tok[0] if T else NULL
    with nogil:
        ll_embed(o, tp, e, p, T, C, V, start_pos)


def layernorm(out, inp, weight, bias, float eps):
    """out [T, C] = layernorm(inp [T, C]) * weight [C] + bias [C]."""
    _array(inp, "inp", np.float32, (None, None))
    cdef int T = inp.shape[0], C = inp.shape[1]
    _array(out, "out", np.float32, (T, C), True)
    _array(weight, "weight", np.float32, (C,))
    _array(bias, "bias", np.float32, (C,))
    cdef float* o = _ptr(out)
    cdef const float* x = _cptr(inp)
    cdef const float* w = _cptr(weight)
    cdef const float* b = _cptr(bias)
    with nogil:
        ll_layernorm(o, x, w, b, T, C, eps)


cdef const float* _bias_cptr(bias, int OC) except? NULL:
    """The bias [OC] of a linear layer, or NULL for none."""
    if bias is None:
        return NULL
    _array(bias, "bias", np.float32, (OC,))
    return _cptr(bias)


PANEL = LLORCH_PANEL


def pack_linear(packed, weight):
    """packed [C * OC] = weight [C, OC] cut into column panels of PANEL (the layout of linear_packed)."""
    _array(weight, "weight", np.float32, (None, None))
    cdef int C = weight.shape[0], OC = weight.shape[1]
    _array(packed, "packed", np.float32, (C * OC,), True)
    _distinct(packed, "packed", ((weight, "weight"),))
    cdef float* o = _ptr(packed)
    cdef const float* w = _cptr(weight)
    with nogil:
        ll_pack_linear(o, w, C, OC)


def linear_packed(out, inp, packed, bias):
    """out [T, OC] = inp [T, C] @ weight + bias [OC] (bias may be None), weight given as
    pack_linear(weight): packed [C * OC]. Each output is one chain over C in order, so a row's bits depend
    on neither T nor the thread count."""
    _array(inp, "inp", np.float32, (None, None))
    cdef int T = inp.shape[0], C = inp.shape[1]
    _array(out, "out", np.float32, (T, None), True)
    cdef int OC = out.shape[1]
    _array(packed, "packed", np.float32, (C * OC,))
    cdef const float* b = _bias_cptr(bias, OC)
    _distinct(out, "out", ((inp, "inp"), (packed, "packed"), (bias, "bias")))
    cdef float* o = _ptr(out)
    cdef const float* x = _cptr(inp)
    cdef const float* w = _cptr(packed)
    with nogil:
        ll_linear_packed(o, x, w, b, T, C, OC)


def gelu(out, inp):
    """out = gelu_tanh(inp), any shape, same for both."""
    _array(inp, "inp", np.float32, None)
    _array(out, "out", np.float32, inp.shape, True)
    cdef float* o = _ptr(out)
    cdef const float* x = _cptr(inp)
    cdef int N = inp.size
    with nogil:
        ll_gelu(o, x, N)


def residual(out, a, b):
    """out = a + b, any shape, same for all three (out may be a or b)."""
    _array(a, "a", np.float32, None)
    _array(b, "b", np.float32, a.shape)
    _array(out, "out", np.float32, a.shape, True)
    cdef float* o = _ptr(out)
    cdef const float* x = _cptr(a)
    cdef const float* y = _cptr(b)
    cdef int N = a.size
    with nogil:
        ll_residual(o, x, y, N)


cdef _check_cache(qkv, k_cache, v_cache, int start_pos, int* T, int* C, int* NH, int* maxT):
    _array(qkv, "qkv", np.float32, (None, None))
    T[0] = qkv.shape[0]
    if qkv.shape[1] % 3:
        raise ValueError(f"qkv: expected shape (T, 3C), got {qkv.shape}")
    C[0] = qkv.shape[1] // 3
    _array(k_cache, "k_cache", np.float32, (None, None, None), True)
    NH[0], maxT[0] = k_cache.shape[0], k_cache.shape[1]
    if NH[0] == 0 or C[0] % NH[0] or k_cache.shape[2] != C[0] // NH[0]:
        raise ValueError(f"k_cache: expected shape (NH, maxT, C/NH) with C = {C[0]}, got {k_cache.shape}")
    _array(v_cache, "v_cache", np.float32, k_cache.shape, True)
    if start_pos < 0 or start_pos > maxT[0] - T[0]:   # not start_pos + T: that overflows an int near 2**31
        raise ValueError(f"positions {start_pos}..{<long long>start_pos + T[0] - 1} exceed the cache of {maxT[0]}")


def kv_write(k_cache, v_cache, qkv, int start_pos):
    """Write k, v of qkv [T, 3C] into k_cache, v_cache [NH, maxT, HS] at positions start_pos.."""
    cdef int T, C, NH, maxT
    _check_cache(qkv, k_cache, v_cache, start_pos, &T, &C, &NH, &maxT)
    _distinct(k_cache, "k_cache", ((v_cache, "v_cache"), (qkv, "qkv")))
    _distinct(v_cache, "v_cache", ((qkv, "qkv"),))
    cdef float* kc = _ptr(k_cache)
    cdef float* vc = _ptr(v_cache)
    cdef const float* x = _cptr(qkv)
    with nogil:
        ll_kv_write(kc, vc, x, T, C, NH, start_pos, maxT)


def attention_scratch_floats(int S):
    """Floats of scratch attention and decode_attention need to attend to S positions with the current
    thread count (set_num_threads). A buffer sized for n_positions serves every pass."""
    if S < 0:
        raise ValueError(f"S must be at least 0, got {S}")
    return ll_attention_scratch_floats(S)


cdef float* _scratch(scratch, int S, others) except? NULL:
    """The scratch array of an attention kernel: float32 [n], writable, n >= attention_scratch_floats(S),
    overlapping none of the other arguments."""
    _array(scratch, "scratch", np.float32, (None,), True)
    cdef size_t need = ll_attention_scratch_floats(S)
    if <size_t>scratch.shape[0] < need:
        raise ValueError(f"scratch: expected at least attention_scratch_floats({S}) = {need} floats, "
                         f"got {scratch.shape[0]}")
    _distinct(scratch, "scratch", others)
    return _ptr(scratch)


cdef float* _trace_output(a, str name, tuple shape) except? NULL:
    """An optional output for tracing (scores, probs): NULL for None, else checked against shape."""
    if a is None:
        return NULL
    _array(a, name, np.float32, shape, True)
    return _ptr(a)


def attention(out, qkv, k_cache, v_cache, int start_pos, scratch, scores=None, probs=None):
    """out [T, C] = causal attention of qkv's queries over the cache; scores and probs [NH, T, S], when
    given (not None), are filled too. scratch: float32 [attention_scratch_floats(S) or more]."""
    cdef int T, C, NH, maxT
    _check_cache(qkv, k_cache, v_cache, start_pos, &T, &C, &NH, &maxT)
    cdef int S = start_pos + T
    _array(out, "out", np.float32, (T, C), True)
    cdef float* sc = _trace_output(scores, "scores", (NH, T, S))
    cdef float* p = _trace_output(probs, "probs", (NH, T, S))
    inputs = ((qkv, "qkv"), (k_cache, "k_cache"), (v_cache, "v_cache"))
    for buf, buf_name in ((out, "out"), (probs, "probs"), (scores, "scores")):
        if buf is not None:
            _distinct(buf, buf_name, inputs)
    _distinct(out, "out", ((probs, "probs"), (scores, "scores")))
    if probs is not None:
        _distinct(probs, "probs", ((scores, "scores"),))
    cdef float* work = _scratch(scratch, S, inputs + ((out, "out"), (probs, "probs"), (scores, "scores")))
    cdef float* o = _ptr(out)
    cdef const float* x = _cptr(qkv)
    cdef const float* kc = _cptr(k_cache)
    cdef const float* vc = _cptr(v_cache)
    with nogil:
        ll_attention(o, sc, p, work, x, kc, vc, T, C, NH, start_pos, maxT)


cdef struct Span:
    size_t lo, hi


cdef int _span_order(const void* a, const void* b) noexcept nogil:
    cdef size_t x = (<const Span*>a).lo, y = (<const Span*>b).lo
    return (x > y) - (x < y)


cdef inline bint _is_cache(a, const cnp.npy_intp* shape):
    """Whether a is a KV cache array as _check_cache wants it, of this shape: decode_attention's fast path,
    which leaves the messages to the full checks."""
    if not cnp.PyArray_Check(a):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if (cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32 or not cnp.PyArray_ISNOTSWAPPED(arr)
            or not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISWRITEABLE(arr) or cnp.PyArray_NDIM(arr) != 3):
        return False
    cdef const cnp.npy_intp* dims = cnp.PyArray_DIMS(arr)
    return dims[0] == shape[0] and dims[1] == shape[1] and dims[2] == shape[2]


cdef bint _spans_apart(list arrays, scratch):
    """Whether no two of the arrays overlap and scratch overlaps none (all C-contiguous, as _disjoint):
    sorted by address in C, each must end before the next starts."""
    cdef Py_ssize_t n = 0, i, count = len(arrays)
    cdef Span* spans = <Span*>PyMem_Malloc(count * sizeof(Span))
    if not spans:
        raise MemoryError()
    cdef size_t lo, size
    for a in arrays:
        lo, size = <size_t>cnp.PyArray_DATA(<cnp.ndarray>a), <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>a)
        if size:
            spans[n].lo, spans[n].hi = lo, lo + size
            n += 1
    qsort(spans, n, sizeof(Span), _span_order)
    lo = <size_t>cnp.PyArray_DATA(<cnp.ndarray>scratch)
    cdef size_t hi = lo + <size_t>cnp.PyArray_NBYTES(<cnp.ndarray>scratch)
    cdef bint apart = True
    for i in range(n):
        if (i + 1 < n and spans[i + 1].lo < spans[i].hi) or (lo < hi and lo < spans[i].hi and spans[i].lo < hi):
            apart = False
            break
    PyMem_Free(spans)
    return apart


def decode_attention(out, qkv, k_caches, v_caches, positions, scratch, scores=None, probs=None):
    """One decode step of B sequences: row b of qkv [B, 3C] is sequence b's token at positions[b]; its k, v
    go into k_caches[b], v_caches[b] [NH, maxT, HS] and row b of out [B, C] is its attention, bitwise as
    kv_write + attention of a one-token pass. scores and probs [NH, 1, positions[0] + 1] (B = 1 only, for
    tracing) receive what that attention call would give. scratch: float32
    [attention_scratch_floats(max(positions) + 1) or more].

    Every step of a batch calls this once per layer, so the caches past the first and the overlaps are
    checked by a fast path in C; only when that finds something wrong do the full checks run, to say what."""
    # each argument read once: what is checked is what the kernel gets, whatever a container or an index
    # object does on access
    k_caches, v_caches, positions = tuple(k_caches), tuple(v_caches), tuple(map(operator.index, positions))
    cdef int B = len(k_caches)
    if B == 0 or len(v_caches) != B or len(positions) != B:
        raise ValueError(f"k_caches, v_caches, positions: expected one per row of qkv (at least one), got "
                         f"{len(k_caches)}, {len(v_caches)}, {len(positions)}")
    _array(qkv, "qkv", np.float32, (B, None))
    cdef int T, C, NH, maxT, b, position, S_max = 0
    _check_cache(qkv[:1], k_caches[0], v_caches[0], positions[0], &T, &C, &NH, &maxT)
    cdef cnp.npy_intp shape[3]
    shape[0], shape[1], shape[2] = k_caches[0].shape
    for b in range(B):
        position = positions[b]
        if not (_is_cache(k_caches[b], shape) and _is_cache(v_caches[b], shape) and 0 <= position < maxT):
            _check_cache(qkv[b:b + 1], k_caches[b], v_caches[b], position, &T, &C, &NH, &maxT)
            if k_caches[b].shape != k_caches[0].shape:
                raise ValueError(f"k_caches[{b}]: expected the shape of k_caches[0], {k_caches[0].shape}, "
                                 f"got {k_caches[b].shape}")
        S_max = max(S_max, position + 1)   # position < maxT: no overflow
    _array(out, "out", np.float32, (B, C), True)
    if B > 1 and (scores is not None or probs is not None):
        raise ValueError(f"scores, probs: only for a step of one sequence, got {B}")
    cdef int S = positions[0] + 1
    cdef float* sc = _trace_output(scores, "scores", (NH, 1, S))
    cdef float* p = _trace_output(probs, "probs", (NH, 1, S))
    traced = [a for a in (scores, probs) if a is not None]
    # scratch's own checks come last, as before (_scratch): here it need only be an array to have a span
    if not (cnp.PyArray_Check(scratch) and _spans_apart([out, qkv, *k_caches, *v_caches, *traced], scratch)):
        named = [(out, "out"), (qkv, "qkv")] + [(k_caches[b], f"k_caches[{b}]") for b in range(B)] \
            + [(v_caches[b], f"v_caches[{b}]") for b in range(B)]
        _disjoint(named + [(a, name) for a, name in ((scores, "scores"), (probs, "probs")) if a is not None])
        _scratch(scratch, S_max, named + [(scores, "scores"), (probs, "probs")])
    cdef float* work = _scratch(scratch, S_max, ())
    cdef float** kc = <float**>PyMem_Malloc(B * sizeof(float*))
    cdef float** vc = <float**>PyMem_Malloc(B * sizeof(float*))
    cdef int* pos = <int*>PyMem_Malloc(B * sizeof(int))
    if not kc or not vc or not pos:
        PyMem_Free(kc); PyMem_Free(vc); PyMem_Free(pos)
        raise MemoryError()
    for b in range(B):
        kc[b], vc[b], pos[b] = _ptr(k_caches[b]), _ptr(v_caches[b]), positions[b]
    cdef float* o = _ptr(out)
    cdef const float* x = _cptr(qkv)
    try:
        with nogil:
            ll_decode_attention(o, sc, p, work, x, kc, vc, pos, B, C, NH, maxT)
    finally:
        PyMem_Free(kc); PyMem_Free(vc); PyMem_Free(pos)


def argmax(x):
    """Index of the largest element of x [N] (first on ties)."""
    _array(x, "x", np.float32, (None,))
    if x.shape[0] == 0:
        raise ValueError("x: argmax of an empty array")
    cdef const float* p = _cptr(x)
    cdef int N = x.shape[0]
    cdef int i
    with nogil:
        i = ll_argmax(p, N)
    return i


cdef int _sampling_row(logits, weights, scratch) except -1:
    """Check the arrays of a sampling kernel: logits float32 [V], weights float64 [V] (writable, or None),
    scratch int32 [V] (writable), no two overlapping; returns V."""
    _array(logits, "logits", np.float32, (None,))
    cdef int V = logits.shape[0]
    if V == 0:
        raise ValueError("logits: an empty row")
    _array(scratch, "scratch", np.int32, (V,), True)
    if weights is None:
        _disjoint([(logits, "logits"), (scratch, "scratch")])
    else:
        _array(weights, "weights", np.float64, (V,), True)
        _disjoint([(logits, "logits"), (weights, "weights"), (scratch, "scratch")])
    return V


def top_k(logits, int k, ids):
    """Write into ids (int32 [V]) the ids of logits [V] at least as likely as the k-th most likely (ties with it
    kept), in id order; returns how many."""
    cdef int V = _sampling_row(logits, None, ids)
    if not 1 <= k <= V:
        raise ValueError(f"k: expected 1 <= k <= {V}, got {k}")
    cdef const float* l = _cptr(logits)
    cdef int32_t* out = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>ids)
    cdef int kept
    with nogil:
        kept = ll_top_k(l, V, k, out)
    return kept


def keep_top_p(logits, weights, double mass, scratch):
    """Zero weights [V] (float64) but for the shortest most-likely-first prefix of logits [V] whose weights
    sum to at least mass (> 0). scratch: int32 [V]."""
    cdef int V = _sampling_row(logits, weights, scratch)
    if not 0 < mass < float("inf"):
        raise ValueError(f"mass: expected a finite number > 0, got {mass}")
    cdef const float* l = _cptr(logits)
    cdef double* w = <double*>cnp.PyArray_DATA(<cnp.ndarray>weights)
    cdef int32_t* ids = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>scratch)
    with nogil:
        ll_keep_top_p(l, w, V, mass, ids)


def draw(weights, double floor, double u):
    """The id i drawn with probability weights[i] / sum by the uniform variate u in [0, 1), among the ids whose
    weight (float64 [V], >= 0) is at least floor (> 0); the sum of those must be positive. The first id whose
    running sum exceeds u * sum."""
    _array(weights, "weights", np.float64, (None,))
    cdef int V = weights.shape[0]
    if V == 0:
        raise ValueError("weights: an empty row")
    if not 0 < floor < float("inf"):
        raise ValueError(f"floor: expected a finite number > 0, got {floor}")
    if not 0 <= u < 1:
        raise ValueError(f"u: expected 0 <= u < 1, got {u}")
    cdef const double* w = <const double*>cnp.PyArray_DATA(<cnp.ndarray>weights)
    cdef int i
    with nogil:
        i = ll_draw(w, V, floor, u)
    return i


def select_simd(str name):
    """Use SIMD path `name` ("auto", "baseline", "avx2", "avx512") for every kernel from now on."""
    if ll_select_simd(name.encode()) != 0:
        raise ValueError(f"SIMD path {name!r} is not available here (compiled: {simd_compiled()}; "
                         f"this CPU supports: {simd_supported()})")


def simd_selected():
    return ll_simd_selected().decode()


def simd_compiled():
    return ll_simd_compiled().decode()


def simd_supported():
    return ll_simd_supported().decode()


def set_num_threads(int n):
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    ll_set_num_threads(n)


def max_threads():
    return ll_max_threads()


def parallel_team_size():
    """Run one OpenMP parallel region and return how many threads it had."""
    return ll_parallel_team_size()


def openmp_version():
    return ll_openmp_version()


def compiler():
    return ll_compiler().decode()
