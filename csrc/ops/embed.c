/* Token + position embedding.
 * out [T, C] = wte[tokens[t]] [C] + wpe[start_pos + t] [C]; tokens int32 [T], checked by the caller. */
static void LL_FN(embed)(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                         int T, int C, int start_pos) {
    for (int t = 0; t < T; t++) {
        const float* tok = wte + (size_t)tokens[t] * C;
        const float* pos = wpe + (size_t)(start_pos + t) * C;
        float* o = out + (size_t)t * C;
        for (int i = 0; i < C; i++) o[i] = tok[i] + pos[i];
    }
}
