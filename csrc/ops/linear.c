/* Linear layer with fused bias, HF Conv1D layout.
 * out [T, OC] = inp [T, C] @ weight [C, OC] + bias [OC]   (bias may be NULL)
 *
 * Output columns are cut into fixed tiles of LIN_TILE; threads take whole tiles. Inside a tile, rows go
 * LIN_ROWS at a time through a register-blocked kernel: per input channel c it loads one row slice of
 * weight and broadcasts each row's inp[t, c]. Every output accumulates over c = 0..C-1 in order, so its
 * bits depend on neither the thread count nor the row blocking. One token (T = 1) is the GEMV of decode;
 * many tokens reuse each weight slice LIN_ROWS times from cache (prefill). */
#if LL_VBYTES >= 64
#define LIN_NV 4                 /* vectors per tile: 4 x 16 floats, 16 accumulators of 32 zmm */
#else
#define LIN_NV 2                 /* 16 ymm / xmm registers: 8 accumulators */
#endif
#define LIN_TILE (LIN_NV * LL_VLEN)
#define LIN_ROWS 4

static inline __attribute__((always_inline)) void LL_FN(linear_rows)(
        int R, float* out, const float* inp, const float* weight, const float* bias,
        int C, int OC, int j) {
    vfloat acc[LIN_ROWS][LIN_NV];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < LIN_NV; v++)
            acc[r][v] = bias ? vload(bias + j + v * LL_VLEN) : (vfloat){0};
    for (int c = 0; c < C; c++) {
        const float* w = weight + (size_t)c * OC + j;
        vfloat wv[LIN_NV];
        for (int v = 0; v < LIN_NV; v++) wv[v] = vload(w + v * LL_VLEN);
        for (int r = 0; r < R; r++) {
            const vfloat x = vsplat(inp[(size_t)r * C + c]);
            for (int v = 0; v < LIN_NV; v++) acc[r][v] += x * wv[v];
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < LIN_NV; v++) vstore(out + (size_t)r * OC + j + v * LL_VLEN, acc[r][v]);
}

/* The columns past the last full tile, one at a time, same order over c. */
static void LL_FN(linear_tail)(float* out, const float* inp, const float* weight, const float* bias,
                               int T, int C, int OC, int j0) {
    for (int t = 0; t < T; t++)
        for (int j = j0; j < OC; j++) {
            float s = bias ? bias[j] : 0.0f;
            for (int c = 0; c < C; c++) s += inp[(size_t)t * C + c] * weight[(size_t)c * OC + j];
            out[(size_t)t * OC + j] = s;
        }
}

static void LL_FN(linear)(float* out, const float* inp, const float* weight, const float* bias,
                          int T, int C, int OC) {
    const int tiles = OC / LIN_TILE;
    #pragma omp parallel for schedule(static)
    for (int tile = 0; tile < tiles; tile++) {
        const int j = tile * LIN_TILE;
        int t = 0;
        for (; t + LIN_ROWS <= T; t += LIN_ROWS)
            LL_FN(linear_rows)(LIN_ROWS, out + (size_t)t * OC, inp + (size_t)t * C, weight, bias, C, OC, j);
        switch (T - t) {
            case 3: LL_FN(linear_rows)(3, out + (size_t)t * OC, inp + (size_t)t * C, weight, bias, C, OC, j); break;
            case 2: LL_FN(linear_rows)(2, out + (size_t)t * OC, inp + (size_t)t * C, weight, bias, C, OC, j); break;
            case 1: LL_FN(linear_rows)(1, out + (size_t)t * OC, inp + (size_t)t * C, weight, bias, C, OC, j); break;
            default: break;
        }
    }
    if (tiles * LIN_TILE < OC) LL_FN(linear_tail)(out, inp, weight, bias, T, C, OC, tiles * LIN_TILE);
}

#undef LIN_NV
#undef LIN_TILE
#undef LIN_ROWS
