/* Append this pass's keys and values to the layer's cache.
 * qkv [T, 3C] holds q | k | v; k and v of token t, head h go to k_cache/v_cache [NH, maxT, HS] at
 * position start_pos + t. The cache is the only state of generation besides the position. */
static void LL_FN(kv_write)(float* k_cache, float* v_cache, const float* qkv,
                            int T, int C, int NH, int start_pos, int maxT) {
    const int HS = C / NH;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < NH; h++) {
            const size_t dst = ((size_t)h * maxT + start_pos + t) * HS;
            memcpy(k_cache + dst, qkv + (size_t)t * 3 * C + C + h * HS, HS * sizeof(float));
            memcpy(v_cache + dst, qkv + (size_t)t * 3 * C + 2 * C + h * HS, HS * sizeof(float));
        }
}
