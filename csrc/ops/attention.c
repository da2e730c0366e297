/* Causal multi-head self-attention over the KV cache.
 * q of token t, head h = qkv [T, 3C] at columns [h*HS, (h+1)*HS); token t sits at position
 * p = start_pos + t and attends to cached positions 0..p of k_cache, v_cache [NH, maxT, HS].
 *   scores [NH, T, S] = q.k / sqrt(HS), -inf where s > p (optional, for tracing; may be NULL)
 *   probs  [NH, T, S] = softmax over s (max subtracted first), exactly 0 where s > p
 *   out    [T, C]     = sum_s probs * v, heads merged back side by side
 * (head, token) pairs are split over threads; each row's reductions run in one order. */
static void LL_FN(attention)(float* out, float* scores, float* probs, const float* qkv,
                             const float* k_cache, const float* v_cache,
                             int T, int C, int NH, int start_pos, int maxT) {
    const int HS = C / NH;
    const int S = start_pos + T;
    const float scale = 1.0f / sqrtf((float)HS);
    #pragma omp parallel for collapse(2) schedule(static)
    for (int h = 0; h < NH; h++) {
        for (int t = 0; t < T; t++) {
            const float* q = qkv + (size_t)t * 3 * C + h * HS;
            const float* k = k_cache + (size_t)h * maxT * HS;
            const float* v = v_cache + (size_t)h * maxT * HS;
            float* p = probs + ((size_t)h * T + t) * S;
            const int last = start_pos + t;

            float maxv = -INFINITY;
            for (int s = 0; s <= last; s++) {
                p[s] = dot(q, k + (size_t)s * HS, HS) * scale;
                if (p[s] > maxv) maxv = p[s];
            }
            if (scores) {
                float* sc = scores + ((size_t)h * T + t) * S;
                for (int s = 0; s <= last; s++) sc[s] = p[s];
                for (int s = last + 1; s < S; s++) sc[s] = -INFINITY;
            }
            float sum = 0.0f;
            for (int s = 0; s <= last; s++) { p[s] = expf(p[s] - maxv); sum += p[s]; }
            const float inv = 1.0f / sum;
            for (int s = 0; s <= last; s++) p[s] *= inv;
            for (int s = last + 1; s < S; s++) p[s] = 0.0f;

            float* o = out + (size_t)t * C + h * HS;
            for (int i = 0; i < HS; i++) o[i] = 0.0f;
            for (int s = 0; s <= last; s++) {
                const float w = p[s];
                const float* vs = v + (size_t)s * HS;
                for (int i = 0; i < HS; i++) o[i] += w * vs[i];
            }
        }
    }
}
