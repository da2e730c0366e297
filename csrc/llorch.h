/* llorch kernel ABI: FP32 GPT-2 ops on plain C arrays.
 *
 * Sizes: T tokens in this pass (one sequence, B = 1), C = n_embd, OC = output width of a linear layer,
 * NH heads of HS = C / NH, V = vocab size, maxT = n_positions (cache length), S = start_pos + T.
 * Every array is C-contiguous float32 unless said otherwise. Kernels never allocate: the caller owns
 * every buffer. Threads (OpenMP) always split outputs over a tiling that does not depend on the thread
 * count, so results are bitwise identical for any number of threads.
 */
#ifndef LLORCH_H
#define LLORCH_H

#include <stdint.h>

/* out[t, :] = wte[tokens[t], :] + wpe[start_pos + t, :]          out [T, C], tokens int32 [T] */
void ll_embed(float* out, const int32_t* tokens, const float* wte, const float* wpe,
              int T, int C, int start_pos);

/* out[t] = (inp[t] - mean) / sqrt(var + eps) * weight + bias, biased variance over C.  [T, C] */
void ll_layernorm(float* out, const float* inp, const float* weight, const float* bias,
                  int T, int C, float eps);

/* out[T, OC] = inp[T, C] @ weight[C, OC] + bias[OC]   (HF Conv1D layout; bias may be NULL) */
void ll_linear(float* out, const float* inp, const float* weight, const float* bias,
               int T, int C, int OC);

/* The same linear layer on a weight repacked once (at load) into column panels of LLORCH_PANEL:
 * packed [C * OC], panel p = columns [p P, p P + w) stored as [C][w] at offset p P C (P = LLORCH_PANEL,
 * w = P except for a narrower last panel). Each thread then streams contiguous memory; the packing is
 * the same for every SIMD path, and ll_linear_packed(out, inp, pack(weight), bias) is bitwise
 * ll_linear(out, inp, weight, bias). */
#define LLORCH_PANEL 64
void ll_pack_linear(float* packed, const float* weight, int C, int OC);
void ll_linear_packed(float* out, const float* inp, const float* packed, const float* bias,
                      int T, int C, int OC);

/* out[i] = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's "gelu_new".  [N] */
void ll_gelu(float* out, const float* inp, int N);

/* out[i] = a[i] + b[i].  [N]  (out may alias a or b) */
void ll_residual(float* out, const float* a, const float* b, int N);

/* Copy this pass's k and v (columns [C, 2C) and [2C, 3C) of qkv [T, 3C]) into positions
 * [start_pos, start_pos + T) of k_cache and v_cache, each [NH, maxT, HS]. */
void ll_kv_write(float* k_cache, float* v_cache, const float* qkv,
                 int T, int C, int NH, int start_pos, int maxT);

/* Causal self-attention of this pass's queries (columns [0, C) of qkv [T, 3C]) over cached positions
 * [0, start_pos + t] of k_cache/v_cache [NH, maxT, HS]; heads merged into out [T, C].
 * probs and scores [NH, T, S] may be NULL; when given (for tracing) they receive the softmax weights
 * (masked entries 0) and q.k / sqrt(HS) (masked entries -inf). */
void ll_attention(float* out, float* scores, float* probs, const float* qkv,
                  const float* k_cache, const float* v_cache,
                  int T, int C, int NH, int start_pos, int maxT);

/* One decode step of B sequences with caches of their own: row b of qkv [B, 3C] is sequence b's token at
 * position pos[b]; as ll_kv_write + ll_attention of a one-token pass into k_caches[b], v_caches[b]
 * [NH, maxT, HS] (bitwise the same out row), for every b in one call. out [B, C]. */
void ll_decode_attention(float* out, const float* qkv, float* const* k_caches, float* const* v_caches,
                         const int* pos, int B, int C, int NH, int maxT);

/* logits[T, V] = inp[T, C] @ wte[V, C]^T   (the tied lm_head: wte is read in place) */
void ll_lm_head(float* logits, const float* inp, const float* wte, int T, int C, int V);

/* Index of the largest of x[0..N), the first one on ties. */
int ll_argmax(const float* x, int N);

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
