/* Causal multi-head self-attention over the KV cache.
 * q of token t, head h = qkv [T, 3C] at columns [h*HS, (h+1)*HS); token t sits at position
 * p = start_pos + t and attends to cached positions 0..p of k_cache, v_cache [NH, maxT, HS].
 *   scores [NH, T, S] = q.k / sqrt(HS), -inf where s > p (optional, for tracing; may be NULL)
 *   probs  [NH, T, S] = softmax over s (max subtracted first), exactly 0 where s > p (optional: may be NULL)
 *   out    [T, C]     = sum_s probs * v, heads merged back side by side
 * (head, block of 4 tokens) pairs are split over threads. A row's every reduction runs in an order fixed by its own
 * length, so a token gets the same bits in a prompt pass as in a decode step:
 *   - q.k for LL_VLEN keys at once: lane partial sums per key, then one transpose-and-add tree turns the
 *     LL_VLEN accumulators into a vector of the LL_VLEN dot products (each key's lanes summed in the same
 *     tree order, whatever its slot), then any HS % LL_VLEN tail;
 *   - exp by the vector vexp, the sum over s in vector lanes then lane order;
 *   - probs @ v as vector accumulators over HS, one chain over s (4 rows share each load of v). */

/* Two-source shuffle masks of one step of the tree, for a block of w lanes: the first half of each block
 * takes lanes j and j + w/2 of the even vector, the second half those of the odd one. */
#define ATT_LO(j, w) ((j) % (w) < (w) / 2 ? (j) : LL_VLEN + (j) - (w) / 2)
#define ATT_HI(j, w) ((j) % (w) < (w) / 2 ? (j) + (w) / 2 : LL_VLEN + (j))
#define ATT_STEP(w)                                                                             \
    _Pragma("GCC unroll 8")                                                                     \
    for (int m = 0; m < n / 2; m++)                                                             \
        a[m] = LL_SHUFFLE(a[2 * m], a[2 * m + 1], LL_LANES(ATT_LO, w)) +                           \
               LL_SHUFFLE(a[2 * m], a[2 * m + 1], LL_LANES(ATT_HI, w));                           \
    n /= 2;

/* Lane L of the result = the sum of the lanes of a[bitrev(L)] (a is overwritten). */
static inline vfloat LL_FN(transpose_sum)(vfloat* a) {
    int n = LL_VLEN;
#if LL_VLEN >= 16
    ATT_STEP(16)
#endif
#if LL_VLEN >= 8
    ATT_STEP(8)
#endif
    ATT_STEP(4)
    ATT_STEP(2)
    return a[0];
}

/* i with its log2(LL_VLEN) bits reversed: the slot whose sum the tree leaves in lane i. */
static inline int LL_FN(bitrev)(int i) {
    int r = 0;
    for (int b = 1; b < LL_VLEN; b <<= 1) r = (r << 1) | ((i & b) != 0);
    return r;
}

/* q.k of keys s0 .. s0 + LL_VLEN - 1, lane L = key s0 + L. Keys past `last` read row `last` instead (in
 * bounds) and are to be ignored. NQ = HS / LL_VLEN vectors of q, preloaded in qv when NQ <= 8 (the
 * compiler unrolls a constant NQ: q stays in registers, one key row at a time); each key's lanes
 * accumulate over the vectors of HS in order either way. */
static inline __attribute__((always_inline)) vfloat LL_FN(att_scores)(
        int NQ, const vfloat* qv, const float* q, const float* k, int HS, int s0, int last) {
    vfloat acc[LL_VLEN];
    #pragma GCC unroll 16
    for (int i = 0; i < LL_VLEN; i++) {   /* unrolled: acc stays in registers, bitrev(i) a constant */
        const int s = s0 + LL_FN(bitrev)(i);
        const float* row = k + (size_t)(s <= last ? s : last) * HS;
        vfloat a = {0};
        for (int c = 0; c < NQ; c++) a += (NQ <= 8 ? qv[c] : vload(q + c * LL_VLEN)) * vload(row + c * LL_VLEN);
        acc[i] = a;
    }
    vfloat sum = LL_FN(transpose_sum)(acc);
    for (int d = NQ * LL_VLEN; d < HS; d++) {
        vfloat kd;
        for (int L = 0; L < LL_VLEN; L++) {
            const int s = s0 + L;
            kd[L] = k[(size_t)(s <= last ? s : last) * HS + d];
        }
        sum += vsplat(q[d]) * kd;
    }
    return sum;
}

