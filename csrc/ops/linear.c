/* Linear layer with fused bias, HF Conv1D layout.
 * out [T, OC] = inp [T, C] @ weight [C, OC] + bias [OC]   (bias may be NULL)
 *
 * Every output is one chain: acc = bias[j] (or 0), then acc += inp[t, c] * weight[c, j] for c = 0..C-1 in
 * order (one fused multiply-add per step where the ISA has FMA). Both paths below and the scalar column
 * tail compute exactly that chain, so an output's bits depend on neither T, nor the row blocking, nor the
 * thread count (threads own disjoint columns). Partial sums may rest in `out` between blocks of c: a
 * float32 store and reload is exact.
 *
 * - T < LIN_GEMM_T (decode, small batches): GEMV. Each thread streams its contiguous column range of
 *   weight, LIN_GEMV_G rows at a time, the T rows of accumulators kept in `out` (L1/L2). Weights are read
 *   once, in contiguous runs; many rows in flight keep enough misses outstanding to reach DRAM bandwidth.
 * - T >= LIN_GEMM_T (prefill): blocked GEMM. For each block of LIN_KC input channels a thread packs a
 *   LIN_KC x LIN_NR panel of weight contiguously (stack, L1) and runs an LIN_MR x LIN_NR register-blocked
 *   microkernel down all T rows (inp's block stays in L2). */
#if LL_VBYTES >= 64
#define LIN_MR 8                 /* 8 rows x 3 vectors: 24 accumulators of 32 zmm */
#define LIN_NV 3
#else
#define LIN_MR 6                 /* 6 rows x 2 vectors: 12 accumulators of 16 ymm / xmm */
#define LIN_NV 2
#endif
#define LIN_NR (LIN_NV * LL_VLEN)
#define LIN_KC 256               /* panel LIN_KC x LIN_NR floats: 48 KB (AVX-512, L2), 16 KB (AVX2) */
#define LIN_GEMM_T 8
#define LIN_GEMV_G 16            /* GEMV weight rows in flight: at 2 threads 4 rows gave ~25 % less */
#define LIN_GEMV_CH 4096         /* GEMV columns per pass: T x 16 KB of accumulators (L1/L2) */
#define LIN_PAR_MIN 32768        /* C * OC * T below this: one thread (a parallel region costs ~us) */

/* Columns [j0, OC) that do not fill a vector, one at a time (the same chain, scalar). */
static void LL_FN(linear_tail)(float* out, const float* inp, const float* weight, const float* bias,
                               int T, int C, int OC, int j0) {
    for (int t = 0; t < T; t++)
        for (int j = j0; j < OC; j++) {
            float s = bias ? bias[j] : 0.0f;
            for (int c = 0; c < C; c++) s += inp[(size_t)t * C + c] * weight[(size_t)c * OC + j];
            out[(size_t)t * OC + j] = s;
        }
}

/* ---- GEMV: R = 1..LIN_GEMM_T-1 rows, columns [j0, j1) (whole vectors) ---- */

static inline __attribute__((always_inline)) void LL_FN(gemv_rows)(
        int R, float* out, const float* inp, const float* weight, const float* bias,
        int C, int OC, int j0, int j1) {
    for (int r = 0; r < R; r++)
        for (int j = j0; j < j1; j += LL_VLEN)
            vstore(out + (size_t)r * OC + j, bias ? vload(bias + j) : (vfloat){0});
    int c = 0;
    for (; c + LIN_GEMV_G <= C; c += LIN_GEMV_G) {
        const float* w = weight + (size_t)c * OC;
        vfloat x[LIN_GEMM_T][LIN_GEMV_G];
        for (int r = 0; r < R; r++)
            for (int k = 0; k < LIN_GEMV_G; k++) x[r][k] = vsplat(inp[(size_t)r * C + c + k]);
        for (int j = j0; j < j1; j += LL_VLEN) {
            vfloat wv[LIN_GEMV_G];
            for (int k = 0; k < LIN_GEMV_G; k++) wv[k] = vload(w + (size_t)k * OC + j);
            for (int r = 0; r < R; r++) {
                float* o = out + (size_t)r * OC + j;
                vfloat acc = vload(o);
                for (int k = 0; k < LIN_GEMV_G; k++) acc += x[r][k] * wv[k];
                vstore(o, acc);
            }
        }
    }
    for (; c < C; c++) {
        const float* w = weight + (size_t)c * OC;
        for (int r = 0; r < R; r++) {
            const vfloat x = vsplat(inp[(size_t)r * C + c]);
            for (int j = j0; j < j1; j += LL_VLEN) {
                float* o = out + (size_t)r * OC + j;
                vstore(o, vload(o) + x * vload(w + j));
            }
        }
    }
}

