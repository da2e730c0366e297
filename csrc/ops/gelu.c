/* GELU, tanh approximation (GPT-2's "gelu_new"; not the exact erf form).
 * out [N] = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); elements split over threads. */
static void LL_FN(gelu)(float* out, const float* inp, int N) {
    const float k = 0.7978845608028654f;  /* sqrt(2 / pi) */
    #pragma omp parallel for schedule(static) if (N > 16384)
    for (int i = 0; i < N; i++) {
        const float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
    }
}
