/* Output projection tied to the token embedding.
 * logits [T, V] = inp [T, C] @ wte [V, C]^T: each logit is dot(inp[t], wte[v], C) (kernels.h: one vector
 * accumulator over C in order, then the lanes, then the remaining floats), reading wte in place.
 *
 * A register tile of LMH_MR rows x LMH_NR vocabulary rows shares each load. At T = 1 (decode) it streams
 * wte, LMH_NR rows side by side, the next LMH_NR prefetched in line order; for a batch of decode rows each
 * wte vector loaded serves up to LMH_MR of them. Against one sequential stream with 8 accumulators per
 * logit (kernel alone, paired, 2 threads, 124M): 1 row 4.4 -> 4.4 ms, 2 rows 5.8 -> 4.9, 8 rows 12.1 -> 5.4.
 * (6 vocabulary rows side by side cost a decode step ~4 %; 2 rows gave the 8-row batch less.) Threads take
 * whole tiles of LMH_TILE vocabulary rows, which stay in L2 while LMH_TC rows of inp pass over them.
 * Every logit's chain depends on C alone, so a row's logits are bitwise the same at any T, tiling or
 * thread count. */
#if LL_VBYTES >= 64
#define LMH_MR 8                 /* 8 x 3 accumulators + 3 wte vectors + 1 inp vector of 32 zmm */
#define LMH_NR 3
#else
#define LMH_MR 2                 /* 2 x 4 accumulators + 4 + 1 of 16 ymm / xmm */
#define LMH_NR 4
#endif
#define LMH_TILE (LMH_NR * 80)   /* 720 KB of wte at C = 768 (AVX-512) */
#define LMH_TC 32

/* logits[r, n] (row stride ldl) = dot(x[r], w[n]) for R rows of x and N rows of w, each C floats long. */
static inline __attribute__((always_inline)) void LL_FN(lm_head_tile)(
        int R, int N, float* logits, size_t ldl, const float* x, const float* w, int C, const float* prefetch) {
    vfloat acc[LMH_MR][LMH_NR];
    for (int r = 0; r < R; r++)
        for (int n = 0; n < N; n++) acc[r][n] = (vfloat){0};
    int i = 0;
    for (; i + LL_VLEN <= C; i += LL_VLEN) {
        vfloat wv[LMH_NR];
        if (prefetch)
            for (int n = 0; n < N; n++) __builtin_prefetch(prefetch + ((size_t)i * N + n * LL_VLEN), 0, 2);
        for (int n = 0; n < N; n++) wv[n] = vload(w + (size_t)n * C + i);
        for (int r = 0; r < R; r++) {
            const vfloat xv = vload(x + (size_t)r * C + i);
            for (int n = 0; n < N; n++) acc[r][n] += xv * wv[n];
        }
    }
    for (int r = 0; r < R; r++)
        for (int n = 0; n < N; n++) {
            float s = vsum(acc[r][n]);
            for (int j = i; j < C; j++) s += x[(size_t)r * C + j] * w[(size_t)n * C + j];
            logits[(size_t)r * ldl + n] = s;
        }
}

static void LL_FN(lm_head)(float* logits, const float* inp, const float* wte, int T, int C, int V) {
    const int tiles = (V + LMH_TILE - 1) / LMH_TILE;
    #pragma omp parallel for schedule(static)
    for (int tile = 0; tile < tiles; tile++) {
        const int v0 = tile * LMH_TILE, v1 = v0 + LMH_TILE < V ? v0 + LMH_TILE : V;
        for (int t0 = 0; t0 < T; t0 += LMH_TC) {   /* LMH_TC rows of inp stay in L2 with the tile */
            const int t1 = t0 + LMH_TC < T ? t0 + LMH_TC : T;
            int v = v0;
            for (; v + LMH_NR <= v1; v += LMH_NR) {   /* LMH_NR rows of wte in L1 while the rows pass */
                const float* w = wte + (size_t)v * C;
                /* The first pass over the tile fetches the next LMH_NR rows, in line order. */
                const float* next = t0 == 0 ? w + (size_t)LMH_NR * C : NULL;
                int t = t0;
                for (; t + LMH_MR <= t1; t += LMH_MR, next = NULL)
                    LL_FN(lm_head_tile)(LMH_MR, LMH_NR, logits + (size_t)t * V + v, V, inp + (size_t)t * C, w, C, next);
                float* lt = logits + (size_t)t * V + v;
                const float* xt = inp + (size_t)t * C;
                switch (t1 - t) {
#define LMH_CASE(R) case R: LL_FN(lm_head_tile)(R, LMH_NR, lt, V, xt, w, C, next); break;
                    LMH_CASE(1)
#if LMH_MR > 2
                    LMH_CASE(2) LMH_CASE(3)
#endif
#if LMH_MR > 4
                    LMH_CASE(4) LMH_CASE(5) LMH_CASE(6) LMH_CASE(7)
#endif
#undef LMH_CASE
                    default: break;
                }
            }
            for (; v < v1; v++)                       /* the last tile's last rows, one at a time */
                for (int t = t0; t < t1; t++)
                    LL_FN(lm_head_tile)(1, 1, logits + (size_t)t * V + v, V, inp + (size_t)t * C, wte + (size_t)v * C, C, NULL);
        }
    }
}

#undef LMH_MR
#undef LMH_NR
#undef LMH_TILE
#undef LMH_TC