static void LL_FN(linear_gemv)(float* out, const float* inp, const float* weight, const float* bias,
                               int T, int C, int OC) {
    const int nvec = OC / LL_VLEN;
    #pragma omp parallel if ((size_t)C * OC * T >= LIN_PAR_MIN)
    {
        int lo, hi;
        ll_share(nvec, &lo, &hi);
        for (int j0 = lo * LL_VLEN; j0 < hi * LL_VLEN; j0 += LIN_GEMV_CH) {
            const int j1 = j0 + LIN_GEMV_CH < hi * LL_VLEN ? j0 + LIN_GEMV_CH : hi * LL_VLEN;
            switch (T) {
#define LIN_GEMV_CASE(R) case R: LL_FN(gemv_rows)(R, out, inp, weight, bias, C, OC, j0, j1); break;
                LIN_GEMV_CASE(1) LIN_GEMV_CASE(2) LIN_GEMV_CASE(3) LIN_GEMV_CASE(4)
                LIN_GEMV_CASE(5) LIN_GEMV_CASE(6) LIN_GEMV_CASE(7)
#undef LIN_GEMV_CASE
                default: break;
            }
        }
    }
}

/* ---- GEMM: packed weight panels, LIN_MR x LIN_NR microkernel ---- */

/* All T rows through one panel: full LIN_MR blocks, then the rest (each R a separately unrolled copy). */
static inline __attribute__((always_inline)) void LL_FN(gemm_panel)(
        int NV, int T, int K, const float* a, int C, const float* bp, float* out, int OC,
        const float* bias, int first) {
    int t = 0;
    for (; t + LIN_MR <= T; t += LIN_MR)
        gemm_micro(LIN_MR, NV, K, a + (size_t)t * C, C, bp, LIN_NR, out + (size_t)t * OC, OC, bias, first, NULL);
    const float* at = a + (size_t)t * C;
    float* ot = out + (size_t)t * OC;
    switch (T - t) {
#define LIN_GEMM_CASE(R) case R: gemm_micro(R, NV, K, at, C, bp, LIN_NR, ot, OC, bias, first, NULL); break;
        LIN_GEMM_CASE(1) LIN_GEMM_CASE(2) LIN_GEMM_CASE(3) LIN_GEMM_CASE(4) LIN_GEMM_CASE(5)
#if LIN_MR > 7
        LIN_GEMM_CASE(6) LIN_GEMM_CASE(7)
#endif
#undef LIN_GEMM_CASE
        default: break;
    }
}

static void LL_FN(linear_gemm)(float* out, const float* inp, const float* weight, const float* bias,
                               int T, int C, int OC) {
    const int nvec = OC / LL_VLEN;
    const int tiles = (nvec + LIN_NV - 1) / LIN_NV;       /* the last one may be narrower */
    #pragma omp parallel
    {
        float bp[LIN_KC * LIN_NR] __attribute__((aligned(64)));
        int lo, hi;
        ll_share(tiles, &lo, &hi);
        for (int k0 = 0; k0 == 0 || k0 < C; k0 += LIN_KC) {   /* C = 0: the bias alone */
            const int K = C - k0 < LIN_KC ? C - k0 : LIN_KC;
            for (int tile = lo; tile < hi; tile++) {
                const int j = tile * LIN_NR;
                const int nv = nvec - tile * LIN_NV < LIN_NV ? nvec - tile * LIN_NV : LIN_NV;
                for (int k = 0; k < K; k++) {
                    const float* w = weight + (size_t)(k0 + k) * OC + j;
                    memcpy(bp + (size_t)k * LIN_NR, w, nv * LL_VBYTES);
                    /* The next tile's rows: strided, so the hardware will not fetch them ahead; they
                     * arrive while this panel's microkernels run. */
                    if (tile + 1 < hi)
                        for (int line = 0; line < LIN_NR * 4; line += 64) __builtin_prefetch(w + LIN_NR + line / 4, 0, 2);
                }
                const float* b = bias ? bias + j : NULL;
                if (nv == LIN_NV)
                    LL_FN(gemm_panel)(LIN_NV, T, K, inp + k0, C, bp, out + j, OC, b, k0 == 0);
                else
                    for (int v = 0; v < nv; v++)     /* a narrow last tile: one vector at a time */
                        LL_FN(gemm_panel)(1, T, K, inp + k0, C, bp + v * LL_VLEN, out + j + v * LL_VLEN, OC,
                                          b ? b + v * LL_VLEN : NULL, k0 == 0);
            }
        }
    }
}

static void LL_FN(linear)(float* out, const float* inp, const float* weight, const float* bias,
                          int T, int C, int OC) {
    if (T < LIN_GEMM_T)
        LL_FN(linear_gemv)(out, inp, weight, bias, T, C, OC);
    else
        LL_FN(linear_gemm)(out, inp, weight, bias, T, C, OC);
    const int j0 = OC / LL_VLEN * LL_VLEN;
    if (j0 < OC) LL_FN(linear_tail)(out, inp, weight, bias, T, C, OC, j0);
}

#undef LIN_MR
#undef LIN_NV
#undef LIN_NR
#undef LIN_KC
#undef LIN_GEMM_T
#undef LIN_GEMV_CH
#undef LIN_GEMV_G
#undef LIN_PAR_MIN
