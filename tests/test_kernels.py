"""Every kernel of llorch._kernels against a float64 numpy version, on every SIMD path this CPU runs.

Each comparison computes the reference in float64 from the very float32 inputs the kernel got and asserts,
element by element,

    |ours - ref| <= rtol * scale

where `scale` is what bounds float32 rounding for that computation (u = 2**-24, float32's unit roundoff):

- copies and single additions (embed, residual, kv_write): no tolerance. float32 `a + b` is correctly
  rounded, so it equals the float64 sum rounded to float32; the kernels must match that bit for bit.
- gelu: scale |x|, rtol 8u: a handful of roundings in x + 0.044715 x^3 and tanhf's few-ulp error, all
  relative to x (for x << 0 the result is a cancellation, but its absolute error stays a few u |x|).
- a dot product of length K (linear_packed, attention's scores and weighted sum of values): scale is the
  sum of magnitudes sum_k |a_k b_k| (+ |bias|). Any summation order has error <= K u times it; with
  independent rounding errors it grows like sqrt(K) u, so rtol = dot_rtol(K) = 4 u (sqrt(K) + 2), a margin
  of about 4 standard deviations over the random walk (the measured errors are printed with `-s`).
- layernorm: scale max|ref|. The mean of C float32 values has an error of about sqrt(C) u max|x|, which
  after dividing by the standard deviation is relative to max|x| / std (`cond`): rtol = 8 u (1 + sqrt(C) cond).
- softmax probabilities: relative to p itself. An absolute score error dz changes p by p (dz - E_p[dz]),
  so rtol = 2 max dz + 4 u (sqrt(S) + 4) (the sum over S terms and the divide), plus a 1e-30 floor for
  probabilities that underflow.

The measured max(|ours - ref| / scale) per kernel and SIMD path is printed at the end of the module
(`pytest -s tests/test_kernels.py`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llorch import _kernels as K
from llorch.weights import pack_wte

U = 2.0 ** -24
F32 = np.float32
SIMD_PATHS = K.simd_supported().split()
# One fixture (the SIMD path) is selected per test, not per example: it stays valid across examples.
PROPERTY = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MEASURED: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])  # worst ratio, worst / rtol


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    print("\nmax |ours - ref| / scale per kernel and SIMD path (and as a fraction of rtol):")
    for (kernel, path), (worst, used) in sorted(MEASURED.items()):
        print(f"  {kernel:18s} {path:9s} {worst:9.3g}  ({used:.2f} of rtol)")


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Run the test on one SIMD path; restore the previous selection afterwards."""
    previous = K.simd_selected()
    K.select_simd(request.param)
    assert K.simd_selected() == request.param
    yield request.param
    K.select_simd(previous)


@pytest.fixture
def restore_threads():
    threads = K.max_threads()
    yield
    K.set_num_threads(threads)


# ---- helpers ----

def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=F32) * F32(scale) + F32(offset)).astype(F32)


def empty(*shape: int) -> np.ndarray:
    """An output buffer full of NaN, so an element the kernel forgets to write shows up."""
    return np.full(shape, np.nan, dtype=F32)


def scratch(S: int) -> np.ndarray:
    """Attention scratch for S positions, NaN-filled (its contents must never reach an output)."""
    return empty(K.attention_scratch_floats(S))


def f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def dot_rtol(K_: int) -> float:
    return 4 * U * (math.sqrt(K_) + 2)


def check(kernel: str, got: np.ndarray, ref: np.ndarray, scale, rtol: float) -> None:
    """Assert |got - ref| <= rtol * scale elementwise (scale: an array or a number); record the worst ratio."""
    assert got.dtype == F32 and got.shape == ref.shape
    assert not np.isnan(got).any(), f"{kernel}: NaN in the output (an element not written?)"
    err = np.abs(f64(got) - ref)
    err[got == ref] = 0.0          # equal infinities
    scale = np.broadcast_to(f64(scale), err.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / scale)
    worst = float(ratio.max()) if ratio.size else 0.0
    path = K.simd_selected()
    record = MEASURED[kernel, path]
    record[:] = max(record[0], worst), max(record[1], worst / rtol)
    assert worst <= rtol, (f"{kernel} [{path}]: max |ours - ref| / scale = {worst:.3g} > rtol {rtol:.3g} "
                           f"at {np.unravel_index(ratio.argmax(), ratio.shape)}")


