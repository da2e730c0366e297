/* One decode step of B sequences, each with its own KV cache: kv_write and attention for a pass of T = 1,
 * for all of them in one parallel region.
 * qkv [B, 3C]: row b is sequence b's new token, at position pos[b]; its k and v go into k_caches[b],
 * v_caches[b] [NH, maxT, HS] at pos[b], and out [B, C] row b = its attention over positions 0..pos[b].
 * Each (row, head) runs the very functions attention.c runs for a one-token pass (att_probs_row,
 * att_pv_rows with one row), so a row gets bitwise what its sequence gets alone; (row, head) pairs are split over
 * threads, each with a row of softmax scratch. Why: decode_batch would otherwise make 2 B calls per layer. */
static void LL_FN(decode_attention)(float* out, const float* qkv, float* const* k_caches, float* const* v_caches,
                                    const int* pos, int B, int C, int NH, int maxT) {
    const int HS = C / NH, NQ = HS / LL_VLEN;
    const float scale = 1.0f / sqrtf((float)HS);
    size_t work = 0;   /* the cached rows all the heads read: a parallel region pays from ~16 K floats */
    for (int b = 0; b < B; b++) work += (size_t)(pos[b] + 1) * NH * HS;
    #pragma omp parallel if (work > 16384)
    {
    float* p = (float*)malloc((size_t)maxT * sizeof(float));
    if (!p) abort();
    #pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float* row = qkv + (size_t)b * 3 * C;
            float* k = k_caches[b] + (size_t)h * maxT * HS;
            float* v = v_caches[b] + (size_t)h * maxT * HS;
            const int last = pos[b];
            memcpy(k + (size_t)last * HS, row + C + h * HS, HS * sizeof(float));
            memcpy(v + (size_t)last * HS, row + 2 * C + h * HS, HS * sizeof(float));
            const float* q = row + h * HS;
            LL_FN(att_probs_row)(NQ, p, NULL, q, k, HS, last, last + 1, scale);
            LL_FN(att_pv_rows)(1, out + (size_t)b * C + h * HS, C, p, last + 1, v, last + 1, HS);
        }
    }
    free(p);
    }
}
