/* Included once by each isa_<level>.c after it has set LL_ISA, LL_VBYTES and its target pragma:
 * compiles every op for that level and publishes them as the table ll_kernels_<level>. */
#include <math.h>
#include <string.h>
#include "kernels.h"

/* The ops' signatures, from the list: each definition below must match its entry. */
#define LL_ISA_DECLARE(ret, name, ...) static ret LL_FN(name)(LL_PARAMS(__VA_ARGS__));
LL_OPS(LL_ISA_DECLARE)
#undef LL_ISA_DECLARE

#include "ops/embed.inc"
#include "ops/layernorm.inc"
#include "ops/linear_packed.inc"
#include "ops/gelu.inc"
#include "ops/residual.inc"
#include "ops/kv_write.inc"
#include "ops/attention.inc"
#include "ops/decode_attention.inc"
#include "ops/argmax.inc"
#include "ops/sampling.inc"

#define LL_ENTRY(ret, name, ...) .name = LL_FN(name),
const ll_kernels LL_CAT(ll_kernels, LL_ISA) = {
    .isa = LL_ISA_NAME,
    LL_OPS(LL_ENTRY)
};
#undef LL_ENTRY
