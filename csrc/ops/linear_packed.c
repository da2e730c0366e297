/* Linear layer on weights repacked once at load into column panels: the decode GEMV's layout.
 *   pack_linear:   packed [C * OC] = weight [C, OC] (HF Conv1D layout) cut into panels of LL_PANEL columns,
 *                  panel p = columns [p LL_PANEL, p LL_PANEL + w) stored as [C][w] at offset p LL_PANEL C
 *                  (w = LL_PANEL except for a narrower last panel).
 *   linear_packed: out [T, OC] = inp [T, C] @ weight + bias, reading packed.
 *
 * Why: in the [C, OC] layout a thread that owns a column range reads a short run of every row; in panels it
 * reads one contiguous stream (measured at 2 threads, T = 1: 768x3072 ~31 -> ~37 GB/s, 3072x768 ~24 -> ~34
 * GB/s), and the prefill GEMM needs no per-call packing. LL_PANEL is the same for every SIMD level, so a
 * model packed once runs on any path.
 *
 * Each output is the same chain as in linear.c: acc = bias[j] (or 0), then acc += inp[t, c] * w[c, j] for
 * c = 0..C-1 in order. So linear_packed gives bitwise the output of linear, for any T, row blocking and
 * thread count (threads own whole panels). */
#define LP_MR 6                  /* GEMM rows: x LP_NR vectors, 24 zmm (AVX-512) or 12 ymm / xmm accumulators */
#if LL_VBYTES >= 64
#define LP_NR 4                  /* GEMM width in vectors: a whole 64-column panel row */
#define LP_PANELS 2              /* GEMV: two panels streamed side by side (8 accumulators) */
#else
#define LP_NR 2
#define LP_PANELS 1              /* one panel: 8 ymm / 16 xmm accumulators */
#endif
#define LP_NV (LL_PANEL / LL_VLEN)  /* vectors per panel row */
#define LP_KC 256                /* GEMM: channels per block; a panel block is 64 KB (L2) */
#define LP_AHEAD 64             /* GEMM: channels (16 KB of a panel) between the row read and the row fetched */

/* Rows of weight are read in order (one pass over the mapped file, split over threads by rows); each
 * row's columns go to their panels. */
static void LL_FN(pack_linear)(float* packed, const float* weight, int C, int OC) {
    const int full = OC / LL_PANEL, tail = OC - full * LL_PANEL;
    #pragma omp parallel for schedule(static) if ((size_t)C * OC > 65536)
    for (int c = 0; c < C; c++) {
        const float* src = weight + (size_t)c * OC;
        for (int p = 0; p < full; p++)
            memcpy(packed + ((size_t)p * C + c) * LL_PANEL, src + p * LL_PANEL, LL_PANEL * sizeof(float));
        if (tail)
            memcpy(packed + (size_t)full * LL_PANEL * C + (size_t)c * tail, src + full * LL_PANEL, tail * sizeof(float));
    }
}

/* A narrower last panel (w < LL_PANEL columns at j0), every row: whole vectors, then single columns,
 * exactly where linear.c switches from vectors to its scalar tail (the two need not round alike). */
static void LL_FN(linear_packed_tail)(float* out, const float* inp, const float* panel, const float* bias,
                                      int T, int C, int OC, int j0, int w) {
    const int wv = w / LL_VLEN * LL_VLEN;
    for (int t = 0; t < T; t++) {
        const float* x = inp + (size_t)t * C;
        for (int j = 0; j < wv; j += LL_VLEN) {
            vfloat acc = bias ? vload(bias + j0 + j) : (vfloat){0};
            for (int c = 0; c < C; c++) acc += vsplat(x[c]) * vload(panel + (size_t)c * w + j);
            vstore(out + (size_t)t * OC + j0 + j, acc);
        }
        for (int j = wv; j < w; j++) {
            float s = bias ? bias[j0 + j] : 0.0f;
            for (int c = 0; c < C; c++) s += x[c] * panel[(size_t)c * w + j];
            out[(size_t)t * OC + j0 + j] = s;
        }
    }
}

/* ---- GEMV (T = 1, decode): NP full panels side by side for the row x, accumulators in registers ---- */

static inline __attribute__((always_inline)) void LL_FN(gemv_panels)(
        int NP, float* out, const float* x, const float* panel, const float* bias, int C) {
    vfloat acc[LP_PANELS][LP_NV];
    for (int q = 0; q < NP; q++)
        for (int v = 0; v < LP_NV; v++)
            acc[q][v] = bias ? vload(bias + q * LL_PANEL + v * LL_VLEN) : (vfloat){0};
    for (int c = 0; c < C; c++) {
        const vfloat xv = vsplat(x[c]);
        for (int q = 0; q < NP; q++) {
            const float* w = panel + ((size_t)q * C + c) * LL_PANEL;
            for (int v = 0; v < LP_NV; v++) acc[q][v] += xv * vload(w + v * LL_VLEN);
        }
    }
    for (int q = 0; q < NP; q++)
        for (int v = 0; v < LP_NV; v++) vstore(out + q * LL_PANEL + v * LL_VLEN, acc[q][v]);
}