def assert_bitwise(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, what
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{what}: not bitwise equal"


# ---- float64 references ----

def ref_layernorm(x, w, b, eps):
    x = f64(x)
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * f64(w) + f64(b)


def ref_gelu_tanh(x):
    x = f64(x)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_gelu_erf(x):
    x = f64(x)
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ref_linear(x, w, b):
    """(out, scale): out = x @ w + b in float64, scale = |x| @ |w| + |b| (the sum of magnitudes)."""
    out, scale = f64(x) @ f64(w), np.abs(f64(x)) @ np.abs(f64(w))
    if b is not None:
        out, scale = out + f64(b), scale + np.abs(f64(b))
    return out, scale


def split_heads(a, NH):
    """[T, C] -> [NH, T, HS]."""
    T, C = a.shape
    return f64(a).reshape(T, NH, C // NH).transpose(1, 0, 2)


def ref_attention(q, k, v, start_pos):
    """q [NH, T, HS], k, v [NH, S, HS] (float64) -> dict of scores, probs, out [T, C] and their error scales."""
    NH, T, HS = q.shape
    S = k.shape[1]
    masked = np.arange(S)[None, :] > start_pos + np.arange(T)[:, None]            # [T, S]
    scores = np.where(masked, -np.inf, q @ k.transpose(0, 2, 1) / math.sqrt(HS))
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    merge = lambda a: a.transpose(1, 0, 2).reshape(T, NH * HS)  # noqa: E731
    return {"masked": masked, "scores": scores, "probs": probs, "out": merge(probs @ v),
            "scores_scale": np.abs(q) @ np.abs(k).transpose(0, 2, 1) / math.sqrt(HS),
            "out_scale": merge(probs @ np.abs(v))}


# ---- embed, residual, kv_write: exact ----

@pytest.mark.parametrize("T, C, V, start_pos", [(1, 1, 1, 0), (1, 37, 64, 5), (7, 120, 300, 3),
                                              (64, 768, 300, 960), (40, 64, 50257, 7)])
def test_embed(simd, T, C, V, start_pos):
    """wte as the model holds it (pack_wte: the lm_head's packed [C, V]); rows of full panels and of the
    narrower last one."""
    rng = np.random.default_rng(T * 1000 + C)
    maxT = 1024
    wte, wpe = randn(rng, V, C), randn(rng, maxT, C)
    tokens = rng.integers(0, V, T, dtype=np.int32)
    tokens[0] = V - 1
    out = empty(T, C)
    K.embed(out, tokens, pack_wte(wte), wpe, start_pos)
    assert_bitwise(out, (f64(wte[tokens]) + f64(wpe[start_pos:start_pos + T])).astype(F32), "embed")


@pytest.mark.parametrize("shape", [(1,), (3,), (37,), (4, 120), (1024, 768)])
@pytest.mark.parametrize("alias", ["none", "out=a", "out=b"])
def test_residual(simd, shape, alias):
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    a, b = randn(rng, *shape), randn(rng, *shape, scale=1e-3)
    want = (f64(a) + f64(b)).astype(F32)
    out = {"none": empty(*shape), "out=a": a, "out=b": b}[alias]
    K.residual(out, a, b)
    assert_bitwise(out, want, f"residual {alias}")


def filled_cache(rng, NH, maxT, HS, start_pos):
    """k, v caches [NH, maxT, HS]: random history at positions < start_pos, NaN after (never to be read)."""
    caches = []
    for _ in range(2):
        cache = np.full((NH, maxT, HS), np.nan, dtype=F32)
        cache[:, :start_pos] = randn(rng, NH, start_pos, HS)
        caches.append(cache)
    return caches


def write_and_check_cache(k_cache, v_cache, qkv, start_pos):
    """kv_write, and check it copied k, v of qkv to positions [start_pos, S) exactly and touched nothing else."""
    NH, maxT, HS = k_cache.shape
    T, C = qkv.shape[0], qkv.shape[1] // 3
    before = k_cache.copy(), v_cache.copy()
    K.kv_write(k_cache, v_cache, qkv, start_pos)
    S = start_pos + T
    for cache, old, col in ((k_cache, before[0], 1), (v_cache, before[1], 2)):
        want = old.copy()
        want[:, start_pos:S] = qkv[:, col * C:(col + 1) * C].reshape(T, NH, HS).transpose(1, 0, 2)
        assert_bitwise(cache, want, "kv_write")


@pytest.mark.parametrize("NH, HS, T, start_pos, maxT", [(1, 1, 1, 0, 1), (4, 16, 5, 3, 16), (6, 20, 1, 127, 128),
                                                         (12, 64, 7, 0, 1024), (2, 80, 2, 1022, 1024)])
def test_kv_write(simd, NH, HS, T, start_pos, maxT):
    rng = np.random.default_rng(NH * HS + T)
    k_cache, v_cache = filled_cache(rng, NH, maxT, HS, start_pos)
    write_and_check_cache(k_cache, v_cache, randn(rng, T, 3 * NH * HS), start_pos)
    if start_pos + T < maxT:  # a decode step after the prompt
        write_and_check_cache(k_cache, v_cache, randn(rng, 1, 3 * NH * HS), start_pos + T)


# ---- elementwise and row-wise kernels ----

GELU_POINTS = np.concatenate([np.linspace(-10, 10, 2001), [0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 30, -30,
                                                            1e5, -1e5, 1e13, -1e13]]).astype(F32)


@pytest.mark.parametrize("n", [1, 3, 37, 20000])   # 20000 > 16384: the threaded branch
def test_gelu(simd, n):
    rng = np.random.default_rng(n)
    x = np.concatenate([GELU_POINTS, randn(rng, max(n - GELU_POINTS.size, 0), scale=3.0)])
    x = rng.permutation(x)[:n]
    out = empty(n)
    K.gelu(out, x)
    check("gelu", out, ref_gelu_tanh(x), np.abs(f64(x)), 8 * U)
    inplace = x.copy()
    K.gelu(inplace, inplace)           # the model runs it in place
    assert_bitwise(inplace, out, "gelu in place")


def test_gelu_is_the_tanh_approximation_not_erf(simd):
    """The tanh form and the exact erf form differ by up to 4.7e-4 (at x = -2.7): far above our error."""
    x = np.linspace(-6, 6, 1201).astype(F32)
    out = empty(x.size)
    K.gelu(out, x)
    to_tanh = np.abs(f64(out) - ref_gelu_tanh(x)).max()
    to_erf = np.abs(f64(out) - ref_gelu_erf(x)).max()
    assert to_erf > 1e-4
    assert to_tanh < to_erf / 100, f"gelu: {to_tanh:.3g} from the tanh form, {to_erf:.3g} from erf"


def layernorm_case(rng, T, C, offset=0.0, spread=1.0, eps=1e-5):
    check_layernorm(rng, randn(rng, T, C, scale=spread, offset=offset), eps)


def check_layernorm(rng, x, eps=1e-5):
    T, C = x.shape
    w, b = randn(rng, C, scale=0.5, offset=1.0), randn(rng, C, scale=0.1)
    out = empty(T, C)
    K.layernorm(out, x, w, b, eps)
    ref = ref_layernorm(x, w, b, eps)
    std = np.sqrt(f64(x).var(axis=1) + eps)
    cond = float((np.abs(f64(x)).max(axis=1) / std).max())
    check("layernorm", out, ref, np.abs(ref).max(), 8 * U * (1 + math.sqrt(C) * cond))


@pytest.mark.parametrize("T, C, spread", [(1, 1, 1.0), (1, 3, 1.0), (5, 37, 1.0), (3, 120, 1.0), (1024, 64, 1.0),
                                          (4, 768, 1.0), (2, 1600, 1.0),
                                          (3, 50, 3e-3)])   # variance ~ eps: eps must sit inside the sqrt
def test_layernorm(simd, T, C, spread):
    layernorm_case(np.random.default_rng(T * C), T, C, spread=spread)


@pytest.mark.parametrize("offset, spread", [(300.0, 1.0), (1000.0, 0.5), (-50.0, 0.01)])
def test_layernorm_large_mean(simd, offset, spread):
    """Rows far from zero (GPT-2's outlier dimensions): a one-pass E[x^2] - E[x]^2 would lose every digit."""
    layernorm_case(np.random.default_rng(7), 6, 768, offset=offset, spread=spread)


def packed(w):
    p = empty(w.size)
    K.pack_linear(p, w)
    return p


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 3e38, 1e-20, 1e-30, 1e-38])
def test_layernorm_any_finite_row(simd, magnitude):
    """Rows whose squared deviations overflow float32 (from ~1e19 / sqrt(C)) up to FLT_MAX are normalised,
    not returned as the bias; tiny rows too. Row 0 centred, row 1 far from zero, row 2 a single spike."""
    rng = np.random.default_rng(int(math.log10(magnitude)) + 40)
    C = 768
    x = f64(randn(rng, 3, C))
    x[1] = 0.1 * x[1] + 0.9 * np.abs(x[1]).max()
    x[2] = 0.0
    x[2, 5] = 1.0
    x = (x / np.abs(x).max(axis=1, keepdims=True) * magnitude).astype(F32)   # max |x| = magnitude per row
    assert np.isfinite(x).all()
    check_layernorm(rng, x)


