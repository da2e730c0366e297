/* The ops for x86-64 CPUs with AVX-512 F/VL/BW/DQ (Skylake-SP, Ice Lake, Zen 4 and later). Empty elsewhere. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define LL_ISA avx512
#define LL_ISA_NAME "avx512"
#define LL_VBYTES 64
#include "isa_ops.h"
#endif
