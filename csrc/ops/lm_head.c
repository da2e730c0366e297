/* Output projection tied to the token embedding.
 * logits [T, V] = inp [T, C] @ wte [V, C]^T: each logit is one dot product with a row of wte, read in
 * place (no transposed copy). Vocabulary rows are cut into fixed tiles that threads take whole.
 *
 * One row at a time, so each thread reads wte as a single sequential stream: at T = 1 (decode) this is a
 * pure read of 154 MB, and one stream per thread reached ~50-57 GB/s on 2 threads where 16 rows side by
 * side (16 short interleaved streams) reached ~31-35 and 2-4 rows ~19-23. LMH_ACC accumulators per row
 * hide the FMA latency; each logit's sum runs in an order fixed by C alone. */
#define LMH_TILE 256
#define LMH_ACC 8

/* x . w over C floats: LMH_ACC vector accumulators over blocks of LMH_ACC vectors, added in order, then
 * the remaining vectors, the lanes (vsum) and the remaining floats. */
static inline float LL_FN(lm_head_dot)(const float* x, const float* w, int C) {
    vfloat acc[LMH_ACC];
    for (int a = 0; a < LMH_ACC; a++) acc[a] = (vfloat){0};
    int i = 0;
    for (; i + LMH_ACC * LL_VLEN <= C; i += LMH_ACC * LL_VLEN)
        for (int a = 0; a < LMH_ACC; a++) acc[a] += vload(x + i + a * LL_VLEN) * vload(w + i + a * LL_VLEN);
    vfloat t = acc[0];
    for (int a = 1; a < LMH_ACC; a++) t += acc[a];
    for (; i + LL_VLEN <= C; i += LL_VLEN) t += vload(x + i) * vload(w + i);
    float s = vsum(t);
    for (; i < C; i++) s += x[i] * w[i];
    return s;
}

static void LL_FN(lm_head)(float* logits, const float* inp, const float* wte, int T, int C, int V) {
    const int tiles = (V + LMH_TILE - 1) / LMH_TILE;
    #pragma omp parallel for schedule(static)
    for (int tile = 0; tile < tiles; tile++) {
        const int v0 = tile * LMH_TILE;
        const int v1 = v0 + LMH_TILE < V ? v0 + LMH_TILE : V;
        for (int t = 0; t < T; t++)   /* rows after the first find the tile in L2 */
            for (int v = v0; v < v1; v++)
                logits[(size_t)t * V + v] = LL_FN(lm_head_dot)(inp + (size_t)t * C, wte + (size_t)v * C, C);
    }
}

#undef LMH_TILE
#undef LMH_ACC