def linear_packed_case(rng, T, C, OC, with_bias):
    x, w = randn(rng, T, C), randn(rng, C, OC)
    b = randn(rng, OC) if with_bias else None
    out = empty(T, OC)
    K.linear_packed(out, x, packed(w), b)
    ref, scale = ref_linear(x, w, b)
    check("linear_packed" + ("+bias" if with_bias else ""), out, ref, scale, dot_rtol(C))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("T, C, OC", [(1, 1, 1), (1, 3, 3), (2, 37, 130), (3, 120, 64), (5, 120, 200),
                                      (7, 1, 67), (8, 120, 200), (9, 64, 64), (1, 768, 2304), (6, 3072, 768),
                                      (13, 300, 129), (130, 768, 64), (1024, 37, 130)])
def test_linear_packed(simd, T, C, OC, with_bias):
    linear_packed_case(np.random.default_rng(T * C * OC), T, C, OC, with_bias)


@PROPERTY
@given(T=st.integers(1, 20), C=st.integers(0, 80), OC=st.integers(1, 200), with_bias=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_linear_packed_property(simd, T, C, OC, with_bias, seed):
    linear_packed_case(np.random.default_rng(seed), T, C, OC, with_bias)


def test_linear_packed_same_bits_for_any_thread_count(simd, restore_threads):
    """Threads own whole panels: 1, 2 or 3 threads give the same bits, for the GEMV (T = 1) and the GEMM."""
    rng = np.random.default_rng(2)
    C, OC = 300, 4 * K.PANEL + 9   # several panels and a narrow last one
    w, b = packed(randn(rng, C, OC)), randn(rng, OC)
    for T in (1, 2, 7, 19):
        x, results = randn(rng, T, C), []
        for threads in (1, 2, 3):
            K.set_num_threads(threads)
            results.append(empty(T, OC))
            K.linear_packed(results[-1], x, w, b)
        for threads, got in zip((2, 3), results[1:]):
            assert_bitwise(got, results[0], f"linear_packed T={T}, {threads} threads vs 1")


def test_linear_packed_simd_paths_agree():
    """Every SIMD path computes the same chains (FMA or not): all within rounding of one another."""
    rng = np.random.default_rng(4)
    T, C, OC = 3, 768, 2 * K.PANEL + 5
    x, w, b = randn(rng, T, C), randn(rng, C, OC), randn(rng, OC)
    _, scale = ref_linear(x, w, b)
    previous, results = K.simd_selected(), {}
    try:
        for path in SIMD_PATHS:
            K.select_simd(path)
            results[path] = empty(T, OC)
            K.linear_packed(results[path], x, packed(w), b)
    finally:
        K.select_simd(previous)
    for path, got in results.items():
        check("linear_packed paths", got, f64(results[SIMD_PATHS[0]]), scale, 2 * dot_rtol(C))


def test_pack_linear_layout():
    """Panel p holds columns [p PANEL, p PANEL + w) as [C][w], one panel after the other."""
    C, OC, P = 5, 2 * K.PANEL + 3, K.PANEL
    w = np.arange(C * OC, dtype=F32).reshape(C, OC)
    want = np.concatenate([w[:, :P].ravel(), w[:, P:2 * P].ravel(), w[:, 2 * P:].ravel()])
    assert_bitwise(packed(w), want, "pack_linear")


@PROPERTY
@given(T=st.integers(1, 6), C=st.integers(1, 300), offset=st.floats(-100, 100), seed=st.integers(0, 2**32 - 1))
def test_layernorm_property(simd, T, C, offset, seed):
    layernorm_case(np.random.default_rng(seed), T, C, offset=offset)


def test_pack_wte_is_the_transpose_packed():
    """pack_wte packs a few MiB of wte's rows at a time: the parts together are pack_linear of the whole
    transpose (here 2 parts, the second ending in a narrower panel)."""
    wte = randn(np.random.default_rng(8), 50257, 64)
    assert_bitwise(pack_wte(wte), packed(np.ascontiguousarray(wte.T)), "pack_wte")


@pytest.mark.parametrize("T, C, V", [(1, 3, 5), (3, 120, 1027), (1, 64, 50257), (5, 20, 50257), (16, 768, 515)])
def test_lm_head(simd, T, C, V):
    """The tied lm_head, logits [T, V] = x [T, C] @ wte^T: linear_packed with no bias over pack_wte(wte)."""
    rng = np.random.default_rng(T + C + V)
    x, wte = randn(rng, T, C), randn(rng, V, C, scale=0.02)
    logits = empty(T, V)
    K.linear_packed(logits, x, pack_wte(wte), None)
    ref, scale = ref_linear(x, wte.T, None)
    check("lm_head", logits, ref, scale, dot_rtol(C))


# ---- attention ----

def attention_case(rng, NH, HS, T, start_pos, maxT, q_scale=1.0):
    """kv_write this pass into a partly filled cache, run attention with scores and probs; check all three."""
    C, S = NH * HS, start_pos + T
    k_cache, v_cache = filled_cache(rng, NH, maxT, HS, start_pos)
    qkv = randn(rng, T, 3 * C)
    qkv[:, :C] *= F32(q_scale)
    write_and_check_cache(k_cache, v_cache, qkv, start_pos)

    out, probs, scores = empty(T, C), empty(NH, T, S), empty(NH, T, S)
    K.attention(out, qkv, k_cache, v_cache, start_pos, scratch(S), scores, probs)
    ref = ref_attention(split_heads(qkv[:, :C], NH), f64(k_cache[:, :S]), f64(v_cache[:, :S]), start_pos)

    masked = np.broadcast_to(ref["masked"], probs.shape)
    assert np.all(scores[masked] == -np.inf), "masked scores must be -inf"
    assert np.all(probs[masked] == 0.0), "masked probabilities must be exactly 0"
    assert np.all(probs[~masked] >= 0.0)
    score_rtol = dot_rtol(HS)
    check("attention.scores", np.where(masked, 0, scores).astype(F32), np.where(masked, 0, ref["scores"]),
          ref["scores_scale"], score_rtol)
    max_dz = score_rtol * float(np.where(masked, 0, ref["scores_scale"]).max())
    probs_rtol = 2 * max_dz + 4 * U * (math.sqrt(S) + 4)
    check("attention.probs", probs, ref["probs"], ref["probs"] + 1e-30, probs_rtol)
    check("attention.rowsum", probs.sum(axis=-1, dtype=np.float64).astype(F32), np.ones((NH, T)), 1.0,
          4 * U * (math.sqrt(S) + 4) + 2 * max_dz)
    check("attention.out", out, ref["out"], ref["out_scale"], probs_rtol + dot_rtol(S))
    untraced = empty(T, C)   # without probs and scores the kernel keeps its rows in scratch: same bits
    K.attention(untraced, qkv, k_cache, v_cache, start_pos, scratch(S))
    assert_bitwise(untraced, out, "attention out without probs")
    return scores, probs


@pytest.mark.parametrize("NH, HS, T, start_pos, maxT", [
    (1, 1, 1, 0, 1),          # the smallest
    (4, 16, 5, 0, 8),         # prompt, cache longer than the pass
    (6, 20, 3, 9, 32),        # head_dim 20, partly filled cache
    (12, 64, 1, 17, 64),      # GPT-2 124M heads, decode
    (2, 80, 4, 30, 40),       # head_dim 80 (gpt2-large)
    (3, 7, 2, 5, 7),          # head_dim 7, cache filled to the end
    (2, 64, 1024, 0, 1024),   # the whole context in one pass
    (12, 64, 1, 1023, 1024),  # decode of the last position
])
def test_attention(simd, NH, HS, T, start_pos, maxT):
    attention_case(np.random.default_rng(NH * 100 + T), NH, HS, T, start_pos, maxT)


def test_attention_large_scores(simd):
    """Scores in the hundreds: expf(score) overflows past 88.7, so the row max must be subtracted first."""
    scores, probs = attention_case(np.random.default_rng(3), 4, 64, 6, 10, 32, q_scale=100.0)
    assert (scores.max(axis=-1) > 89.0).mean() > 0.5    # most rows would overflow
    assert probs.max() > 0.99                  # nearly one-hot, and finite (checked in attention_case)


@PROPERTY
@given(NH=st.integers(1, 4), HS=st.integers(1, 24), T=st.integers(1, 6), start_pos=st.integers(0, 12),
       extra=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
def test_attention_property(simd, NH, HS, T, start_pos, extra, seed):
    attention_case(np.random.default_rng(seed), NH, HS, T, start_pos, start_pos + T + extra)


# ---- row independence (spec 00, requirement 17): row t of a batch == the same row alone, bitwise ----

def test_rows_independent_of_batch(simd):
    rng = np.random.default_rng(11)
    T, C, OC = 19, 120, 200   # 19 rows: GEMM blocks and a remainder, vs the GEMV of one row
    x, w, b = randn(rng, T, C), randn(rng, C, OC), randn(rng, OC)
    wp = packed(w)
    ops = {"linear_packed": (lambda o, r: K.linear_packed(o, r, wp, b), OC),
           "layernorm": (lambda o, r: K.layernorm(o, r, w[:, 0].copy(), b[:C].copy(), 1e-5), C)}
    for name, (run, width) in ops.items():
        assert_rows_alone(name, run, x, width)


def assert_rows_alone(name, run, x, width):
    """run(out, rows) on all rows of x at once gives each row the bits it gets alone."""
    batch = empty(x.shape[0], width)
    run(batch, x)
    for t in range(x.shape[0]):
        alone = empty(1, width)
        run(alone, x[t:t + 1])
        assert_bitwise(alone[0], batch[t], f"{name} row {t} of {x.shape[0]}")


@pytest.mark.parametrize("T", range(2, 17))
def test_small_batches_rows_equal_rows_alone(simd, T):
    """A decode batch of 2..16 rows (the GEMM's row blocks, evened out): each row is bitwise the row computed
    alone, at GPT-2's C and over several panels, with a bias and without (the lm_head)."""
    rng = np.random.default_rng(T)
    C, OC = 768, 3 * K.PANEL + 5
    x, wp, b = randn(rng, T, C), packed(randn(rng, C, OC)), randn(rng, OC)
    for name, bias in (("linear_packed", b), ("lm_head", None)):
        assert_rows_alone(name, lambda o, r: K.linear_packed(o, r, wp, bias), x, OC)


def test_attention_prefill_equals_decode(simd):
    """A prompt pass of T tokens and T one-token decode steps give bitwise the same outputs and probs."""
    rng = np.random.default_rng(5)
    NH, HS, T, maxT = 3, 20, 6, 8
    C = NH * HS
    qkv = randn(rng, T, 3 * C)
    caches = [np.zeros((NH, maxT, HS), F32) for _ in range(4)]
    out, probs = empty(T, C), empty(NH, T, T)
    K.kv_write(caches[0], caches[1], qkv, 0)
    K.attention(out, qkv, caches[0], caches[1], 0, scratch(T), probs=probs)
    for t in range(T):
        step, step_probs = empty(1, C), empty(NH, 1, t + 1)
        K.kv_write(caches[2], caches[3], qkv[t:t + 1], t)
        K.attention(step, qkv[t:t + 1], caches[2], caches[3], t, scratch(t + 1), probs=step_probs)
        assert_bitwise(step[0], out[t], f"attention out, token {t}")
        assert_bitwise(step_probs[:, 0], probs[:, t, :t + 1], f"attention probs, token {t}")


@pytest.mark.parametrize("NH, HS", [(12, 64), (6, 20), (2, 80), (3, 7)])
def test_decode_attention_is_each_rows_kv_write_and_attention(simd, NH, HS):
    """One call for B sequences at their own positions: bitwise each sequence's one-token pass alone."""
    rng = np.random.default_rng(NH * HS)
    C, maxT, positions = NH * HS, 40, [0, 7, 39, 12, 3]
    alone_caches = [filled_cache(rng, NH, maxT, HS, p) for p in positions]
    batch_caches = [(k.copy(), v.copy()) for k, v in alone_caches]
    qkv, out = randn(rng, len(positions), 3 * C), empty(len(positions), C)
    K.decode_attention(out, qkv, [k for k, _ in batch_caches], [v for _, v in batch_caches], positions,
                       scratch(maxT))
    for b, ((k, v), p) in enumerate(zip(alone_caches, positions)):
        alone = empty(1, C)
        K.kv_write(k, v, qkv[b:b + 1], p)
        K.attention(alone, qkv[b:b + 1], k, v, p, scratch(p + 1))
        assert_bitwise(out[b], alone[0], f"row {b} at position {p}")
        assert_bitwise(batch_caches[b][0], k, f"k cache of row {b}")
        assert_bitwise(batch_caches[b][1], v, f"v cache of row {b}")


@pytest.mark.parametrize("NH, HS, pos", [(12, 64, 0), (12, 64, 37), (6, 20, 9), (3, 7, 16)])
def test_decode_attention_traced_is_attention(simd, NH, HS, pos):
    """A traced decode step (B = 1, scores and probs given) fills them bitwise as attention does for the
    same one-token pass, and its output is the untraced step's."""
    rng = np.random.default_rng(NH * HS + pos)
    C, maxT, S = NH * HS, 40, pos + 1
    k, v = filled_cache(rng, NH, maxT, HS, pos)
    qkv = randn(rng, 1, 3 * C)
    runs = {}
    for how in ("attention", "decode traced", "decode"):
        kc, vc = k.copy(), v.copy()
        out, scores, probs = empty(1, C), empty(NH, 1, S), empty(NH, 1, S)
        if how == "attention":
            K.kv_write(kc, vc, qkv, pos)
            K.attention(out, qkv, kc, vc, pos, scratch(S), scores, probs)
        elif how == "decode traced":
            K.decode_attention(out, qkv, [kc], [vc], [pos], scratch(S), scores, probs)
        else:
            K.decode_attention(out, qkv, [kc], [vc], [pos], scratch(S))
        runs[how] = out, scores, probs, kc, vc
    for how in ("decode traced", "decode"):
        assert_bitwise(runs[how][0], runs["attention"][0], f"{how}: out")
        assert_bitwise(runs[how][3], runs["attention"][3], f"{how}: k cache")
    for i, name in ((1, "scores"), (2, "probs")):
        assert_bitwise(runs["decode traced"][i], runs["attention"][i], f"decode traced: {name}")


def test_decode_attention_refuses_bad_arguments():
    NH, HS, maxT = 2, 4, 8
    caches = [np.zeros((NH, maxT, HS), F32) for _ in range(4)]
    qkv, out, work = np.zeros((2, 3 * NH * HS), F32), np.zeros((2, NH * HS), F32), scratch(maxT)
    with pytest.raises(ValueError, match="one per row"):
        K.decode_attention(out, qkv, caches[:1], caches[1:2], [0, 1], work)
    with pytest.raises(ValueError, match=r"k_caches\[1\]: must not overlap k_caches\[0\]"):
        K.decode_attention(out, qkv, [caches[0], caches[0]], caches[2:4], [0, 1], work)
    with pytest.raises(ValueError, match="exceed the cache"):
        K.decode_attention(out, qkv, caches[:2], caches[2:4], [0, maxT], work)
    with pytest.raises(ValueError, match="exceed the cache"):   # start_pos + 1 would overflow a C int
        K.decode_attention(out, qkv, caches[:2], caches[2:4], [0, 2**31 - 1], work)
    # a container is read once: a sequence handing out fresh views of stacked caches gets them checked too
    class Views:
        def __init__(self, arrays):
            self.arrays = arrays

        def __len__(self):
            return len(self.arrays)

        def __getitem__(self, b):
            return self.arrays[b][...]
    with pytest.raises(ValueError, match=r"v_cache: expected shape \(2, 8, 4\), got \(2, 1, 4\)"):
        K.decode_attention(out, qkv, np.zeros((2, NH, maxT, HS), F32),
                           Views([np.zeros((NH, maxT, HS), F32), np.zeros((NH, 1, HS), F32)]), [0, 5], work)
    # a position is read once: one that changes after the check cannot move the kernel's writes
    class Shifty:
        reads = 0

        def __index__(self):
            Shifty.reads += 1
            return 0 if Shifty.reads == 1 else 1000
    row = np.arange(qkv.size, dtype=F32).reshape(qkv.shape)
    K.decode_attention(out, row, caches[:2], caches[2:4], [0, Shifty()], work)
    assert np.array_equal(caches[1][:, 0].reshape(-1), row[1, NH * HS:2 * NH * HS])
    # a later row's cache is checked as fully as the first's (the fast path leaves the messages to those checks)
    longer = np.zeros((NH, maxT + 1, HS), F32)
    with pytest.raises(ValueError, match=r"k_caches\[1\]: expected the shape of k_caches\[0\]"):
        K.decode_attention(out, qkv, [caches[0], longer], [caches[2], np.zeros_like(longer)], [0, 1], work)
    frozen = np.zeros((NH, maxT, HS), F32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="v_cache: expected a writable array"):
        K.decode_attention(out, qkv, caches[:2], [caches[2], frozen], [0, 1], work)
    with pytest.raises(ValueError, match="k_cache: expected dtype float32"):
        K.decode_attention(out, qkv, [caches[0], caches[1].astype(np.float64)], caches[2:4], [0, 1], work)
    shared = np.zeros((NH, maxT, HS), F32)
    with pytest.raises(ValueError, match=r"v_caches\[1\]: must not overlap out"):
        K.decode_attention(shared.reshape(-1)[:out.size].reshape(out.shape), qkv, caches[:2], [caches[2], shared],
                           [0, 1], work)
    with pytest.raises(ValueError, match="out"):
        K.decode_attention(out[:1], qkv, caches[:2], caches[2:4], [0, 1], work)
    with pytest.raises(ValueError, match=r"^scores, probs: only for a step of one sequence, got 2"):
        K.decode_attention(out, qkv, caches[:2], caches[2:4], [0, 1], work, probs=np.zeros((NH, 1, 1), F32))
    with pytest.raises(ValueError, match=r"^probs: expected shape \(2, 1, 4\), got \(2, 1, 3\)"):
        K.decode_attention(out[:1], qkv[:1], caches[:1], caches[2:3], [3], work, probs=np.zeros((NH, 1, 3), F32))
    with pytest.raises(ValueError, match=r"^scratch: expected at least attention_scratch_floats\(8\)"):
        K.decode_attention(out, qkv, caches[:2], caches[2:4], [7, 1], work[:-1])
    with pytest.raises(ValueError, match=r"^scratch: must not overlap out"):
        K.decode_attention(work[:out.size].reshape(out.shape), qkv, caches[:2], caches[2:4], [0, 1], work)


# ---- argmax ----

@pytest.mark.parametrize("values, want", [
    ([1.0], 0),
    ([0.0, 3.0, 3.0, 1.0], 1),                        # ties: the first
    ([5.0, 5.0, 5.0], 0),
    ([0.0, -0.0], 0), ([-0.0, 0.0], 0),               # equal values
    ([np.nan, 1.0, 2.0], 2),                          # NaN never wins
    ([1.0, np.nan, 0.5], 0),
    ([2.0, 1.0, np.nan], 0),
    ([np.nan, np.nan], 0),                            # all NaN: 0
    ([-np.inf, -np.inf, -1e38], 2),
    ([-np.inf, -np.inf], 0),
    ([1.0, np.inf, np.inf], 1),
])
def test_argmax_cases(simd, values, want):
    assert K.argmax(np.array(values, dtype=F32)) == want


@pytest.mark.parametrize("values, want", [
    ([-np.inf] * 50, 0),                              # longer than any vector: the lane path
    ([np.nan] * 50, 0),
    ([np.nan] * 20 + [-np.inf] * 30, 20),
    ([-np.inf] * 33 + [np.nan] * 17, 0),
    ([0.0] * 17 + [1.0] + [0.0] * 15 + [1.0] * 17, 17),   # ties in several lanes: the first
    ([-0.0] * 40 + [0.0] * 9, 0),
    ([1.0] * 48 + [np.inf, 2.0], 48),                 # the largest in the tail
])
def test_argmax_long_cases(simd, values, want):
    assert K.argmax(np.array(values, dtype=F32)) == want


@pytest.mark.parametrize("n", [1, 3, 37, 50257])
def test_argmax_random_with_ties(simd, n):
    rng = np.random.default_rng(n)
    x = rng.integers(-20, 20, n).astype(F32)         # many ties
    assert K.argmax(x) == int(np.argmax(x))
    x[rng.integers(0, n, n // 3)] = np.nan
    finite = np.where(np.isnan(x), -np.inf, x)
    want = int(np.argmax(finite)) if not np.isnan(x).all() else 0
    assert K.argmax(x) == want


# ---- argument checks in the Cython layer ----

def valid_args() -> dict[str, dict]:
    """One valid call of each kernel, as keyword arguments (T = 2, C = 6, NH = 2, V = 5, maxT = 4)."""
    rng = np.random.default_rng(0)
    T, C, NH, V, maxT = 2, 6, 2, 5, 4
    cache = lambda: np.zeros((NH, maxT, C // NH), F32)  # noqa: E731
    return {
        "embed": dict(out=empty(T, C), tokens=np.array([0, V - 1], np.int32), wte=pack_wte(randn(rng, V, C)),
                      wpe=randn(rng, maxT, C), start_pos=1),
        "layernorm": dict(out=empty(T, C), inp=randn(rng, T, C), weight=randn(rng, C), bias=randn(rng, C), eps=1e-5),
        "linear_packed": dict(out=empty(T, 3), inp=randn(rng, T, C), packed=randn(rng, C * 3), bias=randn(rng, 3)),
        "pack_linear": dict(packed=empty(C * 3), weight=randn(rng, C, 3)),
        "gelu": dict(out=empty(T, C), inp=randn(rng, T, C)),
        "residual": dict(out=empty(T, C), a=randn(rng, T, C), b=randn(rng, T, C)),
        "kv_write": dict(k_cache=cache(), v_cache=cache(), qkv=randn(rng, T, 3 * C), start_pos=2),
        "attention": dict(out=empty(T, C), probs=empty(NH, T, 3), qkv=randn(rng, T, 3 * C), k_cache=cache(),
                          v_cache=cache(), start_pos=1, scratch=np.zeros(K.attention_scratch_floats(3), F32),
                          scores=empty(NH, T, 3)),
        "argmax": dict(x=randn(rng, V)),
    }


def as_float64(a): return a.astype(np.float64)
def transposed(a): return np.asfortranarray(a)                      # same shape, a transposed layout
def strided(a): return np.repeat(a, 2, axis=-1)[..., ::2]           # same shape and values, stride 2
def read_only(a): a.setflags(write=False); return a                 # noqa: E702
def one_more_row(a): return np.concatenate([a, a[:1]])
def as_list(a): return a.tolist()


BAD_ARGUMENTS = [
    # kernel, argument, how it is spoiled, the message (a regex)
    ("linear_packed", "inp", as_float64, r"^inp: expected dtype float32, got float64"),
    ("linear_packed", "inp", strided, r"^inp: expected a C-contiguous array"),
    ("linear_packed", "out", one_more_row, r"^out: expected shape \(2, \?\), got \(3, 3\)"),
    ("linear_packed", "out", read_only, r"^out: expected a writable array"),
    ("linear_packed", "packed", lambda a: a[:-1].copy(), r"^packed: expected shape \(18\), got \(17,\)"),
    ("linear_packed", "bias", lambda a: a[:2].copy(), r"^bias: expected shape \(3\)"),
    ("pack_linear", "packed", lambda a: a.reshape(6, 3), r"^packed: expected shape \(18\)"),
    ("pack_linear", "packed", read_only, r"^packed: expected a writable array"),
    ("pack_linear", "weight", transposed, r"^weight: expected a C-contiguous array"),
    ("layernorm", "weight", one_more_row, r"^weight: expected shape \(6\)"),
    ("layernorm", "out", as_float64, r"^out: expected dtype float32"),
    ("embed", "tokens", lambda t: t.astype(np.int64), r"^tokens: expected dtype int32, got int64"),
    ("embed", "tokens", lambda t: t + 1, r"^tokens: ids must be in \[0, 5\), got 1\.\.5"),
    ("embed", "tokens", lambda t: t - 1, r"^tokens: ids must be in \[0, 5\), got -1\.\.3"),
    ("embed", "start_pos", lambda p: 3, r"positions 3\.\.4 exceed the context of 4"),
    ("embed", "start_pos", lambda p: -1, r"positions -1\.\.0 exceed the context of 4"),
    ("embed", "start_pos", lambda p: 2**31 - 1, r"positions 2147483647\.\.2147483648 exceed the context of 4"),
    ("embed", "wte", as_list, r"^wte: expected a numpy array, got list"),
    ("embed", "wte", lambda w: w[:-1].copy(), r"^wte: expected V rows of C = 6 floats, got 29 floats"),
    ("embed", "wte", lambda w: w.reshape(5, 6), r"^wte: expected shape \(\?\), got \(5, 6\)"),
    ("embed", "wpe", strided, r"^wpe: expected a C-contiguous array"),
    ("gelu", "out", lambda a: a[:, :5].copy(), r"^out: expected shape \(2, 6\), got \(2, 5\)"),
    ("gelu", "inp", as_float64, r"^inp: expected dtype float32"),
    ("residual", "b", lambda a: a.reshape(-1).copy(), r"^b: expected shape \(2, 6\)"),
    ("residual", "out", read_only, r"^out: expected a writable array"),
    ("kv_write", "start_pos", lambda p: 3, r"positions 3\.\.4 exceed the cache of 4"),
    ("kv_write", "start_pos", lambda p: 2**31 - 1, r"positions 2147483647\.\.2147483648 exceed the cache of 4"),
    ("kv_write", "k_cache", lambda c: c[:, :, :2].copy(), r"^k_cache: expected shape \(NH, maxT, C/NH\)"),
    ("kv_write", "v_cache", read_only, r"^v_cache: expected a writable array"),
    ("kv_write", "qkv", lambda a: a[:, :17].copy(), r"^qkv: expected shape \(T, 3C\)"),
    ("attention", "probs", lambda a: a[:, :, :2].copy(), r"^probs: expected shape \(2, 2, 3\), got \(2, 2, 2\)"),
    ("attention", "scores", as_float64, r"^scores: expected dtype float32"),
    ("attention", "scores", strided, r"^scores: expected a C-contiguous array"),
    ("attention", "v_cache", lambda c: c[:, :3].copy(), r"^v_cache: expected shape \(2, 4, 3\)"),
    ("attention", "start_pos", lambda p: 3, r"positions 3\.\.4 exceed the cache of 4"),
    ("attention", "start_pos", lambda p: 2**31 - 2, r"positions 2147483646\.\.2147483647 exceed the cache of 4"),
    ("attention", "k_cache", transposed, r"^k_cache: expected a C-contiguous array"),
    ("attention", "scratch", lambda a: a[:-1].copy(), r"^scratch: expected at least attention_scratch_floats\(3\)"),
    ("attention", "scratch", read_only, r"^scratch: expected a writable array"),
    ("attention", "scratch", lambda a: a[None], r"^scratch: expected shape \(\?\)"),
    ("argmax", "x", lambda x: x[:0], r"^x: argmax of an empty array"),
    ("argmax", "x", lambda x: x.reshape(1, -1), r"^x: expected shape \(\?\)"),
]


@pytest.mark.parametrize("kernel", sorted(valid_args()))
def test_valid_arguments_run(kernel):
    """The unspoiled calls are accepted and fill their outputs, so each rejection below is caused by its one
    bad argument."""
    args = valid_args()[kernel]
    result = getattr(K, kernel)(**args)
    for name, a in args.items():
        assert not (isinstance(a, np.ndarray) and np.isnan(a).any()), f"{kernel}: {name} not fully written"
    assert result == (int(np.argmax(args["x"])) if kernel == "argmax" else None)


def test_read_only_inputs_are_accepted():
    """Weights come from a read-only mmap: inputs need not be writable."""
    args = valid_args()["linear_packed"]
    for name in ("inp", "packed", "bias"):
        read_only(args[name])
    K.linear_packed(**args)
    assert np.isfinite(args["out"]).all()


@pytest.mark.parametrize("kernel, name, spoil, message", BAD_ARGUMENTS,
                         ids=[f"{k}-{n}-{s.__name__.strip('<>')}" for k, n, s, _ in BAD_ARGUMENTS])
def test_bad_argument_is_rejected(kernel, name, spoil, message):
    args = valid_args()[kernel]
    args[name] = spoil(args[name])
    outputs = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray) and v.flags.writeable}
    with pytest.raises(ValueError, match=message):
        getattr(K, kernel)(**args)
    for k, before in outputs.items():   # rejected before any C code wrote anything
        np.testing.assert_array_equal(args[k], before, err_msg=f"{kernel} wrote {k} despite the error")


@pytest.mark.parametrize("call, message", [
    (lambda: K.select_simd("avx1024"), r"SIMD path 'avx1024' is not available"),
    (lambda: K.set_num_threads(0), r"threads must be at least 1, got 0"),
])
def test_bad_configuration_is_rejected(call, message):
    before = K.simd_selected(), K.max_threads()
    with pytest.raises(ValueError, match=message):
        call()
    assert (K.simd_selected(), K.max_threads()) == before


def test_output_overlapping_an_input_is_rejected():
    rng = np.random.default_rng(0)
    x, w = randn(rng, 4, 128), randn(rng, 128, 128)
    with pytest.raises(ValueError):
        K.linear_packed(x, x, packed(w), None)