static void LL_FN(linear_packed_gemv)(float* out, const float* x, const float* packed, const float* bias,
                                      int C, int OC) {
    const int full = OC / LL_PANEL;
    #pragma omp parallel if ((size_t)C * OC >= 32768)
    {
        int lo, hi;
        ll_share((full + LP_PANELS - 1) / LP_PANELS, &lo, &hi);   /* in groups of LP_PANELS panels */
        lo *= LP_PANELS;
        hi = hi * LP_PANELS < full ? hi * LP_PANELS : full;
        for (int p = lo; p < hi; p += LP_PANELS) {
            const int np = hi - p < LP_PANELS ? hi - p : LP_PANELS;
            const float* panel = packed + (size_t)p * LL_PANEL * C;
            const float* b = bias ? bias + p * LL_PANEL : NULL;
            float* o = out + p * LL_PANEL;
            if (np == LP_PANELS) LL_FN(gemv_panels)(LP_PANELS, o, x, panel, b, C);
            else for (int q = 0; q < np; q++)
                LL_FN(gemv_panels)(1, o + q * LL_PANEL, x, panel + (size_t)q * LL_PANEL * C,
                                   b ? b + q * LL_PANEL : NULL, C);
        }
    }
}

/* ---- GEMM (T >= 2): LP_MR rows x LP_NR vectors, straight from the panel ---- */

static void LL_FN(linear_packed_gemm)(float* out, const float* inp, const float* packed, const float* bias,
                                      int T, int C, int OC) {
    const int full = OC / LL_PANEL;
    #pragma omp parallel
    {
        int lo, hi;
        ll_share(full, &lo, &hi);
        for (int p = lo; p < hi; p++) {
            const float* panel = packed + (size_t)p * LL_PANEL * C;
            for (int k0 = 0; k0 == 0 || k0 < C; k0 += LP_KC) {   /* C = 0: the bias alone */
                const int K = C - k0 < LP_KC ? C - k0 : LP_KC;
                for (int j = 0; j < LL_PANEL; j += LP_NR * LL_VLEN) {
                    const int col = p * LL_PANEL + j;
                    const float* b = panel + (size_t)k0 * LL_PANEL + j;
                    const float* bb = bias ? bias + col : NULL;
                    /* The first row block also fetches the stream LP_AHEAD channels ahead (the rest of
                     * this panel, then the next: they follow in memory), so the DRAM reads overlap its
                     * FMAs; the later row blocks find the block in L1/L2. */
                    const float* ahead = j == 0 ? b + (size_t)LP_AHEAD * LL_PANEL : NULL;
                    int t = 0;
                    for (; t + LP_MR <= T; t += LP_MR)
                        gemm_micro(LP_MR, LP_NR, K, inp + (size_t)t * C + k0, C, b, LL_PANEL,
                                   out + (size_t)t * OC + col, OC, bb, k0 == 0, t == 0 ? ahead : NULL);
                    const float* at = inp + (size_t)t * C + k0;
                    float* ot = out + (size_t)t * OC + col;
                    const float* pf = t == 0 ? ahead : NULL;
                    switch (T - t) {
#define LP_CASE(R) case R: gemm_micro(R, LP_NR, K, at, C, b, LL_PANEL, ot, OC, bb, k0 == 0, pf); break;
                        LP_CASE(1) LP_CASE(2) LP_CASE(3)
#if LP_MR > 4
                        LP_CASE(4) LP_CASE(5)
#endif
#undef LP_CASE
                        default: break;
                    }
                }
            }
        }
    }
}

static void LL_FN(linear_packed)(float* out, const float* inp, const float* packed, const float* bias,
                                 int T, int C, int OC) {
    if (T == 1)
        LL_FN(linear_packed_gemv)(out, inp, packed, bias, C, OC);
    else
        LL_FN(linear_packed_gemm)(out, inp, packed, bias, T, C, OC);
    const int j0 = OC / LL_PANEL * LL_PANEL;
    if (j0 < OC)
        LL_FN(linear_packed_tail)(out, inp, packed + (size_t)j0 * C, bias, T, C, OC, j0, OC - j0);
}

#undef LP_MR
#undef LP_PANELS
#undef LP_NV
#undef LP_NR
#undef LP_KC
#undef LP_AHEAD
