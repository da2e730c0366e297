/* Residual connection. out [N] = a [N] + b [N]; out may alias a or b. */
static void LL_FN(residual)(float* out, const float* a, const float* b, int N) {
    for (int i = 0; i < N; i++) out[i] = a[i] + b[i];
}
