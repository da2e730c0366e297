/* Output projection tied to the token embedding.
 * logits [T, V] = inp [T, C] @ wte [V, C]^T: each logit is one dot product with a row of wte, read in
 * place (no transposed copy). Vocabulary rows are cut into fixed tiles that threads take whole; within
 * a tile LMH_ROWS rows run side by side: independent accumulations hide the FMA latency, and enough
 * streams are in flight to reach DRAM bandwidth for T = 1. */
#define LMH_TILE 256
#if LL_VBYTES >= 64
#define LMH_ROWS 16   /* vocabulary rows streamed side by side (2 threads, T = 1: 4 rows ~24-30 GB/s, 16 ~30-35) */
#else
#define LMH_ROWS 8    /* accumulators + x within 16 registers */
#endif

static void LL_FN(lm_head)(float* logits, const float* inp, const float* wte, int T, int C, int V) {
    const int tiles = (V + LMH_TILE - 1) / LMH_TILE;
    #pragma omp parallel for schedule(static)
    for (int tile = 0; tile < tiles; tile++) {
        const int v0 = tile * LMH_TILE;
        const int v1 = v0 + LMH_TILE < V ? v0 + LMH_TILE : V;
        for (int t = 0; t < T; t++) {
            const float* x = inp + (size_t)t * C;
            float* out = logits + (size_t)t * V;
            int v = v0;
            for (; v + LMH_ROWS <= v1; v += LMH_ROWS) {
                const float* w = wte + (size_t)v * C;
                vfloat acc[LMH_ROWS];
                for (int r = 0; r < LMH_ROWS; r++) acc[r] = (vfloat){0};
                int i = 0;
                for (; i + LL_VLEN <= C; i += LL_VLEN) {
                    const vfloat xv = vload(x + i);
                    for (int r = 0; r < LMH_ROWS; r++) acc[r] += xv * vload(w + (size_t)r * C + i);
                }
                for (int r = 0; r < LMH_ROWS; r++) {
                    float s = vsum(acc[r]);
                    for (int k = i; k < C; k++) s += x[k] * w[(size_t)r * C + k];
                    out[v + r] = s;
                }
            }
            for (; v < v1; v++) out[v] = dot(x, wte + (size_t)v * C, C);
        }
    }
}

#undef LMH_TILE
#undef LMH_ROWS
