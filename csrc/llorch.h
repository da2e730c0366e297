/* llorch kernel ABI: FP32 GPT-2 ops on plain C arrays.
 *
 * Sizes: T tokens in this pass (one sequence), B sequences in a decode step (one token each), C = n_embd,
 * OC = output width of a linear layer, NH heads of HS = C / NH, V = vocab size, maxT = n_positions (cache
 * length), S = start_pos + T (positions attended). Every array is C-contiguous float32 unless said
 * otherwise. Kernels never allocate and never fail: the caller owns every buffer, scratch included, and
 * passes only arguments that satisfy what each op states (src/llorch/_kernels.pyx checks them). Threads
 * (OpenMP) always split outputs over a tiling that does not depend on the thread count, so results are
 * bitwise identical for any number of threads.
 */
#ifndef LLORCH_H
#define LLORCH_H

#include <stddef.h>
#include <stdint.h>

/* A linear layer's weight is repacked once (at load) into column panels of LLORCH_PANEL: the same
 * packing for every SIMD path, so a model packed once runs on any of them. */
#define LLORCH_PANEL 64

/* Every op, said once: X(return type, name, (type, parameter)...). This list makes the public ll_<name>
 * prototypes below, each SIMD level's table (kernels.h, isa_ops.h), the dispatching ll_<name>
 * functions (dispatch.c) and the Cython declarations (setup.py reads this text: one X(...) per op,
 * each parameter a (type, name) pair). */
#define LL_OPS(X) \
    /* out [T, C] = wte[tokens[t]] + wpe[start_pos + t]; tokens int32 [T] in [0, V), wpe [maxT, C]  \
     * with start_pos + T <= maxT; wte as the lm_head holds it: wte^T [C, V] packed by pack_linear  \
     * (a token's row is a column of it) */                                                          \
    X(void, embed, (float*, out), (const int32_t*, tokens), (const float*, wte), (const float*, wpe), \
      (int, T), (int, C), (int, V), (int, start_pos))                                                 \
    /* out [T, C] = (inp - mean) / sqrt(var + eps) * weight [C] + bias [C] per row, biased variance   \
     * over C; any finite row is normalised (no overflow for rows up to FLT_MAX) */                    \
    X(void, layernorm, (float*, out), (const float*, inp), (const float*, weight), (const float*, bias), \
      (int, T), (int, C), (float, eps))                                                               \
    /* packed [C * OC] = weight [C, OC] (HF Conv1D layout) cut into column panels: panel p = columns  \
     * [p P, p P + w) stored as [C][w] at offset p P C (P = LLORCH_PANEL, w = P but for a narrower     \
     * last panel) */                                                                                 \
    X(void, pack_linear, (float*, packed), (const float*, weight), (int, C), (int, OC))               \
    /* out [T, OC] = inp [T, C] @ weight [C, OC] + bias [OC] (bias may be NULL), weight given packed  \
     * [C * OC] by pack_linear. Each output is the chain acc = bias (or 0), acc += inp[t, c] w[c, j]  \
     * for c in order: a row's bits depend on neither T nor the thread count */                       \
    X(void, linear_packed, (float*, out), (const float*, inp), (const float*, packed),                \
      (const float*, bias), (int, T), (int, C), (int, OC))                                            \
    /* out [N] = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's "gelu_new" (out may alias   \
     * inp) */                                                                                        \
    X(void, gelu, (float*, out), (const float*, inp), (int, N))                                       \
    /* out [N] = a [N] + b [N] (out may alias a or b) */                                              \
    X(void, residual, (float*, out), (const float*, a), (const float*, b), (int, N))                  \
    /* k and v of this pass (columns [C, 2C) and [2C, 3C) of qkv [T, 3C]) into positions              \
     * [start_pos, S) of k_cache, v_cache [NH, maxT, HS], S <= maxT */                                 \
    X(void, kv_write, (float*, k_cache), (float*, v_cache), (const float*, qkv), (int, T), (int, C),  \
      (int, NH), (int, start_pos), (int, maxT))                                                       \
    /* out [T, C] = causal attention of this pass's queries (columns [0, C) of qkv [T, 3C]) over      \
     * positions [0, start_pos + t] of k_cache, v_cache [NH, maxT, HS], heads merged. scores and      \
     * probs [NH, T, S] may be NULL; when given (for tracing) they receive q.k / sqrt(HS) (masked     \
     * entries -inf) and the softmax weights (masked entries 0). scratch: ll_attention_scratch_floats(S) \
     * floats, sized in the calling thread */                                                         \
    X(void, attention, (float*, out), (float*, scores), (float*, probs), (float*, scratch),           \
      (const float*, qkv), (const float*, k_cache), (const float*, v_cache), (int, T), (int, C),       \
      (int, NH), (int, start_pos), (int, maxT))                                                       \
    /* One decode step of B sequences with caches of their own: row b of qkv [B, 3C] is sequence b's  \
     * token at position pos[b]; as kv_write + attention of a one-token pass into k_caches[b],        \
     * v_caches[b] [NH, maxT, HS], bitwise (out [B, C] row b, and scores and probs [NH, 1, pos[0] + 1], \
     * which must be NULL unless B == 1). scratch: ll_attention_scratch_floats(max pos[b] + 1) floats */ \
    X(void, decode_attention, (float*, out), (float*, scores), (float*, probs), (float*, scratch),    \
      (const float*, qkv), (float* const*, k_caches), (float* const*, v_caches), (const int*, pos),    \
      (int, B), (int, C), (int, NH), (int, maxT))                                                     \
    /* index of the largest of x [N], N >= 1, the first one on ties; NaN never wins (all NaN: 0) */    \
    X(int, argmax, (const float*, x), (int, N))                                                       \
    /* Sampling (most likely first: logits [V] descending, ties lower id first; logits finite or      \
     * -inf; weights [V] float64 >= 0; scratch int32 [V]). top_k: ids [V] receives, in id order, the   \
     * ids at least as likely as the k-th (1 <= k <= V; ties with it kept); returns their count */    \
    X(int, top_k, (const float*, logits), (int, V), (int, k), (int32_t*, ids))                       \
    /* keep_top_p: weights set to 0 but for the shortest most-likely-first prefix whose weights sum   \
     * to at least mass (> 0); unchanged if all together fall short */                                 \
    X(void, keep_top_p, (const float*, logits), (double*, weights), (int, V), (double, mass),         \
      (int32_t*, scratch))                                                                            \
    /* draw: among the ids whose weight is at least floor (> 0; others count as 0), the first in id   \
     * order whose running sum of weights [V] exceeds u * their sum, u in [0, 1), the sum > 0: id i    \
     * is drawn with probability weights[i] / sum */                                                   \
    X(int, draw, (const double*, weights), (int, V), (double, floor), (double, u))

