/* The ops for any CPU: the compiler's default target (SSE2 on x86-64; NEON etc. elsewhere). */
#define LL_ISA baseline
#define LL_ISA_NAME "baseline"
#define LL_VBYTES 16
#include "isa_ops.h"
