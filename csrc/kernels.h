/* Internal: the table of kernels compiled for one SIMD level, and the helpers the ops share.
 *
 * Each csrc/isa_<level>.c sets LL_ISA and LL_VBYTES (vector width in bytes), enables that level's
 * instructions with `#pragma GCC target`, and includes isa_ops.h, which includes this file and every
 * csrc/ops/<op>.inc (include-only: they compile only inside an isa_<level>.c). The ops are
 * written once with GCC vector extensions, so the same source becomes SSE2, AVX2+FMA or AVX-512 code.
 * dispatch.c holds the public ll_* functions and calls the selected table.
 */
#ifndef LLORCH_KERNELS_H
#define LLORCH_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include "llorch.h"
#include "parallel.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* One SIMD level's build of every op (the fields are LL_OPS's names). */
#define LL_FIELD(ret, name, ...) ret (*name)(LL_PARAMS(__VA_ARGS__));
typedef struct {
    const char* isa;
    LL_OPS(LL_FIELD)
} ll_kernels;
#undef LL_FIELD

extern const ll_kernels ll_kernels_baseline;
#if defined(__x86_64__) || defined(__i386__)
extern const ll_kernels ll_kernels_avx2;
extern const ll_kernels ll_kernels_avx512;
#endif

/* Query rows attention computes together (they share each load of v): a thread's scratch holds that many
 * rows of softmax weights. */
#define LL_ATT_ROWS 4

#endif

/* Below: per-ISA part, only inside an isa_<level>.c translation unit. */
#ifdef LL_ISA
#ifndef LLORCH_KERNELS_ISA_BODY
#define LLORCH_KERNELS_ISA_BODY

#define LL_CAT2(a, b) a##_##b
#define LL_CAT(a, b) LL_CAT2(a, b)
#define LL_FN(name) LL_CAT(name, LL_ISA)   /* embed -> embed_avx512 */

#define LL_VLEN (LL_VBYTES / 4)            /* floats per vector */
#define LL_PANEL LLORCH_PANEL              /* columns per panel of a packed linear weight */
typedef float vfloat __attribute__((vector_size(LL_VBYTES)));
typedef float vfloat_u __attribute__((vector_size(LL_VBYTES), aligned(4), may_alias));
typedef int32_t vint __attribute__((vector_size(LL_VBYTES)));

static inline vfloat vload(const float* p) { return *(const vfloat_u*)p; }
static inline void vstore(float* p, vfloat v) { *(vfloat_u*)p = v; }
/* LL_LANES(F, w): F(0, w), F(1, w), ..., F(LL_VLEN - 1, w), to spell constant lane indices. */
#if LL_VLEN == 16
#define LL_LANES(F, w) F(0, w), F(1, w), F(2, w), F(3, w), F(4, w), F(5, w), F(6, w), F(7, w), \
                       F(8, w), F(9, w), F(10, w), F(11, w), F(12, w), F(13, w), F(14, w), F(15, w)
#elif LL_VLEN == 8
#define LL_LANES(F, w) F(0, w), F(1, w), F(2, w), F(3, w), F(4, w), F(5, w), F(6, w), F(7, w)
#elif LL_VLEN == 4
#define LL_LANES(F, w) F(0, w), F(1, w), F(2, w), F(3, w)
#else
#error "unsupported vector width"
#endif

/* Lanes of a and b (indices 0 .. 2 LL_VLEN - 1, constants): GCC's and clang's builtins differ. */
#if defined(__clang__)
#define LL_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define LL_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vint){__VA_ARGS__})
#endif
#define LL_LANE0(j, w) 0

/* x in every lane: one broadcast (the shorter (vfloat){0} + x costs an add, to turn -0 into +0). */
static inline vfloat vsplat(float x) {
    const vfloat v = {x};
    return LL_SHUFFLE(v, v, LL_LANES(LL_LANE0, 0));
}

/* Inside a parallel region: this thread's number, 0 .. team size - 1. */
static inline int ll_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Inside a parallel region: this thread's contiguous share [*lo, *hi) of n units, in thread order. Only for
 * work whose every output is computed the same way whoever owns it (then bits never depend on the split). */
static inline void ll_share(int n, int* lo, int* hi) {
#ifdef _OPENMP
    const long long nth = omp_get_num_threads(), me = omp_get_thread_num();
#else
    const long long nth = 1, me = 0;
#endif
    *lo = (int)(n * me / nth);
    *hi = (int)(n * (me + 1) / nth);
}

/* Lanes summed in a fixed order, so a reduction's bits never depend on who computes it. */
static inline float vsum(vfloat v) {
    float s = v[0];
    for (int i = 1; i < LL_VLEN; i++) s += v[i];
    return s;
}

/* Lanes where mask is true (all bits set, as a vector comparison gives) take a, the others b. */
static inline vfloat vselect(vint mask, vfloat a, vfloat b) {
    return (vfloat)((mask & (vint)a) | (~mask & (vint)b));
}

/* exp(y) per lane, within ~2 ulp: y = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so n ln2 is exact
 * enough), exp(r) by Cephes' polynomial, 2^n put straight into the exponent bits. Below -87.3 the result
 * is 0 (no denormals), above 88 it is +inf (exp overflows float32 at 88.72); NaN stays NaN. Written with vector extensions only,
 * so it is the same code on every SIMD level and every CPU. */
static inline vfloat vexp(vfloat y) {
    const vfloat hi = vsplat(88.0f), lo = vsplat(-87.3365478515625f);
    const vint overflow = y > hi, underflow = y < lo;
    y = vselect(y > hi, hi, y);
    y = vselect(y < lo, lo, y);
    /* n = round(y / ln2): adding 1.5 * 2^23 pushes the fraction out, the low bits of t are n. */
    const vfloat shifter = vsplat(12582912.0f);
    const vfloat t = y * vsplat(1.44269504088896341f) + shifter;
    const vfloat n = t - shifter;
    vfloat r = y - n * vsplat(0.693359375f);
    r = r - n * vsplat(-2.12194440e-4f);
    vfloat p = vsplat(1.9875691500e-4f);
    p = p * r + vsplat(1.3981999507e-3f);
    p = p * r + vsplat(8.3334519073e-3f);
    p = p * r + vsplat(4.1665795894e-2f);
    p = p * r + vsplat(1.6666665459e-1f);
    p = p * r + vsplat(5.0000001201e-1f);
    p = p * (r * r) + r + vsplat(1.0f);
    const vint pow2n = ((vint)t - (vint)shifter + 127) << 23;   /* n in [-126, 127]: a normal 2^n */
    vfloat e = p * (vfloat)pow2n;
    e = vselect(underflow, vsplat(0.0f), e);
    return vselect(overflow, vsplat(INFINITY), e);
}

/* sum_i a[i] * b[i] over n floats: vector lanes first, then the tail, in a fixed order. */
static inline float dot(const float* a, const float* b, int n) {
    vfloat acc = {0};
    int i = 0;
    for (; i + LL_VLEN <= n; i += LL_VLEN) acc += vload(a + i) * vload(b + i);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#endif
#endif