/* Row p [S] of probs for query q at position last: scores (copied to sc when tracing), softmax, zeros
 * past last. */
static inline __attribute__((always_inline)) void LL_FN(att_probs)(
        int NQ, float* p, float* sc, const float* q, const float* k, int HS, int last, int S, float scale) {
    const int n = last + 1;
    float buf[LL_VLEN];
    vfloat qv[8];
    for (int c = 0; c < NQ && c < 8; c++) qv[c] = vload(q + c * LL_VLEN);

    /* scores, and their max */
    vfloat vmax = vsplat(-INFINITY);
    int s = 0;
    for (; s + LL_VLEN <= n; s += LL_VLEN) {
        const vfloat x = LL_FN(att_scores)(NQ, qv, q, k, HS, s, last) * vsplat(scale);
        vstore(p + s, x);
        vmax = vselect(x > vmax, x, vmax);
    }
    float maxv = -INFINITY;
    for (int i = 0; i < LL_VLEN; i++) maxv = vmax[i] > maxv ? vmax[i] : maxv;
    if (s < n) {
        vstore(buf, LL_FN(att_scores)(NQ, qv, q, k, HS, s, last) * vsplat(scale));
        for (int i = 0; i < n - s; i++) { p[s + i] = buf[i]; maxv = buf[i] > maxv ? buf[i] : maxv; }
    }
    if (sc) {
        memcpy(sc, p, n * sizeof(float));
        for (int i = n; i < S; i++) sc[i] = -INFINITY;
    }

    /* softmax: exp(score - max), summed in lanes then in lane order, then the tail */
    const vfloat vm = vsplat(maxv);
    vfloat vs = {0};
    for (s = 0; s + LL_VLEN <= n; s += LL_VLEN) {
        const vfloat e = vexp(vload(p + s) - vm);
        vstore(p + s, e);
        vs += e;
    }
    float sum = vsum(vs);
    if (s < n) {
        for (int i = 0; i < LL_VLEN; i++) buf[i] = s + i < n ? p[s + i] : maxv;
        vstore(buf, vexp(vload(buf) - vm));
        for (int i = 0; i < n - s; i++) { p[s + i] = buf[i]; sum += buf[i]; }
    }
    const vfloat inv = vsplat(1.0f / sum);
    for (s = 0; s + LL_VLEN <= n; s += LL_VLEN) vstore(p + s, vload(p + s) * inv);
    for (; s < n; s++) p[s] *= inv[0];
    for (; s < S; s++) p[s] = 0.0f;
}

/* att_probs with NQ made a constant for the head sizes of GPT-2 (64) on AVX-512 and AVX2, so that the
 * compiler unrolls them; any other head size takes the general loop. */
static inline void LL_FN(att_probs_row)(int NQ, float* p, float* sc, const float* q, const float* k, int HS,
                                        int last, int S, float scale) {
    switch (NQ) {
        case 4: LL_FN(att_probs)(4, p, sc, q, k, HS, last, S, scale); break;
        case 8: LL_FN(att_probs)(8, p, sc, q, k, HS, last, S, scale); break;
        default: LL_FN(att_probs)(NQ, p, sc, q, k, HS, last, S, scale);
    }
}

#if LL_VBYTES >= 64
#define ATT_PV_NV 4      /* 4 rows x 4 vectors: 16 accumulators */
#else
#define ATT_PV_NV 2      /* 4 rows x 2 vectors: 8 accumulators */
#endif
#define ATT_ROWS 4       /* query rows sharing each load of v */

/* o_r[0 .. NV vectors) = sum over s < n0 + r of p_r[s] v[s, same columns] for rows r < R (row r attends
 * to one more position than row r - 1). Each output is one chain over s; the rows share the loads of v
 * while all of them still run, then each finishes alone. */
