/* LayerNorm over the channel axis, one row per token.
 * inp, out [T, C]; weight, bias [C]. Biased variance (divide by C), eps inside the square root.
 * Two passes (mean, then squared deviations) so large activations do not cancel. Rows split over threads. */
static void LL_FN(layernorm)(float* out, const float* inp, const float* weight, const float* bias,
                             int T, int C, float eps) {
    #pragma omp parallel for schedule(static) if (T > 1)
    for (int t = 0; t < T; t++) {
        const float* x = inp + (size_t)t * C;
        float* o = out + (size_t)t * C;
        vfloat acc = {0};
        int i = 0;
        for (; i + LL_VLEN <= C; i += LL_VLEN) acc += vload(x + i);
        float sum = vsum(acc);
        for (; i < C; i++) sum += x[i];
        const float mean = sum / C;

        vfloat sq = {0};
        const vfloat vmean = vsplat(mean);
        for (i = 0; i + LL_VLEN <= C; i += LL_VLEN) { vfloat d = vload(x + i) - vmean; sq += d * d; }
        float var = vsum(sq);
        for (; i < C; i++) { float d = x[i] - mean; var += d * d; }
        var /= C;

        const float rstd = 1.0f / sqrtf(var + eps);
        for (i = 0; i < C; i++) o[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
    }
}
