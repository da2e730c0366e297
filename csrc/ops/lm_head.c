/* Output projection tied to the token embedding.
 * logits [T, V] = inp [T, C] @ wte [V, C]^T: each logit is one dot product with a row of wte, read in
 * place (no transposed copy). Vocabulary rows are cut into fixed tiles that threads take whole; within
 * a tile four rows run side by side so four independent accumulations hide the FMA latency. */
#define LMH_TILE 256

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
            for (; v + 4 <= v1; v += 4) {
                const float* w0 = wte + (size_t)v * C;
                vfloat a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                int i = 0;
                for (; i + LL_VLEN <= C; i += LL_VLEN) {
                    const vfloat xv = vload(x + i);
                    a0 += xv * vload(w0 + i);
                    a1 += xv * vload(w0 + C + i);
                    a2 += xv * vload(w0 + 2 * (size_t)C + i);
                    a3 += xv * vload(w0 + 3 * (size_t)C + i);
                }
                float s0 = vsum(a0), s1 = vsum(a1), s2 = vsum(a2), s3 = vsum(a3);
                for (; i < C; i++) {
                    s0 += x[i] * w0[i];
                    s1 += x[i] * w0[C + i];
                    s2 += x[i] * w0[2 * (size_t)C + i];
                    s3 += x[i] * w0[3 * (size_t)C + i];
                }
                out[v] = s0; out[v + 1] = s1; out[v + 2] = s2; out[v + 3] = s3;
            }
            for (; v < v1; v++) out[v] = dot(x, wte + (size_t)v * C, C);
        }
    }
}

#undef LMH_TILE