static inline __attribute__((always_inline)) void LL_FN(att_pv)(
        int R, int NV, float* o, int ldo, const float* p, int ldp, const float* v, int n0, int HS) {
    vfloat acc[ATT_ROWS][ATT_PV_NV];
    for (int r = 0; r < R; r++)
        for (int i = 0; i < NV; i++) acc[r][i] = (vfloat){0};
    for (int s = 0; s < n0; s++) {
        vfloat vv[ATT_PV_NV];
        for (int i = 0; i < NV; i++) vv[i] = vload(v + (size_t)s * HS + i * LL_VLEN);
        for (int r = 0; r < R; r++) {
            const vfloat w = vsplat(p[(size_t)r * ldp + s]);
            for (int i = 0; i < NV; i++) acc[r][i] += w * vv[i];
        }
    }
    for (int r = 1; r < R; r++)
        for (int s = n0; s < n0 + r; s++) {
            const vfloat w = vsplat(p[(size_t)r * ldp + s]);
            for (int i = 0; i < NV; i++) acc[r][i] += w * vload(v + (size_t)s * HS + i * LL_VLEN);
        }
    for (int r = 0; r < R; r++)
        for (int i = 0; i < NV; i++) vstore(o + (size_t)r * ldo + i * LL_VLEN, acc[r][i]);
}

static inline __attribute__((always_inline)) void LL_FN(att_pv_rows)(
        int R, float* o, int ldo, const float* p, int ldp, const float* v, int n0, int HS) {
    int d = 0;
    for (; d + ATT_PV_NV * LL_VLEN <= HS; d += ATT_PV_NV * LL_VLEN)
        LL_FN(att_pv)(R, ATT_PV_NV, o + d, ldo, p, ldp, v + d, n0, HS);
    for (; d + LL_VLEN <= HS; d += LL_VLEN) LL_FN(att_pv)(R, 1, o + d, ldo, p, ldp, v + d, n0, HS);
    for (; d < HS; d++)
        for (int r = 0; r < R; r++) {
            float acc = 0.0f;
            for (int s = 0; s < n0 + r; s++) acc += p[(size_t)r * ldp + s] * v[(size_t)s * HS + d];
            o[(size_t)r * ldo + d] = acc;
        }
}

static void LL_FN(attention)(float* out, float* scores, float* probs, const float* qkv,
                             const float* k_cache, const float* v_cache,
                             int T, int C, int NH, int start_pos, int maxT) {
    const int HS = C / NH, NQ = HS / LL_VLEN;
    const int S = start_pos + T;
    const float scale = 1.0f / sqrtf((float)HS);
    const int blocks = (T + ATT_ROWS - 1) / ATT_ROWS;
    #pragma omp parallel if ((size_t)NH * T * S * HS > 16384)
    {
    /* Without probs (no trace), each thread keeps the rows of its block in its own scratch: no [NH, T, S]
     * buffer, which a 1024-token pass would need 48 MB for at 124M. */
    float* scratch = probs ? NULL : (float*)malloc((size_t)ATT_ROWS * S * sizeof(float));
    if (!probs && !scratch) abort();
    #pragma omp for collapse(2) schedule(static)
    for (int h = 0; h < NH; h++) {
        for (int b = 0; b < blocks; b++) {
            const int t0 = b * ATT_ROWS, R = T - t0 < ATT_ROWS ? T - t0 : ATT_ROWS;
            const float* k = k_cache + (size_t)h * maxT * HS;
            float* p = probs ? probs + ((size_t)h * T + t0) * S : scratch;
            for (int r = 0; r < R; r++) {
                const float* q = qkv + (size_t)(t0 + r) * 3 * C + h * HS;
                float* sc = scores ? scores + ((size_t)h * T + t0 + r) * S : NULL;
                LL_FN(att_probs_row)(NQ, p + (size_t)r * S, sc, q, k, HS, start_pos + t0 + r, S, scale);
            }
            float* o = out + (size_t)t0 * C + h * HS;
            const float* v = v_cache + (size_t)h * maxT * HS;
            const int n0 = start_pos + t0 + 1;
            switch (R) {
                case 4: LL_FN(att_pv_rows)(4, o, C, p, S, v, n0, HS); break;
                case 3: LL_FN(att_pv_rows)(3, o, C, p, S, v, n0, HS); break;
                case 2: LL_FN(att_pv_rows)(2, o, C, p, S, v, n0, HS); break;
                default: LL_FN(att_pv_rows)(1, o, C, p, S, v, n0, HS); break;
            }
        }
    }
    free(scratch);
    }
}

#undef ATT_PV_NV
#undef ATT_ROWS
#undef ATT_LO
#undef ATT_HI
#undef ATT_STEP
