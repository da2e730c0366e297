/* GELU, tanh approximation (GPT-2's "gelu_new"; not the exact erf form).
 * out [N] = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as x / (1 + exp(-2u)):
 * the same function (1 + tanh(u) = 2 / (1 + exp(-2u))), one vector exp and a divide, and no cancellation
 * for x << 0. Large |x| is safe: exp(-2u) -> +inf gives -0, -> 0 gives x.
 * Elements split over threads in whole vectors; the tail goes through the same vector code (padded), so
 * every element gets the same bits whoever computes it. out may alias inp. */
static inline vfloat LL_FN(gelu_v)(vfloat x) {
    const vfloat u = vsplat(0.7978845608028654f) * (x + vsplat(0.044715f) * x * x * x);
    return x / (vsplat(1.0f) + vexp(vsplat(-2.0f) * u));
}

static void LL_FN(gelu)(float* out, const float* inp, int N) {
    const int nv = N / LL_VLEN;
    #pragma omp parallel for schedule(static) if (N > 16384)
    for (int i = 0; i < nv; i++) vstore(out + (size_t)i * LL_VLEN, LL_FN(gelu_v)(vload(inp + (size_t)i * LL_VLEN)));
    const int rest = N - nv * LL_VLEN;
    if (rest) {
        float buf[LL_VLEN] = {0};
        memcpy(buf, inp + (size_t)nv * LL_VLEN, rest * sizeof(float));
        vstore(buf, LL_FN(gelu_v)(vload(buf)));
        memcpy(out + (size_t)nv * LL_VLEN, buf, rest * sizeof(float));
    }
}
