/* The ops for x86-64 CPUs with AVX2 and FMA (Haswell, Zen and later). Empty elsewhere. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#define LL_ISA avx2
#define LL_ISA_NAME "avx2"
#define LL_VBYTES 32
#include "isa_ops.h"
#endif