/* How the list is spelled out: LL_PARAMS((float*, out), (int, T)) is `float* out, int T`, LL_ARGS(...)
 * is `out, T` (up to 12 parameters). */
#define LL_PARAM(type, name) type name
#define LL_ARG(type, name) name
#define LL_PARAMS(...) LL_MAP(LL_PARAM, __VA_ARGS__)
#define LL_ARGS(...) LL_MAP(LL_ARG, __VA_ARGS__)
#define LL_MAP(F, ...) LL_MAP_N(__VA_ARGS__, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1)(F, __VA_ARGS__)
#define LL_MAP_N(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, n, ...) LL_MAP_##n
#define LL_MAP_1(F, p) F p
#define LL_MAP_2(F, p, ...) F p, LL_MAP_1(F, __VA_ARGS__)
#define LL_MAP_3(F, p, ...) F p, LL_MAP_2(F, __VA_ARGS__)
#define LL_MAP_4(F, p, ...) F p, LL_MAP_3(F, __VA_ARGS__)
#define LL_MAP_5(F, p, ...) F p, LL_MAP_4(F, __VA_ARGS__)
#define LL_MAP_6(F, p, ...) F p, LL_MAP_5(F, __VA_ARGS__)
#define LL_MAP_7(F, p, ...) F p, LL_MAP_6(F, __VA_ARGS__)
#define LL_MAP_8(F, p, ...) F p, LL_MAP_7(F, __VA_ARGS__)
#define LL_MAP_9(F, p, ...) F p, LL_MAP_8(F, __VA_ARGS__)
#define LL_MAP_10(F, p, ...) F p, LL_MAP_9(F, __VA_ARGS__)
#define LL_MAP_11(F, p, ...) F p, LL_MAP_10(F, __VA_ARGS__)
#define LL_MAP_12(F, p, ...) F p, LL_MAP_11(F, __VA_ARGS__)

#define LL_DECLARE(ret, name, ...) ret ll_##name(LL_PARAMS(__VA_ARGS__));
LL_OPS(LL_DECLARE)
#undef LL_DECLARE

/* Floats of scratch ll_attention and ll_decode_attention need to attend to S positions: a few rows of
 * softmax weights for each thread the next parallel region may use (ll_max_threads(), so size it after
 * any ll_set_num_threads, in the thread that calls the kernel). */
size_t ll_attention_scratch_floats(int S);

/* ---- run-time configuration ---- */

/* Select the SIMD path: "auto", "baseline", "avx2" or "avx512". Returns 0, or -1 if that path is not
 * compiled in or this CPU cannot run it (the selection is then unchanged). */
int ll_select_simd(const char* name);
const char* ll_simd_selected(void);
/* Space-separated SIMD paths compiled into this build, and those this CPU supports. */
const char* ll_simd_compiled(void);
const char* ll_simd_supported(void);

void ll_set_num_threads(int n);
int ll_max_threads(void);          /* threads the next parallel region would use (1 without OpenMP) */
int ll_parallel_team_size(void);   /* threads that actually ran a parallel region just now */
int ll_openmp_version(void);       /* _OPENMP (yyyymm), 0 when built without OpenMP */
const char* ll_compiler(void);

#endif
