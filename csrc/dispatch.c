/* The public ll_* kernels: each forwards to the table of the SIMD level selected at run time.
 * Selection: the best level this CPU supports, unless ll_select_simd() (LLORCH_SIMD) says otherwise. */
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "llorch.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#define LL_X86 1
#endif

/* Best first. */
static const ll_kernels* const compiled[] = {
#ifdef LL_X86
    &ll_kernels_avx512, &ll_kernels_avx2,
#endif
    &ll_kernels_baseline,
};
#define N_COMPILED ((int)(sizeof compiled / sizeof compiled[0]))

static int cpu_supports(const ll_kernels* k) {
#ifdef LL_X86
    __builtin_cpu_init();
    if (k == &ll_kernels_avx512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (k == &ll_kernels_avx2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return k == &ll_kernels_baseline;
}

static const ll_kernels* selected = NULL;

static const ll_kernels* active(void) {
    if (!selected) ll_select_simd("auto");
    return selected;
}

int ll_select_simd(const char* name) {
    for (int i = 0; i < N_COMPILED; i++) {
        const int wanted = !strcmp(name, "auto") || !strcmp(name, compiled[i]->isa);
        if (wanted && cpu_supports(compiled[i])) { selected = compiled[i]; return 0; }
        if (wanted && strcmp(name, "auto")) return -1;
    }
    return -1;
}

const char* ll_simd_selected(void) { return active()->isa; }

static const char* join_names(char* buf, size_t size, int only_supported) {
    buf[0] = '\0';
    for (int i = 0; i < N_COMPILED; i++) {
        if (only_supported && !cpu_supports(compiled[i])) continue;
        if (buf[0]) strncat(buf, " ", size - strlen(buf) - 1);
        strncat(buf, compiled[i]->isa, size - strlen(buf) - 1);
    }
    return buf;
}

const char* ll_simd_compiled(void) { static char buf[64]; return join_names(buf, sizeof buf, 0); }
const char* ll_simd_supported(void) { static char buf[64]; return join_names(buf, sizeof buf, 1); }

/* Each ll_<name> of LL_OPS calls the selected level's <name>. */
#define LL_RETURN_void
#define LL_RETURN_int return
#define LL_DISPATCH(ret, name, ...) \
    ret ll_##name(LL_PARAMS(__VA_ARGS__)) { LL_RETURN_##ret active()->name(LL_ARGS(__VA_ARGS__)); }
LL_OPS(LL_DISPATCH)
#undef LL_DISPATCH

size_t ll_attention_scratch_floats(int S) { return (size_t)ll_max_threads() * LL_ATT_ROWS * S; }

/* ---- threads and build facts ---- */

void ll_set_num_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

int ll_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int ll_parallel_team_size(void) {
    int team = 1;
#ifdef _OPENMP
    #pragma omp parallel
    {
        #pragma omp single
        team = omp_get_num_threads();
    }
#endif
    return team;
}

int ll_openmp_version(void) {
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}

const char* ll_compiler(void) {
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#else
    return "unknown";
#endif
}
