/* Internal: the table of kernels compiled for one SIMD level, and the helpers the ops share.
 *
 * Each csrc/isa_<level>.c sets LL_ISA and LL_VBYTES (vector width in bytes), enables that level's
 * instructions with `#pragma GCC target`, and includes this file and every csrc/ops/<op>.c. The ops are
 * written once with GCC vector extensions, so the same source becomes SSE2, AVX2+FMA or AVX-512 code.
 * dispatch.c holds the public ll_* functions and calls the selected table.
 */
#ifndef LLORCH_KERNELS_H
#define LLORCH_KERNELS_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    const char* name;
    void (*embed)(float*, const int32_t*, const float*, const float*, int, int, int);
    void (*layernorm)(float*, const float*, const float*, const float*, int, int, float);
    void (*linear)(float*, const float*, const float*, const float*, int, int, int);
    void (*gelu)(float*, const float*, int);
    void (*residual)(float*, const float*, const float*, int);
    void (*kv_write)(float*, float*, const float*, int, int, int, int, int);
    void (*attention)(float*, float*, float*, const float*, const float*, const float*,
                      int, int, int, int, int);
    void (*lm_head)(float*, const float*, const float*, int, int, int);
    int (*argmax)(const float*, int);
} ll_kernels;

extern const ll_kernels ll_kernels_baseline;
#if defined(__x86_64__) || defined(__i386__)
extern const ll_kernels ll_kernels_avx2;
extern const ll_kernels ll_kernels_avx512;
#endif

#endif

/* Below: per-ISA part, only inside an isa_<level>.c translation unit. */
#ifdef LL_ISA
#ifndef LLORCH_KERNELS_ISA_BODY
#define LLORCH_KERNELS_ISA_BODY

#define LL_CAT2(a, b) a##_##b
#define LL_CAT(a, b) LL_CAT2(a, b)
#define LL_FN(name) LL_CAT(name, LL_ISA)   /* linear -> linear_avx512 */

#define LL_VLEN (LL_VBYTES / 4)            /* floats per vector */
typedef float vfloat __attribute__((vector_size(LL_VBYTES)));
typedef float vfloat_u __attribute__((vector_size(LL_VBYTES), aligned(4), may_alias));

static inline vfloat vload(const float* p) { return *(const vfloat_u*)p; }
static inline void vstore(float* p, vfloat v) { *(vfloat_u*)p = v; }
static inline vfloat vsplat(float x) { return (vfloat){0} + x; }

/* Lanes summed in a fixed order, so a reduction's bits never depend on who computes it. */
static inline float vsum(vfloat v) {
    float s = v[0];
    for (int i = 1; i < LL_VLEN; i++) s += v[i];
    return s;
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
