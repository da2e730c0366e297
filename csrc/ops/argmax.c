/* Greedy choice. Returns the index of the largest of x [N], the first one on ties; NaN never wins
 * (an all-NaN row gives 0). */
static int LL_FN(argmax)(const float* x, int N) {
    int best = -1;
    for (int i = 0; i < N; i++)
        if (x[i] == x[i] && (best < 0 || x[i] > x[best])) best = i;
    return best < 0 ? 0 : best;
}
